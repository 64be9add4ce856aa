// Implementation of ldm_native.hpp. Each function names the Python code it mirrors; the ctest
// (test_native.cpp) holds them to values that code produced.
#include "ldm_native.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace ldm {

// ============================================================================ schedules

// ldm_fast.diffusion.linear_betas: linspace in sqrt(beta), squared; then cumprod(1 - beta).
std::vector<double> linear_alphas_cumprod(int timesteps, double linear_start, double linear_end) {
    if (timesteps < 1) throw std::invalid_argument("timesteps must be >= 1");
    const double a = std::sqrt(linear_start), b = std::sqrt(linear_end);
    std::vector<double> out(timesteps);
    double prod = 1.0;
    const double step = timesteps > 1 ? (b - a) / (timesteps - 1) : 0.0;
    for (int i = 0; i < timesteps; ++i) {
        // torch.linspace fills the first half from the start and the second from the end;
        // the same split keeps the endpoints exact.
        const double s = i < timesteps / 2 ? a + step * i : b - step * (timesteps - 1 - i);
        prod *= 1.0 - s * s;
        out[i] = prod;
    }
    return out;
}

// ldm_fast.diffusion.cosine_betas (Nichol & Dhariwal 2021, eq. 17), betas clipped at max_beta.
std::vector<double> cosine_alphas_cumprod(int timesteps, double s, double max_beta) {
    if (timesteps < 1) throw std::invalid_argument("timesteps must be >= 1");
    const double pi = 3.14159265358979323846;
    std::vector<double> f(timesteps + 1);
    for (int i = 0; i <= timesteps; ++i) {
        const double c = std::cos((static_cast<double>(i) / timesteps + s) / (1 + s) * pi / 2);
        f[i] = c * c;
    }
    std::vector<double> out(timesteps);
    double prod = 1.0;
    for (int i = 0; i < timesteps; ++i) {
        const double ac_next = f[i + 1] / f[0], ac = f[i] / f[0];
        const double beta = std::min(std::max(1.0 - ac_next / ac, 0.0), max_beta);
        prod *= 1.0 - beta;
        out[i] = prod;
    }
    return out;
}

// samplers.make_timesteps(spacing="linspace"): torch.linspace(T-1, 0, steps).round().
std::vector<int> linspace_timesteps(int num_timesteps, int steps) {
    if (steps < 1 || steps > num_timesteps) throw std::invalid_argument("steps must be in [1, T]");
    std::vector<int> out(steps);
    const double start = num_timesteps - 1, end = 0.0;
    const double step = steps > 1 ? (end - start) / (steps - 1) : 0.0;
    for (int i = 0; i < steps; ++i) {
        const double v = i < steps / 2 ? start + step * i : end - step * (steps - 1 - i);
        out[i] = static_cast<int>(std::nearbyint(v));  // default rounding: half to even, as torch
    }
    if (steps == 1) out[0] = num_timesteps - 1;
    return out;
}

// ============================================================================ DDIM

Parameterization parse_parameterization(const std::string& name) {
    if (name == "eps") return Parameterization::Eps;
    if (name == "v") return Parameterization::V;
    throw std::invalid_argument("parameterization: expected eps or v, got " + name);
}

// kernels/sampler_steps.py _ddim_sigma.
double ddim_sigma(double a_t, double a_next, double eta) {
    if (eta == 0.0 || a_next >= 1.0) return 0.0;
    return eta * std::sqrt((1 - a_next) / (1 - a_t) * (1 - a_t / a_next));
}

