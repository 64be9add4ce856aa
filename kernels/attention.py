"""FlashAttention-style softmax attention, forward and backward (Dao et al., FlashAttention-2).

softmax(q·kᵀ/√D)·v for q: (B, H, Lq, D) and k, v: (B, H, Lk, D) — self-attention over the
latent's pixels (Lq = Lk = 4096 at SD1.5's 64×64 level) and cross-attention to text tokens
(Lk = 77). The eager path materialises the Lq×Lk score matrix (4096² fp32 per head is 64 MB);
these kernels never do: memory stays linear in the sequence lengths.

Forward (_attn_fwd_kernel), one program per (block of BLOCK_M queries, batch·head):
    stream over key blocks of BLOCK_N keys, keeping for every query row the running maximum m,
    the running normaliser l and the unnormalised output acc ("online softmax"):
        s = q·kᵀ·scale·log2(e)         (base-2 exponent: exp2 is the GPU's native exp)
        m' = max(m, rowmax s);  p = 2^(s − m');  l = l·2^(m−m') + rowsum p
        acc = acc·2^(m−m') + p·v
    then o = acc / l and, for the backward, lse = m + log2 l per row (base 2).
Backward, with delta = rowsum(dO ∘ O) precomputed (_attn_bwd_delta_kernel):
    p = 2^(s − lse) (recomputed, never stored), dp = dO·vᵀ, ds = p ∘ (dp − delta),
    dv = pᵀ·dO,  dk = dsᵀ·q·scale,  dq = ds·k·scale.
_attn_bwd_dkdv_kernel owns a block of keys and streams over all queries (no atomics);
_attn_bwd_dq_kernel owns a block of queries and streams over all keys. Recomputing the
scores in both costs one extra q·kᵀ but keeps each kernel free of cross-program reductions.

Head dims: Triton's blocks are powers of two, and padding SD's head dims to the next one
(40 → 64, 80 → 128, 160 → 256) would spend ~37% of every MMA on zeros. Instead a head dim is
handled as one or two slices (head_dim_blocks: 40 = 32 + 16 (8 masked), 80 = 64 + 16,
160 = 128 + 32): q·kᵀ sums one dot per slice, p·v and the gradients keep one accumulator per
slice. Columns past the head dim are masked loads (zeros change neither q·kᵀ nor p·v).
Sequence tails are masked: keys past Lk get a score of −inf, queries past Lq are never
stored. Every key block holds at least one real key, so the running maximum is finite after
the first block and no row ever sees 0/0.

Precision: products feed tl.dot in the input dtype with fp32 accumulation; softmax state is
fp32; fp32 inputs use IEEE fp32 dots (no TF32) so the fp32 path matches the fp32 reference
tightly. DOT_FP32 upcasts the dot operands to fp32 after the same rounding to the input
dtype; it exists because Triton's CPU interpreter returns garbage from tl.dot on bf16
operands, so bf16 is tested on CPU through it, and for real (DOT_FP32 off) on a GPU.
"""

from __future__ import annotations

import functools
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:   # an eager-only install: the *_ref implementations need no Triton
    triton = None

# ----------------------------------------------------------------------------- 1. reference


def attention_ref(q, k, v, upcast=False):
    """The PyTorch reference. upcast=False is the eager path (`F.scaled_dot_product_attention`
    in the input dtype, what `ldm_fast.ops` runs); upcast=True computes the explicit
    softmax(q·kᵀ/√D)·v in fp32 and casts back — the tests' fp32 ground truth."""
    if not upcast:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    dt = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    s = qf @ kf.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return (s.softmax(-1) @ vf).to(q.dtype)


# ----------------------------------------------------------------------------- 2. kernels

