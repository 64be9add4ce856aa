"""Fused GroupNorm → optional x·(1+scale)+shift → optional SiLU, forward and backward.

Every convolutional block of the UNet and the autoencoder starts with GroupNorm, usually
followed by SiLU (ResBlock in_layers/out_layers, the decoder's norm_out), sometimes with a
per-sample scale and shift from the timestep embedding in between ("scale-shift norm"
ResBlocks), and plain before attention. Eager PyTorch runs these as 3–5 kernels that each read
and write the whole activation; here the forward reads x twice (statistics, then the fused
apply, the second read usually hitting L2) and writes y once, and the backward reads x and dy
twice and writes dx once.

The maths, for one sample b and one group g of N = (C/G)·HW elements, channel c:
    x̂ = (x − μ_bg)·r_bg,   r = 1/sqrt(σ² + eps)        (statistics in fp32 whatever the dtype)
    u = x̂·w_c + β_c                                     (affine; w = 1, β = 0 when absent)
    v = u·(1 + scale_bc) + shift_bc                     (scale/shift are (B, C); optional)
    y = silu(v) = v·σ(v)     (when act)   else y = v
which folds to one multiply-add per element: v = x·a_bc + d_bc with
    a = r·w·(1+scale),  d = (β − μ·r·w)·(1+scale) + shift.
Backward (dv = dy·σ(v)·(1 + v·(1−σ(v))) with act, else dy), with per-(b, c) sums over space
    S1 = Σ_s dv,   S2 = Σ_s dv·x̂:
    dshift = S1,  dscale = w·S2 + β·S1,  dβ = Σ_b (1+scale)·S1,  dw = Σ_b (1+scale)·S2,
    dx̂ = dv·(1+scale)·w,
    dx = r·(dx̂ − mean_group(dx̂) − x̂·mean_group(dx̂·x̂))
where mean_group(dx̂) = Σ_c w(1+scale)·S1 / N and mean_group(dx̂·x̂) = Σ_c w(1+scale)·S2 / N.

Work decomposition. A group of an SD1.5 activation holds 10·4096 elements and there are only
B·G = 64 groups, far fewer than the GPU has SMs, so one program per group cannot reach the
memory bandwidth. Instead every kernel tiles the activation into [BLOCK_C channels × BLOCK_S
positions] tiles (a 3-D grid: sample, spatial tile, channel block), and the tiles follow the
memory layout so that loads are 128-bit: channels-first tiles are long in space; channels-last
tiles run along a power-of-two block of contiguous channels that divides C (64 of SD's 320),
straddling group boundaries. So statistics are kept per channel and merged per group:
    forward  1. _gn_stats_kernel: each program → per-channel (count, mean, M2) of its chunk
                (exact two-pass inside a tile, Chan's parallel formula across tiles).
             2. _gn_group_stats_kernel: one program per (sample, group) merges its channels'
                partials (Chan again, a few KB from L2) into μ and 1/σ.
             3. _gn_fwd_kernel: each tile gathers its channels' group statistics and applies
                the folded multiply-add (+SiLU).
    backward 4. _gn_bwd_reduce_kernel: per-channel partial S1, S2 over a spatial chunk.
             5. _gn_bwd_group_kernel: per (sample, group), the two group means and the
                per-(b, c) parameter-gradient terms (the launcher sums those over b).
             6. _gn_bwd_dx_kernel: dx for its tile.
Channels-first groups small enough for one tile (the UNet's 8×8 level, the tiny preset) skip
all that: _gn_fwd_single_kernel / _gn_bwd_single_kernel give each (sample, group) one program
that reads its data once and does everything in registers — one launch per direction.
Addressing is by (batch, channel, spatial) strides of x viewed as (B, C, HW), so contiguous
NCHW (channel stride HW, spatial stride 1) and channels-last (channel stride 1, spatial stride
C) run through the same kernels, and outputs keep the input's memory format. The pre-norm bias
`add` (the ResBlock's h + emb) is added to x as it is loaded.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:   # an eager-only install: the *_ref implementations need no Triton
    triton = None

# ----------------------------------------------------------------------------- 1. reference


def group_norm_ref(x, num_groups, weight=None, bias=None, eps=1e-5, act=False, scale=None,
                   shift=None, upcast=True, add=None):
    """The PyTorch reference: [x + add] → GroupNorm → x·(1+scale)+shift → SiLU. With upcast
    (the default, and what `ldm_fast.ops` runs eagerly) everything is computed in fp32 (or
    wider) and the result is cast back to x's dtype; upcast=False runs the same chain in x's
    own dtype, which is the "same-precision PyTorch" error baseline the tests compare the
    kernel against. `add` (B, C) is a per-sample channel bias added before the statistics (the
    ResBlock's h + emb). The affine goes into F.group_norm itself and SiLU runs in place when
    no gradient is recorded: the eager path makes as few passes over the activation as
    PyTorch allows."""
    dt = torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype   # fp64 stays fp64
    xd = x.to(dt)
    if add is not None:
        xd = xd + add.to(dt).view(add.shape + (1,) * (x.dim() - 2))
    out = F.group_norm(xd, num_groups, None if weight is None else weight.to(dt),
                       None if bias is None else bias.to(dt), eps)
    if scale is not None:
        bshape = scale.shape + (1,) * (x.dim() - 2)
        out = out * (1 + scale.to(dt).view(bshape))
    if shift is not None:
        out = out + shift.to(dt).view(shift.shape + (1,) * (x.dim() - 2))
    if act:
        # In place is safe for autograd only when nothing records the graph.
        out = F.silu(out, inplace=not torch.is_grad_enabled())
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- 2. kernels

if triton is not None:   # the kernels exist only where Triton is installed

    @triton.jit
    def _gn_stats_kernel(
        X,            # input viewed as (B, C, HW) with strides (sxb, sxc, sxs); any float dtype
        PART,         # fp32 (3, B*C*NS): count, mean, M2 of each channel over each spatial chunk
        sxb, sxc, sxs,
        C, HW,
        NS,           # spatial chunks (statistics partials per channel)
        ITERS,        # spatial tiles per chunk
        ADD, sab, sac,  # (B, C) bias added to x before the statistics (unused if not HAS_ADD)
        HAS_ADD: tl.constexpr,
        WIDE: tl.constexpr,  # 64-bit spatial offsets: channels-last position × C can pass 2³¹
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        b = tl.program_id(0)        # which sample
        pid_s = tl.program_id(1)    # which spatial chunk (ITERS tiles of BLOCK_S positions)
        pid_c = tl.program_id(2)    # which block of BLOCK_C channels (any channels, any groups)
        ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = ch < C
        base = X + b.to(tl.int64) * sxb + ch.to(tl.int64)[:, None] * sxc
        add = _channel_add(ADD, b, ch, mask_c, sab, sac, HAS_ADD, BLOCK_C)

        # Running per-channel (count, mean, M2) over the chunk. Each tile is reduced exactly
        # (mean first, then the centred sum of squares, in registers), tiles are merged with Chan
        # et al.'s pairwise update: no E[x²] − E[x]² cancellation at any size.
        n = tl.zeros([BLOCK_C], tl.float32)
        mean = tl.zeros([BLOCK_C], tl.float32)
        m2 = tl.zeros([BLOCK_C], tl.float32)
        for it in range(0, ITERS):
            offs_s = (pid_s * ITERS + it) * BLOCK_S + tl.arange(0, BLOCK_S)
            offs_s = _wide(offs_s, WIDE)
            mask = mask_c[:, None] & (offs_s < HW)[None, :]
            x = _shifted(tl.load(base + offs_s[None, :] * sxs, mask=mask, other=0.0), add, mask,
                         HAS_ADD)
            cnt = tl.sum(mask.to(tl.float32), axis=1)
            t_mean = tl.sum(x, axis=1) / tl.maximum(cnt, 1.0)
            d = tl.where(mask, x - t_mean[:, None], 0.0)
            t_m2 = tl.sum(d * d, axis=1)
            tot = tl.maximum(n + cnt, 1.0)
            delta = t_mean - mean
            mean = mean + delta * (cnt / tot)
            m2 = m2 + t_m2 + delta * delta * (n * cnt / tot)
            n = n + cnt

        total = tl.num_programs(0) * C * NS
        slot = (b * C + ch).to(tl.int64) * NS + pid_s
        tl.store(PART + slot, n, mask=mask_c)
        tl.store(PART + total + slot, mean, mask=mask_c)
        tl.store(PART + 2 * total + slot, m2, mask=mask_c)


    @triton.jit
    def _gn_group_stats_kernel(
        PART,         # fp32 (3, B*C*NS) per-channel partials from _gn_stats_kernel
        MEAN, RSTD,   # fp32 (B*G,) outputs: the group statistics
        C, G, CPG, NS, eps,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """One program per (sample, group): merge its CPG × NS partials with Chan's formula,
        M2 = Σ M2_i + Σ n_i (mean_i − μ)², in two sweeps (μ first) over a few KB from L2."""
        pid_bg = tl.program_id(0)
        b = pid_bg // G
        g = pid_bg % G
        total = tl.num_programs(0) // G * C * NS
        offs_p = tl.arange(0, BLOCK_P)
        n = 0.0
        s = 0.0
        for c0 in range(0, CPG, BLOCK_C):
            oc = c0 + tl.arange(0, BLOCK_C)
            ptr = PART + (b * C + g * CPG + oc).to(tl.int64)[:, None] * NS + offs_p[None, :]
            m = (oc < CPG)[:, None] & (offs_p < NS)[None, :]
            cnt = tl.load(ptr, mask=m, other=0.0)
            n += tl.sum(tl.sum(cnt, axis=1), axis=0)
            s += tl.sum(tl.sum(cnt * tl.load(ptr + total, mask=m, other=0.0), axis=1), axis=0)
        mu = s / n
        m2 = 0.0
        for c0 in range(0, CPG, BLOCK_C):
            oc = c0 + tl.arange(0, BLOCK_C)
            ptr = PART + (b * C + g * CPG + oc).to(tl.int64)[:, None] * NS + offs_p[None, :]
            m = (oc < CPG)[:, None] & (offs_p < NS)[None, :]
            cnt = tl.load(ptr, mask=m, other=0.0)
            dev = tl.where(m, tl.load(ptr + total, mask=m, other=0.0) - mu, 0.0)
            m2 += tl.sum(tl.sum(tl.load(ptr + 2 * total, mask=m, other=0.0) + cnt * dev * dev,
                                axis=1), axis=0)
        tl.store(MEAN + pid_bg, mu)
        tl.store(RSTD + pid_bg, 1.0 / tl.sqrt(tl.maximum(m2 / n, 0.0) + eps))


    @triton.jit
    def _wide(offs, WIDE: tl.constexpr):
        """Spatial offsets in 64 bits when the launcher says position × stride can overflow 32."""
        if WIDE:
            offs = offs.to(tl.int64)
        return offs


    @triton.jit
    def _channel_add(ADD, b, ch, mask_c, sab, sac, HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr):
        """fp32 [BLOCK_C] per-sample channel bias added to x before normalising (0 if absent)."""
        a = tl.zeros([BLOCK_C], tl.float32)
        if HAS_ADD:
            a = tl.load(ADD + b * sab + ch * sac, mask=mask_c, other=0.0).to(tl.float32)
        return a


    @triton.jit
    def _shifted(x, add, mask, HAS_ADD: tl.constexpr):
        """x (a loaded [BLOCK_C, BLOCK_S] tile) in fp32, plus the channel bias; padding lanes stay
        0 so that they drop out of every sum."""
        x = x.to(tl.float32)
        if HAS_ADD:
            x = tl.where(mask, x + add[:, None], 0.0)
        return x


    @triton.jit
    def _channel_params(W, BETA, SCALE, SHIFT, b, ch, mask_c, ssb, ssc, shb, shc,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                        HAS_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr):
        """fp32 [BLOCK_C] vectors w, β, 1+scale, shift for channels `ch` of sample b; absent
        inputs give the identity (1, 0, 1, 0)."""
        w = tl.full([BLOCK_C], 1.0, tl.float32)
        beta = tl.zeros([BLOCK_C], tl.float32)
        s1 = tl.full([BLOCK_C], 1.0, tl.float32)
        sh = tl.zeros([BLOCK_C], tl.float32)
        if HAS_W:
            w = tl.load(W + ch, mask=mask_c, other=0.0).to(tl.float32)
        if HAS_B:
            beta = tl.load(BETA + ch, mask=mask_c, other=0.0).to(tl.float32)
        if HAS_SCALE:
            s1 = 1.0 + tl.load(SCALE + b * ssb + ch * ssc, mask=mask_c, other=0.0).to(tl.float32)
        if HAS_SHIFT:
            sh = tl.load(SHIFT + b * shb + ch * shc, mask=mask_c, other=0.0).to(tl.float32)
        return w, beta, s1, sh


    @triton.jit
    def _apply(x, mean, rstd, w, beta, s1, sh, mask, ACT: tl.constexpr):
        """y from x for a [BLOCK_C, BLOCK_S] tile: the folded v = x·a + d, then SiLU."""
        a = rstd * w * s1
        d = (beta - mean * rstd * w) * s1 + sh
        v = x * a[:, None] + d[:, None]
        if ACT:
            # Padding lanes hold x = 0, i.e. v = d, which can be far out (|μ·r| large) and make
            # exp overflow; they are never stored, but zero them so no inf is ever computed.
            v = tl.where(mask, v, 0.0)
            v = v * tl.sigmoid(v)
        return v


    @triton.jit
    def _grad_v(dy, xhat, w, beta, s1, sh, mask, ACT: tl.constexpr):
        """dv (the gradient at the input of SiLU) from dy, zero on padding lanes. SiLU'(v) =
        σ(v)·(1 + v·(1 − σ(v))), with v recomputed from x̂ rather than stored by the forward."""
        dv = dy
        if ACT:
            v = (xhat * w[:, None] + beta[:, None]) * s1[:, None] + sh[:, None]
            v = tl.where(mask, v, 0.0)   # padding lanes: keep exp finite (as in the forward)
            sig = tl.sigmoid(v)
            dv = dv * sig * (1.0 + v * (1.0 - sig))
        return tl.where(mask, dv, 0.0)


    @triton.jit
    def _group_of(STAT, b, ch, mask_c, G, CPG):
        """Per-channel gather of a per-(sample, group) fp32 statistic: a tile may span groups."""
        return tl.load(STAT + b * G + ch // CPG, mask=mask_c, other=0.0)


    @triton.jit
    def _gn_fwd_kernel(
        X, Y,         # input and output, both viewed as (B, C, HW) through their own strides
        MEAN, RSTD,   # fp32 (B*G,) group statistics from _gn_group_stats_kernel
        W, BETA,      # (C,) affine weight and bias (any float dtype; unused if not HAS_*)
        SCALE, SHIFT, # (B, C) per-sample modulation (strides ssb, ssc / shb, shc)
        sxb, sxc, sxs, syb, syc, sys_,
        ssb, ssc, shb, shc,
        C, HW, G, CPG,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
        ADD, sab, sac, HAS_ADD: tl.constexpr,   # pre-norm channel bias, as in the stats kernel
        WIDE: tl.constexpr,   # 64-bit spatial offsets (position × stride can pass 2³¹)
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        b = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_c = tl.program_id(2)

        # Stage 1: this tile's per-channel constants (its channels may belong to several groups).
        ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = ch < C
        mean = _group_of(MEAN, b, ch, mask_c, G, CPG)
        rstd = _group_of(RSTD, b, ch, mask_c, G, CPG)
        w, beta, s1, sh = _channel_params(W, BETA, SCALE, SHIFT, b, ch, mask_c, ssb, ssc, shb, shc,
                                          HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C)
        add = _channel_add(ADD, b, ch, mask_c, sab, sac, HAS_ADD, BLOCK_C)

        # Stage 2: the tile — one multiply-add, optional SiLU, one store in the output dtype.
        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_s = _wide(offs_s, WIDE)
        mask = mask_c[:, None] & (offs_s < HW)[None, :]
        chl = ch.to(tl.int64)[:, None]
        x = _shifted(tl.load(X + b.to(tl.int64) * sxb + chl * sxc + offs_s[None, :] * sxs,
                             mask=mask, other=0.0), add, mask, HAS_ADD)
        v = _apply(x, mean, rstd, w, beta, s1, sh, mask, ACT)
        tl.store(Y + b.to(tl.int64) * syb + chl * syc + offs_s[None, :] * sys_,
                 v.to(Y.dtype.element_ty), mask=mask)


    @triton.jit
    def _gn_fwd_single_kernel(
        X, Y, MEAN, RSTD, W, BETA, SCALE, SHIFT,   # as in _gn_fwd_kernel
        sxb, sxc, sxs, syb, syc, sys_,
        ssb, ssc, shb, shc,
        HW, G, CPG, eps,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
        ADD, sab, sac, HAS_ADD: tl.constexpr,   # pre-norm channel bias, as in the stats kernel
        WIDE: tl.constexpr,   # 64-bit spatial offsets (position × stride can pass 2³¹)
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """Whole group in one tile (small groups: the UNet's 8×8 level, the tiny preset): one
        program per (sample, group) reads x once, keeps it in registers for the exact two-pass
        statistics, and writes y — one launch, no partials."""
        pid_bg = tl.program_id(0)
        b = pid_bg // G
        g = pid_bg % G
        offs_c = tl.arange(0, BLOCK_C)
        offs_s = tl.arange(0, BLOCK_S)
        offs_s = _wide(offs_s, WIDE)
        mask_c = offs_c < CPG
        mask = mask_c[:, None] & (offs_s < HW)[None, :]
        ch = g * CPG + offs_c
        chl = ch.to(tl.int64)[:, None]
        add = _channel_add(ADD, b, ch, mask_c, sab, sac, HAS_ADD, BLOCK_C)
        x = _shifted(tl.load(X + b.to(tl.int64) * sxb + chl * sxc + offs_s[None, :] * sxs,
                             mask=mask, other=0.0), add, mask, HAS_ADD)
        n = CPG * HW * 1.0   # not .to(): CPG or HW may be a compile-time 1
        mean = tl.sum(tl.sum(x, axis=1), axis=0) / n
        dev = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(dev * dev, axis=1), axis=0) / n + eps)
        tl.store(MEAN + pid_bg, mean)
        tl.store(RSTD + pid_bg, rstd)
        w, beta, s1, sh = _channel_params(W, BETA, SCALE, SHIFT, b, ch, mask_c, ssb, ssc, shb, shc,
                                          HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C)
        v = _apply(x, mean, rstd, w, beta, s1, sh, mask, ACT)
        tl.store(Y + b.to(tl.int64) * syb + chl * syc + offs_s[None, :] * sys_,
                 v.to(Y.dtype.element_ty), mask=mask)


    @triton.jit
    def _gn_bwd_reduce_kernel(
        X, DY,        # input and upstream gradient, (B, C, HW) through their strides
        MEAN, RSTD,   # fp32 (B*G,) from the forward
        W, BETA, SCALE, SHIFT,   # as in the forward (needed to recompute v for SiLU's derivative)
        PS1, PS2,     # fp32 (B, C, NS) partial Σ dv and Σ dv·x̂ per spatial chunk
        sxb, sxc, sxs, sdb, sdc, sds,
        ssb, ssc, shb, shc,
        C, HW, G, CPG, NS, ITERS,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
        ADD, sab, sac, HAS_ADD: tl.constexpr,   # pre-norm channel bias, as in the stats kernel
        WIDE: tl.constexpr,   # 64-bit spatial offsets (position × stride can pass 2³¹)
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        b = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_c = tl.program_id(2)
        ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = ch < C
        mean = _group_of(MEAN, b, ch, mask_c, G, CPG)
        rstd = _group_of(RSTD, b, ch, mask_c, G, CPG)
        w, beta, s1, sh = _channel_params(W, BETA, SCALE, SHIFT, b, ch, mask_c, ssb, ssc, shb, shc,
                                          HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C)
        add = _channel_add(ADD, b, ch, mask_c, sab, sac, HAS_ADD, BLOCK_C)

        chl = ch.to(tl.int64)[:, None]
        xb = X + b.to(tl.int64) * sxb + chl * sxc
        db = DY + b.to(tl.int64) * sdb + chl * sdc
        acc1 = tl.zeros([BLOCK_C], tl.float32)
        acc2 = tl.zeros([BLOCK_C], tl.float32)
        for it in range(0, ITERS):
            offs_s = (pid_s * ITERS + it) * BLOCK_S + tl.arange(0, BLOCK_S)
            offs_s = _wide(offs_s, WIDE)
            mask = mask_c[:, None] & (offs_s < HW)[None, :]
            x = _shifted(tl.load(xb + offs_s[None, :] * sxs, mask=mask, other=0.0), add, mask,
                         HAS_ADD)
            dy = tl.load(db + offs_s[None, :] * sds, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean[:, None]) * rstd[:, None]
            dv = _grad_v(dy, xhat, w, beta, s1, sh, mask, ACT)
            acc1 += tl.sum(dv, axis=1)
            acc2 += tl.sum(dv * xhat, axis=1)
        out = (b * C + ch).to(tl.int64) * NS + pid_s
        tl.store(PS1 + out, acc1, mask=mask_c)
        tl.store(PS2 + out, acc2, mask=mask_c)


    @triton.jit
    def _gn_bwd_group_kernel(
        PS1, PS2,     # fp32 (B, C, NS) partials from _gn_bwd_reduce_kernel
        W, BETA, SCALE, SHIFT,   # as in the forward
        PW, PB,       # fp32 (B, C) per-sample terms of dw, dβ (launcher sums over B)
        DSCALE, DSHIFT,  # fp32 (B, C) gradients of the modulation
        C1, C2,       # fp32 (B*G,) the group means Σ_c w(1+scale)·S1 / N and ·S2 / N
        ssb, ssc, shb, shc,
        C, HW, G, CPG, NS,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """One program per (sample, group): sum its channels' partials into S1, S2, write the
        per-(b, c) parameter-gradient terms and the two group means the dx kernel needs."""
        pid_bg = tl.program_id(0)
        b = pid_bg // G
        g = pid_bg % G
        offs_p = tl.arange(0, BLOCK_P)
        c1v = tl.zeros([BLOCK_C], tl.float32)
        c2v = tl.zeros([BLOCK_C], tl.float32)
        for c0 in range(0, CPG, BLOCK_C):
            oc = c0 + tl.arange(0, BLOCK_C)
            mc = oc < CPG
            ch = g * CPG + oc
            pc = (b * C + ch).to(tl.int64)
            pm = mc[:, None] & (offs_p < NS)[None, :]
            pp = pc[:, None] * NS + offs_p[None, :]
            S1 = tl.sum(tl.load(PS1 + pp, mask=pm, other=0.0), axis=1)
            S2 = tl.sum(tl.load(PS2 + pp, mask=pm, other=0.0), axis=1)
            w, beta, s1, _ = _channel_params(W, BETA, SCALE, SHIFT, b, ch, mc, ssb, ssc, shb, shc,
                                             HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C)
            c1v += w * s1 * S1
            c2v += w * s1 * S2
            tl.store(PW + pc, s1 * S2, mask=mc)
            tl.store(PB + pc, s1 * S1, mask=mc)
            tl.store(DSCALE + pc, w * S2 + beta * S1, mask=mc)
            tl.store(DSHIFT + pc, S1, mask=mc)
        # Not (CPG * HW).to(...): Triton turns integer arguments equal to 1 into compile-time
        # constants (a 1×1 group, or HW = 1), and a constant has no .to().
        n = CPG * HW * 1.0
        tl.store(C1 + pid_bg, tl.sum(c1v, axis=0) / n)
        tl.store(C2 + pid_bg, tl.sum(c2v, axis=0) / n)


    @triton.jit
    def _gn_bwd_dx_kernel(
        X, DY, DX,    # (B, C, HW) through their own strides; DX in x's dtype
        MEAN, RSTD, C1, C2,   # fp32 (B*G,): forward statistics, _gn_bwd_group_kernel's means
        W, BETA, SCALE, SHIFT,
        sxb, sxc, sxs, sdb, sdc, sds, sob, soc, sos,
        ssb, ssc, shb, shc,
        C, HW, G, CPG,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
        ADD, sab, sac, HAS_ADD: tl.constexpr,   # pre-norm channel bias, as in the stats kernel
        WIDE: tl.constexpr,   # 64-bit spatial offsets (position × stride can pass 2³¹)
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        b = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_c = tl.program_id(2)
        ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = ch < C
        mean = _group_of(MEAN, b, ch, mask_c, G, CPG)
        rstd = _group_of(RSTD, b, ch, mask_c, G, CPG)
        c1 = _group_of(C1, b, ch, mask_c, G, CPG)
        c2 = _group_of(C2, b, ch, mask_c, G, CPG)
        w, beta, s1, sh = _channel_params(W, BETA, SCALE, SHIFT, b, ch, mask_c, ssb, ssc, shb, shc,
                                          HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C)
        add = _channel_add(ADD, b, ch, mask_c, sab, sac, HAS_ADD, BLOCK_C)

        # dx = r·(dv·(1+scale)·w − c1 − x̂·c2) for the tile.
        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_s = _wide(offs_s, WIDE)
        mask = mask_c[:, None] & (offs_s < HW)[None, :]
        chl = ch.to(tl.int64)[:, None]
        bl = b.to(tl.int64)
        x = _shifted(tl.load(X + bl * sxb + chl * sxc + offs_s[None, :] * sxs, mask=mask,
                             other=0.0), add, mask, HAS_ADD)
        dy = tl.load(DY + bl * sdb + chl * sdc + offs_s[None, :] * sds, mask=mask,
                     other=0.0).to(tl.float32)
        xhat = (x - mean[:, None]) * rstd[:, None]
        dv = _grad_v(dy, xhat, w, beta, s1, sh, mask, ACT)
        dx = rstd[:, None] * (dv * (s1 * w)[:, None] - c1[:, None] - xhat * c2[:, None])
        tl.store(DX + bl * sob + chl * soc + offs_s[None, :] * sos, dx.to(DX.dtype.element_ty),
                 mask=mask)


    @triton.jit
    def _gn_bwd_single_kernel(
        X, DY, DX, MEAN, RSTD, W, BETA, SCALE, SHIFT,   # as in _gn_bwd_dx_kernel
        PW, PB, DSCALE, DSHIFT,
        sxb, sxc, sxs, sdb, sdc, sds, sob, soc, sos,
        ssb, ssc, shb, shc,
        C, HW, G, CPG,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
        ADD, sab, sac, HAS_ADD: tl.constexpr,   # pre-norm channel bias, as in the stats kernel
        WIDE: tl.constexpr,   # 64-bit spatial offsets (position × stride can pass 2³¹)
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """The backward of _gn_fwd_single_kernel: one program per (sample, group) reads x and dy
        once, reduces S1, S2 in registers and writes dx and the parameter-gradient terms."""
        pid_bg = tl.program_id(0)
        b = pid_bg // G
        g = pid_bg % G
        mean = tl.load(MEAN + pid_bg)
        rstd = tl.load(RSTD + pid_bg)
        offs_c = tl.arange(0, BLOCK_C)
        offs_s = tl.arange(0, BLOCK_S)
        offs_s = _wide(offs_s, WIDE)
        mask_c = offs_c < CPG
        mask = mask_c[:, None] & (offs_s < HW)[None, :]
        ch = g * CPG + offs_c
        chl = ch.to(tl.int64)[:, None]
        bl = b.to(tl.int64)
        w, beta, s1, sh = _channel_params(W, BETA, SCALE, SHIFT, b, ch, mask_c, ssb, ssc, shb, shc,
                                          HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C)
        add = _channel_add(ADD, b, ch, mask_c, sab, sac, HAS_ADD, BLOCK_C)
        x = _shifted(tl.load(X + bl * sxb + chl * sxc + offs_s[None, :] * sxs, mask=mask,
                    other=0.0), add, mask, HAS_ADD)
        dy = tl.load(DY + bl * sdb + chl * sdc + offs_s[None, :] * sds, mask=mask,
                     other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        dv = _grad_v(dy, xhat, w, beta, s1, sh, mask, ACT)
        S1 = tl.sum(dv, axis=1)
        S2 = tl.sum(dv * xhat, axis=1)
        k = w * s1
        n = CPG * HW * 1.0
        c1 = tl.sum(k * S1, axis=0) / n
        c2 = tl.sum(k * S2, axis=0) / n
        dx = rstd * (dv * k[:, None] - c1 - xhat * c2)
        tl.store(DX + bl * sob + chl * soc + offs_s[None, :] * sos, dx.to(DX.dtype.element_ty),
                 mask=mask)
        pc = (b * C + ch).to(tl.int64)
        tl.store(PW + pc, s1 * S2, mask=mask_c)
        tl.store(PB + pc, s1 * S1, mask=mask_c)
        tl.store(DSCALE + pc, w * S2 + beta * S1, mask=mask_c)
        tl.store(DSHIFT + pc, S1, mask=mask_c)


# ----------------------------------------------------------------------------- 3. launchers

# Elements per program tile (split path). Memory-bound kernels want many warps resident per
# SM: at 8 elements per thread (one 16-byte fp16 vector) the kernels compiled for sm_90 need
# 56–128 registers per thread, at 16 elements 120–246 (one 256-thread program per SM for the
# backward reduction). So 2048-element tiles at 8 warps, giving the SD1.5 shapes 512–2048
# programs per kernel.
_TILE = 2048
# Statistics partials per channel are capped so that the per-group merge stays a few KB;
# larger groups give each statistics program several tiles instead.
_MAX_SPLIT = 32
# Channels per tile are capped; a tile takes any run of channels, across group boundaries.
_MAX_BLOCK_C = 256
# Channels-first groups that fit in one tile of at most this many elements take the
# one-program-per-group kernels (one launch, x read once); 0 forces the split path (tests).
_SINGLE_MAX = 4096
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Spatial offsets (position × spatial stride) from this size on are computed in 64 bits.
_WIDE_LIMIT = 2**31


class _Plan(NamedTuple):
    single: bool    # one program per (sample, group), whole group in registers
    block_c: int    # channels per tile
    block_s: int    # positions per tile
    n_cblk: int     # channel blocks (over all C)
    n_stile: int    # spatial tiles
    iters: int      # spatial tiles per statistics chunk
    n_chunk: int    # statistics chunks (partials per channel)


def _plan(C: int, cpg: int, hw: int, channels_last: bool) -> _Plan:
    """Tiles follow the memory layout, so that the contiguous dim is the tile's long side
    and loads are 128-bit: channels-first tiles are long in space; channels-last tiles run
    along C over a power-of-two block that divides it (64 of SD's 320 channels), across
    group boundaries — the per-channel partials are merged per group afterwards."""
    if not channels_last:
        block_c = max(2, triton.next_power_of_2(cpg))
        block_s = max(2, triton.next_power_of_2(hw))
        if block_c * block_s <= _SINGLE_MAX:
            return _Plan(True, block_c, block_s, 1, 1, 1, 1)
        block_s = min(block_s, _TILE)
        block_c = max(2, min(triton.next_power_of_2(C), _TILE // block_s, _MAX_BLOCK_C))
    else:
        factor = C & -C                     # the largest power of two dividing C
        block_c = factor if factor >= 8 else triton.next_power_of_2(C)
        block_c = max(2, min(block_c, _MAX_BLOCK_C))
        block_s = max(2, min(triton.next_power_of_2(hw), _TILE // block_c))
    n_stile = triton.cdiv(hw, block_s)
    iters = triton.cdiv(n_stile, _MAX_SPLIT)
    return _Plan(False, block_c, block_s, triton.cdiv(C, block_c), n_stile, iters,
                 triton.cdiv(n_stile, iters))


def _is_channels_last(x3: torch.Tensor) -> bool:
    """Whether the (B, C, HW) view has channels innermost (the NHWC layout convolutions
    prefer on tensor cores)."""
    return x3.shape[1] > 1 and x3.stride(1) == 1 and x3.shape[2] > 1


def _merge_blocks(cpg: int, n_chunk: int) -> dict:
    """Tile of the per-group merge kernels: BLOCK_C channels × all BLOCK_P partials."""
    block_p = max(2, triton.next_power_of_2(n_chunk))
    return dict(BLOCK_C=max(2, min(triton.next_power_of_2(cpg), 4096 // block_p)),
                BLOCK_P=block_p)


def _num_warps(block_c, block_s):
    """8 elements per thread (see _TILE), between 1 and 16 warps."""
    return max(1, min(16, block_c * block_s // 256))


def _as_bcs(t: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) → (B, C, HW). A view for contiguous and channels-last tensors (their
    spatial dims merge into one stride); a contiguous copy only for exotic layouts."""
    return t.reshape(t.shape[0], t.shape[1], -1)


def _empty_out(x: torch.Tensor) -> torch.Tensor:
    """Output in x's memory format (channels-last stays channels-last), viewable as (B, C, HW).
    Shared by the real and the fake implementation so their strides agree."""
    return torch.empty_like(_as_bcs(x)).view(x.shape)


def _mod_strides(t):
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def wide_loads_expected(C: int, hw: int, channels_last: bool) -> tuple[bool, str]:
    """Whether this layout lets the kernels load x as 128-bit vectors, and if not why — what
    kernels/ptx_audit.py holds each compiled case to. Channels-first tiles run along HW,
    channels-last ones along C; either way the row stride (HW or C) must be a multiple of 16
    for the JIT to prove 16-byte alignment."""
    n, what = (C, "C") if channels_last else (hw, "HW")
    return (n % 16 == 0, "" if n % 16 == 0 else f"{what} = {n} is not a multiple of 16")


def _check(x, num_groups, weight, bias, scale, shift, add=None):
    if x.dim() < 2:
        raise ValueError(f"group_norm: expected (B, C, *spatial), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"group_norm kernel: dtype {x.dtype} not supported ({_DTYPES})")
    C = x.shape[1]
    if C % num_groups:
        raise ValueError(f"group_norm: {C} channels not divisible by {num_groups} groups")
    for name, t, shape in (("weight", weight, (C,)), ("bias", bias, (C,)),
                           ("scale", scale, (x.shape[0], C)), ("shift", shift, (x.shape[0], C)),
                           ("add", add, (x.shape[0], C))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"group_norm: {name} must have shape {shape}, got {tuple(t.shape)}")


def _add_args(add, dummy, *tensors3):
    """Arguments every kernel takes beside x: the pre-norm bias (pointer, (batch, channel)
    strides, flag), and WIDE — whether a spatial offset, position × spatial stride of any of
    the (B, C, HW) views, can pass 2³¹ (channels-last tensors of over 2³¹ elements per sample:
    a 2048² decoder level at 512 channels). Batch and channel offsets are always 64-bit."""
    wide = any(t.shape[2] * t.stride(2) >= _WIDE_LIMIT for t in tensors3)
    if add is None:
        return dict(ADD=dummy, sab=0, sac=0, HAS_ADD=False, WIDE=wide)
    return dict(ADD=add, sab=add.stride(0), sac=add.stride(1), HAS_ADD=True, WIDE=wide)


def _gn_forward(x, weight, bias, scale, shift, add, num_groups, eps, act):
    B, C = x.shape[:2]
    G = num_groups
    cpg = C // G
    x3 = _as_bcs(x)
    hw = x3.shape[2]
    y = _empty_out(x)
    y3 = y.view(B, C, hw)
    plan = _plan(C, cpg, hw, _is_channels_last(x3))
    mean = torch.empty((B, G), device=x.device, dtype=torch.float32)
    rstd = torch.empty((B, G), device=x.device, dtype=torch.float32)
    nw = _num_warps(plan.block_c, plan.block_s)
    tile = dict(BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=nw)
    dummy = mean  # never dereferenced when the matching HAS_* flag is off
    params = (weight if weight is not None else dummy, bias if bias is not None else dummy,
              scale if scale is not None else dummy, shift if shift is not None else dummy)
    strides = (*x3.stride(), *y3.stride(), *_mod_strides(scale), *_mod_strides(shift))
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None,
                 HAS_SHIFT=shift is not None, ACT=act, **_add_args(add, dummy, x3, y3))
    if plan.single:
        _gn_fwd_single_kernel[(B * G,)](
            x3, y3, mean, rstd, *params, *strides, hw, G, cpg, eps, **flags, **tile)
        return y, mean, rstd
    # 1. per-channel partial statistics, 2. merged per group, 3. the fused apply.
    part = torch.empty((3, B * C * plan.n_chunk), device=x.device, dtype=torch.float32)
    _gn_stats_kernel[(B, plan.n_chunk, plan.n_cblk)](
        x3, part, *x3.stride(), C, hw, plan.n_chunk, plan.iters,
        **_add_args(add, dummy, x3), **tile)
    _gn_group_stats_kernel[(B * G,)](part, mean, rstd, C, G, cpg, plan.n_chunk, eps,
                                     **_merge_blocks(cpg, plan.n_chunk), num_warps=4)
    _gn_fwd_kernel[(B, plan.n_stile, plan.n_cblk)](
        x3, y3, mean, rstd, *params, *strides, C, hw, G, cpg, **flags, **tile)
    return y, mean, rstd


def _gn_backward(dy, x, weight, bias, scale, shift, add, mean, rstd, num_groups, act):
    B, C = x.shape[:2]
    G = num_groups
    cpg = C // G
    x3 = _as_bcs(x)
    hw = x3.shape[2]
    dy3 = _as_bcs(dy)
    dx = _empty_out(x)
    dx3 = dx.view(B, C, hw)
    plan = _plan(C, cpg, hw, _is_channels_last(x3))
    dev = x.device
    pw = torch.empty((B, C), device=dev, dtype=torch.float32)
    pb = torch.empty((B, C), device=dev, dtype=torch.float32)
    dscale = torch.empty((B, C), device=dev, dtype=torch.float32)
    dshift = torch.empty((B, C), device=dev, dtype=torch.float32)
    dummy = mean  # never dereferenced when the matching HAS_* flag is off
    w_, b_ = (weight if weight is not None else dummy), (bias if bias is not None else dummy)
    s_, h_ = (scale if scale is not None else dummy), (shift if shift is not None else dummy)
    has = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None,
               HAS_SHIFT=shift is not None)
    flags = dict(has, ACT=act, **_add_args(add, dummy, x3, dy3, dx3))
    mod = (*_mod_strides(scale), *_mod_strides(shift))
    tile = dict(BLOCK_C=plan.block_c, BLOCK_S=plan.block_s,
                num_warps=_num_warps(plan.block_c, plan.block_s))
    if plan.single:
        _gn_bwd_single_kernel[(B * G,)](
            x3, dy3, dx3, mean, rstd, w_, b_, s_, h_, pw, pb, dscale, dshift,
            *x3.stride(), *dy3.stride(), *dx3.stride(), *mod, C, hw, G, cpg, **flags, **tile)
    else:
        # 1. per-channel partial Σ dv, Σ dv·x̂; 2. merged per group (parameter-gradient terms
        # and the two group means); 3. dx.
        ps1 = torch.empty((B, C, plan.n_chunk), device=dev, dtype=torch.float32)
        ps2 = torch.empty((B, C, plan.n_chunk), device=dev, dtype=torch.float32)
        c1 = torch.empty((B, G), device=dev, dtype=torch.float32)
        c2 = torch.empty((B, G), device=dev, dtype=torch.float32)
        _gn_bwd_reduce_kernel[(B, plan.n_chunk, plan.n_cblk)](
            x3, dy3, mean, rstd, w_, b_, s_, h_, ps1, ps2, *x3.stride(), *dy3.stride(), *mod,
            C, hw, G, cpg, plan.n_chunk, plan.iters, **flags, **tile)
        _gn_bwd_group_kernel[(B * G,)](
            ps1, ps2, w_, b_, s_, h_, pw, pb, dscale, dshift, c1, c2, *mod,
            C, hw, G, cpg, plan.n_chunk, **has, **_merge_blocks(cpg, plan.n_chunk),
            num_warps=4)
        _gn_bwd_dx_kernel[(B, plan.n_stile, plan.n_cblk)](
            x3, dy3, dx3, mean, rstd, c1, c2, w_, b_, s_, h_, *x3.stride(), *dy3.stride(),
            *dx3.stride(), *mod, C, hw, G, cpg, **flags, **tile)
    dw = pw.sum(0) if weight is not None else None
    db = pb.sum(0) if bias is not None else None
    # x + add feeds only the normalisation, so the bias's gradient is dx summed over space
    # (training only; one extra read of dx).
    dadd = dx3.sum(2, dtype=torch.float32) if add is not None else None
    return dx, dw, db, dscale, dshift, dadd


# ----------------------------------------------------------------------------- 4. custom ops
# torch.library.custom_op (not triton_op): it compiles with torch.compile(fullgraph=True) as
# one opaque node, including under the Triton interpreter on CPU where the tests run; the
# fake implementations only describe output shapes/strides.


@torch.library.custom_op("ldm_fast::group_norm_fwd", mutates_args=())
def _group_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       scale: torch.Tensor | None, shift: torch.Tensor | None,
                       add: torch.Tensor | None, num_groups: int,
                       eps: float, act: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gn_forward(x, weight, bias, scale, shift, add, num_groups, eps, act)


@_group_norm_fwd_op.register_fake
def _(x, weight, bias, scale, shift, add, num_groups, eps, act):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return _empty_out(x), stats, stats.clone()


@torch.library.custom_op("ldm_fast::group_norm_bwd", mutates_args=())
def _group_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, scale: torch.Tensor | None,
                       shift: torch.Tensor | None, add: torch.Tensor | None, mean: torch.Tensor,
                       rstd: torch.Tensor, num_groups: int, act: bool) -> list[torch.Tensor]:
    """Returns [dx, dweight, dbias, dscale, dshift, dadd]; gradients of absent inputs are
    empty tensors (a custom op cannot return None)."""
    grads = _gn_backward(dy, x, weight, bias, scale, shift, add, mean, rstd, num_groups, act)
    out = [grads[0]]
    for g, t in zip(grads[1:], (weight, bias, scale, shift, add)):
        out.append(g.to(t.dtype) if t is not None else x.new_empty(0))
    return out


@_group_norm_bwd_op.register_fake
def _(dy, x, weight, bias, scale, shift, add, mean, rstd, num_groups, act):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None \
            else x.new_empty(0)
    return [_empty_out(x), like(weight), like(bias), like(scale), like(shift), like(add)]


def _gn_setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, add, num_groups, eps, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, add, mean, rstd)
    ctx.num_groups = num_groups
    ctx.act = act


