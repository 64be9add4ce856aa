"""Fused residual add + LayerNorm: (s, y) = (x + r, LayerNorm(x + r)) in one pass.

Why this kernel exists. Inside every transformer block of the UNet (self-attention →
cross-attention → feed-forward, each pre-norm and residual) a residual add is followed at
once by the next sub-layer's LayerNorm: `x = x + attn(…); h = norm(x)`. Eagerly the add
reads x and r and writes s, then the norm reads s again and writes y. Here one program per
token row reads x and r once and writes both s (the residual stream, still needed by the next
add) and y: one read of s fewer per add, and one launch instead of two. The backward takes the
gradients of both outputs — dy through the norm, ds straight from the residual stream — and
writes dx (= dr) in one pass, plus per-program partial sums for the norm's weight and bias
that the launcher reduces.

Maths (fp32 inside whatever the storage dtype): s = x + r; μ, σ² over the row; x̂ = (s − μ)·
rstd, rstd = 1/√(σ² + ε); y = x̂·w + b. Backward: g = dy·w; ds_total = rstd·(g − mean(g) −
x̂·mean(g·x̂)) + ds; dw = Σ_rows dy·x̂, db = Σ_rows dy.

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
MAX_WIDTH = 8192   # one row per program, held in registers: SD's widest transformer is 1280


# ----------------------------------------------------------------------------- 1. reference

def add_layer_norm_ref(x, r, weight, bias, eps=1e-5, upcast=False):
    """(x + r, LayerNorm(x + r)) over the last dim. upcast=False (the eager path) is the
    original block's maths exactly: the add with PyTorch's type promotion, then F.layer_norm
    (under autocast it runs in fp32, as it would there). upcast=True computes in fp32 (or
    wider) and casts both results back to the promoted input dtype."""
    if not upcast:
        s = x + r
        return s, F.layer_norm(s, s.shape[-1:], weight, bias, eps)
    out_dt = torch.promote_types(x.dtype, r.dtype)
    dt = torch.promote_types(out_dt, torch.float32)
    s = x.to(dt) + r.to(dt)
    y = F.layer_norm(s, s.shape[-1:], None if weight is None else weight.to(dt),
                     None if bias is None else bias.to(dt), eps)
    return s.to(out_dt), y.to(out_dt)


# ----------------------------------------------------------------------------- 2. kernels

if triton is not None:
    @triton.jit
    def _add_ln_fwd_kernel(
        X, R,         # inputs (M, D), row-major
        W, B,         # LayerNorm weight and bias (D,)
        S, Y,         # outputs (M, D) in x's dtype: the sum and its norm
        MEAN, RSTD,   # fp32 (M,): statistics saved for the backward
        D, eps,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)    # int64 offsets: M·D exceeds int32 at SD scale
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        # Stage 1: the residual add, in fp32, written back as the residual stream.
        s = (tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
             + tl.load(R + row * D + cols, mask=mask, other=0.0).to(tl.float32))
        tl.store(S + row * D + cols, s.to(S.dtype.element_ty), mask=mask)
        # Stage 2: row statistics (two-pass over registers: mean, then centred variance).
        mean = tl.sum(s, axis=0) / D
        centred = tl.where(mask, s - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
        # Stage 3: normalise, affine, store.
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * D + cols, (centred * rstd * w + b).to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _add_ln_bwd_kernel(
        DY, DS,       # gradients of y and of s (M, D)
        S,            # saved sum (M, D)
        W,            # LayerNorm weight (D,)
        MEAN, RSTD,   # saved fp32 statistics (M,)
        DX,           # output (M, D): the gradient of both x and r
        DW_PART, DB_PART,   # fp32 (n_programs, D): this program's partial dw, db
        M, D,
        ROWS_PER_PROG,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
        db = tl.zeros((BLOCK_D,), dtype=tl.float32)
        # Each program walks a contiguous run of rows, accumulating dw/db in registers.
        for i in range(0, ROWS_PER_PROG):
            row = pid.to(tl.int64) * ROWS_PER_PROG + i
            if row < M:
                # Stage 1: reload the row, rebuild x̂ from the saved statistics.
                s = tl.load(S + row * D + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (s - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)
                dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(tl.float32)
                # Stage 2: the norm's input gradient plus the residual stream's own.
                g = dy * w
                c1 = tl.sum(g, axis=0) / D
                c2 = tl.sum(g * xhat, axis=0) / D
                dx = (g - c1 - xhat * c2) * tl.load(RSTD + row)
                dx += tl.load(DS + row * D + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=mask)
                # Stage 3: the affine parameters' partial sums.
                dw += dy * xhat
                db += dy
        tl.store(DW_PART + pid * D + cols, dw, mask=mask)
        tl.store(DB_PART + pid * D + cols, db, mask=mask)


# ----------------------------------------------------------------------------- 3. launcher
# One row per program (the row sits in registers; BLOCK_D = the next power of two ≥ D, at
# most 8192). Warps by width: a 320-wide row needs one warp's 32 lanes × 16 values at most;
# beyond 2048 values eight warps keep the per-thread count at ≤ 8 (no spills). No autotune:
# the op is bandwidth-bound and those two numbers are all there is to choose. The backward
# runs a fixed number of programs over runs of rows so the dw/db partials stay small.

def _warps(block: int) -> int:
    return 1 if block <= 512 else 4 if block <= 2048 else 8


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


def _on_gpu(x: torch.Tensor) -> bool:
    """Whether launches size themselves for a GPU (the offline sm_90 audit forces it)."""
    return x.is_cuda


def _add_ln_forward(x, r, weight, bias, eps):
    x2, r2 = _rows(x), _rows(r)
    m, d = x2.shape
    s, y = torch.empty_like(x2), torch.empty_like(x2)
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if m:
        block = triton.next_power_of_2(d)
        _add_ln_fwd_kernel[(m,)](x2, r2, weight, bias, s, y, mean, rstd, d, eps, BLOCK_D=block,
                                 num_warps=_warps(block))
    return s.reshape(x.shape), y.reshape(x.shape), mean, rstd


def _add_ln_backward(dy, ds, s, weight, mean, rstd):
    dy2, ds2, s2 = _rows(dy), _rows(ds), _rows(s)
    m, d = s2.shape
    dx = torch.empty_like(s2)
    programs = max(1, min(m, 256 if _on_gpu(s) else 4))
    rows_per = triton.cdiv(m, programs) if m else 0
    dw_part = torch.zeros((programs, d), device=s.device, dtype=torch.float32)
    db_part = torch.zeros_like(dw_part)
    if m:
        block = triton.next_power_of_2(d)
        _add_ln_bwd_kernel[(programs,)](dy2, ds2, s2, weight, mean, rstd, dx, dw_part, db_part, m, d,
                                        rows_per, BLOCK_D=block, num_warps=_warps(block))
    return dx.reshape(s.shape), dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------- 4. custom ops
# custom_op + register_fake (not triton_op): one opaque node for torch.compile, which also
# compiles under the Triton interpreter (DESIGN.md).

@torch.library.custom_op("ldm_fast::add_layer_norm_fwd", mutates_args=())
def _add_ln_fwd_op(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _add_ln_forward(x, r, weight, bias, eps)


@_add_ln_fwd_op.register_fake
def _(x, r, weight, bias, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stat = x.new_empty((rows,), dtype=torch.float32)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format), stat, stat.clone())


@torch.library.custom_op("ldm_fast::add_layer_norm_bwd", mutates_args=())
def _add_ln_bwd_op(dy: torch.Tensor, ds: torch.Tensor, s: torch.Tensor, weight: torch.Tensor,
                   mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _add_ln_backward(dy, ds, s, weight, mean, rstd)


@_add_ln_bwd_op.register_fake
def _(dy, ds, s, weight, mean, rstd):
    return torch.empty_like(s, memory_format=torch.contiguous_format), torch.empty_like(weight), \
        torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    _, _, weight, _, _ = inputs
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)


def _backward(ctx, ds, dy, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    ds = torch.zeros_like(s) if ds is None else ds
    dy = torch.zeros_like(s) if dy is None else dy
    dx, dw, db = _add_ln_bwd_op(dy, ds, s, weight, mean, rstd)
    return dx, dx, dw, db, None


_add_ln_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- 5. API

def supports(x: torch.Tensor, r: torch.Tensor, weight, bias) -> bool:
    """Whether the kernel handles these inputs; `ops` falls back to eager, saying so."""
    return (triton is not None and weight is not None and bias is not None and x.dtype in _DTYPES
            and r.dtype == x.dtype
            and r.shape == x.shape and 0 < x.shape[-1] <= MAX_WIDTH)


def add_layer_norm(x, r, weight, bias, eps=1e-5):
    """(x + r, LayerNorm(x + r)) over the last dim, fused; fp32 statistics, outputs in x's
    dtype. Differentiable in x, r, weight and bias."""
    if r.shape != x.shape:
        raise ValueError(f"add_layer_norm: x {tuple(x.shape)} and r {tuple(r.shape)} must match")
    s, y, _, _ = _add_ln_fwd_op(x, r, weight, bias, float(eps))
    return s, y
