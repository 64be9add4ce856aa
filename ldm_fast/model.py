"""The latent diffusion model: a frozen first stage, a UNet in its latent space, a schedule.

`LatentDiffusion` is the one object that training, sampling, export and the benchmarks share.
Images → `encode()` → scaled latents z (the UNet's data); sampler → z → `decode()` → images.
Conditioning reaches the UNet as a dict (the samplers' `cond`):
  'context'      (B, L, D)   cross-attention tokens τθ(y)
  'class_labels' (B,)        class ids added to the time embedding
  'concat'       (B, C, h, w) spatially aligned inputs concatenated to z_t
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ldm_fast import distributed
from ldm_fast.autoencoder import build_first_stage
from ldm_fast.config import Config
from ldm_fast.diffusion import make_schedule
from ldm_fast.unet import UNet


class LatentDiffusion(nn.Module):
    def __init__(self, cfg: Config, first_stage: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.first_stage = first_stage if first_stage is not None else build_first_stage(cfg.autoencoder)
        self.first_stage.requires_grad_(False).eval()
        self.unet = UNet(cfg.unet)
        d = cfg.diffusion
        self.schedule = make_schedule(d.schedule, d.timesteps, d.linear_start, d.linear_end, d.parameterization)
        # Stored with the weights: 1/std of the first training latents for KL stages (paper
        # Sec. 3.1 / G), or a fixed value such as 0.18215; VQ stages keep 1.
        self.register_buffer("scale_factor", torch.tensor(float(d.scale_factor)))

    def train(self, mode: bool = True):
        super().train(mode)
        self.first_stage.eval()  # frozen: BatchNorm/dropout never switch to training behaviour
        return self

    @property
    def latent_channels(self) -> int:
        return self.cfg.unet.out_channels

    @property
    def factor(self) -> int:
        return self.cfg.autoencoder.factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = True, generator=None, noise=None) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents (KL: a posterior sample unless sample=False)."""
        return self.first_stage.encode_latent(images, sample=sample, generator=generator, noise=noise) * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images (roughly [-1, 1]; clamp before saving)."""
        return self.first_stage.decode(z / self.scale_factor)

    @torch.no_grad()
    def set_scale_from_latents(self, z_unscaled: torch.Tensor) -> float:
        """scale_by_std: rescale so that the latents handed to the UNet have unit variance. The
        moments are averaged over ranks, so every rank sets the value the global batch gives."""
        z = z_unscaled.float()
        moments = distributed.all_reduce_mean(torch.stack([z.mean(), z.pow(2).mean()]))
        value = float((moments[1] - moments[0] ** 2).clamp_min(1e-16).rsqrt())
        self.scale_factor.fill_(value)
        return value

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        """The model the samplers and the loss call: ε (or v) prediction for noisy latents x at t."""
        cond = cond or {}
        if "concat" in cond:
            x = torch.cat([x, cond["concat"].to(x.dtype)], dim=1)
        return self.unet(x, t, context=cond.get("context"), class_labels=cond.get("class_labels"))


class EMA(nn.Module):
    """Exponential moving average of a module's parameters with the warm-up of the original
    code: decay_n = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, module: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(module).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        n = int(self.num_updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        for ema_p, p in zip(self.module.parameters(), module.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), module.buffers()):
            ema_b.copy_(b)
