"""Fused sampler updates: one elementwise kernel per denoising step, CFG included.

Why this kernel exists. Between two UNet calls, an eager sampler runs a chain of small
elementwise ops over the latent: split the stacked [uncond; cond] output, combine
u + s·(c − u), convert the prediction (ε or v) to x0 and ε, then the update itself, plus
noise for the stochastic samplers — eight to fifteen launches, each a full pass over memory.
Every update here is, per element, an *affine* combination of the tensors it reads:

    x_next = k_x·x + k_c·c + k_u·u + k_prev·x0_prev + k_noise·z
    x0     = d_x·x + d_c·c + d_u·u                   (written only when asked for)

where c is the (conditional) model output, u its unconditional half under guidance,
x0_prev the previous step's denoised estimate (DPM-Solver++(2M)) and z standard normal noise.
The coefficients depend only on the timestep pair, the parameterization and the guidance
scale, so the host folds all of those into a few float64 scalars and one pass over memory
does the rest. That single kernel, specialised at compile time by which inputs are present,
*is* each update's fused kernel: DDIM (η ≥ 0; with η = 1 the DDPM ancestral step),
Euler / Euler-ancestral and DPM-Solver++(2M) differ only in their coefficient functions below.

Notation: a = ᾱ_t (current), a' = ᾱ_{t'} (next; 1.0 for the final step to clean data),
α = √a, s = √(1 − a), σ = s/α (the VE noise level k-diffusion works with), λ = log(α/s).

Anatomy (see DESIGN.md): 1. references (the eager implementations), 2. the Triton kernel,
3. launcher, 4. torch.library custom ops, 5. the functional API `ops.py` calls.
These are inference-only ops: no autograd is registered.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

try:  # the references must stay usable where Triton is not installed (macOS, Windows)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

PARAMETERIZATIONS = ("eps", "v")


# ============================================================================ 1. references
# Written the textbook way, as the eager chain of ops a sampler would otherwise run; the
# kernel's folded coefficients are checked against them. `upcast=True` computes in fp32
# whatever the input dtypes (what the samplers use); `upcast=False` computes in the inputs'
# dtype (the same-precision baseline the kernel's fp16/bf16 error is compared with).

def _split_guided(x: Tensor, out: Tensor, guidance: float) -> Tensor:
    """The model output to use: `out` itself, or u + g·(c − u) when `out` stacks [u; c]."""
    if out.shape[0] == 2 * x.shape[0]:
        u, c = out.chunk(2, dim=0)
        return u + guidance * (c - u)
    return out


def _x0_eps(x: Tensor, m: Tensor, a: float, parameterization: str):
    """(x0, ε) implied by prediction m at ᾱ = a."""
    alpha, sigma = math.sqrt(a), math.sqrt(1 - a)
    if parameterization == "eps":
        return (x - sigma * m) / alpha, m
    return alpha * x - sigma * m, sigma * x + alpha * m


def _prep(x, out, upcast, *others):
    # upcast: at least fp32 (a float64 latent stays float64, which tests use as the truth)
    dt = torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype
    return [None if t is None else t.to(dt) for t in (x, out, *others)]


def ddim_step_ref(x: Tensor, out: Tensor, a_t: float, a_next: float, eta: float = 0.0,
                  noise: Optional[Tensor] = None, parameterization: str = "eps",
                  guidance: float = 1.0, return_x0: bool = False, upcast: bool = True):
    """DDIM (Song et al. 2021, eq. 12): x' = α'·x0 + √(1 − a' − σ_η²)·ε + σ_η·z with
    σ_η = η·√((1 − a')/(1 − a))·√(1 − a/a'); η = 1 is DDPM's ancestral step (posterior q(x_t'|x_t, x0))."""
    _check(x, out, noise=noise, needs_noise=_ddim_sigma(a_t, a_next, eta) > 0)
    xf, of, nf = _prep(x, out, upcast, noise)
    x0, eps = _x0_eps(xf, _split_guided(xf, of, guidance), a_t, parameterization)
    sigma_eta = _ddim_sigma(a_t, a_next, eta)
    x_next = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma_eta ** 2, 0.0)) * eps
    if sigma_eta > 0:
        x_next = x_next + sigma_eta * nf
    x_next = x_next.to(x.dtype)
    return (x_next, x0.to(x.dtype)) if return_x0 else x_next


def euler_step_ref(x: Tensor, out: Tensor, a_t: float, a_next: float, eta: float = 0.0,
                   noise: Optional[Tensor] = None, parameterization: str = "eps",
                   guidance: float = 1.0, return_x0: bool = False, upcast: bool = True):
    """Euler / Euler-ancestral (Karras et al. 2022, Algorithm 1 without churn; k-diffusion's
    `sample_euler_ancestral` for η > 0), taken in the VE variable y = x/α and mapped back:
    y' = y + (σ_down − σ)·(y − x0)/σ + σ_up·z, x' = α'·y'."""
    sigma_down, sigma_up = _ancestral_split(a_t, a_next, eta)
    _check(x, out, noise=noise, needs_noise=sigma_up > 0)
    xf, of, nf = _prep(x, out, upcast, noise)
    x0, _ = _x0_eps(xf, _split_guided(xf, of, guidance), a_t, parameterization)
    sigma = _sigma(a_t)
    y = xf / math.sqrt(a_t)
    d = (y - x0) / sigma  # the ODE's derivative dy/dσ (the ε the model implies)
    y = y + (sigma_down - sigma) * d
    if sigma_up > 0:
        y = y + sigma_up * nf
    x_next = (math.sqrt(a_next) * y).to(x.dtype)
    return (x_next, x0.to(x.dtype)) if return_x0 else x_next


def dpmpp_2m_step_ref(x: Tensor, out: Tensor, a_t: float, a_next: float,
                      x0_prev: Optional[Tensor] = None, a_prev: Optional[float] = None,
                      parameterization: str = "eps", guidance: float = 1.0, upcast: bool = True):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; k-diffusion's `sample_dpmpp_2m`) in the
    VE variable y = x/α: y' = (σ'/σ)·y − (e^{−h} − 1)·D, h = λ' − λ, D = x0 on the first step
    and the last one (σ' = 0), else (1 + 1/2r)·x0 − (1/2r)·x0_prev with r = h_prev/h.
    Returns (x_next, x0); x0 is the next step's x0_prev."""
    _check(x, out, prev=x0_prev)
    xf, of, pf = _prep(x, out, upcast, x0_prev)
    x0, _ = _x0_eps(xf, _split_guided(xf, of, guidance), a_t, parameterization)
    if a_next >= 1.0:  # σ' = 0: the step lands on the denoised estimate itself
        return x0.to(x.dtype), x0.to(x.dtype)
    lam, lam_next = _lambda(a_t), _lambda(a_next)
    h = lam_next - lam
    d = x0
    if x0_prev is not None:
        r = (lam - _lambda(a_prev)) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * pf
    y = xf / math.sqrt(a_t)
    y_next = (_sigma(a_next) / _sigma(a_t)) * y - math.expm1(-h) * d
    return (math.sqrt(a_next) * y_next).to(x.dtype), x0.to(x.dtype)