// kernels/sampler_steps.py ddim_step_ref (with _split_guided and _x0_eps).
void ddim_step(const float* x, const float* cond, const float* uncond, float* x_next, std::size_t n,
               double a_t, double a_next, double eta, const float* noise, Parameterization param,
               double guidance) {
    const double alpha = std::sqrt(a_t), sigma = std::sqrt(1 - a_t);
    const double sig_eta = ddim_sigma(a_t, a_next, eta);
    if (sig_eta > 0 && noise == nullptr) throw std::invalid_argument("this DDIM step adds noise: pass noise");
    const double c_x0 = std::sqrt(a_next), c_eps = std::sqrt(std::max(1 - a_next - sig_eta * sig_eta, 0.0));
    for (std::size_t i = 0; i < n; ++i) {
        const double xi = x[i];
        double m = cond[i];
        if (uncond != nullptr) m = uncond[i] + guidance * (m - uncond[i]);
        double x0, eps;
        if (param == Parameterization::Eps) {
            x0 = (xi - sigma * m) / alpha;
            eps = m;
        } else {
            x0 = alpha * xi - sigma * m;
            eps = sigma * xi + alpha * m;
        }
        double v = c_x0 * x0 + c_eps * eps;
        if (sig_eta > 0) v += sig_eta * noise[i];
        x_next[i] = static_cast<float>(v);
    }
}

// ============================================================================ JSON

namespace {

struct Parser {
    const std::string& s;
    std::size_t i = 0;

    [[noreturn]] void fail(const std::string& what) const {
        throw std::runtime_error("JSON: " + what + " at offset " + std::to_string(i));
    }
    void ws() {
        while (i < s.size() && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) ++i;
    }
    bool eat(char c) {
        ws();
        if (i < s.size() && s[i] == c) { ++i; return true; }
        return false;
    }
    void expect(char c) {
        if (!eat(c)) fail(std::string("expected '") + c + "'");
    }
    bool literal(const char* word) {
        std::size_t n = std::char_traits<char>::length(word);
        if (s.compare(i, n, word) == 0) { i += n; return true; }
        return false;
    }

    static void utf8(std::string& out, unsigned cp) {
        if (cp < 0x80) {
            out += static_cast<char>(cp);
        } else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
    }

    unsigned hex4() {
        if (i + 4 > s.size()) fail("truncated \\u escape");
        unsigned v = 0;
        for (int k = 0; k < 4; ++k) {
            char c = s[i++];
            v <<= 4;
            if (c >= '0' && c <= '9') v |= c - '0';
            else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
            else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
            else fail("bad \\u escape");
        }
        return v;
    }

    std::string string() {
        expect('"');
        std::string out;
        while (true) {
            if (i >= s.size()) fail("unterminated string");
            char c = s[i++];
            if (c == '"') return out;
            if (c != '\\') { out += c; continue; }
            if (i >= s.size()) fail("unterminated escape");
            char e = s[i++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    unsigned cp = hex4();
                    if (cp >= 0xD800 && cp < 0xDC00 && s.compare(i, 2, "\\u") == 0) {  // surrogate pair
                        i += 2;
                        unsigned lo = hex4();
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    }
                    utf8(out, cp);
                    break;
                }
                default: fail("bad escape");
            }
        }
    }

    Json value() {
        ws();
        if (i >= s.size()) fail("unexpected end");
        Json j;
        char c = s[i];
        if (c == '{') {
            ++i;
            j.type = Json::Type::Object;
            if (eat('}')) return j;
            do {
                ws();
                std::string key = string();
                expect(':');
                j.object[key] = value();
            } while (eat(','));
            expect('}');
        } else if (c == '[') {
            ++i;
            j.type = Json::Type::Array;
            if (eat(']')) return j;
            do {
                j.array.push_back(value());
            } while (eat(','));
            expect(']');
        } else if (c == '"') {
            j.type = Json::Type::String;
            j.string = string();
        } else if (literal("true")) {
            j.type = Json::Type::Bool;
            j.boolean = true;
        } else if (literal("false")) {
            j.type = Json::Type::Bool;
        } else if (literal("null")) {
        } else if (literal("NaN")) {         // Python's json writes these for non-finite floats
            j.type = Json::Type::Number;
            j.number = std::nan("");
        } else if (literal("Infinity")) {
            j.type = Json::Type::Number;
            j.number = HUGE_VAL;
        } else if (literal("-Infinity")) {
            j.type = Json::Type::Number;
            j.number = -HUGE_VAL;
        } else {
            // strtod parses the shortest round-trip repr Python writes back to the same double.
            const char* begin = s.c_str() + i;
            char* end = nullptr;
            j.number = std::strtod(begin, &end);
            if (end == begin) fail("unexpected character");
            j.type = Json::Type::Number;
            i += static_cast<std::size_t>(end - begin);
        }
        return j;
    }
};

}  // namespace

