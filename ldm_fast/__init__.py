"""ldm_fast: latent diffusion models with fused kernels, export and benchmarks."""

__version__ = "0.1.0"
