"""FlashAttention-style kernels against softmax(q·kᵀ/√D)·v in fp32, and PyTorch's SDPA.

On CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1) with
32×32 blocks, so lengths such as 50 and 77 span several blocks with ragged tails; bf16 goes
through the fp32-dot variant there (the interpreter's bf16 tl.dot is broken) and through the
real bf16 dot when the same tests run on a GPU.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ldm_fast import ops
from ldm_fast.kernels import attention as at
from ldm_fast.kernels import groupnorm as gn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]


def _qkv(B, H, LQ, LK, D, dtype, seed=0, q_gain=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, LQ, D, generator=g) * q_gain
    k = torch.randn(B, H, LK, D, generator=g)
    v = torch.randn(B, H, LK, D, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def _run(fn, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = fn(*leaves)
    return o, torch.autograd.grad(o, leaves, do.to(o.dtype))


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _check_close(out, ref, same_prec, dtype, what):
    """fp32: tight. fp16/bf16: within 2× the same-precision PyTorch (SDPA) error plus one
    machine epsilon of the reference's magnitude."""
    err = _err(out, ref)
    scale = ref.abs().max().item() + 1e-6
    if dtype == torch.float32:
        assert err <= 2e-5 * scale + 1e-6, f"{what}: fp32 error {err:.3g} (scale {scale:.3g})"
    else:
        base = _err(same_prec, ref)
        tol = 2 * base + torch.finfo(dtype).eps * scale
        assert err <= tol, f"{what}: {dtype} error {err:.3g} > {tol:.3g} (SDPA {base:.3g})"


def _compare(q, k, v, dtype, grads=True):
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    if not grads:
        with torch.no_grad():
            o = at.attention(q, k, v)
            o32 = at.attention_ref(q.float(), k.float(), v.float(), upcast=True)
            opt = at.attention_ref(q, k, v)
        assert o.dtype == q.dtype and o.shape == q.shape
        _check_close(o, o32, opt, dtype, "output")
        return
    o, g = _run(at.attention, q, k, v, do)
    o32, g32 = _run(lambda *a: at.attention_ref(*a, upcast=True), q.float(), k.float(),
                    v.float(), do.float())
    opt, gpt = _run(at.attention_ref, q, k, v, do)
    assert o.dtype == q.dtype and o.shape == q.shape
    _check_close(o, o32, opt, dtype, "output")
    for name, a, b, c in zip("qkv", g, g32, gpt):
        _check_close(a, b, c, dtype, f"grad {name}")


# ----------------------------------------------------------------------------- correctness

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("LQ,LK,D", [(50, 77, 40), (33, 33, 160), (40, 64, 80)],
                         ids=["cross77_d40", "self33_d160", "cross64_d80"])
def test_forward_backward(LQ, LK, D, dtype):
    """Cross-attention to 77 text tokens, self-attention, SD's head dims 40/80/160; lengths
    not multiples of the block."""
    _compare(*_qkv(1, 2, LQ, LK, D, dtype), dtype)


@pytest.mark.parametrize("D", [24, 32, 64, 72, 96, 128])
def test_other_head_dims(D):
    """Every head-dim shape the kernels take, batch > 1: one power-of-two slice (32, 64, 128),
    one padded slice (24 → 32), two exact slices (96 = 64 + 32) and two with a masked tail
    (72 = 64 + 16)."""
    _compare(*_qkv(2, 1, 20, 45, D, torch.float16), torch.float16)


def test_head_dim_slices():
    assert [at.head_dim_blocks(d) for d in (16, 24, 40, 64, 80, 160, 200)] == [
        (16, 0), (32, 0), (32, 16), (64, 0), (64, 16), (128, 32), (256, 0)]


@pytest.mark.parametrize("LQ,LK", [(1, 5), (5, 1), (32, 96)], ids=["one_query", "one_key",
                                                                    "exact_blocks"])
def test_edge_lengths(LQ, LK):
    _compare(*_qkv(1, 1, LQ, LK, 40, torch.float32), torch.float32)