if triton is not None:   # the kernels exist only where Triton is installed

    @triton.jit
    def _dot(a, b, DOT_FP32: tl.constexpr, PREC: tl.constexpr):
        """a·b with fp32 accumulation; DOT_FP32 upcasts the operands first (see module doc)."""
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=PREC)


    @triton.jit
    def _load_rows(base, rows, row_stride, offs_d, d_stride, mask_rows, HEAD_DIM: tl.constexpr):
        """A [rows × head-dim slice] tile; rows past the sequence and columns past HEAD_DIM read 0
        (zeros change neither q·kᵀ nor p·v)."""
        return tl.load(base + rows[:, None] * row_stride + offs_d[None, :] * d_stride,
                       mask=mask_rows[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)


    @triton.jit
    def _store_rows(base, rows, row_stride, offs_d, d_stride, mask_rows, value,
                    HEAD_DIM: tl.constexpr):
        tl.store(base + rows[:, None] * row_stride + offs_d[None, :] * d_stride,
                 value.to(base.dtype.element_ty),
                 mask=mask_rows[:, None] & (offs_d < HEAD_DIM)[None, :])


    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V,      # (B, H, Lq|Lk, D) through the strides below (any layout, e.g. a view)
        O,            # (B, H, Lq, D) output, q's dtype
        LSE,          # fp32 (B*H, Lq): base-2 log-sum-exp of the scaled scores, for the backward
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
        H, LQ, LK,
        qk_scale,     # softmax scale · log2(e)
        HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
        DOT_FP32: tl.constexpr, PREC: tl.constexpr,
        ALIGN: tl.constexpr,  # strides other than the head dim's come in units of ALIGN elements
    ):
        # Strides arrive divided by ALIGN (16 bytes when every row starts on a 16-byte boundary)
        # and are multiplied back here: the product tells the compiler their divisibility, which
        # the JIT only infers for multiples of 16 elements, so that rows of 40 or 80 fp16 values
        # still load as 128-bit vectors (and qualify for cp.async).
        sqb, sqh, sqm, skb = sqb * ALIGN, sqh * ALIGN, sqm * ALIGN, skb * ALIGN
        skh, skn, svb, svh = skh * ALIGN, skn * ALIGN, svb * ALIGN, svh * ALIGN
        svn, sob, soh, som = svn * ALIGN, sob * ALIGN, soh * ALIGN, som * ALIGN
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d0 = tl.arange(0, BLOCK_D0)
        mask_m = offs_m < LQ
        q_base = Q + b * sqb + h * sqh
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh

        # Stage 1: this program's queries stay in registers for the whole key loop, as one or
        # two head-dim slices (see "Head dims" in the module docstring).
        q0 = _load_rows(q_base, offs_m, sqm, offs_d0, sqd, mask_m, HEAD_DIM)
        acc0 = tl.zeros([BLOCK_M, BLOCK_D0], tl.float32)
        if BLOCK_D1 > 0:
            offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            q1 = _load_rows(q_base, offs_m, sqm, offs_d1, sqd, mask_m, HEAD_DIM)
            acc1 = tl.zeros([BLOCK_M, BLOCK_D1], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)

        # Stage 2: online softmax over key blocks.
        for start_n in range(0, LK, BLOCK_N):
            kn = start_n + offs_n
            mask_n = kn < LK
            s = _dot(q0, tl.trans(_load_rows(k_base, kn, skn, offs_d0, skd, mask_n, HEAD_DIM)),
                     DOT_FP32, PREC)
            if BLOCK_D1 > 0:
                s += _dot(q1, tl.trans(_load_rows(k_base, kn, skn, offs_d1, skd, mask_n, HEAD_DIM)),
                          DOT_FP32, PREC)
            s = s * qk_scale
            if not EVEN_N:
                s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p = p.to(V.dtype.element_ty)
            acc0 = acc0 * alpha[:, None] + _dot(
                p, _load_rows(v_base, kn, svn, offs_d0, svd, mask_n, HEAD_DIM), DOT_FP32, PREC)
            if BLOCK_D1 > 0:
                acc1 = acc1 * alpha[:, None] + _dot(
                    p, _load_rows(v_base, kn, svn, offs_d1, svd, mask_n, HEAD_DIM), DOT_FP32, PREC)
            m_i = m_new

        # Stage 3: normalise, store o and the row log-sum-exp.
        o_base = O + b * sob + h * soh
        _store_rows(o_base, offs_m, som, offs_d0, sod, mask_m, acc0 / l_i[:, None], HEAD_DIM)
        if BLOCK_D1 > 0:
            _store_rows(o_base, offs_m, som, offs_d1, sod, mask_m, acc1 / l_i[:, None], HEAD_DIM)
        tl.store(LSE + pid_bh.to(tl.int64) * LQ + offs_m, m_i + tl.log2(l_i), mask=mask_m)


    @triton.jit
    def _attn_bwd_delta_kernel(
        O, DO,        # (B, H, Lq, D) output and its gradient
        DELTA,        # fp32 (B*H, Lq): rowsum(dO ∘ O), the softmax-Jacobian term
        sob, soh, som, sod, sdb, sdh, sdm, sdd,
        H, LQ,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        ALIGN: tl.constexpr,  # strides other than the head dim's come in units of ALIGN elements
    ):
        # Strides arrive divided by ALIGN (16 bytes when every row starts on a 16-byte boundary)
        # and are multiplied back here: the product tells the compiler their divisibility, which
        # the JIT only infers for multiples of 16 elements, so that rows of 40 or 80 fp16 values
        # still load as 128-bit vectors (and qualify for cp.async).
        sob, soh, som, sdb = sob * ALIGN, soh * ALIGN, som * ALIGN, sdb * ALIGN
        sdh, sdm = sdh * ALIGN, sdm * ALIGN
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m < LQ)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                    mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
                     mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + pid_bh.to(tl.int64) * LQ + offs_m, tl.sum(o * do, axis=1),
                 mask=offs_m < LQ)


    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO,  # inputs and the output gradient, through their strides
        DK, DV,       # outputs, k's / v's dtype and layout
        LSE, DELTA,   # fp32 (B*H, Lq) from the forward / the delta kernel
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
        sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
        H, LQ, LK,
        sm_scale, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr,
        DOT_FP32: tl.constexpr, PREC: tl.constexpr,
        ALIGN: tl.constexpr,  # strides other than the head dim's come in units of ALIGN elements
    ):
        # Strides in units of ALIGN (see _attn_fwd_kernel).
        sqb, sqh, sqm, skb = sqb * ALIGN, sqh * ALIGN, sqm * ALIGN, skb * ALIGN
        skh, skn, svb, svh = skh * ALIGN, skn * ALIGN, svb * ALIGN, svh * ALIGN
        svn, sdb, sdh, sdm = svn * ALIGN, sdb * ALIGN, sdh * ALIGN, sdm * ALIGN
        sdkb, sdkh, sdkn, sdvb = sdkb * ALIGN, sdkh * ALIGN, sdkn * ALIGN, sdvb * ALIGN
        sdvh, sdvn = sdvh * ALIGN, sdvn * ALIGN
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d0 = tl.arange(0, BLOCK_D0)
        mask_n = offs_n < LK
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        row = pid_bh.to(tl.int64) * LQ

        # Stage 1: this program's keys and values stay in registers (one or two head-dim slices).
        k0 = _load_rows(k_base, offs_n, skn, offs_d0, skd, mask_n, HEAD_DIM)
        v0 = _load_rows(v_base, offs_n, svn, offs_d0, svd, mask_n, HEAD_DIM)
        dk0 = tl.zeros([BLOCK_N, BLOCK_D0], tl.float32)
        dv0 = tl.zeros([BLOCK_N, BLOCK_D0], tl.float32)
        if BLOCK_D1 > 0:
            offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            k1 = _load_rows(k_base, offs_n, skn, offs_d1, skd, mask_n, HEAD_DIM)
            v1 = _load_rows(v_base, offs_n, svn, offs_d1, svd, mask_n, HEAD_DIM)
            dk1 = tl.zeros([BLOCK_N, BLOCK_D1], tl.float32)
            dv1 = tl.zeros([BLOCK_N, BLOCK_D1], tl.float32)

        # Stage 2: stream over all query blocks, working with transposed scores [keys, queries]
        # so that dk and dv accumulate without transposing them.
        for start_m in range(0, LQ, BLOCK_M):
            qm = start_m + offs_m
            mask_m = qm < LQ
            q0 = _load_rows(q_base, qm, sqm, offs_d0, sqd, mask_m, HEAD_DIM)
            do0 = _load_rows(do_base, qm, sdm, offs_d0, sdd, mask_m, HEAD_DIM)
            sT = _dot(k0, tl.trans(q0), DOT_FP32, PREC)
            if BLOCK_D1 > 0:
                q1 = _load_rows(q_base, qm, sqm, offs_d1, sqd, mask_m, HEAD_DIM)
                do1 = _load_rows(do_base, qm, sdm, offs_d1, sdd, mask_m, HEAD_DIM)
                sT += _dot(k1, tl.trans(q1), DOT_FP32, PREC)
            lse = tl.load(LSE + row + qm, mask=mask_m, other=0.0)
            delta = tl.load(DELTA + row + qm, mask=mask_m, other=0.0)
            pT = tl.exp2(sT * qk_scale - lse[None, :])
            # Padded keys only meet zero rows of k; padded queries must not contribute at all.
            if not EVEN_M:
                pT = tl.where(mask_m[None, :], pT, 0.0)
            p16 = pT.to(DO.dtype.element_ty)
            dv0 += _dot(p16, do0, DOT_FP32, PREC)
            dpT = _dot(v0, tl.trans(do0), DOT_FP32, PREC)
            if BLOCK_D1 > 0:
                dv1 += _dot(p16, do1, DOT_FP32, PREC)
                dpT += _dot(v1, tl.trans(do1), DOT_FP32, PREC)
            ds16 = (pT * (dpT - delta[None, :])).to(Q.dtype.element_ty)
            dk0 += _dot(ds16, q0, DOT_FP32, PREC)
            if BLOCK_D1 > 0:
                dk1 += _dot(ds16, q1, DOT_FP32, PREC)

        # Stage 3: store (the softmax scale enters dk once, here).
        dk_base = DK + b * sdkb + h * sdkh
        dv_base = DV + b * sdvb + h * sdvh
        _store_rows(dk_base, offs_n, sdkn, offs_d0, sdkd, mask_n, dk0 * sm_scale, HEAD_DIM)
        _store_rows(dv_base, offs_n, sdvn, offs_d0, sdvd, mask_n, dv0, HEAD_DIM)
        if BLOCK_D1 > 0:
            _store_rows(dk_base, offs_n, sdkn, offs_d1, sdkd, mask_n, dk1 * sm_scale, HEAD_DIM)
            _store_rows(dv_base, offs_n, sdvn, offs_d1, sdvd, mask_n, dv1, HEAD_DIM)


    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO,  # inputs and the output gradient, through their strides
        DQ,           # output, q's dtype and layout
        LSE, DELTA,   # fp32 (B*H, Lq)
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
        sdqb, sdqh, sdqm, sdqd,
        H, LQ, LK,
        sm_scale, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
        DOT_FP32: tl.constexpr, PREC: tl.constexpr,
        ALIGN: tl.constexpr,  # strides other than the head dim's come in units of ALIGN elements
    ):
        # Strides in units of ALIGN (see _attn_fwd_kernel).
        sqb, sqh, sqm, skb = sqb * ALIGN, sqh * ALIGN, sqm * ALIGN, skb * ALIGN
        skh, skn, svb, svh = skh * ALIGN, skn * ALIGN, svb * ALIGN, svh * ALIGN
        svn, sdb, sdh, sdm = svn * ALIGN, sdb * ALIGN, sdh * ALIGN, sdm * ALIGN
        sdqb, sdqh, sdqm = sdqb * ALIGN, sdqh * ALIGN, sdqm * ALIGN
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d0 = tl.arange(0, BLOCK_D0)
        mask_m = offs_m < LQ
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh

        # Stage 1: this program's queries, output gradients and row statistics.
        q0 = _load_rows(q_base, offs_m, sqm, offs_d0, sqd, mask_m, HEAD_DIM)
        do0 = _load_rows(do_base, offs_m, sdm, offs_d0, sdd, mask_m, HEAD_DIM)
        dq0 = tl.zeros([BLOCK_M, BLOCK_D0], tl.float32)
        if BLOCK_D1 > 0:
            offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            q1 = _load_rows(q_base, offs_m, sqm, offs_d1, sqd, mask_m, HEAD_DIM)
            do1 = _load_rows(do_base, offs_m, sdm, offs_d1, sdd, mask_m, HEAD_DIM)
            dq1 = tl.zeros([BLOCK_M, BLOCK_D1], tl.float32)
        row = pid_bh.to(tl.int64) * LQ
        lse = tl.load(LSE + row + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + row + offs_m, mask=mask_m, other=0.0)

        # Stage 2: stream over key blocks, recomputing p and ds.
        for start_n in range(0, LK, BLOCK_N):
            kn = start_n + offs_n
            mask_n = kn < LK
            k0 = _load_rows(k_base, kn, skn, offs_d0, skd, mask_n, HEAD_DIM)
            v0 = _load_rows(v_base, kn, svn, offs_d0, svd, mask_n, HEAD_DIM)
            s = _dot(q0, tl.trans(k0), DOT_FP32, PREC)
            dp = _dot(do0, tl.trans(v0), DOT_FP32, PREC)
            if BLOCK_D1 > 0:
                k1 = _load_rows(k_base, kn, skn, offs_d1, skd, mask_n, HEAD_DIM)
                v1 = _load_rows(v_base, kn, svn, offs_d1, svd, mask_n, HEAD_DIM)
                s += _dot(q1, tl.trans(k1), DOT_FP32, PREC)
                dp += _dot(do1, tl.trans(v1), DOT_FP32, PREC)
            p = tl.exp2(s * qk_scale - lse[:, None])
            if not EVEN_N:
                p = tl.where(mask_n[None, :], p, 0.0)
            ds16 = (p * (dp - delta[:, None])).to(K.dtype.element_ty)
            dq0 += _dot(ds16, k0, DOT_FP32, PREC)
            if BLOCK_D1 > 0:
                dq1 += _dot(ds16, k1, DOT_FP32, PREC)

        # Stage 3: store.
        dq_base = DQ + b * sdqb + h * sdqh
        _store_rows(dq_base, offs_m, sdqm, offs_d0, sdqd, mask_m, dq0 * sm_scale, HEAD_DIM)
        if BLOCK_D1 > 0:
            _store_rows(dq_base, offs_m, sdqm, offs_d1, sdqd, mask_m, dq1 * sm_scale, HEAD_DIM)