Json parse_json(const std::string& text) {
    Parser p{text};
    Json j = p.value();
    p.ws();
    if (p.i != text.size()) p.fail("trailing characters");
    return j;
}

bool Json::has(const std::string& key) const { return type == Type::Object && object.count(key) > 0; }

const Json& Json::at(const std::string& key) const {
    if (type != Type::Object) throw std::runtime_error("JSON: not an object when looking up '" + key + "'");
    auto it = object.find(key);
    if (it == object.end()) throw std::runtime_error("JSON: missing key '" + key + "'");
    return it->second;
}

const Json& Json::at(std::size_t index) const {
    if (type != Type::Array || index >= array.size()) throw std::runtime_error("JSON: index out of range");
    return array[index];
}

double Json::num() const {
    if (type != Type::Number) throw std::runtime_error("JSON: expected a number");
    return number;
}

long long Json::integer() const {
    double v = num();
    if (std::floor(v) != v) throw std::runtime_error("JSON: expected an integer");
    return static_cast<long long>(v);
}

const std::string& Json::str() const {
    if (type != Type::String) throw std::runtime_error("JSON: expected a string");
    return string;
}

std::vector<double> Json::numbers() const {
    if (type != Type::Array) throw std::runtime_error("JSON: expected an array of numbers");
    std::vector<double> out;
    out.reserve(array.size());
    for (const Json& v : array) out.push_back(v.num());
    return out;
}

std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot open " + path);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// ============================================================================ sidecar

static std::vector<TensorInfo> tensors(const Json& list) {
    std::vector<TensorInfo> out;
    for (const Json& t : list.array) {
        TensorInfo info{t.at("name").str(), t.at("dtype").str(), {}};
        for (const Json& d : t.at("shape").array)
            info.shape.push_back(d.type == Json::Type::String ? d.str() : std::to_string(d.integer()));
        out.push_back(info);
    }
    return out;
}

// Schema: export/tensorrt_build.py make_sidecar.
Sidecar parse_sidecar(const std::string& text) {
    Json j = parse_json(text);
    Sidecar s;
    s.format = j.at("format").str();
    if (s.format != "ldm_fast-engine/1") throw std::runtime_error("sidecar: unknown format " + s.format);
    s.graph = j.at("graph").str();
    s.tensorrt_version = j.at("tensorrt_version").str();
    const Json& gpu = j.at("gpu");
    s.gpu_name = gpu.at("name").str();
    s.cc_major = static_cast<int>(gpu.at("compute_capability").at(0).integer());
    s.cc_minor = static_cast<int>(gpu.at("compute_capability").at(1).integer());
    const Json& src = j.at("source_onnx").at("sha256");
    s.source_sha256 = src.type == Json::Type::String ? src.str() : "";
    const Json& spec = j.at("spec");
    s.inputs = tensors(spec.at("inputs"));
    s.outputs = tensors(spec.at("outputs"));
    for (const auto& kv : j.at("profiles").at(0).object) {
        std::vector<std::vector<long long>> mmm;
        for (const char* k : {"min", "opt", "max"}) {
            std::vector<long long> dims;
            for (const Json& d : kv.second.at(k).array) dims.push_back(d.integer());
            mmm.push_back(dims);
        }
        s.profile[kv.first] = mmm;
    }
    const Json& model = j.at("model");
    if (model.has("schedule")) {
        s.alphas_cumprod = model.at("schedule").at("alphas_cumprod").numbers();
        s.parameterization = model.at("schedule").at("parameterization").str();
    }
    if (model.has("scale_factor")) s.scale_factor = model.at("scale_factor").num();
    if (model.has("latent_channels")) s.latent_channels = static_cast<int>(model.at("latent_channels").integer());
    if (model.has("factor")) s.factor = static_cast<int>(model.at("factor").integer());
    if (model.has("spatial_multiple")) s.spatial_multiple = static_cast<int>(model.at("spatial_multiple").integer());
    return s;
}

