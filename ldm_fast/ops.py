"""The one switch between eager PyTorch and Triton implementations of the hot ops.

Models and samplers reach GroupNorm(+SiLU), attention and the sampler updates only through
the functions below, so flipping the backend changes nothing else. The backend is chosen,
in order of precedence, by `set_backend()` (the CLIs' `--kernels` flag and the config's
`kernels` field call it), the environment variable ``LDM_KERNELS=eager|triton|auto``, and
the default ``auto``: Triton for CUDA tensors, eager elsewhere.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("eager", "triton", "auto")
_backend: str | None = None
_warned: set[str] = set()


def set_backend(name: str | None) -> None:
    """Select the kernel backend for the whole process (None: back to $LDM_KERNELS/auto)."""
    global _backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"kernels: expected one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The requested backend name: 'eager', 'triton' or 'auto'."""
    name = _backend or os.environ.get("LDM_KERNELS", "auto")
    if name not in BACKENDS:
        raise ValueError(f"LDM_KERNELS: expected one of {BACKENDS}, got {name!r}")
    return name


def _triton_usable(x: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _say_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def use_triton(x: torch.Tensor) -> bool:
    """Whether the op on tensor `x` runs the Triton kernel under the current backend."""
    name = get_backend()
    if name == "eager":
        return False
    if name == "auto":
        return x.is_cuda and _triton_usable(x)
    if not _triton_usable(x):
        _say_once("triton-fallback", f"LDM_KERNELS=triton but Triton cannot run on {x.device} "
                  "tensors (no CUDA, TRITON_INTERPRET unset); using eager ops")
        return False
    return True


# ----------------------------------------------------------------------------- normalisation
# The fused kernel is kernels/groupnorm.py; its group_norm_ref (fp32 maths, cast back) is the
# eager implementation. Imported lazily, like every kernel module: Triton reads
# TRITON_INTERPRET when a kernel is defined.

def group_norm(x, num_groups, weight, bias, eps=1e-5, act=False, scale=None, shift=None):
    """GroupNorm over (B, C, *spatial) → optional x·(1+scale)+shift (scale, shift: (B, C)) →
    optional SiLU. Statistics in fp32 whatever the input dtype."""
    from ldm_fast.kernels import groupnorm as k
    if use_triton(x):
        if k.supports(x):
            return k.group_norm(x, num_groups, weight, bias, eps, act=act, scale=scale,
                                shift=shift)
        _say_once("group_norm-fallback", f"group_norm: no Triton kernel for {x.dtype} "
                  f"{x.dim()}-D input; using the eager op")
    return k.group_norm_ref(x, num_groups, weight, bias, eps, act=act, scale=scale,
                            shift=shift)


# ----------------------------------------------------------------------------- attention
# The FlashAttention-style kernels are kernels/attention.py; eager is PyTorch's SDPA.

def attention(q, k, v):
    """Softmax attention, q: (B, H, Lq, D), k and v: (B, H, Lk, D), scale 1/sqrt(D)."""
    from ldm_fast.kernels import attention as kern
    if use_triton(q):
        if kern.supports(q, k, v):
            return kern.attention(q, k, v)
        _say_once("attention-fallback", f"attention: no Triton kernel for q{tuple(q.shape)} "
                  f"{q.dtype} (head dim > 256 or mixed dtypes); using PyTorch SDPA")
    return kern.attention_ref(q, k, v)


# ----------------------------------------------------------------------------- sampler steps