# ----------------------------------------------------------------------------- 3. launchers

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256

# Whether a sequence length is a multiple of the block: decided per launch (under autotuning
# the block size is only known inside the autotuner, hence heuristics, not launcher code).
if triton is not None:
    _fwd = triton.heuristics({"EVEN_N": lambda a: a["LK"] % a["BLOCK_N"] == 0})(_attn_fwd_kernel)
    _dq = triton.heuristics({"EVEN_N": lambda a: a["LK"] % a["BLOCK_N"] == 0})(
        _attn_bwd_dq_kernel)
    _dkdv = triton.heuristics({"EVEN_M": lambda a: a["LQ"] % a["BLOCK_M"] == 0})(
        _attn_bwd_dkdv_kernel)

# Under the interpreter (CPU tests) blocks are fixed and small: lengths such as 50 and 77 then
# cover several blocks and a ragged tail, and no time goes to autotuning numpy.
_INTERP_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32)


# Autotuning candidates per kernel and head-dim bucket (the next power of two, `_bucket`):
# (owner block, streamed block, warps, stages), the owner being the query block for fwd/dq and
# the key block for dkdv. Every one is compiled for sm_90 by kernels/ptx_audit.py (in CI, no
# GPU needed), which holds them to: no spills or stack, 128-bit loads staged through cp.async,
# wgmma for 64-row tiles. Pruned on that evidence (triton 3.6 and 3.9):
#   * 32-row owner blocks in 16-bit: Hopper's wgmma needs 64 rows per warpgroup, so these
#     compile to the older mma.sync — wide heads (the 256 bucket, SD's 160) use 64-row owners
#     with short streamed blocks instead. dK/dV there holds k, v, dk and dv in registers: as
#     one 256-wide padded slice its 64-row tile took 251 registers and a stack frame (and the
#     32-row tile 255 with one), as 128 + 32 slices 169–203 and none;
#   * BLOCK_M 128 at 4 warps (227–233 registers) and the 4-warp BLOCK_D 256 backward tiles
#     (240–255 registers, stack frames): no headroom, spill-prone across Triton versions.
# The first entry is the default when autotuning is off.
_CANDIDATES = {
    ("fwd", 64): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4),
                  (64, 64, 4, 4)],
    ("fwd", 128): [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 8, 3), (64, 64, 4, 3),
                   (64, 32, 4, 4)],
    ("fwd", 256): [(64, 32, 8, 2), (64, 16, 8, 2)],
    ("dq", 64): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 4),
                 (128, 128, 8, 2)],
    ("dq", 128): [(64, 64, 8, 3), (64, 32, 8, 3), (64, 32, 4, 3)],
    ("dq", 256): [(64, 32, 8, 2), (64, 16, 8, 2)],
    ("dkdv", 64): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 4),
                   (64, 64, 8, 3)],
    ("dkdv", 128): [(64, 64, 8, 3), (64, 32, 8, 3)],
    ("dkdv", 256): [(64, 32, 8, 2), (64, 16, 8, 2), (64, 16, 8, 3)],
}
# fp32 runs IEEE fp32 dots on the FMA pipes (no tensor cores), with every tile in 32-bit
# registers: 64×64 tiles and larger compiled to 255 registers with 100–690-byte stack frames,
# these two to under 90 registers and none.
_FP32_CANDIDATES = [(64, 32, 8, 2), (32, 32, 4, 2)]


