"""Noise → sampler loop in latent space → decode: the image-generation pipeline."""

from __future__ import annotations

import torch

from ldm_fast import samplers


@torch.no_grad()
def generate(model, n: int, sampler: str = "ddim", steps: int = 50, eta: float = 0.0, seed: int = 0,
             cond: dict | None = None, uncond: dict | None = None, guidance: float = 1.0,
             latent_size: tuple[int, int] | None = None, return_latents: bool = False, **sampler_kwargs):
    """Draw `n` images from a LatentDiffusion. The same seed gives the same images: the initial
    noise and every stochastic update come from one torch.Generator seeded with `seed`."""
    device = model.scale_factor.device
    if latent_size is None:
        side = model.cfg.data.resolution // model.factor
        latent_size = (side, side)
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((n, model.latent_channels, *latent_size), generator=generator, device=device)
    z = samplers.sample(sampler, model, x, model.schedule, steps=steps, eta=eta, cond=cond, uncond=uncond,
                        guidance=guidance, generator=generator, **sampler_kwargs)
    images = model.decode(z).clamp(-1, 1)
    return (images, z) if return_latents else images
