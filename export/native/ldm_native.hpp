// ldm_native: the portable half of the native runner — no dependencies beyond C++17.
//
// What a runner needs besides the engines themselves, written so that it can be built and
// tested on any machine (the ctest compares it with values the Python implementation wrote,
// see make_fixture.py):
//   - schedules (linear-in-sqrt(beta) and cosine, in double, as ldm_fast.diffusion) and the
//     sampler's timestep grid (samplers.make_timesteps, "linspace" spacing);
//   - the DDIM update with classifier-free guidance, eps or v prediction (kernels/
//     sampler_steps.py ddim_step_ref), in double per element;
//   - a small JSON parser and the engine sidecar schema written by export/tensorrt_build.py,
//     with the same TensorRT-version / GPU check as export/trt_runtime.py;
//   - images: [-1, 1] floats to the uint8 grid of ldm_fast/images.py, written as PNG (stored
//     deflate blocks: valid PNG without zlib) or PPM.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace ldm {

// ---------------------------------------------------------------------------- schedules

std::vector<double> linear_alphas_cumprod(int timesteps, double linear_start, double linear_end);
std::vector<double> cosine_alphas_cumprod(int timesteps, double s = 0.008, double max_beta = 0.999);
// `steps` timesteps evenly from T-1 down to 0, rounded half to even (torch.linspace + round).
std::vector<int> linspace_timesteps(int num_timesteps, int steps);

// ---------------------------------------------------------------------------- DDIM

enum class Parameterization { Eps, V };
Parameterization parse_parameterization(const std::string& name);

// One DDIM step (Song et al. 2021, eq. 12) for n elements: alpha-bar a_t -> a_next (1.0 =
// clean). `uncond` may be null (no guidance); otherwise m = u + guidance * (c - u). `noise` is
// needed only when the step is stochastic (eta > 0 and a_next < 1).
void ddim_step(const float* x, const float* cond, const float* uncond, float* x_next, std::size_t n,
               double a_t, double a_next, double eta, const float* noise, Parameterization param,
               double guidance);
double ddim_sigma(double a_t, double a_next, double eta);

// ---------------------------------------------------------------------------- JSON

struct Json {
    enum class Type { Null, Bool, Number, String, Array, Object };
    Type type = Type::Null;
    bool boolean = false;
    double number = 0.0;
    std::string string;
    std::vector<Json> array;
    std::map<std::string, Json> object;

    bool has(const std::string& key) const;
    const Json& at(const std::string& key) const;   // throws std::runtime_error naming the key
    const Json& at(std::size_t index) const;
    double num() const;
    long long integer() const;                      // throws unless an exact integer
    const std::string& str() const;
    std::vector<double> numbers() const;
};

Json parse_json(const std::string& text);           // throws std::runtime_error with the offset
std::string read_file(const std::string& path);

// ---------------------------------------------------------------------------- sidecar

struct TensorInfo {
    std::string name, dtype;
    std::vector<std::string> shape;                 // ints as decimal text, or axis names
};

struct Sidecar {
    std::string format, graph, tensorrt_version, gpu_name, parameterization, source_sha256;
    int cc_major = 0, cc_minor = 0;
    double scale_factor = 1.0;
    int latent_channels = 0, factor = 1, spatial_multiple = 1;
    std::vector<double> alphas_cumprod;             // empty when the sidecar has no model facts
    std::vector<TensorInfo> inputs, outputs;
    std::map<std::string, std::vector<std::vector<long long>>> profile;  // name -> min, opt, max
};

Sidecar parse_sidecar(const std::string& text);
// Empty when the engine fits; else every difference, as export/trt_runtime.py check_sidecar.
std::string check_sidecar(const Sidecar& s, const std::string& tensorrt_version, const std::string& gpu_name,
                          int cc_major, int cc_minor);

// ---------------------------------------------------------------------------- 16-bit floats
// Host-side conversions for fp16 / bf16 engine buffers (round to nearest even, as numpy and
// torch do), so the runner needs no cuda_fp16.h on the host.

std::uint16_t float_to_half(float f);
float half_to_float(std::uint16_t h);
std::uint16_t float_to_bf16(float f);
float bf16_to_float(std::uint16_t h);

// ---------------------------------------------------------------------------- images

// (b, 3, h, w) floats in [-1, 1] -> grid (rows*(h+pad)+pad) x (nrow*(w+pad)+pad) x 3, white
// background, `nrow` images per row (0: ceil(sqrt(b))), as ldm_fast/images.py make_grid.
std::vector<std::uint8_t> make_grid(const float* images, int b, int h, int w, int nrow, int pad,
                                    int* grid_h, int* grid_w);
std::uint8_t to_uint8(float v);
std::uint32_t crc32(const std::uint8_t* data, std::size_t n, std::uint32_t crc = 0);
std::uint32_t adler32(const std::uint8_t* data, std::size_t n);
void write_png(const std::string& path, const std::uint8_t* rgb, int width, int height);
void write_ppm(const std::string& path, const std::uint8_t* rgb, int width, int height);

}  // namespace ldm
