"""Stage 1, perceptual compression: VQGAN-style encoder/decoder with a KL or VQ bottleneck.

`Encoder` maps x (B, 3, H, W) to (B, z, H/f, W/f) with f = 2^(levels-1); `Decoder` inverts it.
`AutoencoderKL` puts a diagonal Gaussian posterior on the latent (sampled with the
reparameterisation trick, pulled toward N(0, I) by a tiny KL weight); `VQModel` quantises to
a codebook inside the decoder, so the latent handed to stage 2 is the *pre*-quantisation
feature map (Rombach et al. 2022, Sec. 3.1). `IdentityFirstStage` is f = 1: the pixel-space
baseline. Module names follow the original checkpoints (encoder.down.i.block.j.norm1, …) so
released weights map onto them with few rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_fast import ops
from ldm_fast.config import AutoencoderConfig
from ldm_fast.layers import Conv2d, GroupNorm, TokenConv2d, Upsample


def _norm(channels: int, groups: int, act: bool = False) -> GroupNorm:
    return GroupNorm(groups, channels, eps=1e-6, act=act)


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice, plus a (1×1-projected) skip."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_ch, groups, act=True)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups, act=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.dropout(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H·W positions (1×1-conv q, k, v)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        # 1×1 convolutions in the checkpoints, applied to (B, H·W, C) tokens as matmuls.
        self.q = TokenConv2d(channels, channels, 1)
        self.k = TokenConv2d(channels, channels, 1)
        self.v = TokenConv2d(channels, channels, 1)
        self.proj_out = TokenConv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)   # (B, H·W, C): a view when channels-last
        q, k, v = (m(tokens).unsqueeze(1) for m in (self.q, self.k, self.v))   # one head
        out = ops.attention(q, k, v).squeeze(1)
        return x + self.proj_out(out).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after asymmetric (0, 1, 0, 1) padding, as the original first stages."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Level(nn.Module):
    """One resolution level: `block` ResnetBlocks, `attn` blocks, and an optional resampler."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, dropout: float, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        super().__init__()
        ch, g = cfg.base_channels, cfg.groups
        self.conv_in = Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_ch, side = ch, cfg.resolution
        for i, mult in enumerate(cfg.channel_mult):
            level, out_ch = _Level(), ch * mult
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(in_ch, out_ch, g, cfg.dropout))
                in_ch = out_ch
                if side in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(in_ch, g))
            if i != len(cfg.channel_mult) - 1:
                level.downsample = Downsample(in_ch)
                side //= 2
            self.down.append(level)
        self.mid = _Mid(in_ch, g, cfg.dropout, cfg.mid_attention)
        self.norm_out = _norm(in_ch, g, act=True)
        self.conv_out = Conv2d(in_ch, out_channels, 3, padding=1)

    def forward(self, x):
        # Channels-last on the fast path (ops.channels_last): every layer below keeps it.
        h = self.conv_in(ops.channels_last(x))
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(self.norm_out(self.mid(h))).contiguous()


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g, levels = cfg.base_channels, cfg.groups, len(cfg.channel_mult)
        in_ch = ch * cfg.channel_mult[-1]
        side = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = Conv2d(cfg.z_channels, in_ch, 3, padding=1)
        self.mid = _Mid(in_ch, g, cfg.dropout, cfg.mid_attention)
        # Built lowest resolution first, stored so that up[0] is the highest resolution
        # (the original layout, which checkpoint conversion relies on).
        up = []
        for i in reversed(range(levels)):
            level, out_ch = _Level(), ch * cfg.channel_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(in_ch, out_ch, g, cfg.dropout))
                in_ch = out_ch
                if side in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(in_ch, g))
            if i != 0:
                level.upsample = Upsample(in_ch)
                side *= 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(in_ch, g, act=True)
        self.conv_out = Conv2d(in_ch, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        side = z.shape[-1] * 2 ** (len(self.up) - 1)   # the output's side: where most of the work is
        h = self.mid(self.conv_in(ops.channels_last(z, largest_map=side * side)))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(self.norm_out(h)).contiguous()

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight differentiates against."""
        return self.conv_out.weight


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from a (B, 2c, h, w) moments tensor."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent elements, per batch item."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with a straight-through gradient (van den Oord et al. 2017).
    Loss as in the released VQ first stages: mean‖sg(z_q) − z‖² + β·mean‖z_q − sg(z)‖²."""

    def __init__(self, n_embed: int, dim: int, beta: float):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z):
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        codebook = self.embedding.weight
        # ‖z − e‖² = ‖z‖² + ‖e‖² − 2 z·e, without materialising the (N, K, c) differences.
        dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        indices = dist.argmin(dim=1)
        zq = codebook[indices].view(b, h, w, c).permute(0, 3, 1, 2)
        loss = (zq.detach() - z).pow(2).mean() + self.beta * (zq - z.detach()).pow(2).mean()
        zq = z + (zq - z).detach()  # straight-through: the decoder's gradient reaches the encoder
        counts = torch.bincount(indices, minlength=codebook.shape[0]).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        stats = {"perplexity": perplexity.detach(), "codes_used": (counts > 0).sum().detach()}
        return zq, loss, indices.view(b, h, w), stats


class AutoencoderKL(nn.Module):
    kind = "kl"

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, 2 * cfg.z_channels)
        self.decoder = Decoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = Conv2d(cfg.z_channels, cfg.z_channels, 1)
        # The learned log-variance of the reconstruction term lives with the loss in the
        # original code; it is part of the model here so one checkpoint holds all of stage 1.
        self.logvar = nn.Parameter(torch.zeros(()))

    def encode(self, x) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def encode_latent(self, x, sample: bool = True, generator=None, noise=None):
        """The stage-2 latent: a posterior sample (training) or its mean."""
        posterior = self.encode(x)
        return posterior.sample(generator, noise) if sample else posterior.mode()

    def forward(self, x, sample: bool = True, noise=None):
        posterior = self.encode(x)
        z = posterior.sample(noise=noise) if sample else posterior.mode()
        return self.decode(z), posterior.kl().mean() * self.cfg.kl_weight, {"kl": posterior.kl().mean().detach()}


class VQModel(nn.Module):
    kind = "vq"

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, cfg.z_channels)
        self.decoder = Decoder(cfg)
        self.quant_conv = Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.z_channels, cfg.vq_beta)
        self.post_quant_conv = Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x):
        """Pre-quantisation latent: the quantiser belongs to the decoder (paper Sec. 3.1)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, h):
        zq, _, _, _ = self.quantize(h)
        return self.decoder(self.post_quant_conv(zq))

    def encode_latent(self, x, sample: bool = True, generator=None, noise=None):
        return self.encode(x)

    def forward(self, x, sample: bool = True, noise=None):
        zq, qloss, _, stats = self.quantize(self.encode(x))
        return self.decoder(self.post_quant_conv(zq)), qloss, stats


class IdentityFirstStage(nn.Module):
    """f = 1: diffusion runs on pixels (the paper's LDM-1 baseline). Nothing to train."""

    kind = "identity"

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg

    def encode_latent(self, x, sample: bool = True, generator=None, noise=None):
        return x

    def decode(self, z):
        return z

    def forward(self, x, sample: bool = True, noise=None):
        return x, x.new_zeros(()), {}


def build_first_stage(cfg: AutoencoderConfig) -> nn.Module:
    return {"kl": AutoencoderKL, "vq": VQModel, "identity": IdentityFirstStage}[cfg.kind](cfg)
