"""The one switch between eager PyTorch and Triton implementations of the hot ops.

Models and samplers reach GroupNorm(+SiLU), attention and the sampler updates only through
the functions below, so flipping the backend changes nothing else. The backend is chosen,
in order of precedence, by `set_backend()` (the CLIs' `--kernels` flag and the config's
`kernels` field call it), the environment variable ``LDM_KERNELS=eager|triton|auto``, and
the default ``auto``. ``auto`` runs a Triton kernel on CUDA tensors only where a committed GPU
measurement showed it beating eager PyTorch (kernels/measured_defaults.json, written from
bench/gpu_check.sh's results by bench/kernel_defaults.py); until an op has such a win it stays
opt-in (``LDM_KERNELS=triton``). CPU tensors always run eagerly under ``auto``.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from contextlib import contextmanager
from importlib import resources

import torch

BACKENDS = ("eager", "triton", "auto")
_backend: str | None = None
_warned: set[str] = set()


def set_backend(name: str | None) -> None:
    """Select the kernel backend for the whole process (None: back to $LDM_KERNELS/auto)."""
    global _backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"kernels: expected one of {BACKENDS}, got {name!r}")
    _backend = name


@contextmanager
def backend(name: str | None):
    """`with ops.backend("triton"): …` — the backend for the block, the previous selection
    (including "none: follow $LDM_KERNELS") restored after it, also when the block raises.
    None keeps the current selection, so callers can pass an optional --kernels through."""
    global _backend
    previous = _backend
    if name is not None:
        set_backend(name)
    try:
        yield
    finally:
        _backend = previous


def get_backend() -> str:
    """The requested backend name: 'eager', 'triton' or 'auto'."""
    name = _backend or os.environ.get("LDM_KERNELS", "auto")
    if name not in BACKENDS:
        raise ValueError(f"LDM_KERNELS: expected one of {BACKENDS}, got {name!r}")
    return name


@functools.lru_cache(maxsize=None)
def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_usable(x: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    return _have_triton() and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _say_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


@functools.lru_cache(maxsize=None)
def measured_wins() -> dict:
    """{op: [dtype names]} for which a GPU measurement showed the kernel faster than eager
    (the package's kernels/measured_defaults.json; no file or no entry: no win)."""
    try:
        text = (resources.files("ldm_fast.kernels") / "measured_defaults.json").read_text()
        return json.loads(text).get("auto", {})
    except (OSError, ValueError):
        return {}


def use_triton(x: torch.Tensor, op: str | None = None) -> bool:
    """Whether the op `op` on tensor `x` runs the Triton kernel under the current backend."""
    name = get_backend()
    if name == "eager":
        return False
    if name == "auto":
        dtype = str(x.dtype).replace("torch.", "")
        return (x.is_cuda and dtype in measured_wins().get(op, ())
                and _triton_usable(x))
    if not _triton_usable(x):
        why = ("Triton is not installed (pip install 'ldm_fast[gpu]')" if not _have_triton()
               else f"Triton cannot run on {x.device} tensors (no CUDA, TRITON_INTERPRET unset)")
        _say_once("triton-fallback", f"LDM_KERNELS=triton but {why}; using eager ops")
        return False
    return True


# ----------------------------------------------------------------------------- normalisation
# The fused kernel is kernels/groupnorm.py; its group_norm_ref (fp32 maths, cast back) is the
# eager implementation. Imported lazily, like every kernel module: Triton reads
# TRITON_INTERPRET when a kernel is defined.

def group_norm(x, num_groups, weight, bias, eps=1e-5, act=False, scale=None, shift=None,
               add=None):
    """GroupNorm over (B, C, *spatial) of x [+ add] (add: (B, C), e.g. the ResBlock's timestep
    embedding) → optional x·(1+scale)+shift (scale, shift: (B, C)) → optional SiLU.
    Statistics in fp32 whatever the input dtype."""
    from ldm_fast.kernels import groupnorm as k
    if use_triton(x, "group_norm"):
        if k.supports(x):
            return k.group_norm(x, num_groups, weight, bias, eps, act=act, scale=scale,
                                shift=shift, add=add)
        _say_once("group_norm-fallback", f"group_norm: no Triton kernel for {x.dtype} "
                  f"{x.dim()}-D input; using the eager op")
    return k.group_norm_ref(x, num_groups, weight, bias, eps, act=act, scale=scale,
                            shift=shift, add=add)


# ----------------------------------------------------------------------------- attention
# The FlashAttention-style kernels are kernels/attention.py; eager is PyTorch's SDPA.

def attention(q, k, v):
    """Softmax attention, q: (B, H, Lq, D), k and v: (B, H, Lk, D), scale 1/sqrt(D)."""
    from ldm_fast.kernels import attention as kern
    if use_triton(q, "attention"):
        if kern.supports(q, k, v):
            return kern.attention(q, k, v)
        _say_once("attention-fallback", f"attention: no Triton kernel for q{tuple(q.shape)} "
                  f"{q.dtype} (head dim > 256 or mixed dtypes); using PyTorch SDPA")
    return kern.attention_ref(q, k, v)


# ----------------------------------------------------------------------------- sampler steps
# Every sampler update (the schedule's ᾱ values as Python floats, the model output `out`,
# which stacks [uncond; cond] along dim 0 under classifier-free guidance) goes through here:
# the fused kernel in kernels/sampler_steps.py when `use_triton(x)`, else the eager chain of
# ops it replaces (the kernel file's *_ref functions). The kernel module is imported lazily:
# Triton reads TRITON_INTERPRET when a kernel is defined, and eager-only users never need it.

def _sampler_steps():
    from ldm_fast.kernels import sampler_steps
    return sampler_steps


def ddim_step(x, out, a_t, a_next, eta=0.0, noise=None, parameterization="eps", guidance=1.0,
              return_x0=False):
    """DDIM step ᾱ: a_t → a_next (1.0 = clean); η = 1 is DDPM's ancestral step. Returns x_next,
    or (x_next, x0) with return_x0."""
    k = _sampler_steps()
    fn = k.ddim_step if use_triton(x, "sampler_step") else k.ddim_step_ref
    return fn(x, out, a_t, a_next, eta=eta, noise=noise, parameterization=parameterization,
              guidance=guidance, return_x0=return_x0)


def euler_step(x, out, a_t, a_next, eta=0.0, noise=None, parameterization="eps", guidance=1.0,
               return_x0=False):
    """Euler (η = 0) / Euler-ancestral (η > 0) step in σ = √((1 − ᾱ)/ᾱ)."""
    k = _sampler_steps()
    fn = k.euler_step if use_triton(x, "sampler_step") else k.euler_step_ref
    return fn(x, out, a_t, a_next, eta=eta, noise=noise, parameterization=parameterization,
              guidance=guidance, return_x0=return_x0)


def dpmpp_2m_step(x, out, a_t, a_next, x0_prev=None, a_prev=None, parameterization="eps",
                  guidance=1.0):
    """DPM-Solver++(2M) step; returns (x_next, x0), x0 being the next call's x0_prev."""
    k = _sampler_steps()
    fn = k.dpmpp_2m_step if use_triton(x, "sampler_step") else k.dpmpp_2m_step_ref
    return fn(x, out, a_t, a_next, x0_prev=x0_prev, a_prev=a_prev,
              parameterization=parameterization, guidance=guidance)


def prediction_to_eps(x, out, a_t, parameterization="eps", guidance=1.0):
    """The ε a (possibly stacked [uncond; cond]) model output implies, in fp32 (PLMS keeps a
    history of these). Eager: PLMS has no fused kernel."""
    k = _sampler_steps()
    xf = x.float()
    return k._x0_eps(xf, k._split_guided(xf, out.float(), guidance), a_t, parameterization)[1]


def plms_step(x, eps, a_t, a_next, eps_history=(), eps_next=None):
    """PLMS (Liu et al. 2022, "Pseudo Numerical Methods", eq. 12 and the LDM code): combine ε
    with the previous ε's (most recent last) by the Adams–Bashforth weights — or, on the first
    step, average it with `eps_next` evaluated at the predicted point (the pseudo improved
    Euler start) — then take a DDIM (η = 0) step with the result. The combination is eager;
    the step itself goes through `ddim_step`."""
    h = list(eps_history)[-3:]
    if eps_next is not None:
        e = (eps + eps_next) / 2
    elif len(h) == 0:
        e = eps
    elif len(h) == 1:
        e = (3 * eps - h[-1]) / 2
    elif len(h) == 2:
        e = (23 * eps - 16 * h[-1] + 5 * h[-2]) / 12
    else:
        e = (55 * eps - 59 * h[-1] + 37 * h[-2] - 9 * h[-3]) / 24
    return ddim_step(x, e, a_t, a_next, parameterization="eps")


# ----------------------------------------------------------------------------- the model's fast path
# Rewrites inside the models that keep the maths and change only how the work is laid out or
# batched: channels-last (NHWC) activations, and the time-embedding projections of every
# ResBlock in one matmul per step (unet.py). Off under `eager`, which stays the reference laid
# out as the original code; on under `triton`; under `auto` only where measured to win: on CPU,
# where oneDNN's convolutions run channels-last natively (same process, interleaved, 1 thread:
# tiny decode 0.78–0.84× the channels-first time, SD-shaped UNet step 0.91×, tiny autoencoder
# training step 0.72×). CUDA under `auto` waits for GPU figures.

def model_fast_path(x: torch.Tensor) -> bool:
    """Whether the model-level fast path is on for activations like `x`."""
    name = get_backend()
    if name == "eager":
        return False
    return name == "triton" or not x.is_cuda


def channels_last(x: torch.Tensor, largest_map: int | None = None) -> torch.Tensor:
    """A 4-D activation in the layout the convolutions prefer under the current backend:
    channels-last on the fast path (on CUDA only for fp16/bf16, where cuDNN's tensor-core
    convolutions are NHWC-native), else unchanged. Convolutions, GroupNorm, elementwise ops,
    concatenation, pooling and nearest upsampling keep the layout, so converting the model's
    input once carries it through the network. `largest_map`: positions (H·W) of the largest
    feature map the network will convolve (a decoder's output side², not its latent's);
    default x's own."""
    if x.dim() != 4 or not model_fast_path(x) or torch.compiler.is_compiling():
        # Under torch.compile the compiler picks layouts; forcing one here would make every
        # convolution re-lay out its (graph-input) weight on each call.
        return x
    if x.is_cuda and x.dtype not in (torch.float16, torch.bfloat16):
        return x
    if not x.is_cuda and (largest_map or x.shape[-2] * x.shape[-1]) < 256:
        # oneDNN's NHWC convolutions lose on small maps: the tiny UNet (8×8) measured 4%
        # slower channels-last, while the SD-shaped UNet (32×32) and the decoders gained 9–16%.
        return x
    return x.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- GEGLU
# The fused kernel is kernels/geglu.py; eager is its reference in the input dtype, the
# original module's maths (chunk, exact GELU, product).

def geglu(h):
    """a · GELU(gate) for [a | gate] = h split in half along the last dim."""
    from ldm_fast.kernels import geglu as k
    if use_triton(h, "geglu"):
        if k.supports(h):
            return k.geglu(h)
        _say_once("geglu-fallback", f"geglu: no Triton kernel for {h.dtype} input of shape "
                  f"{tuple(h.shape)}; using the eager op")
    return k.geglu_ref(h)


# ----------------------------------------------------------------------------- residual add + LayerNorm
# The fused kernel is kernels/add_layernorm.py; eager is its reference in the input dtype
# (the add, then F.layer_norm: the original transformer block's maths).

def add_layer_norm(x, r, weight, bias, eps=1e-5):
    """(x + r, LayerNorm(x + r)) over the last dim: a residual add and the next pre-norm."""
    from ldm_fast.kernels import add_layernorm as k
    if use_triton(x, "add_layer_norm"):
        if k.supports(x, r, weight, bias):
            return k.add_layer_norm(x, r, weight, bias, eps)
        _say_once("add_layer_norm-fallback", f"add_layer_norm: no Triton kernel for {x.dtype} + "
                  f"{r.dtype} (the kernel needs one dtype), width {x.shape[-1]} (at most "
                  f"{k.MAX_WIDTH}) or a norm without affine; using the eager ops")
    return k.add_layer_norm_ref(x, r, weight, bias, eps)