def _gpu_configs(kind: str, block_d: int, fp32: bool = False):
    cand = _FP32_CANDIDATES if fp32 else _CANDIDATES[(kind, block_d)]
    owner, streamed = ("BLOCK_N", "BLOCK_M") if kind == "dkdv" else ("BLOCK_M", "BLOCK_N")
    return [triton.Config({owner: o, streamed: s}, num_warps=w, num_stages=st)
            for o, s, w, st in cand]


def _fixed_gpu_config(kind: str, block_d: int, fp32: bool = False):
    """The first candidate, used when autotuning is switched off (LDM_ATTN_AUTOTUNE=0)."""
    cfg = _gpu_configs(kind, block_d, fp32)[0]
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, block_d: int, fp32: bool):
    kernel = {"fwd": _fwd, "dq": _dq, "dkdv": _dkdv}[kind]
    return triton.autotune(configs=_gpu_configs(kind, block_d, fp32),
                           key=["LQ", "LK", "HEAD_DIM"])(kernel)


def _launch(kind: str, x: torch.Tensor, grid, block_d: int, *args, **const):
    """Run `kind` with interpreter blocks on CPU, autotuned configs on GPU."""
    if not _on_gpu(x):
        kernel = {"fwd": _fwd, "dq": _dq, "dkdv": _dkdv}[kind]
        kernel[grid(_INTERP_BLOCKS)](*args, **const, **_INTERP_BLOCKS)
    elif os.environ.get("LDM_ATTN_AUTOTUNE", "1") == "0":
        kernel = {"fwd": _fwd, "dq": _dq, "dkdv": _dkdv}[kind]
        cfg = _fixed_gpu_config(kind, block_d, x.dtype == torch.float32)
        kernel[grid(cfg)](*args, **const, **cfg)
    else:
        _tuned(kind, block_d, x.dtype == torch.float32)[grid](*args, **const)


