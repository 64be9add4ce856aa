"""Stage 2 backbone: the time-conditional UNet ε_θ(z_t, t, c) of latent diffusion.

Structure (Rombach et al. 2022, Sec. 3.3 and App. E; the ADM UNet of Dhariwal & Nichol 2021):
a sinusoidal timestep embedding → Linear, SiLU, Linear; an encoder of ResBlocks with
self-attention blocks or SpatialTransformers (self-attention, cross-attention to the context
τ_θ(y), GEGLU feed-forward) at chosen downsampling factors; a middle block; a decoder with skip
connections. The time embedding is added to the features or applied as GroupNorm scale/shift.
Output projections start at zero so each residual branch starts as the identity.
Module names follow the original checkpoints (input_blocks.N.M, middle_block, output_blocks,
time_embed, out) so released weights map onto them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm_fast import ops
from ldm_fast.config import UNetConfig

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds without torch.distributed
    DTensor = ()   # isinstance(x, ()) is always False
from ldm_fast.layers import Conv2d, GroupNorm, TokenConv1d, Upsample, zero_module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [cos | sin] as the original."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _maybe_checkpoint(module: nn.Module, fn, *args):
    if module.training and getattr(module, "gradient_checkpointing", False):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """GN+SiLU → conv → (+emb or GN·(1+scale)+shift) → SiLU → dropout → zero conv, plus skip.
    With `resample` ("up"/"down") it also changes resolution (BigGAN-style up/down blocks)."""

    def __init__(self, in_ch, emb_dim, out_ch, groups, dropout=0.0, scale_shift=False, resample=None):
        super().__init__()
        self.scale_shift = scale_shift
        # Indices mirror the original Sequential(norm, SiLU, conv): SiLU is fused into the norm.
        self.in_layers = nn.Sequential(GroupNorm(groups, in_ch, act=True), nn.Identity(),
                                       Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch))
        self.out_layers = nn.Sequential(GroupNorm(groups, out_ch, act=True), nn.Identity(), nn.Dropout(dropout),
                                        zero_module(Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip_connection = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.resample = resample
        if resample == "up":
            self.h_upd = self.x_upd = lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest")
        elif resample == "down":
            self.h_upd = self.x_upd = lambda t: F.avg_pool2d(t, 2)

    def forward(self, x, emb, projected: bool = False):
        """emb: the UNet's time embedding (B, emb_dim), or with `projected` this block's
        emb_layers(emb) already computed (TimeEmbeddingProjections)."""
        return _maybe_checkpoint(self, self._forward, x, emb, projected)

    def _forward(self, x, emb, projected=False):
        h = self.in_layers[0](x)
        if self.resample:
            h, x = self.h_upd(h), self.x_upd(x)
        h = self.in_layers[2](h)
        e = (emb if projected else self.emb_layers(emb)).to(h.dtype)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h, scale=scale, shift=shift)
        else:
            h = self.out_layers[0](h, add=e)   # GroupNorm(h + e): the add rides in the norm's pass
        h = self.out_layers[3](self.out_layers[2](h))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head spatial self-attention (no context) with a zero-initialised output projection."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm(groups, channels)
        # 1×1 convolutions in the checkpoints, applied to (B, T, C) tokens as matmuls.
        self.qkv = TokenConv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(TokenConv1d(channels, channels, 1))

    def forward(self, x):
        b, c, *spatial = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)   # (B, T, C): a view when channels-last
        qkv = self.qkv(tokens)                               # (B, T, 3C)
        # The released checkpoints order qkv head-major ("legacy" order): per head, q then k then v.
        q, k, v = qkv.reshape(b, -1, self.num_heads, 3 * c // self.num_heads).transpose(1, 2).chunk(3, dim=-1)
        out = ops.attention(q, k, v).transpose(1, 2).reshape(b, -1, c)   # (B, T, C)
        return x + self.proj_out(out).transpose(1, 2).reshape(b, c, *spatial)


class CrossAttention(nn.Module):
    """Multi-head attention of x over a context (itself when context is None)."""

    def __init__(self, query_dim, context_dim, heads, dim_head, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, _ = x.shape

        def heads(t):  # (B, L, H·D) → (B, H, L, D)
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)

        out = ops.attention(heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context)))
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one projection to 2× width, gate by GELU."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        return ops.geglu(self.proj(x))   # x · GELU(gate), fused under the kernel switch


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention → cross-attention → GEGLU feed-forward, each residual."""

    def __init__(self, dim, heads, dim_head, context_dim, dropout=0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None):
        return _maybe_checkpoint(self, self._forward, x, context)

    def _forward(self, x, context):
        # Each residual add that a LayerNorm follows is fused with it (ops.add_layer_norm).
        x, h = ops.add_layer_norm(x, self.attn1(self.norm1(x)), self.norm2.weight, self.norm2.bias, self.norm2.eps)
        x, h = ops.add_layer_norm(x, self.attn2(h, context), self.norm3.weight, self.norm3.bias, self.norm3.eps)
        return x + self.ff(h)


