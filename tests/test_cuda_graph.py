"""CUDA-graph capture of the denoising step (ldm_fast/cuda_graph.py).

Without a GPU: the fallback (one line, eager result) and the static-buffer logic, driven by a
stand-in capture that behaves like a graph — the replay recomputes from the static buffers
only, so a missed copy or a stale buffer shows up as a wrong output. On a GPU: the real
capture of a small UNet against eager calls."""

import warnings

import pytest
import torch

from ldm_fast.config import UNetConfig
from ldm_fast.cuda_graph import CUDAGraphDenoiser, signature
from ldm_fast.unet import UNet


def denoiser(x, t, cond):
    out = x * 2 + t.view(-1, *[1] * (x.dim() - 1))
    if "context" in cond:
        out = out + cond["context"].mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return out * cond.get("scale", 1.0)


class StandInCapture:
    """Records the calls; its replay reads only the static inputs, as a graph would."""

    def __init__(self, fail=False):
        self.warmups, self.captures, self.fail = 0, 0, fail

    def __call__(self, fn, static, warmup, pool):
        for _ in range(warmup):
            fn(*static.args())
            self.warmups += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        out = fn(*static.args())

        def replay():
            out.copy_(fn(*static.args()))
        return replay, out


def _x(b, seed, side=4):
    return torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_cpu_tensors_fall_back_with_one_line():
    graphed = CUDAGraphDenoiser(denoiser)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            x, t = _x(2, seed), torch.tensor([3.0, 5.0])
            torch.testing.assert_close(graphed(x, t, {}), denoiser(x, t, {}))
    lines = [str(w.message) for w in caught if "cuda_graph" in str(w.message)]
    assert len(lines) == 1 and "without a CUDA graph" in lines[0], lines
    assert graphed.captures == 0


def test_static_buffers_follow_every_call_and_capture_once_per_signature():
    cap = StandInCapture()
    graphed = CUDAGraphDenoiser(denoiser, warmup=3, capture=cap)
    ctx = torch.randn(2, 7, 8)
    outs = []
    for seed in range(4):   # same signature, new values each call
        x, t = _x(2, seed), torch.tensor([float(seed), 9.0])
        c = {"context": ctx + seed, "scale": 0.5}
        out = graphed(x, t, c)
        torch.testing.assert_close(out, denoiser(x, t, c))
        outs.append((out, denoiser(x, t, c)))
    assert cap.captures == 1 and cap.warmups == 3
    for out, expected in outs:   # cloned outputs are not overwritten by later replays
        torch.testing.assert_close(out, expected)

    # A new batch size (e.g. guidance doubling the batch) captures again; going back reuses.
    x4, t4 = _x(4, 9), torch.arange(4.0)
    c4 = {"context": torch.randn(4, 7, 8), "scale": 0.5}
    torch.testing.assert_close(graphed(x4, t4, c4), denoiser(x4, t4, c4))
    assert cap.captures == 2
    x, t = _x(2, 11), torch.tensor([1.0, 2.0])
    torch.testing.assert_close(graphed(x, t, {"context": ctx, "scale": 0.5}), denoiser(x, t, {"context": ctx, "scale": 0.5}))
    assert cap.captures == 2
    # A different non-tensor value is a different graph (it was baked into the capture).
    torch.testing.assert_close(graphed(x, t, {"context": ctx, "scale": 2.0}), denoiser(x, t, {"context": ctx, "scale": 2.0}))
    assert cap.captures == 3


def test_signature_covers_shape_dtype_and_keys():
    x, t = _x(2, 0), torch.zeros(2)
    base = signature(x, t, {"a": x})
    assert signature(x.double(), t, {"a": x}) != base
    assert signature(x, t, {"b": x}) != base
    assert signature(x, t, {"a": x[:1]}) != base
    assert signature(x + 1, t + 1, {"a": x * 3}) == base


def test_least_recently_used_graphs_are_dropped():
    cap = StandInCapture()
    graphed = CUDAGraphDenoiser(denoiser, capture=cap, max_graphs=2)
    for b in (1, 2, 3, 1):   # 1 was dropped when 3 came in: captured again
        graphed(_x(b, b), torch.zeros(b), {})
    assert cap.captures == 4


def test_uncloned_output_is_the_static_buffer():
    graphed = CUDAGraphDenoiser(denoiser, capture=StandInCapture(), clone_output=False)
    a = graphed(_x(2, 0), torch.zeros(2), {})
    b = graphed(_x(2, 1), torch.zeros(2), {})
    assert a is b


def test_failed_capture_falls_back_once_and_is_not_retried():
    cap = StandInCapture(fail=True)
    graphed = CUDAGraphDenoiser(denoiser, warmup=1, capture=cap)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            x, t = _x(2, seed), torch.ones(2)
            torch.testing.assert_close(graphed(x, t, {}), denoiser(x, t, {}))
    lines = [str(w.message) for w in caught if "cuda_graph" in str(w.message)]
    assert len(lines) == 1 and "capture failed (RuntimeError" in lines[0], lines
    assert cap.warmups == 1   # one attempt for the signature, then eager without retrying


def test_warmup_must_be_positive():
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphDenoiser(denoiser, warmup=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_capture_of_a_unet_step_matches_eager():
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(2,), num_head_channels=16, groups=8,
                     use_spatial_transformer=True, context_dim=32)
    unet = UNet(cfg).cuda().eval()

    def fn(x, t, cond):
        return unet(x, t, context=cond["context"])
    graphed = CUDAGraphDenoiser(fn)
    with torch.no_grad():
        for seed in range(3):
            x = torch.randn(2, 4, 16, 16, device="cuda")
            t = torch.tensor([10.0 * seed, 500.0], device="cuda")
            cond = {"context": torch.randn(2, 5, 32, device="cuda")}
            torch.testing.assert_close(graphed(x, t, cond), fn(x, t, cond), atol=1e-4, rtol=1e-4)
    assert graphed.captures == 1