def _on_gpu(x: torch.Tensor) -> bool:
    """Whether launches take the compiled-GPU path (autotuned configs, real bf16 dots). The one
    place that decides it, so the offline sm_90 audit (kernels/ptx_audit.py) can ask for the
    GPU path with tensors that only describe shapes."""
    return x.is_cuda


def head_dim_blocks(D: int) -> tuple[int, int]:
    """The head dim as one or two power-of-two slices (BLOCK_D0, BLOCK_D1; 0 = one slice):
    a power of two stays whole; otherwise the largest power of two below D plus the rest
    rounded up to a power of two (≥ 16, the MMA's K minimum), if that pads less than the
    next power of two would — 40 → 32 + 16, 80 → 64 + 16, 160 → 128 + 32, 24 → 32."""
    whole = max(16, triton.next_power_of_2(D))
    if D <= 16 or D == whole:
        return whole, 0
    d0 = whole // 2
    d1 = max(16, triton.next_power_of_2(D - d0))
    return (d0, d1) if d0 + d1 < whole else (whole, 0)


def _consts(q: torch.Tensor):
    D = q.shape[-1]
    d0, d1 = head_dim_blocks(D)
    # fp32: IEEE dots (no TF32); 16-bit: the default (the precision flag only concerns fp32).
    prec = "ieee" if q.dtype == torch.float32 else None
    # bf16 dots are broken in the CPU interpreter: emulate them in fp32 there.
    dot_fp32 = q.dtype == torch.bfloat16 and not _on_gpu(q)
    return dict(HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, DOT_FP32=dot_fp32, PREC=prec)