def test_peaked_softmax_is_stable():
    """Scores of ±hundreds (q scaled ×30): the online max must keep exp finite."""
    q, k, v = _qkv(1, 1, 40, 77, 64, torch.float32, q_gain=30.0)
    _compare(q, k, v, torch.float32)


def test_strided_layouts():
    """q, k, v as the model makes them: (B, L, H, D) projections viewed as (B, H, L, D).
    The output keeps q's layout, so transposing back is free."""
    B, H, LQ, LK, D = 2, 2, 24, 77, 40
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, LQ, H, D, generator=g).to(DEVICE).transpose(1, 2)
    kv = torch.randn(B, LK, 2, H, D, generator=g).to(DEVICE)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    o = at.attention(q, k, v)
    assert o.stride() == q.stride()
    _compare(q, k, v, torch.float32)


def test_matches_sdpa_and_no_grad_path():
    q, k, v = _qkv(1, 2, 30, 77, 40, torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(at.attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                                   atol=2e-3, rtol=2e-3)
    _compare(q, k, v, torch.float16, grads=False)


def test_custom_op_registration():
    q, k, v = [t.requires_grad_() for t in _qkv(1, 1, 9, 13, 16, torch.float32)]
    torch.library.opcheck(torch.ops.ldm_fast.attention_fwd.default, (q, k, v),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_unsupported_inputs_raise():
    q, k, v = _qkv(1, 1, 4, 4, 320, torch.float32)
    assert not at.supports(q, k, v)
    with pytest.raises(ValueError, match="head dim"):
        at.attention(q, k, v)


# ----------------------------------------------------------------------------- ops + compile

def test_ops_switch_and_fallback():
    q, k, v = _qkv(1, 2, 20, 33, 40, torch.float32)
    big = _qkv(1, 1, 4, 4, 512, torch.float32)   # VAE mid-block single head: D = 512
    ops._warned.discard("attention-fallback")
    try:
        ops.set_backend("triton")
        o_tr = ops.attention(q, k, v)
        with pytest.warns(UserWarning, match="attention"):
            o_big = ops.attention(*big)
        ops.set_backend("eager")
        o_eager = ops.attention(q, k, v)
    finally:
        ops.set_backend(None)
    torch.testing.assert_close(o_tr, o_eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o_big, F.scaled_dot_product_attention(*big))


def _block(x, w, b, scale, shift, wq, wk, wv, ctx):
    """A miniature UNet stage: scale-shift GN→SiLU, plain GN, self- and cross-attention."""
    B, C, Hh, Ww = x.shape
    h = ops.group_norm(x, 4, w, b, 1e-5, act=True, scale=scale, shift=shift)
    h = ops.group_norm(h, 4, w, b, 1e-5)
    t = h.flatten(2).transpose(1, 2)                            # (B, HW, C)
    heads = 2
    def split(z):
        return z.view(B, -1, heads, C // heads).transpose(1, 2)
    a = ops.attention(split(t @ wq), split(t @ wk), split(t @ wv))
    a = ops.attention(split(a.transpose(1, 2).reshape(B, -1, C)), split(ctx @ wk),
                      split(ctx @ wv))
    return (a.transpose(1, 2).reshape(B, Hh * Ww, C).transpose(1, 2).view_as(x) + x)


def _block_inputs():
    g = torch.Generator().manual_seed(0)
    C = 16
    t = [torch.randn(2, C, 5, 7, generator=g), 1 + 0.1 * torch.randn(C, generator=g),
         0.1 * torch.randn(C, generator=g), 0.1 * torch.randn(2, C, generator=g),
         0.1 * torch.randn(2, C, generator=g)]
    t += [torch.randn(C, C, generator=g) / math.sqrt(C) for _ in range(3)]
    t += [torch.randn(2, 11, C, generator=g)]
    return [z.to(DEVICE).requires_grad_() for z in t]


def _compiled_matches_eager(backend):
    graphs = []
    inner = torch._dynamo.lookup_backend(backend)

    def record(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)

    torch._dynamo.reset()
    args = _block_inputs()
    try:
        ops.set_backend("triton")
        fn = torch.compile(_block, fullgraph=True, backend=record)
        out = fn(*args)
        grads = torch.autograd.grad(out.square().sum(), args)
        ops.set_backend("eager")
        ref = _block(*args)
        ref_grads = torch.autograd.grad(ref.square().sum(), args)
    finally:
        ops.set_backend(None)
        torch._dynamo.reset()
    assert len(graphs) == 1, "fullgraph: one graph, no breaks"
    code = graphs[0].code
    assert code.count("ldm_fast.group_norm_fwd") == 2 and code.count("ldm_fast.attention_fwd") == 2
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) captures the ops as single custom-op nodes and AOTAutograd
    traces their backward through register_fake/register_autograd ('aot_eager': the whole
    pipeline but Inductor's code generation, so a failure here is about capture)."""
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    """The same with Inductor, which generates code for everything around the custom ops
    (C++ on CPU: 15–40 s here, most of it compiling; Triton on a GPU)."""
    _compiled_matches_eager("inductor")


def test_benchmark_script_smoke():
    """bench/kernels.py end to end on toy shapes (interpreter, wall clock) so the GPU
    benchmark cannot rot unnoticed between the rare sessions that have a GPU."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU, bench/gpu_check.sh runs the real benchmark")
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke"]) == 0
    assert bench.main([]) == 0   # no CUDA: says so, times nothing, exits cleanly


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("LQ,LK,D", [(4096, 4096, 40), (4096, 77, 40), (1024, 77, 80),
                                     (256, 256, 160), (1000, 77, 64), (333, 333, 128)])
def test_sd_shapes_gpu(LQ, LK, D, dtype):
    """SD1.5 shapes at 512² (batch 2 with CFG, 8 heads) on the compiled, autotuned kernels,
    with the real bf16 tensor-core dot."""
    _compare(*_qkv(2, 8, LQ, LK, D, dtype), dtype)


@pytest.mark.gpu
@gpu
def test_fixed_config_gpu(monkeypatch):
    """The no-autotune path (LDM_ATTN_AUTOTUNE=0) runs its default configurations."""
    monkeypatch.setenv("LDM_ATTN_AUTOTUNE", "0")
    for D in (40, 80, 160):
        _compare(*_qkv(2, 4, 300, 77, D, torch.float16), torch.float16)


@pytest.mark.gpu
@gpu
def test_groupnorm_attention_fp32_gpu():
    """fp32 on the GPU: IEEE dots (no TF32) keep the fp32 tolerance."""
    _compare(*_qkv(1, 2, 200, 77, 40, torch.float32), torch.float32)
    x = torch.randn(2, 64, 9, 7, device=DEVICE)
    torch.testing.assert_close(gn.group_norm(x, 32, act=True), gn.group_norm_ref(x, 32, act=True),
                               atol=1e-5, rtol=1e-5)


def test_batch_offsets_beyond_int32():
    """q/k/v whose second batch element starts 2³¹ elements into the storage (reserved, not
    touched): batch and head offsets must be 64-bit."""
    store = torch.empty(2**31 + 1024, dtype=torch.float16, device=DEVICE)
    q = store.as_strided((2, 1, 16, 16), (2**31, 256, 16, 1))
    q.copy_(torch.randn(2, 1, 16, 16))
    # k shared by the batch (stride 0, as an expanded context), v an ordinary tensor
    k = torch.randn(1, 1, 24, 16, dtype=torch.float16, device=DEVICE).expand(2, 1, 24, 16)
    v = torch.randn(2, 1, 24, 16, dtype=torch.float16, device=DEVICE)
    o = at.attention(q, k, v)
    ref = at.attention_ref(q.contiguous(), k.contiguous(), v, upcast=True)
    assert (o.float() - ref.float()).abs().max().item() < 2e-3