# ============================================================================ host coefficients
# Everything scalar is folded here, in float64 (Python floats), so the kernel does one
# multiply-add per input. Under guidance the model output m = (1 − g)·u + g·c, so a
# coefficient k on m becomes k·(1 − g) on u and k·g on c.

def _sigma(a: float) -> float:
    return math.sqrt((1 - a) / a)


def _lambda(a: float) -> float:
    """Half log-SNR, λ = log(α/s)."""
    return 0.5 * (math.log(a) - math.log1p(-a))


def _ddim_sigma(a_t: float, a_next: float, eta: float) -> float:
    if eta == 0 or a_next >= 1.0:
        return 0.0
    return eta * math.sqrt((1 - a_next) / (1 - a_t) * (1 - a_t / a_next))


def _ancestral_split(a_t: float, a_next: float, eta: float):
    """k-diffusion's get_ancestral_step: (σ_down, σ_up) with σ_down² + σ_up² = σ'²."""
    sigma_next = 0.0 if a_next >= 1.0 else _sigma(a_next)
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    sigma = _sigma(a_t)
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


def _prediction_coefs(a: float, parameterization: str):
    """(p, q, r, w): x0 = p·x + q·m and ε = r·x + w·m for prediction m at ᾱ = a."""
    alpha, sigma = math.sqrt(a), math.sqrt(1 - a)
    if parameterization == "eps":
        return 1 / alpha, -sigma / alpha, 0.0, 1.0
    if parameterization == "v":
        return alpha, -sigma, sigma, alpha
    raise ValueError(f"parameterization: expected one of {PARAMETERIZATIONS}, got {parameterization!r}")