std::string check_sidecar(const Sidecar& s, const std::string& tensorrt_version, const std::string& gpu_name,
                          int cc_major, int cc_minor) {
    std::string problems;
    auto add = [&](const std::string& p) { problems += (problems.empty() ? "" : "; ") + p; };
    if (s.tensorrt_version != tensorrt_version)
        add("TensorRT version: engine built with " + s.tensorrt_version + ", installed " + tensorrt_version);
    if (s.cc_major != cc_major || s.cc_minor != cc_minor)
        add("GPU compute capability: engine built for sm_" + std::to_string(s.cc_major) + std::to_string(s.cc_minor) +
            ", this GPU is sm_" + std::to_string(cc_major) + std::to_string(cc_minor));
    if (s.gpu_name != gpu_name) add("GPU: engine built on '" + s.gpu_name + "', running on '" + gpu_name + "'");
    return problems;
}

// ============================================================================ 16-bit floats

static std::uint32_t bits(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

static float from_bits(std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

std::uint16_t float_to_half(float f) {
    const std::uint32_t u = bits(f);
    const std::uint32_t sign = (u >> 16) & 0x8000u;
    const std::uint32_t abs = u & 0x7FFFFFFFu;
    if (abs >= 0x7F800000u)                                  // inf / nan (nan stays quiet nan)
        return static_cast<std::uint16_t>(sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u : 0u));
    if (abs >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // rounds past 65504
    if (abs < 0x38800000u) {                                 // subnormal half (or zero)
        // Add 0.5 (as a float) so the FPU's own round-to-nearest-even does the rounding.
        const float r = from_bits(abs) + 0.5f;
        return static_cast<std::uint16_t>(sign | (bits(r) - bits(0.5f)));
    }
    std::uint32_t m = abs + 0xC8000FFFu + ((abs >> 13) & 1u);  // rebias exponent, round to even
    return static_cast<std::uint16_t>(sign | (m >> 13));
}

float half_to_float(std::uint16_t h) {
    const std::uint32_t sign = (static_cast<std::uint32_t>(h) & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    if (exp == 0) {                                           // zero / subnormal: man * 2^-24
        const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
        return from_bits(bits(v) | sign);
    }
    if (exp == 31) return from_bits(sign | 0x7F800000u | (man << 13));
    return from_bits(sign | ((exp + 112u) << 23) | (man << 13));
}

std::uint16_t float_to_bf16(float f) {
    const std::uint32_t u = bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // nan
    return static_cast<std::uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

float bf16_to_float(std::uint16_t h) { return from_bits(static_cast<std::uint32_t>(h) << 16); }

// ============================================================================ images

// ldm_fast/images.py to_uint8: ((clamp(x, -1, 1) + 1) * 127.5).round() in float32.
std::uint8_t to_uint8(float v) {
    float c = std::min(std::max(v, -1.0f), 1.0f);
    float y = (c + 1.0f) * 127.5f;
    return static_cast<std::uint8_t>(std::nearbyint(y));
}

std::vector<std::uint8_t> make_grid(const float* images, int b, int h, int w, int nrow, int pad,
                                    int* grid_h, int* grid_w) {
    if (nrow <= 0) nrow = static_cast<int>(std::ceil(std::sqrt(static_cast<double>(b))));
    const int rows = (b + nrow - 1) / nrow;
    const int gh = rows * (h + pad) + pad, gw = nrow * (w + pad) + pad;
    std::vector<std::uint8_t> grid(static_cast<std::size_t>(gh) * gw * 3, 255);
    for (int i = 0; i < b; ++i) {
        const int r = i / nrow, col = i % nrow;
        const int y0 = pad + r * (h + pad), x0 = pad + col * (w + pad);
        for (int c = 0; c < 3; ++c)
            for (int y = 0; y < h; ++y)
                for (int x = 0; x < w; ++x) {
                    float v = images[((static_cast<std::size_t>(i) * 3 + c) * h + y) * w + x];
                    grid[(static_cast<std::size_t>(y0 + y) * gw + (x0 + x)) * 3 + c] = to_uint8(v);
                }
    }
    *grid_h = gh;
    *grid_w = gw;
    return grid;
}

std::uint32_t crc32(const std::uint8_t* data, std::size_t n, std::uint32_t crc) {
    static std::uint32_t table[256];
    static bool ready = false;
    if (!ready) {
        for (std::uint32_t k = 0; k < 256; ++k) {
            std::uint32_t c = k;
            for (int j = 0; j < 8; ++j) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[k] = c;
        }
        ready = true;
    }
    crc = ~crc;
    for (std::size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

std::uint32_t adler32(const std::uint8_t* data, std::size_t n) {
    std::uint32_t a = 1, b = 0;
    for (std::size_t i = 0; i < n; ++i) {
        a = (a + data[i]) % 65521u;
        b = (b + a) % 65521u;
    }
    return (b << 16) | a;
}

static void put32(std::vector<std::uint8_t>& out, std::uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<std::uint8_t>(v >> s));
}

static void chunk(std::ofstream& f, const char* type, const std::vector<std::uint8_t>& data) {
    std::vector<std::uint8_t> buf;
    put32(buf, static_cast<std::uint32_t>(data.size()));
    buf.insert(buf.end(), type, type + 4);
    buf.insert(buf.end(), data.begin(), data.end());
    put32(buf, crc32(buf.data() + 4, buf.size() - 4));  // CRC over type + data
    f.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
}

// PNG with a zlib stream of *stored* (uncompressed) deflate blocks: every decoder reads it,
// and no compression library is needed. Files are ~3 bytes per pixel, which is fine for
// sample grids.
void write_png(const std::string& path, const std::uint8_t* rgb, int width, int height) {
    std::ofstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot write " + path);
    const std::uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
    f.write(reinterpret_cast<const char*>(sig), 8);
    std::vector<std::uint8_t> ihdr;
    put32(ihdr, static_cast<std::uint32_t>(width));
    put32(ihdr, static_cast<std::uint32_t>(height));
    ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // 8-bit, truecolour, deflate, adaptive filter, no interlace
    chunk(f, "IHDR", ihdr);
    std::vector<std::uint8_t> raw;                  // filter byte 0 (None) before each row
    raw.reserve(static_cast<std::size_t>(height) * (width * 3 + 1));
    for (int y = 0; y < height; ++y) {
        raw.push_back(0);
        raw.insert(raw.end(), rgb + static_cast<std::size_t>(y) * width * 3,
                   rgb + static_cast<std::size_t>(y + 1) * width * 3);
    }
    std::vector<std::uint8_t> z = {0x78, 0x01};    // zlib header: deflate, 32K window, no dict
    std::size_t pos = 0;
    do {
        const std::size_t len = std::min<std::size_t>(65535, raw.size() - pos);
        z.push_back(pos + len == raw.size() ? 1 : 0);  // BFINAL, BTYPE = 00 (stored)
        z.push_back(static_cast<std::uint8_t>(len & 0xFF));
        z.push_back(static_cast<std::uint8_t>(len >> 8));
        z.push_back(static_cast<std::uint8_t>(~len & 0xFF));
        z.push_back(static_cast<std::uint8_t>((~len >> 8) & 0xFF));
        z.insert(z.end(), raw.begin() + pos, raw.begin() + pos + len);
        pos += len;
    } while (pos < raw.size());
    put32(z, adler32(raw.data(), raw.size()));
    chunk(f, "IDAT", z);
    chunk(f, "IEND", {});
    if (!f) throw std::runtime_error("error writing " + path);
}

void write_ppm(const std::string& path, const std::uint8_t* rgb, int width, int height) {
    std::ofstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot write " + path);
    f << "P6\n" << width << " " << height << "\n255\n";
    f.write(reinterpret_cast<const char*>(rgb), static_cast<std::streamsize>(width) * height * 3);
}

}  // namespace ldm