class SpatialTransformer(nn.Module):
    """Feature map → tokens → transformer blocks (cross-attending to the context) → feature map."""

    def __init__(self, channels, heads, dim_head, depth, context_dim, groups, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth))
        self.proj_out = zero_module(Conv2d(inner, channels, 1))

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x))
        t = t.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            t = block(t, context)
        t = t.transpose(1, 2).reshape(b, -1, h, w)
        return x + self.proj_out(t)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x, emb, context=None):
        """emb: the time embedding, or a dict ResBlock → its projected embedding."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb[layer], projected=True) if isinstance(emb, dict) else layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class TimeEmbeddingProjections:
    """The time-embedding projections (SiLU → Linear) of many ResBlocks computed at once: SiLU
    once, one matmul against their weights concatenated along the output dimension, then split
    per block — the same maths as each block's own emb_layers, ~20 small GEMMs fewer per step.
    The weights stay per block (checkpoints unchanged); their concatenation is cached while
    no weight changes (tensor version counters); rebuilt inside autograd when training and
    under torch.compile (which traces the concatenation into its graph). Writes through
    `.data` bypass version counters: after such a write, drop the cache (`_key = None`)."""

    def __init__(self, blocks: list[ResBlock]):
        self.blocks = blocks
        self.sizes = [b.emb_layers[1].out_features for b in blocks]
        self._key, self._cached = None, None

    def applicable(self) -> bool:
        """False while the weights are sharded (FSDP's DTensors): a block's shard is gathered
        only for its own forward, after this would have run."""
        return bool(self.blocks) and not any(isinstance(b.emb_layers[1].weight, DTensor) for b in self.blocks)

    def _weights(self):
        lins = [b.emb_layers[1] for b in self.blocks]
        if (torch.is_grad_enabled() and any(m.weight.requires_grad for m in lins)) or torch.compiler.is_compiling():
            return torch.cat([m.weight for m in lins]), torch.cat([m.bias for m in lins])
        key = tuple((id(m.weight), m.weight._version, m.bias._version, m.weight.dtype, m.weight.device)
                    for m in lins)
        if key != self._key:
            with torch.no_grad():
                self._cached = torch.cat([m.weight for m in lins]), torch.cat([m.bias for m in lins])
            self._key = key
        return self._cached

    def __call__(self, emb: torch.Tensor) -> dict:
        weight, bias = self._weights()
        out = F.linear(F.silu(emb), weight, bias).split(self.sizes, dim=1)
        return dict(zip(self.blocks, out))


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, g = cfg.model_channels, cfg.groups
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes > 0:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        def resblock(i, o, resample=None):
            return ResBlock(i, emb_dim, o, g, cfg.dropout, cfg.use_scale_shift_norm, resample)

        def attention(ch):
            if cfg.num_head_channels > 0:
                heads, dim_head = ch // cfg.num_head_channels, cfg.num_head_channels
            else:
                heads, dim_head = cfg.num_heads, ch // cfg.num_heads
            if cfg.use_spatial_transformer:
                return SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth,
                                          cfg.context_dim or None, g, cfg.dropout)
            return AttentionBlock(ch, heads, g)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [resblock(ch, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = resblock(ch, ch, "down") if cfg.resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch), resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(resblock(ch, ch, "up") if cfg.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm(g, ch, act=True), nn.Identity(),
                                 zero_module(Conv2d(mc, cfg.out_channels, 3, padding=1)))
        self.set_gradient_checkpointing(cfg.gradient_checkpointing)
        # Not a submodule: it holds references to the ResBlocks, no parameters of its own.
        self.__dict__["time_projections"] = TimeEmbeddingProjections(
            [m for m in self.modules() if isinstance(m, ResBlock)])

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for m in self.modules():
            if isinstance(m, (ResBlock, BasicTransformerBlock)):
                m.gradient_checkpointing = enabled

    def forward(self, x, timesteps, context=None, class_labels=None):
        """x: (B, in_channels, h, w); timesteps: (B,) float or int; context: (B, L, context_dim);
        class_labels: (B,) int64 when num_classes > 0. Returns (B, out_channels, h, w)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype))
        if self.cfg.num_classes > 0:
            if class_labels is None:
                raise ValueError("this UNet is class-conditional: pass class_labels")
            emb = emb + self.label_emb(class_labels)
        # The fast path (ops.model_fast_path): channels-last activations and every ResBlock's
        # time-embedding projection in one matmul; the output is handed back contiguous.
        fast = ops.model_fast_path(x)
        if fast and self.time_projections.applicable():
            emb = self.time_projections(emb)
        h, skips = ops.channels_last(x), []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        out = self.out[2](self.out[0](h))
        return out.contiguous() if fast else out
