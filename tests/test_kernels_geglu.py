"""Fused GEGLU (kernels/geglu.py) against its PyTorch reference, forward and backward.

On CPU the kernels run under Triton's interpreter (tests/conftest.py). The truth is the
reference in float64 on the same inputs; fp32 must match it tightly, fp16/bf16 within 2× the
error of the reference run natively in that precision plus a small atol."""

import pytest
import torch

from ldm_fast import ops
from ldm_fast.kernels import geglu as kg
from ldm_fast.unet import FeedForward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    ops.set_backend(None)


def _rand(shape, seed, dtype):
    return (2 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(DEVICE, dtype)


def _fwd_bwd(fn, h, dy):
    h = h.detach().requires_grad_(True)
    out = fn(h)
    out.backward(dy)
    return out.detach(), h.grad


# Awkward widths: not powers of two, a multiple of 8 (SD's), odd half widths, and a width
# above the 1024-column block (two column programs, the second masked).
@pytest.mark.parametrize("shape", [(2, 77, 2 * 40), (3, 5, 2 * 13), (1, 2 * 1100), (4, 2, 3, 2 * 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_geglu_matches_reference_forward_and_backward(shape, dtype):
    h, dy = _rand(shape, 0, dtype), _rand(shape[:-1] + (shape[-1] // 2,), 1, dtype)
    out64, dh64 = _fwd_bwd(lambda t: kg.geglu_ref(t), h.double(), dy.double())
    out, dh = _fwd_bwd(kg.geglu, h, dy)
    assert out.dtype == dtype and dh.dtype == dtype and dh.shape == h.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dh.double(), dh64, atol=1e-5, rtol=1e-5)
        return
    out_lp, dh_lp = _fwd_bwd(kg.geglu_ref, h, dy)   # same-precision PyTorch: the error baseline
    for ours, base, truth in ((out, out_lp, out64), (dh, dh_lp, dh64)):
        err = (ours.double() - truth).abs().max().item()
        base_err = (base.double() - truth).abs().max().item()
        assert err <= 2 * base_err + ATOL[dtype] * truth.abs().max().item(), (err, base_err)


def test_odd_width_is_refused_in_one_line():
    with pytest.raises(ValueError, match="must be even"):
        kg.geglu(torch.zeros(2, 5))


def test_feedforward_through_the_switch_matches_eager():
    """The model's FeedForward (GEGLU inside) gives the same output and gradients with the
    kernel as with the eager module."""
    torch.manual_seed(0)
    ff = FeedForward(24).to(DEVICE)
    x = torch.randn(2, 9, 24, device=DEVICE)
    results = {}
    for backend in ("eager", "triton"):
        ops.set_backend(backend)
        ff.zero_grad(set_to_none=True)
        out = ff(x)
        out.pow(2).sum().backward()
        results[backend] = out.detach(), [p.grad.clone() for p in ff.parameters()]
    torch.testing.assert_close(results["triton"][0], results["eager"][0], atol=1e-5, rtol=1e-5)
    for g_t, g_e in zip(results["triton"][1], results["eager"][1]):
        torch.testing.assert_close(g_t, g_e, atol=1e-5, rtol=1e-5)


def test_geglu_compiles_as_one_op():
    """torch.compile(fullgraph=True) sees the custom op, no graph break."""
    h = _rand((2, 4, 2 * 8), 3, torch.float32)
    compiled = torch.compile(kg.geglu, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(h), kg.geglu_ref(h), atol=1e-6, rtol=1e-6)
