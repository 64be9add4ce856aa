"""ldm_fast: latent diffusion models with fused kernels, export and benchmarks.

    from ldm_fast import Pipeline
    pipe = Pipeline.from_run_dir("runs/tiny-text")
    images = pipe(prompt="a large red circle on a plain background", n=4).pil
"""

__version__ = "0.1.0"
__all__ = ["Pipeline"]


def __getattr__(name):
    # Lazy: `import ldm_fast` stays cheap (no torch model code, never triton) until used.
    if name == "Pipeline":
        from ldm_fast.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'ldm_fast' has no attribute {name!r}")