def _fold(k_x: float, k_m: float, guided: bool, guidance: float):
    """Split a coefficient on the model output m into (on c, on u)."""
    if not guided:
        return k_x, k_m, 0.0
    return k_x, k_m * guidance, k_m * (1 - guidance)


def ddim_coefficients(a_t, a_next, eta, parameterization, guided, guidance):
    """(k_x, k_c, k_u, k_noise) of the DDIM update x' = α'·x0 + d·ε + σ_η·z."""
    p, q, r, w = _prediction_coefs(a_t, parameterization)
    sigma_eta = _ddim_sigma(a_t, a_next, eta)
    alpha_next, d = math.sqrt(a_next), math.sqrt(max(1 - a_next - sigma_eta ** 2, 0.0))
    return (*_fold(alpha_next * p + d * r, alpha_next * q + d * w, guided, guidance), sigma_eta)


def euler_coefficients(a_t, a_next, eta, parameterization, guided, guidance):
    """(k_x, k_c, k_u, k_noise) of x' = α'·(x/α + (σ_down − σ)·ε + σ_up·z). On the discrete VP
    schedule this equals DDIM with the same η (the ODE is the same; tests check it)."""
    p, q, r, w = _prediction_coefs(a_t, parameterization)
    sigma_down, sigma_up = _ancestral_split(a_t, a_next, eta)
    alpha_next, step = math.sqrt(a_next), sigma_down - _sigma(a_t)
    return (*_fold(alpha_next / math.sqrt(a_t) + alpha_next * step * r, alpha_next * step * w,
                   guided, guidance), alpha_next * sigma_up)


def dpmpp_2m_coefficients(a_t, a_next, a_prev, has_prev, parameterization, guided, guidance):
    """(k_x, k_c, k_u, k_prev) of x' = (s'/s)·x + α'(1 − e^{−h})·D, D as in dpmpp_2m_step_ref."""
    p, q, _, _ = _prediction_coefs(a_t, parameterization)
    if a_next >= 1.0:  # x' = x0
        return (*_fold(p, q, guided, guidance), 0.0)
    h = _lambda(a_next) - _lambda(a_t)
    phi = math.sqrt(a_next) * -math.expm1(-h)
    k_x0, k_prev = phi, 0.0
    if has_prev:
        r = (_lambda(a_t) - _lambda(a_prev)) / h
        k_x0, k_prev = phi * (1 + 1 / (2 * r)), -phi / (2 * r)
    ratio = math.sqrt((1 - a_next) / (1 - a_t))  # s'/s
    return (*_fold(ratio + k_x0 * p, k_x0 * q, guided, guidance), k_prev)


# ============================================================================ 2. Triton kernel

