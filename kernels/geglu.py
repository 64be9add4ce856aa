"""Fused GEGLU: out = a · GELU(gate) for h = [a | gate], the transformer feed-forward's gate.

Why this kernel exists. The feed-forward of every SpatialTransformer block (Shazeer 2020,
"GLU Variants Improve Transformer"; LDM's `GEGLU`) projects to twice its inner width and
gates one half by the GELU of the other. Eagerly that is a chunk (a view), GELU over the
gate (read N, write N per row) and the product (read 2N, write N): three passes over the
widest activation of the block — in SD1.5 at 64×64 latents, 4096 tokens × 2·1280 values per
batch item. Here one pass reads the 2N inputs and writes the N outputs; the backward reads h
and the incoming gradient once and writes dh = [dy·GELU(g) | dy·a·GELU'(g)] in one pass too,
recomputing GELU from the saved input instead of saving the intermediate (less memory).

GELU is the exact one (erf form, PyTorch's default, what the released models were trained
with): GELU(g) = g·Φ(g), Φ(g) = ½(1 + erf(g/√2)), GELU'(g) = Φ(g) + g·φ(g), φ the normal pdf.

Anatomy (see DESIGN.md): 1. reference (also the eager implementation), 2. Triton kernels,
3. launcher, 4. torch.library custom ops with autograd, 5. the functional API `ops.py` calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # the reference must stay usable where Triton is not installed
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- 1. reference

def geglu_ref(h: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """a · GELU(gate) with [a | gate] = h split in half along the last dim. upcast=False (what
    `ldm_fast.ops` runs eagerly, as the original module) computes in h's dtype; upcast=True in
    fp32 (or wider), cast back — the tests' ground truth."""
    dt = torch.promote_types(h.dtype, torch.float32) if upcast else h.dtype
    a, gate = h.to(dt).chunk(2, dim=-1)
    return (a * F.gelu(gate)).to(h.dtype)


# ----------------------------------------------------------------------------- 2. kernels

if triton is not None:
    @triton.jit
    def _geglu_fwd_kernel(
        H,        # input (M, 2N), row-major: a in columns [0, N), gate in [N, 2N)
        OUT,      # output (M, N), h's dtype
        N,        # half width
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)     # int64: M·2N overflows int32 at SD scale
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        # Stage 1: load both halves of the row tile, upcast to fp32.
        a = tl.load(H + row * 2 * N + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(H + row * 2 * N + N + cols, mask=mask, other=0.0).to(tl.float32)
        # Stage 2: exact GELU of the gate, times a.
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        tl.store(OUT + row * N + cols, (a * g * cdf).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_bwd_kernel(
        DY,       # incoming gradient (M, N)
        H,        # saved input (M, 2N)
        DH,       # output gradient (M, 2N), h's dtype
        N,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        # Stage 1: the gradient and both input halves of the tile, in fp32.
        dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(H + row * 2 * N + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(H + row * 2 * N + N + cols, mask=mask, other=0.0).to(tl.float32)
        # Stage 2: recompute Φ(g) and φ(g); d/da = GELU(g), d/dg = a·(Φ(g) + g·φ(g)).
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
        tl.store(DH + row * 2 * N + cols, (dy * g * cdf).to(DH.dtype.element_ty), mask=mask)
        tl.store(DH + row * 2 * N + N + cols, (dy * a * (cdf + g * pdf)).to(DH.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- 3. launcher
# A memory-bound elementwise op: one program per (row, BLOCK columns). No autotuning: 1024
# columns × 4 warps is 8 elements per thread, i.e. 128-bit accesses for 16-bit types when N is
# a multiple of 8 (every SD width is), and wider blocks only add masked lanes at N = 1280.

def _block(n: int) -> int:
    return min(1024, triton.next_power_of_2(n))


def _rows(h: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    h2 = h.reshape(-1, h.shape[-1]).contiguous()
    return h2, h2.shape[0], h2.shape[1] // 2


def _geglu_forward(h: torch.Tensor) -> torch.Tensor:
    h2, m, n = _rows(h)
    out = torch.empty((m, n), device=h.device, dtype=h.dtype)
    if m and n:
        _geglu_fwd_kernel[(m, triton.cdiv(n, _block(n)))](h2, out, n, BLOCK=_block(n), num_warps=4)
    return out.reshape(*h.shape[:-1], n)


def _geglu_backward(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    h2, m, n = _rows(h)
    dy2 = dy.reshape(m, n).contiguous()
    dh = torch.empty_like(h2)
    if m and n:
        _geglu_bwd_kernel[(m, triton.cdiv(n, _block(n)))](dy2, h2, dh, n, BLOCK=_block(n), num_warps=4)
    return dh.reshape(h.shape)


# ----------------------------------------------------------------------------- 4. custom ops
# torch.library.custom_op + register_fake (not triton_op): torch.compile(fullgraph=True) sees
# one opaque node, and that compiles under the Triton interpreter too (DESIGN.md).

@torch.library.custom_op("ldm_fast::geglu_fwd", mutates_args=())
def _geglu_fwd_op(h: torch.Tensor) -> torch.Tensor:
    return _geglu_forward(h)


@_geglu_fwd_op.register_fake
def _(h):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@torch.library.custom_op("ldm_fast::geglu_bwd", mutates_args=())
def _geglu_bwd_op(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return _geglu_backward(dy, h)


@_geglu_bwd_op.register_fake
def _(dy, h):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    (h,) = ctx.saved_tensors
    return _geglu_bwd_op(dy, h)


_geglu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- 5. API

def supports(h: torch.Tensor) -> bool:
    """Whether the kernel handles this input; `ops` falls back to eager, saying so."""
    return triton is not None and h.dtype in _DTYPES and h.dim() >= 1 and h.shape[-1] % 2 == 0


def geglu(h: torch.Tensor) -> torch.Tensor:
    """Fused a · GELU(gate), [a | gate] = h split along the last dim; fp32 maths, output in h's
    dtype. Differentiable in h."""
    if h.shape[-1] % 2:
        raise ValueError(f"geglu: the last dimension must be even (a | gate), got {tuple(h.shape)}")
    return _geglu_fwd_op(h)