def _bucket(D: int) -> int:
    """The head-dim bucket the autotune candidates are listed by (the padded power of two)."""
    return min(max(64, triton.next_power_of_2(D)), 256)


_INT32_MAX = 2**31 - 1


def _align(*tensors: torch.Tensor) -> int:
    """Elements per 16 bytes if every tensor starts on a 16-byte boundary and all its strides
    but the head dim's are multiples of that, else 1: the unit the kernels take those strides
    in (see ALIGN in the kernels). Strides near the int32 limit keep unit 1, so that scaling
    them back inside a kernel can never overflow 32-bit arithmetic."""
    unit = 16 // tensors[0].element_size()
    for t in tensors:
        if t.data_ptr() % 16 or any(st % unit or st * unit > _INT32_MAX
                                    for st in t.stride()[:-1]):
            return 1
    return unit


def _strides(align: int, *tensors: torch.Tensor):
    """(batch, head, row) strides in units of `align`, then the head-dim stride, per tensor."""
    out = []
    for t in tensors:
        *outer, sd = t.stride()
        out += [st // align for st in outer] + [sd]
    return out


def _attn_forward(q, k, v):
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((B * H, LQ), device=q.device, dtype=torch.float32)
    c = _consts(q)
    scale = 1.0 / math.sqrt(D)
    align = _align(q, k, v, o)
    _launch("fwd", q, lambda m: (triton.cdiv(LQ, m["BLOCK_M"]), B * H), _bucket(D),
            q, k, v, o, lse, *_strides(align, q, k, v, o),
            H, LQ, LK, scale * _LOG2E, **c, ALIGN=align)
    return o, lse


def _attn_backward(do, q, k, v, o, lse):
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    c = _consts(q)
    scale = 1.0 / math.sqrt(D)
    delta = torch.empty_like(lse)
    block_d = max(16, triton.next_power_of_2(D))   # one padded slice: a rowwise reduction
    bm = max(16, 4096 // block_d)   # o and dO tiles of 4096 elements: no spills at D=256
    align = _align(o, do)
    _attn_bwd_delta_kernel[(triton.cdiv(LQ, bm), B * H)](
        o, do, delta, *_strides(align, o, do), H, LQ,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=bm, ALIGN=align)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    align = _align(q, k, v, do, dq, dk, dv)
    strides = _strides(align, q, k, v, do)
    _launch("dkdv", q, lambda m: (triton.cdiv(LK, m["BLOCK_N"]), B * H), _bucket(D),
            q, k, v, do, dk, dv, lse, delta, *strides, *_strides(align, dk, dv),
            H, LQ, LK, scale, scale * _LOG2E, **c, ALIGN=align)
    _launch("dq", q, lambda m: (triton.cdiv(LQ, m["BLOCK_M"]), B * H), _bucket(D),
            q, k, v, do, dq, lse, delta, *strides, *_strides(align, dq),
            H, LQ, LK, scale, scale * _LOG2E, **c, ALIGN=align)
    return dq, dk, dv


# ----------------------------------------------------------------------------- 4. custom ops
# torch.library.custom_op + register_fake: one opaque node for torch.compile(fullgraph=True),
# testable under the interpreter on CPU (triton_op is not: fake tensors have no data pointer).


@torch.library.custom_op("ldm_fast::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _attn_forward(q, k, v)


@_attention_fwd_op.register_fake
def _(q, k, v):
    B, H, LQ, _ = q.shape
    return torch.empty_like(q), q.new_empty((B * H, LQ), dtype=torch.float32)


@torch.library.custom_op("ldm_fast::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      o: torch.Tensor, lse: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attn_backward(do, q, k, v, o, lse)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attn_setup_context(ctx, inputs, output):
    q, k, v = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)


def _attn_backward_rule(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    return _attention_bwd_op(do, q, k, v, o, lse)


_attention_fwd_op.register_autograd(_attn_backward_rule, setup_context=_attn_setup_context)


# ----------------------------------------------------------------------------- 5. API


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernels handle these inputs; `ops` falls back to eager, saying so."""
    return (triton is not None and q.dim() == 4 and k.dim() == 4 and v.dim() == 4
            and q.dtype in _DTYPES and q.dtype == k.dtype == v.dtype
            and q.device == k.device == v.device
            and q.shape[:2] == k.shape[:2] == v.shape[:2]
            and k.shape[2] == v.shape[2] and q.shape[3] == k.shape[3] == v.shape[3]
            and q.shape[3] <= _MAX_HEAD_DIM and k.shape[2] > 0)


def attention(q, k, v):
    """softmax(q·kᵀ/√D)·v for q: (B, H, Lq, D), k, v: (B, H, Lk, D); same result as
    F.scaled_dot_product_attention. Differentiable in q, k and v."""
    if not supports(q, k, v):
        raise ValueError(f"attention kernel: unsupported inputs q{tuple(q.shape)} {q.dtype}, "
                         f"k{tuple(k.shape)} {k.dtype}, v{tuple(v.shape)} {v.dtype} "
                         f"(4-D, same dtype in {_DTYPES}, head dim ≤ {_MAX_HEAD_DIM})")
    if not _recorded(q, k, v):
        return _attn_forward(q, k, v)[0]
    o, _ = _attention_fwd_op(q, k, v)
    return o


def _recorded(*tensors) -> bool:
    """Whether autograd or torch.compile will see this call; if neither (sampling), the
    launcher is called directly, skipping the custom op's host-side dispatch (see
    kernels/groupnorm.py's _recorded)."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
        t.requires_grad for t in tensors))
