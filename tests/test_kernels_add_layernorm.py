"""Fused residual add + LayerNorm (kernels/add_layernorm.py) against its PyTorch reference,
forward and backward (gradients of both outputs, weight and bias included).

On CPU the kernels run under Triton's interpreter (tests/conftest.py). The truth is the
reference in float64 on the same inputs; fp32 must match it tightly, fp16/bf16 within 2× the
error of the reference run natively in that precision plus a small atol."""

import pytest
import torch

from ldm_fast import ops
from ldm_fast.kernels import add_layernorm as kl
from ldm_fast.unet import BasicTransformerBlock

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    ops.set_backend(None)


def _rand(shape, seed, dtype, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g) + shift).to(DEVICE, dtype)


def _fwd_bwd(fn, x, r, w, b, ds, dy):
    leaves = [t.detach().requires_grad_(True) for t in (x, r, w, b)]
    s, y = fn(*leaves)
    torch.autograd.backward((s, y), (ds, dy))
    return [s.detach(), y.detach()] + [t.grad for t in leaves]


# Widths: SD's head-dim multiples (40, 320), not a power of two, and more rows than the CPU
# backward's four programs (a run of rows per program, the last run short).
@pytest.mark.parametrize("shape", [(2, 77, 40), (3, 7, 320), (1, 5, 100), (13, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_layer_norm_matches_reference(shape, dtype):
    d = shape[-1]
    # An offset mean: a one-pass variance would lose precision here.
    x, r = _rand(shape, 0, dtype, shift=3.0), _rand(shape, 1, dtype)
    w, b = _rand((d,), 2, dtype, 0.2, 1.0), _rand((d,), 3, dtype, 0.1)
    ds, dy = _rand(shape, 4, dtype), _rand(shape, 5, dtype)
    truth = _fwd_bwd(lambda *a: kl.add_layer_norm_ref(*a, eps=1e-5),
                     *(t.double() for t in (x, r, w, b)), ds.double(), dy.double())
    got = _fwd_bwd(lambda *a: kl.add_layer_norm(*a, eps=1e-5), x, r, w, b, ds, dy)
    names = ["s", "y", "dx", "dr", "dw", "db"]
    if dtype == torch.float32:
        for name, g, t in zip(names, got, truth):
            torch.testing.assert_close(g.double(), t, atol=1e-4, rtol=1e-4, msg=name)
        return
    base = _fwd_bwd(lambda *a: kl.add_layer_norm_ref(*a, eps=1e-5), x, r, w, b, ds, dy)
    for name, g, bl, t in zip(names, got, base, truth):
        assert g.dtype == dtype, name
        err = (g.double() - t).abs().max().item()
        base_err = (bl.double() - t).abs().max().item()
        assert err <= 2 * base_err + ATOL[dtype] * max(1.0, t.abs().max().item()), (name, err, base_err)


def test_mismatched_shapes_are_refused_in_one_line():
    with pytest.raises(ValueError, match="must match"):
        kl.add_layer_norm(torch.zeros(2, 8), torch.zeros(1, 8), torch.ones(8), torch.zeros(8))


def test_transformer_block_through_the_switch_matches_eager():
    """The model's transformer block (two fused add+norms and the GEGLU inside) gives the same
    output and gradients with the kernels as with eager ops."""
    torch.manual_seed(0)
    block = BasicTransformerBlock(32, 4, 8, 16).to(DEVICE)
    for norm in (block.norm1, block.norm2, block.norm3):
        torch.nn.init.normal_(norm.weight, 1.0, 0.2)
        torch.nn.init.normal_(norm.bias, 0.0, 0.2)
    x, ctx = torch.randn(2, 11, 32, device=DEVICE), torch.randn(2, 5, 16, device=DEVICE)
    results = {}
    for backend in ("eager", "triton"):
        ops.set_backend(backend)
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = block(xi, ctx)
        out.pow(2).sum().backward()
        results[backend] = [out.detach(), xi.grad] + [p.grad.clone() for p in block.parameters()]
    for got, want in zip(results["triton"], results["eager"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_add_layer_norm_compiles_as_one_op():
    x, r = _rand((2, 3, 24), 6, torch.float32), _rand((2, 3, 24), 7, torch.float32)
    w, b = torch.ones(24, device=DEVICE), torch.zeros(24, device=DEVICE)
    compiled = torch.compile(kl.add_layer_norm, fullgraph=True, backend="eager")
    for got, want in zip(compiled(x, r, w, b), kl.add_layer_norm_ref(x, r, w, b)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mixed_dtypes_fall_back_to_the_original_maths():
    """An fp32 residual stream plus a bf16 branch (autocast): no kernel for mixed dtypes, so
    the switch says so once and runs the original add (type promotion) and LayerNorm."""
    x, r = _rand((2, 3, 16), 8, torch.float32), _rand((2, 3, 16), 9, torch.bfloat16)
    w, b = torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE)
    ops.set_backend("triton")
    ops._warned.discard("add_layer_norm-fallback")   # said once per process: make this the once
    with pytest.warns(UserWarning, match="needs one dtype"):
        s, y = ops.add_layer_norm(x, r, w, b)
    assert s.dtype == torch.float32 and torch.equal(s, x + r)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + r, (16,), w, b))