if triton is not None:

    @triton.jit
    def _sampler_step_kernel(
        x_ptr,       # x_t, the current latent: n_elements values (any float dtype)
        c_ptr,       # model output; the conditional half of [u; c] when GUIDED (any float dtype)
        u_ptr,       # unconditional half of the stacked model output (read only when GUIDED)
        prev_ptr,    # previous step's denoised x0 (read only when HAS_PREV: DPM-Solver++(2M))
        noise_ptr,   # standard normal noise z (read only when HAS_NOISE: η > 0)
        out_ptr,     # x_{t'}: n_elements values in x's dtype
        x0_ptr,      # this step's denoised x0 in x's dtype (written only when WRITE_X0)
        n_elements,
        k_x, k_c, k_u, k_prev, k_noise,  # x' = k_x·x + k_c·c + k_u·u + k_prev·x0_prev + k_noise·z
        d_x, d_c, d_u,                   # x0 = d_x·x + d_c·c + d_u·u
        GUIDED: tl.constexpr, HAS_PREV: tl.constexpr, HAS_NOISE: tl.constexpr,
        WRITE_X0: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        # Stage 1: this program's slice; 64-bit offsets so video-sized latents cannot overflow.
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_elements

        # Stage 2: load what this update reads, upcast to fp32 (inputs may mix dtypes:
        # an fp32 latent with an fp16/bf16 UNet output is the usual case).
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc = k_x * x + k_c * c
        if WRITE_X0:
            x0 = d_x * x + d_c * c
        if GUIDED:  # classifier-free guidance, folded into the coefficients on the host
            u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc += k_u * u
            if WRITE_X0:
                x0 += d_u * u
        if HAS_PREV:  # second-order multistep correction
            acc += k_prev * tl.load(prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_NOISE:  # ancestral / η > 0 noise, drawn on the host so eager and fused agree
            acc += k_noise * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)

        # Stage 3: store in the latent's dtype.
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_X0:
            tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


# ============================================================================ 3. launcher

def _block_size(n: int) -> int:
    # No autotuning: the kernel is memory-bound with no reuse, so any block that keeps loads
    # vectorised runs at bandwidth on large tensors (1024 = 8 fp32 per thread at 4 warps),
    # while a latent step is often small (SD at 512²: 2·4·64·64 = 32k elements), where smaller
    # blocks give more programs than SMs. Autotuning would also time each config on the first
    # call of every shape, inside a sampling loop.
    return 1024 if n >= (1 << 20) else 256


def _num_warps(block: int) -> int:
    # 8 elements per thread: two 128-bit fp32 loads (one for fp16) per operand. At 4 warps a
    # 256 block gives 2 per thread, and the sm_90 audit (kernels/ptx_audit.py) showed it
    # compiling to 64-bit loads.
    return max(1, block // 256)


def _dense(t: Tensor, like: Tensor) -> Tensor:
    """t with the same memory order as `like`, so one flat index addresses both."""
    if like.is_contiguous():
        return t.contiguous()
    return t.contiguous(memory_format=torch.channels_last)


def _launch(x, out, prev, noise, k, d, write_x0):
    """Run the kernel. k = (k_x, k_c, k_u, k_prev, k_noise), d = (d_x, d_c, d_u)."""
    if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        x = x.contiguous()
    b, n = x.shape[0], x.numel()
    guided = out.shape[0] == 2 * b
    out = _dense(out, x)
    # The halves of a stacked [u; c] batch are contiguous slices of its storage (dim 0 is the
    # outermost in both memory orders), so the kernel reads them through two base pointers.
    u, c = (out[:b], out[b:]) if guided else (x, out)
    prev = _dense(prev, x) if prev is not None else None
    noise = _dense(noise, x) if noise is not None else None
    x_next = torch.empty_like(x)
    x0 = torch.empty_like(x) if write_x0 else x_next  # placeholder pointer when not written
    block = _block_size(n)
    grid = (triton.cdiv(n, block),)
    _sampler_step_kernel[grid](
        x, c, u, prev if prev is not None else x, noise if noise is not None else x,
        x_next, x0, n, *[float(v) for v in k], *[float(v) for v in d],
        GUIDED=guided, HAS_PREV=prev is not None, HAS_NOISE=noise is not None,
        WRITE_X0=write_x0, BLOCK_SIZE=block, num_warps=_num_warps(block),
    )
    return x_next, (x0 if write_x0 else x.new_empty(0))


def _x0_coefs(a_t, parameterization, guided, guidance):
    p, q, _, _ = _prediction_coefs(a_t, parameterization)
    return _fold(p, q, guided, guidance)


# ============================================================================ 4. custom ops
# torch.library.custom_op + register_fake: torch.compile(fullgraph=True) and export see one
# opaque op per step (and, unlike triton_op, this also traces under the CPU interpreter).
# Each op returns (x_next, x0); x0 is an empty tensor when not requested, because an op's
# schema cannot make an output optional.

@torch.library.custom_op("ldm_fast::ddim_step", mutates_args=())
def _ddim_step_op(x: Tensor, out: Tensor, a_t: float, a_next: float, eta: float,
                  noise: Optional[Tensor], parameterization: str, guidance: float,
                  return_x0: bool) -> tuple[Tensor, Tensor]:
    guided = out.shape[0] == 2 * x.shape[0]
    k_x, k_c, k_u, k_n = ddim_coefficients(a_t, a_next, eta, parameterization, guided, guidance)
    noise = noise if k_n > 0 else None
    return _launch(x, out, None, noise, (k_x, k_c, k_u, 0.0, k_n),
                   _x0_coefs(a_t, parameterization, guided, guidance), return_x0)


@torch.library.custom_op("ldm_fast::euler_step", mutates_args=())
def _euler_step_op(x: Tensor, out: Tensor, a_t: float, a_next: float, eta: float,
                   noise: Optional[Tensor], parameterization: str, guidance: float,
                   return_x0: bool) -> tuple[Tensor, Tensor]:
    guided = out.shape[0] == 2 * x.shape[0]
    k_x, k_c, k_u, k_n = euler_coefficients(a_t, a_next, eta, parameterization, guided, guidance)
    noise = noise if k_n > 0 else None
    return _launch(x, out, None, noise, (k_x, k_c, k_u, 0.0, k_n),
                   _x0_coefs(a_t, parameterization, guided, guidance), return_x0)


@torch.library.custom_op("ldm_fast::dpmpp_2m_step", mutates_args=())
def _dpmpp_2m_step_op(x: Tensor, out: Tensor, a_t: float, a_next: float,
                      x0_prev: Optional[Tensor], a_prev: float, parameterization: str,
                      guidance: float) -> tuple[Tensor, Tensor]:
    guided = out.shape[0] == 2 * x.shape[0]
    k_x, k_c, k_u, k_p = dpmpp_2m_coefficients(a_t, a_next, a_prev, x0_prev is not None,
                                               parameterization, guided, guidance)
    prev = x0_prev if (x0_prev is not None and k_p != 0.0) else None
    return _launch(x, out, prev, None, (k_x, k_c, k_u, k_p, 0.0),
                   _x0_coefs(a_t, parameterization, guided, guidance), True)


def _fake(x, return_x0):
    return torch.empty_like(x), (torch.empty_like(x) if return_x0 else x.new_empty(0))


@_ddim_step_op.register_fake
def _(x, out, a_t, a_next, eta, noise, parameterization, guidance, return_x0):
    return _fake(x, return_x0)


@_euler_step_op.register_fake
def _(x, out, a_t, a_next, eta, noise, parameterization, guidance, return_x0):
    return _fake(x, return_x0)


@_dpmpp_2m_step_op.register_fake
def _(x, out, a_t, a_next, x0_prev, a_prev, parameterization, guidance):
    return _fake(x, True)


# ============================================================================ 5. functional API

def _check(x, out, noise=None, prev=None, needs_noise=False):
    b = x.shape[0]
    if out.shape[1:] != x.shape[1:] or out.shape[0] not in (b, 2 * b):
        raise ValueError(f"model output of shape {tuple(out.shape)} does not match the latent "
                         f"{tuple(x.shape)} (expected it, or [uncond; cond] stacked along dim 0)")
    for name, t in (("noise", noise), ("x0_prev", prev)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not match the latent {tuple(x.shape)}")
    if needs_noise and noise is None:
        raise ValueError("this step adds noise (η > 0): pass `noise`")


def ddim_step(x: Tensor, out: Tensor, a_t: float, a_next: float, eta: float = 0.0,
              noise: Optional[Tensor] = None, parameterization: str = "eps",
              guidance: float = 1.0, return_x0: bool = False):
    """Fused DDIM step (see ddim_step_ref); `out` may stack [uncond; cond] for CFG."""
    _check(x, out, noise=noise, needs_noise=_ddim_sigma(a_t, a_next, eta) > 0)
    x_next, x0 = torch.ops.ldm_fast.ddim_step(x, out, float(a_t), float(a_next), float(eta), noise,
                                              parameterization, float(guidance), return_x0)
    return (x_next, x0) if return_x0 else x_next


def euler_step(x: Tensor, out: Tensor, a_t: float, a_next: float, eta: float = 0.0,
               noise: Optional[Tensor] = None, parameterization: str = "eps",
               guidance: float = 1.0, return_x0: bool = False):
    """Fused Euler (η = 0) / Euler-ancestral (η > 0) step (see euler_step_ref)."""
    _check(x, out, noise=noise, needs_noise=_ancestral_split(a_t, a_next, eta)[1] > 0)
    x_next, x0 = torch.ops.ldm_fast.euler_step(x, out, float(a_t), float(a_next), float(eta), noise,
                                               parameterization, float(guidance), return_x0)
    return (x_next, x0) if return_x0 else x_next


def dpmpp_2m_step(x: Tensor, out: Tensor, a_t: float, a_next: float,
                  x0_prev: Optional[Tensor] = None, a_prev: Optional[float] = None,
                  parameterization: str = "eps", guidance: float = 1.0):
    """Fused DPM-Solver++(2M) step (see dpmpp_2m_step_ref); returns (x_next, x0)."""
    _check(x, out, prev=x0_prev)
    if x0_prev is not None and a_prev is None:
        raise ValueError("x0_prev needs a_prev, the ᾱ of the step that produced it")
    return torch.ops.ldm_fast.dpmpp_2m_step(x, out, float(a_t), float(a_next), x0_prev,
                                            float(a_prev if a_prev is not None else 0.0),
                                            parameterization, float(guidance))
