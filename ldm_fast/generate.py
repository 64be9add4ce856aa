"""Noise → sampler loop in latent space → decode: the image-generation pipeline."""

from __future__ import annotations

import torch

from ldm_fast import samplers
from ldm_fast.tiling import decode_tiled


@torch.no_grad()
def generate(model, n: int, sampler: str = "ddim", steps: int = 50, eta: float = 0.0, seed: int = 0,
             cond: dict | None = None, uncond: dict | None = None, guidance: float = 1.0,
             latent_size: tuple[int, int] | None = None, return_latents: bool = False, tile: int = 0,
             **sampler_kwargs):
    """Draw `n` images from a LatentDiffusion. The same seed gives the same images: the initial
    noise and every stochastic update come from one torch.Generator seeded with `seed`.
    A latent_size larger than training samples convolutionally; `tile` > 0 decodes in tiles of
    that many latent pixels (ldm_fast.tiling) so memory stays bounded."""
    device = model.scale_factor.device
    if latent_size is None:
        side = model.cfg.data.resolution // model.factor
        latent_size = (side, side)
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((n, model.latent_channels, *latent_size), generator=generator, device=device)
    # The run's own timestep grid (a converted checkpoint: its original's) unless overridden.
    sampler_kwargs = {**samplers.schedule_defaults(model.cfg, sampler),
                      **{k: v for k, v in sampler_kwargs.items() if v is not None}}
    z = samplers.sample(sampler, model, x, model.schedule, steps=steps, eta=eta, cond=cond, uncond=uncond,
                        guidance=guidance, generator=generator, **sampler_kwargs)
    if tile:
        images = decode_tiled(model.decode, z, model.factor, tile=tile, overlap=max(1, tile // 4))
    else:
        images = model.decode(z)
    images = images.clamp(-1, 1)
    return (images, z) if return_latents else images
