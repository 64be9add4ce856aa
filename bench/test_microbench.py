"""pytest-benchmark microbenchmarks: the fused kernels against their eager references, and one
UNet step. Run on demand — the default `pytest` collects tests/ only:

    pytest bench/test_microbench.py                          # all that can run here
    pytest bench/test_microbench.py --benchmark-json=out.json
    pytest bench/test_microbench.py -k unet --benchmark-compare

The Triton cases need CUDA (on CPU the kernels would run in the interpreter, whose speed means
nothing) and are skipped without it; the eager references and the UNet step also run on CPU,
where only ratios between cases of the same run mean anything. Every timed call is followed by
a device synchronisation, so GPU work is inside its own timing.
"""

from __future__ import annotations

import pytest
import torch

from ldm_fast import ops

pytestmark = pytest.mark.benchmark_only

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32
needs_cuda = pytest.mark.skipif(not CUDA, reason="Triton kernels need CUDA (the CPU interpreter's speed means nothing)")

# (name, shape): the tiny preset's training batch, and SD1.5 at 512² on GPUs only.
GN_SHAPES = [("tiny", (32, 128, 8, 8), 16)] + ([("sd", (2, 320, 64, 64), 32)] if CUDA else [])
ATTN_SHAPES = [("tiny", (32, 2, 16, 32), 16)] + ([("sd-self", (2, 8, 4096, 40), 4096),
                                                   ("sd-cross", (2, 8, 4096, 40), 77)] if CUDA else [])


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # reproducible on shared CPU cores (see bench/benchlib.set_threads)
    yield
    torch.set_num_threads(threads)


def synced(fn):
    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out
    return run


# ----------------------------------------------------------------------------- GroupNorm(+SiLU)

@pytest.mark.parametrize("impl", ["eager", pytest.param("triton", marks=needs_cuda)])
@pytest.mark.parametrize("name,shape,groups", GN_SHAPES, ids=[s[0] for s in GN_SHAPES])
def test_groupnorm_silu(benchmark, impl, name, shape, groups):
    from ldm_fast.kernels import groupnorm as k

    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(shape, device=DEV, generator=g).to(DTYPE)
    w = torch.randn(shape[1], device=DEV, generator=g)
    b = torch.randn(shape[1], device=DEV, generator=g)
    fn = (lambda: k.group_norm(x, groups, w, b, act=True)) if impl == "triton" else \
         (lambda: k.group_norm_ref(x, groups, w, b, act=True))
    benchmark.group = f"groupnorm-{name}"
    benchmark(synced(fn))


# ----------------------------------------------------------------------------- attention

@pytest.mark.parametrize("impl", ["eager", pytest.param("triton", marks=needs_cuda)])
@pytest.mark.parametrize("name,shape,lk", ATTN_SHAPES, ids=[s[0] for s in ATTN_SHAPES])
def test_attention(benchmark, impl, name, shape, lk):
    from ldm_fast.kernels import attention as k

    b, h, lq, d = shape
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(b, h, lq, d, device=DEV, generator=g).to(DTYPE)
    kk = torch.randn(b, h, lk, d, device=DEV, generator=g).to(DTYPE)
    v = torch.randn(b, h, lk, d, device=DEV, generator=g).to(DTYPE)
    fn = (lambda: k.attention(q, kk, v)) if impl == "triton" else (lambda: k.attention_ref(q, kk, v))
    benchmark.group = f"attention-{name}"
    benchmark(synced(fn))


# ----------------------------------------------------------------------------- sampler step

@pytest.mark.parametrize("impl", ["eager", pytest.param("triton", marks=needs_cuda)])
def test_ddim_step_guided(benchmark, impl):
    from ldm_fast.kernels import sampler_steps as k

    shape = (2, 4, 64, 64) if CUDA else (8, 3, 8, 8)
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(shape, device=DEV, generator=g).to(DTYPE)
    out = torch.randn((2 * shape[0], *shape[1:]), device=DEV, generator=g).to(DTYPE)   # [uncond; cond]
    step = k.ddim_step if impl == "triton" else k.ddim_step_ref
    benchmark.group = "ddim-step-cfg"
    benchmark(synced(lambda: step(x, out, 0.5, 0.6, guidance=7.5)))


# ----------------------------------------------------------------------------- one UNet step

@pytest.mark.parametrize("kernels", ["eager", pytest.param("triton", marks=needs_cuda)])
def test_unet_step_tiny(benchmark, kernels):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import randomize_zero_layers

    from ldm_fast.config import get_preset
    from ldm_fast.model import LatentDiffusion

    torch.manual_seed(0)
    model = LatentDiffusion(get_preset("tiny")).eval().requires_grad_(False)
    randomize_zero_layers(model)
    model = model.to(DEV, DTYPE)
    x = torch.randn(8, 3, 8, 8, device=DEV, dtype=DTYPE)
    t = torch.full((8,), 500.0, device=DEV)
    with ops.backend(kernels), torch.inference_mode():
        model(x, t)   # first call (kernel compilation/autotuning) outside the timing
        benchmark.group = "unet-step-tiny-b8"
        benchmark.pedantic(synced(lambda: model(x, t)), rounds=10, warmup_rounds=2, iterations=1)
