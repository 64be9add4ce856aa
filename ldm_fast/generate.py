"""`generate(model, n, cond=…)`: the functional form of ldm_fast.pipeline.Pipeline for a
LatentDiffusion in memory and already-encoded conditions (tests, notebooks that build their
own cond dicts). It only forwards to `Pipeline.sample`, so the seeds and the loop are the
Pipeline's."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, n: int, sampler: str = "ddim", steps: int = 50, eta: float = 0.0, seed: int = 0,
             cond: dict | None = None, uncond: dict | None = None, guidance: float = 1.0,
             latent_size: tuple[int, int] | None = None, return_latents: bool = False, tile: int = 0,
             **sampler_kwargs):
    """`n` images in [-1, 1] (on the model's device) from `model` (a LatentDiffusion, or a
    wrapper exposing its cfg, schedule, decode and scale_factor such as SRImageGuidance)."""
    from ldm_fast.pipeline import Pipeline

    images, z = Pipeline.from_model(model).sample(n, cond, uncond, seed=seed, sampler=sampler, steps=steps,
                                                  eta=eta, guidance=guidance, latent_size=latent_size,
                                                  tile=tile, **sampler_kwargs)
    return (images, z) if return_latents else images