def _gn_backward_rule(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, add, mean, rstd = ctx.saved_tensors
    grads = _group_norm_bwd_op(dy, x, weight, bias, scale, shift, add, mean, rstd,
                               ctx.num_groups, ctx.act)
    keep = ctx.needs_input_grad
    present = (True, weight is not None, bias is not None, scale is not None,
               shift is not None, add is not None)
    return (*(g if p and k else None for g, p, k in zip(grads, present, keep)),
            None, None, None)


_group_norm_fwd_op.register_autograd(_gn_backward_rule, setup_context=_gn_setup_context)


# ----------------------------------------------------------------------------- 5. API


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel handles this input (dtype); `ops` falls back to eager, saying so."""
    return triton is not None and x.dtype in _DTYPES and x.dim() >= 2


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, act=False, scale=None,
               shift=None, add=None):
    """Fused GroupNorm(x [+ add]) [·w+β] [·(1+scale)+shift] [→ SiLU] with fp32 statistics;
    output in x's dtype and memory format. Differentiable in x, weight, bias, scale, shift
    and add (a (B, C) per-sample channel bias added before the statistics)."""
    _check(x, num_groups, weight, bias, scale, shift, add)
    if not _recorded(x, weight, bias, scale, shift, add):
        return _gn_forward(x, weight, bias, scale, shift, add, num_groups, eps, act)[0]
    y, _, _ = _group_norm_fwd_op(x, weight, bias, scale, shift, add, int(num_groups),
                                 float(eps), bool(act))
    return y


def _recorded(*tensors) -> bool:
    """Whether autograd or torch.compile will see this call. If neither (sampling), the
    launcher is called directly: the custom op's dispatch costs more host time than the
    launch itself at small sizes (measured on CPU with launches stubbed out: ~15–20 µs per
    call, some 90 calls per UNet step)."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors))
