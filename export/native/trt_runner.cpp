// ldm_trt_runner: sample images from exported TensorRT engines without Python.
//
//   ldm_trt_runner --engine-dir DIR [--n 4] [--steps 25] [--seed 0] [--eta 0] [--guidance G]
//                  [--class ID] [--size H W] [--out grid.png]
//
// Reads DIR/engines/{unet,decoder}.plan (+ cond_encoder.plan for cross-attention class
// models) and their JSON sidecars. Each sidecar is checked against the linked TensorRT
// library and the current GPU BEFORE the engine is deserialised (same rules as
// export/trt_runtime.py). Then the DDIM loop of ldm_fast.samplers.sample_ddim runs with the
// schedule and parameterization recorded in the UNet's sidecar: UNet on the GPU (batch doubled
// to [uncond; cond] under classifier-free guidance, captured once into a CUDA graph and
// replayed every step), the DDIM update on the host with ldm::ddim_step (the same code the
// ctest checks against Python), then the decoder and a PNG grid.
//
// Supported conditioning: none, class ids through the UNet's class_labels input ("adm"), or
// class ids through the cond_encoder engine ("crossattn"; the null class is num_classes, read
// from the UNet sidecar's spec). Text and layout need their tokenizers: use the Python runtime.
// The noise comes from std::mt19937_64, so images differ from the Python backends' for the
// same seed (torch's generator is not reproduced here).
//
// Built only when CMake finds TensorRT and CUDA. Not compiled or run in the development
// environment of this project (no TensorRT there).
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "ldm_native.hpp"

