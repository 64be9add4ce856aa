// ctest driver: the portable native code against fixture.json (values from the Python
// implementation, written by make_fixture.py).
//
//   test_native FIXTURE.json [OUT.png]
//
// Checks schedules, timestep grids, single DDIM steps, whole DDIM loops, the image grid, the
// PNG checksums, the sidecar parser and the sidecar check; writes the fixture's grid as OUT.png
// (tests/test_native.py decodes it with Pillow). Prints one line per failure, exits 1 if any.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "ldm_native.hpp"

namespace {

int failures = 0;

void fail(const std::string& what) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
}

bool close(double got, double want, double rtol, double atol) {
    return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

std::vector<float> floats(const ldm::Json& j) {
    std::vector<float> out;
    for (double v : j.numbers()) out.push_back(static_cast<float>(v));
    return out;
}

void test_schedules(const ldm::Json& cases) {
    for (const ldm::Json& c : cases.array) {
        const std::string kind = c.at("kind").str();
        const int T = static_cast<int>(c.at("timesteps").integer());
        std::vector<double> ac = kind == "linear"
            ? ldm::linear_alphas_cumprod(T, c.at("linear_start").num(), c.at("linear_end").num())
            : ldm::cosine_alphas_cumprod(T);
        const ldm::Json& idx = c.at("index");
        std::vector<double> want = c.at("alphas_cumprod").numbers();
        for (std::size_t k = 0; k < want.size(); ++k) {
            long long i = idx.at(k).integer();
            // float64 on both sides; only summation-order ulps may differ.
            if (!close(ac[i], want[k], 1e-12, 1e-300))
                fail(kind + " schedule T=" + std::to_string(T) + " ac[" + std::to_string(i) + "] = " +
                     std::to_string(ac[i]) + ", Python " + std::to_string(want[k]));
        }
    }
}

void test_timesteps(const ldm::Json& cases) {
    for (const ldm::Json& c : cases.array) {
        const int T = static_cast<int>(c.at("T").integer()), steps = static_cast<int>(c.at("steps").integer());
        std::vector<int> ts = ldm::linspace_timesteps(T, steps);
        const ldm::Json& want = c.at("ts");
        if (ts.size() != want.array.size()) {
            fail("timesteps T=" + std::to_string(T) + " steps=" + std::to_string(steps) + ": wrong count");
            continue;
        }
        for (std::size_t i = 0; i < ts.size(); ++i)
            if (ts[i] != want.at(i).integer())
                fail("timesteps T=" + std::to_string(T) + " steps=" + std::to_string(steps) + " [" +
                     std::to_string(i) + "] = " + std::to_string(ts[i]) + ", Python " +
                     std::to_string(want.at(i).integer()));
    }
}

void test_ddim(const ldm::Json& cases) {
    int k = 0;
    for (const ldm::Json& c : cases.array) {
        std::vector<float> x = floats(c.at("x")), cond = floats(c.at("cond")), uncond, noise;
        if (c.at("uncond").type != ldm::Json::Type::Null) uncond = floats(c.at("uncond"));
        if (c.at("noise").type != ldm::Json::Type::Null) noise = floats(c.at("noise"));
        std::vector<float> out(x.size());
        ldm::ddim_step(x.data(), cond.data(), uncond.empty() ? nullptr : uncond.data(), out.data(), x.size(),
                       c.at("a_t").num(), c.at("a_next").num(), c.at("eta").num(),
                       noise.empty() ? nullptr : noise.data(), ldm::parse_parameterization(c.at("param").str()),
                       c.at("guidance").num());
        std::vector<double> want = c.at("expected").numbers();
        for (std::size_t i = 0; i < x.size(); ++i)
            if (!close(out[i], want[i], 1e-6, 1e-6))   // float32 result of a float64 computation
                fail("ddim case " + std::to_string(k) + " (" + c.at("param").str() + ") [" + std::to_string(i) +
                     "] = " + std::to_string(out[i]) + ", Python " + std::to_string(want[i]));
        ++k;
    }
}

void test_ddim_loops(const ldm::Json& cases) {
    const std::vector<double> ac = ldm::linear_alphas_cumprod(1000, 0.0015, 0.0195);
    for (const ldm::Json& c : cases.array) {
        const int steps = static_cast<int>(c.at("steps").integer());
        const double k = c.at("k").num();
        const ldm::Parameterization p = ldm::parse_parameterization(c.at("param").str());
        std::vector<float> x = floats(c.at("x")), m(x.size()), next(x.size());
        std::vector<int> ts = ldm::linspace_timesteps(1000, steps);
        for (std::size_t i = 0; i < ts.size(); ++i) {
            const double a = ac[ts[i]], a_next = i + 1 < ts.size() ? ac[ts[i + 1]] : 1.0;
            for (std::size_t j = 0; j < x.size(); ++j) m[j] = static_cast<float>(k * x[j]);
            ldm::ddim_step(x.data(), m.data(), nullptr, next.data(), x.size(), a, a_next, 0.0, nullptr, p, 1.0);
            x.swap(next);
        }
        std::vector<double> want = c.at("expected").numbers();
        for (std::size_t j = 0; j < x.size(); ++j)
            // Python runs the loop in float64, this one stores float32 between steps.
            if (!close(x[j], want[j], 1e-5, 1e-5))
                fail("ddim loop " + c.at("param").str() + " steps=" + std::to_string(steps) + " [" +
                     std::to_string(j) + "] = " + std::to_string(x[j]) + ", Python " + std::to_string(want[j]));
    }
}

void test_grid(const ldm::Json& g, const std::string& png) {
    const int b = static_cast<int>(g.at("b").integer()), h = static_cast<int>(g.at("h").integer());
    const int w = static_cast<int>(g.at("w").integer()), pad = static_cast<int>(g.at("pad").integer());
    std::vector<float> images = floats(g.at("images"));
    int gh = 0, gw = 0;
    std::vector<std::uint8_t> grid = ldm::make_grid(images.data(), b, h, w, 0, pad, &gh, &gw);
    if (gh != g.at("grid_h").integer() || gw != g.at("grid_w").integer()) fail("grid size");
    const ldm::Json& want = g.at("expected");
    if (grid.size() != want.array.size()) {
        fail("grid byte count");
        return;
    }
    int bad = 0;
    for (std::size_t i = 0; i < grid.size(); ++i)
        if (grid[i] != want.at(i).integer()) ++bad;
    if (bad) fail("grid: " + std::to_string(bad) + " bytes differ from ldm_fast.images.make_grid");
    if (!png.empty()) ldm::write_png(png, grid.data(), gw, gh);
}

void test_checksums(const ldm::Json& c) {
    std::vector<std::uint8_t> data;
    for (const ldm::Json& v : c.at("data").array) data.push_back(static_cast<std::uint8_t>(v.integer()));
    if (ldm::crc32(data.data(), data.size()) != static_cast<std::uint32_t>(c.at("crc32").integer()))
        fail("crc32 differs from zlib.crc32");
    if (ldm::adler32(data.data(), data.size()) != static_cast<std::uint32_t>(c.at("adler32").integer()))
        fail("adler32 differs from zlib.adler32");
}

void test_halves(const ldm::Json& c) {
    std::vector<double> values = c.at("values").numbers();
    for (std::size_t i = 0; i < values.size(); ++i) {
        const float v = static_cast<float>(values[i]);
        const auto half = static_cast<std::uint16_t>(c.at("half").at(i).integer());
        const auto bf = static_cast<std::uint16_t>(c.at("bf16").at(i).integer());
        if (ldm::float_to_half(v) != half)
            fail("float_to_half(" + std::to_string(v) + ") = " + std::to_string(ldm::float_to_half(v)) +
                 ", numpy " + std::to_string(half));
        if (ldm::float_to_bf16(v) != bf)
            fail("float_to_bf16(" + std::to_string(v) + ") = " + std::to_string(ldm::float_to_bf16(v)) +
                 ", torch " + std::to_string(bf));
        // Back again: a half/bf16 value converts to float exactly and rounds back to itself.
        if (ldm::float_to_half(ldm::half_to_float(half)) != half) fail("half round trip " + std::to_string(half));
        if (ldm::float_to_bf16(ldm::bf16_to_float(bf)) != bf) fail("bf16 round trip " + std::to_string(bf));
    }
}

void test_sidecar(const ldm::Json& side, const std::string& dir) {
    // The sidecar file as tensorrt_build.py writes it (json.dumps, indent=1), parsed as the
    // runner parses an engine's sidecar.
    const std::string text = ldm::read_file(dir + "/" + side.at("file").str());
    ldm::Sidecar s = ldm::parse_sidecar(text);
    if (s.tensorrt_version != "10.13.0.35") fail("sidecar tensorrt_version");
    if (s.gpu_name != "NVIDIA H100 80GB HBM3" || s.cc_major != 9 || s.cc_minor != 0) fail("sidecar gpu");
    if (s.graph != "unet" || s.parameterization != "eps") fail("sidecar graph/parameterization");
    if (s.latent_channels != 3 || s.factor != 4 || s.spatial_multiple != 8) fail("sidecar model facts");
    if (!close(s.scale_factor, 0.18215, 0, 0)) fail("sidecar scale_factor");
    std::vector<double> want = side.at("alphas_cumprod").numbers();
    if (s.alphas_cumprod != want) fail("sidecar alphas_cumprod not bit-identical");
    std::vector<double> ours = ldm::linear_alphas_cumprod(10, 0.01, 0.2);
    for (std::size_t i = 0; i < ours.size(); ++i)
        if (!close(ours[i], want[i], 1e-12, 0)) fail("sidecar schedule vs linear_alphas_cumprod");
    std::vector<std::string> names;
    for (const auto& t : s.inputs) names.push_back(t.name);
    std::vector<std::string> want_names;
    for (const ldm::Json& n : side.at("inputs").array) want_names.push_back(n.str());
    if (names != want_names) fail("sidecar input names");
    auto it = s.profile.find("latent");
    if (it == s.profile.end() || it->second.size() != 3 || it->second[0] != std::vector<long long>{1, 3, 32, 32} ||
        it->second[2] != std::vector<long long>{8, 3, 96, 128})
        fail("sidecar latent profile");
    if (s.inputs.empty() || s.inputs[0].shape != std::vector<std::string>{"batch", "3", "height", "width"})
        fail("sidecar latent shape");
    for (const ldm::Json& c : side.at("checks").array) {
        std::string msg = ldm::check_sidecar(s, c.at("trt").str(), c.at("gpu").str(),
                                             static_cast<int>(c.at("cc").at(0).integer()),
                                             static_cast<int>(c.at("cc").at(1).integer()));
        const ldm::Json& mentions = c.at("mentions");
        if (mentions.array.empty() && !msg.empty()) fail("sidecar check: unexpected mismatch: " + msg);
        if (!mentions.array.empty() && msg.empty()) fail("sidecar check: mismatch not reported");
        for (const ldm::Json& m : mentions.array)
            if (msg.find(m.str()) == std::string::npos) fail("sidecar check message lacks '" + m.str() + "': " + msg);
    }
    const std::string note = ldm::parse_json(text).at("note").str();
    if (note.find("\xc3\xa9") == std::string::npos || note.find("\xf0\x9f\x98\x80") == std::string::npos ||
        note.find("\"quoted\"") == std::string::npos)
        fail("JSON string escapes (\\u, surrogate pairs, quotes)");
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s FIXTURE.json [OUT.png]\n", argv[0]);
        return 2;
    }
    try {
        const std::string text = ldm::read_file(argv[1]);
        const ldm::Json fx = ldm::parse_json(text);
        test_schedules(fx.at("schedules"));
        test_timesteps(fx.at("timesteps"));
        test_ddim(fx.at("ddim"));
        test_ddim_loops(fx.at("ddim_loops"));
        test_grid(fx.at("grid"), argc > 2 ? argv[2] : "");
        test_checksums(fx.at("checksums"));
        test_halves(fx.at("halves"));
        std::string dir = argv[1];
        const std::size_t slash = dir.find_last_of('/');
        dir = slash == std::string::npos ? "." : dir.substr(0, slash);
        test_sidecar(fx.at("sidecar"), dir);
        bool threw = false;
        try {
            ldm::parse_json("{\"a\": [1, 2,, 3]}");
        } catch (const std::runtime_error&) {
            threw = true;
        }
        if (!threw) fail("malformed JSON accepted");
    } catch (const std::exception& e) {
        std::printf("FAIL exception: %s\n", e.what());
        return 1;
    }
    if (failures) {
        std::printf("%d failure(s)\n", failures);
        return 1;
    }
    std::printf("all native checks passed\n");
    return 0;
}