namespace {

#define CUDA_CHECK(call)                                                                        \
    do {                                                                                        \
        cudaError_t err_ = (call);                                                              \
        if (err_ != cudaSuccess)                                                                \
            throw std::runtime_error(std::string(#call) + ": " + cudaGetErrorString(err_));     \
    } while (0)

class Logger : public nvinfer1::ILogger {
    void log(Severity severity, const char* msg) noexcept override {
        if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", msg);
    }
};

Logger g_logger;

std::string runtime_trt_version() {
    // getInferLibVersion(): major * 10000 + minor * 100 + patch (TensorRT >= 10).
    const int v = getInferLibVersion();
    return std::to_string(v / 10000) + "." + std::to_string((v / 100) % 100) + "." + std::to_string(v % 100);
}

std::string first_three(const std::string& version) {   // "10.13.0.35" -> "10.13.0"
    std::size_t pos = 0;
    for (int k = 0; k < 3 && pos != std::string::npos; ++k) pos = version.find('.', pos + (k ? 1 : 0));
    return pos == std::string::npos ? version : version.substr(0, pos);
}

struct DeviceBuffer {
    void* ptr = nullptr;
    std::size_t bytes = 0;
    void resize(std::size_t n) {
        if (n <= bytes) return;
        if (ptr) cudaFree(ptr);
        CUDA_CHECK(cudaMalloc(&ptr, n));
        bytes = n;
    }
    ~DeviceBuffer() {
        if (ptr) cudaFree(ptr);
    }
};

std::size_t element_size(nvinfer1::DataType t) {
    switch (t) {
        case nvinfer1::DataType::kFLOAT: return 4;
        case nvinfer1::DataType::kHALF: return 2;
        case nvinfer1::DataType::kBF16: return 2;
        case nvinfer1::DataType::kINT32: return 4;
        case nvinfer1::DataType::kINT64: return 8;
        default: throw std::runtime_error("unsupported engine tensor type");
    }
}

// One engine: sidecar-checked load, named device buffers, optional CUDA-graph replay.
class Engine {
public:
    Engine(const std::string& path, cudaStream_t stream) : stream_(stream) {
        sidecar_ = ldm::parse_sidecar(ldm::read_file(path + ".json"));
        int dev = 0;
        cudaDeviceProp prop{};
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
        ldm::Sidecar cmp = sidecar_;
        cmp.tensorrt_version = first_three(sidecar_.tensorrt_version);  // the library reports 3 parts
        const std::string problems =
            ldm::check_sidecar(cmp, runtime_trt_version(), prop.name, prop.major, prop.minor);
        if (!problems.empty())  // before deserialising: a foreign engine must not be loaded at all
            throw std::runtime_error(path + ": " + problems + ". Rebuild the engine on this machine.");
        const std::string blob = ldm::read_file(path);
        runtime_.reset(nvinfer1::createInferRuntime(g_logger));
        engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
        if (!engine_) throw std::runtime_error(path + ": deserialisation failed");
        context_.reset(engine_->createExecutionContext());
        for (int i = 0; i < engine_->getNbIOTensors(); ++i) {
            const char* name = engine_->getIOTensorName(i);
            (engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT ? inputs_ : outputs_).push_back(name);
        }
    }

    const ldm::Sidecar& sidecar() const { return sidecar_; }
    bool has_input(const std::string& n) const {
        for (const auto& s : inputs_) if (s == n) return true;
        return false;
    }
    nvinfer1::DataType dtype(const std::string& n) const { return engine_->getTensorDataType(n.c_str()); }

    // Set one input's shape and host data (float values converted to the engine's type).
    void set_input(const std::string& name, const std::vector<long long>& shape, const std::vector<float>& values) {
        host_in(name, shape, values.size());
        std::vector<unsigned char> raw(values.size() * element_size(dtype(name)));
        const nvinfer1::DataType t = dtype(name);
        for (std::size_t i = 0; i < values.size(); ++i) {
            if (t == nvinfer1::DataType::kFLOAT) std::memcpy(&raw[i * 4], &values[i], 4);
            else if (t == nvinfer1::DataType::kHALF) { auto h = ldm::float_to_half(values[i]); std::memcpy(&raw[i * 2], &h, 2); }
            else if (t == nvinfer1::DataType::kBF16) { auto h = ldm::float_to_bf16(values[i]); std::memcpy(&raw[i * 2], &h, 2); }
            else throw std::runtime_error(name + ": expected a float input");
        }
        upload(name, raw);
    }

    void set_input_ids(const std::string& name, const std::vector<long long>& ids) {
        host_in(name, {static_cast<long long>(ids.size())}, ids.size());
        std::vector<unsigned char> raw(ids.size() * element_size(dtype(name)));
        for (std::size_t i = 0; i < ids.size(); ++i) {
            if (dtype(name) == nvinfer1::DataType::kINT64) std::memcpy(&raw[i * 8], &ids[i], 8);
            else { int v = static_cast<int>(ids[i]); std::memcpy(&raw[i * 4], &v, 4); }
        }
        upload(name, raw);
    }

    // Keep a device tensor from another engine's output as this input (no host round trip).
    void set_input_device(const std::string& name, const nvinfer1::Dims& dims, const void* src, std::size_t bytes) {
        if (!context_->setInputShape(name.c_str(), dims)) throw std::runtime_error(name + ": shape outside the profile");
        buffers_[name].resize(bytes);
        CUDA_CHECK(cudaMemcpyAsync(buffers_[name].ptr, src, bytes, cudaMemcpyDeviceToDevice, stream_));
        shapes_changed_ = true;
    }

    // Run once; with `graph`, the first run for the current shapes is followed by a capture
    // and later runs replay it (TensorRT must do its shape set-up outside the capture).
    void run(bool graph) {
        for (const auto& n : outputs_) {
            const nvinfer1::Dims d = context_->getTensorShape(n.c_str());
            std::size_t count = 1;
            for (int k = 0; k < d.nbDims; ++k) count *= static_cast<std::size_t>(d.d[k]);
            std::size_t before = buffers_[n].bytes;
            buffers_[n].resize(count * element_size(dtype(n)));
            if (buffers_[n].bytes != before) shapes_changed_ = true;
        }
        if (shapes_changed_ && exec_) {
            cudaGraphExecDestroy(exec_);
            exec_ = nullptr;
        }
        for (auto& kv : buffers_) context_->setTensorAddress(kv.first.c_str(), kv.second.ptr);
        if (exec_) {
            CUDA_CHECK(cudaGraphLaunch(exec_, stream_));
        } else {
            if (!context_->enqueueV3(stream_)) throw std::runtime_error("enqueueV3 failed");
            if (graph) {
                cudaGraph_t g = nullptr;
                CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
                const bool ok = context_->enqueueV3(stream_);
                CUDA_CHECK(cudaStreamEndCapture(stream_, &g));
                if (!ok) throw std::runtime_error("enqueueV3 failed during capture");
                CUDA_CHECK(cudaGraphInstantiateWithFlags(&exec_, g, 0));
                cudaGraphDestroy(g);
            }
        }
        shapes_changed_ = false;
    }

    // The first output as floats, and its shape.
    std::vector<float> output(std::vector<long long>* shape) {
        const std::string& n = outputs_.at(0);
        const nvinfer1::Dims d = context_->getTensorShape(n.c_str());
        std::size_t count = 1;
        shape->clear();
        for (int k = 0; k < d.nbDims; ++k) {
            count *= static_cast<std::size_t>(d.d[k]);
            shape->push_back(d.d[k]);
        }
        std::vector<unsigned char> raw(count * element_size(dtype(n)));
        CUDA_CHECK(cudaMemcpyAsync(raw.data(), buffers_[n].ptr, raw.size(), cudaMemcpyDeviceToHost, stream_));
        CUDA_CHECK(cudaStreamSynchronize(stream_));
        std::vector<float> out(count);
        const nvinfer1::DataType t = dtype(n);
        for (std::size_t i = 0; i < count; ++i) {
            if (t == nvinfer1::DataType::kFLOAT) std::memcpy(&out[i], &raw[i * 4], 4);
            else {
                std::uint16_t h;
                std::memcpy(&h, &raw[i * 2], 2);
                out[i] = t == nvinfer1::DataType::kHALF ? ldm::half_to_float(h) : ldm::bf16_to_float(h);
            }
        }
        return out;
    }

    const void* output_device(nvinfer1::Dims* dims, std::size_t* bytes) {
        const std::string& n = outputs_.at(0);
        *dims = context_->getTensorShape(n.c_str());
        *bytes = buffers_[n].bytes;
        return buffers_[n].ptr;
    }

    ~Engine() {
        if (exec_) cudaGraphExecDestroy(exec_);
    }

private:
    void host_in(const std::string& name, const std::vector<long long>& shape, std::size_t count) {
        nvinfer1::Dims d{};
        d.nbDims = static_cast<int>(shape.size());
        std::size_t n = 1;
        for (std::size_t k = 0; k < shape.size(); ++k) {
            d.d[k] = shape[k];
            n *= static_cast<std::size_t>(shape[k]);
        }
        if (n != count) throw std::runtime_error(name + ": value count does not match its shape");
        auto it = last_shape_.find(name);
        if (it == last_shape_.end() || it->second != shape) {
            if (!context_->setInputShape(name.c_str(), d))
                throw std::runtime_error(name + ": shape outside the engine's optimization profile");
            last_shape_[name] = shape;
            shapes_changed_ = true;
        }
    }

    void upload(const std::string& name, const std::vector<unsigned char>& raw) {
        std::size_t before = buffers_[name].bytes;
        buffers_[name].resize(raw.size());
        if (buffers_[name].bytes != before) shapes_changed_ = true;
        // Pageable memcpy: synchronous w.r.t. the host data, ordered on the stream.
        CUDA_CHECK(cudaMemcpyAsync(buffers_[name].ptr, raw.data(), raw.size(), cudaMemcpyHostToDevice, stream_));
        CUDA_CHECK(cudaStreamSynchronize(stream_));
    }

    cudaStream_t stream_;
    ldm::Sidecar sidecar_;
    std::unique_ptr<nvinfer1::IRuntime> runtime_;
    std::unique_ptr<nvinfer1::ICudaEngine> engine_;
    std::unique_ptr<nvinfer1::IExecutionContext> context_;
    std::vector<std::string> inputs_, outputs_;
    std::map<std::string, DeviceBuffer> buffers_;
    std::map<std::string, std::vector<long long>> last_shape_;
    cudaGraphExec_t exec_ = nullptr;
    bool shapes_changed_ = true;
};

struct Args {
    std::string dir, out = "grid.png";
    int n = 4, steps = 25, h = 0, w = 0;
    unsigned long long seed = 0;
    double eta = 0.0, guidance = 1.0;
    long long cls = -1;
};

Args parse(int argc, char** argv) {
    Args a;
    for (int i = 1; i < argc; ++i) {
        std::string k = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) throw std::runtime_error(k + " needs a value");
            return argv[++i];
        };
        if (k == "--engine-dir") a.dir = next();
        else if (k == "--out") a.out = next();
        else if (k == "--n") a.n = std::stoi(next());
        else if (k == "--steps") a.steps = std::stoi(next());
        else if (k == "--seed") a.seed = std::stoull(next());
        else if (k == "--eta") a.eta = std::stod(next());
        else if (k == "--guidance") a.guidance = std::stod(next());
        else if (k == "--class") a.cls = std::stoll(next());
        else if (k == "--size") { a.h = std::stoi(next()); a.w = std::stoi(next()); }
        else throw std::runtime_error("unknown argument " + k);
    }
    if (a.dir.empty()) throw std::runtime_error("--engine-dir is required");
    if (a.n < 1 || a.steps < 1) throw std::runtime_error("--n and --steps must be positive");
    return a;
}

int run(const Args& a) {
    cudaStream_t stream;
    CUDA_CHECK(cudaStreamCreate(&stream));
    Engine unet(a.dir + "/engines/unet.plan", stream);
    Engine decoder(a.dir + "/engines/decoder.plan", stream);
    const ldm::Sidecar& s = unet.sidecar();
    if (s.alphas_cumprod.empty()) throw std::runtime_error("unet sidecar has no schedule");
    const ldm::Parameterization param = ldm::parse_parameterization(s.parameterization);
    const int T = static_cast<int>(s.alphas_cumprod.size());
    const int c = s.latent_channels;
    // Latent size: --size, else the profile's opt shape for the latent input.
    const auto& prof = s.profile.at("latent");
    const long long h = a.h ? a.h : prof[1][2], w = a.w ? a.w : prof[1][3];
    if (h % s.spatial_multiple || w % s.spatial_multiple)
        throw std::runtime_error("latent size must be a multiple of " + std::to_string(s.spatial_multiple));

    const bool has_ctx = unet.has_input("context"), has_cls = unet.has_input("class_labels");
    if (unet.has_input("concat")) throw std::runtime_error("concat-conditioned UNets need the Python runtime");
    std::unique_ptr<Engine> cond;
    if (has_ctx) {
        const std::string path = a.dir + "/engines/cond_encoder.plan";
        cond = std::make_unique<Engine>(path, stream);
        if (!cond->has_input("class_labels"))
            throw std::runtime_error("the conditioning encoder takes tokens (text/layout): use the Python runtime");
    }
    const bool conditional = has_ctx || has_cls;
    if (conditional && a.cls < 0) throw std::runtime_error("this model is class-conditional: pass --class ID");
    // The null class (classifier-free guidance) is the last embedding row: num_classes. Read
    // from the manifest written next to the engines.
    long long null_id = -1;
    if (conditional) {
        ldm::Json m = ldm::parse_json(ldm::read_file(a.dir + "/manifest.json"));
        null_id = m.at("conditioning").at("num_classes").integer();
        if (a.cls >= null_id) throw std::runtime_error("--class must be < " + std::to_string(null_id));
    }
    const bool guided = conditional && a.guidance != 1.0;
    const long long b = a.n, bb = guided ? 2 * b : b;

    std::vector<long long> ids;  // [uncond; cond] under guidance, as the Python samplers
    for (long long i = 0; i < bb; ++i) ids.push_back(guided && i < b ? null_id : a.cls);
    if (has_ctx) {
        cond->set_input_ids("class_labels", ids);
        cond->run(false);
        nvinfer1::Dims d;
        std::size_t bytes = 0;
        const void* ptr = cond->output_device(&d, &bytes);
        unet.set_input_device("context", d, ptr, bytes);
    } else if (has_cls) {
        unet.set_input_ids("class_labels", ids);
    }

    std::mt19937_64 rng(a.seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const std::size_t n = static_cast<std::size_t>(b) * c * h * w;
    std::vector<float> x(n), x_in, next(n), noise(n);
    for (float& v : x) v = normal(rng);
    const std::vector<int> ts = ldm::linspace_timesteps(T, a.steps);
    std::vector<long long> shape;
    for (std::size_t i = 0; i < ts.size(); ++i) {
        const double a_t = s.alphas_cumprod[ts[i]];
        const double a_next = i + 1 < ts.size() ? s.alphas_cumprod[ts[i + 1]] : 1.0;
        x_in = x;
        if (guided) x_in.insert(x_in.end(), x.begin(), x.end());
        unet.set_input("latent", {bb, c, h, w}, x_in);
        unet.set_input("timestep", {bb}, std::vector<float>(static_cast<std::size_t>(bb), static_cast<float>(ts[i])));
        unet.run(true);  // static shapes across steps: captured once, replayed after
        std::vector<float> out = unet.output(&shape);
        const float* cond_out = guided ? out.data() + n : out.data();
        const float* uncond_out = guided ? out.data() : nullptr;
        const bool stochastic = ldm::ddim_sigma(a_t, a_next, a.eta) > 0;
        if (stochastic)
            for (float& v : noise) v = normal(rng);
        ldm::ddim_step(x.data(), cond_out, uncond_out, next.data(), n, a_t, a_next, a.eta,
                       stochastic ? noise.data() : nullptr, param, a.guidance);
        x.swap(next);
    }
    decoder.set_input("latent", {b, c, h, w}, x);
    decoder.run(false);
    std::vector<float> img = decoder.output(&shape);  // (b, 3, H, W)
    int gh = 0, gw = 0;
    std::vector<std::uint8_t> grid = ldm::make_grid(img.data(), static_cast<int>(shape[0]),
                                                    static_cast<int>(shape[2]), static_cast<int>(shape[3]),
                                                    0, 2, &gh, &gw);
    if (a.out.size() > 4 && a.out.substr(a.out.size() - 4) == ".ppm") ldm::write_ppm(a.out, grid.data(), gw, gh);
    else ldm::write_png(a.out, grid.data(), gw, gh);
    std::printf("wrote %d images (%lldx%lld latents, %d DDIM steps) to %s\n", a.n, h, w, a.steps, a.out.c_str());
    cudaStreamDestroy(stream);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(parse(argc, argv));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
