"""Fused GroupNorm(+scale/shift)(+SiLU) kernel against its fp32 PyTorch reference.

On CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1); on a
CUDA machine the same tests run the compiled kernels on the GPU. Shapes are tiny on purpose.
"""

import pytest
import torch

from ldm_fast import ops
from ldm_fast.kernels import groupnorm as gn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# The variants the models use, as (affine, act, scale/shift, pre-norm channel bias).
VARIANTS = {
    "gn": (True, False, False, False),            # plain GroupNorm (before attention)
    "gn_noaffine": (False, False, False, False),  # no weight/bias
    "gn_silu": (True, True, False, False),        # ResBlock in_layers / decoder norm_out
    "gn_scaleshift_silu": (True, True, True, False),  # scale-shift-norm ResBlocks
    "gn_add_silu": (True, True, False, True),     # ResBlock out_layers on h + emb
}


def _inputs(shape, groups, dtype, variant, channels_last=False, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    affine, act, mod, add = VARIANTS[variant]
    B, C = shape[:2]
    x = (torch.randn(shape, generator=g) * 1.5 + offset).to(DEVICE, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    p = {"weight": None, "bias": None, "scale": None, "shift": None, "add": None}
    if affine:
        p["weight"] = (1 + 0.5 * torch.randn(C, generator=g)).to(DEVICE)
        p["bias"] = (0.5 * torch.randn(C, generator=g)).to(DEVICE)
    if mod:
        # Scale and shift as the UNet makes them: two halves of one (B, 2C) embedding
        # projection, i.e. non-contiguous views.
        emb = (0.5 * torch.randn(B, 2 * C, generator=g)).to(DEVICE, dtype)
        p["scale"], p["shift"] = emb.chunk(2, dim=1)
    if add:
        # As the UNet makes it: a slice of the embedding projection, offset from zero.
        p["add"] = (1.0 + torch.randn(B, 2 * C, generator=g)).to(DEVICE, dtype)[:, :C]
    return x, p, act


def _run(fn, x, p, groups, act, dy):
    """Forward + gradients of every tensor input that is present, all on leaf copies."""
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None)
              for k, v in p.items()}
    xl = x.detach().clone().requires_grad_()
    extra = {k: leaves[k] for k in ("scale", "shift", "add") if leaves[k] is not None}
    y = fn(xl, groups, leaves["weight"], leaves["bias"], 1e-5, act=act, **extra)
    ins = [xl] + [t for t in leaves.values() if t is not None]
    grads = torch.autograd.grad(y, ins, dy.to(y.dtype))
    return y, grads


def _ref32(x, p, groups, act, dy):
    p32 = {k: (v.float() if v is not None else None) for k, v in p.items()}
    return _run(gn.group_norm_ref, x.float(), p32, groups, act, dy.float())


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _check_close(out, ref, same_prec, dtype, what):
    """fp32: tight. fp16/bf16: within 2× the same-precision PyTorch error plus one machine
    epsilon of the reference's magnitude."""
    err = _err(out, ref)
    scale = ref.abs().max().item() + 1e-6
    if dtype == torch.float32:
        assert err <= 1e-4 * scale + 1e-5, f"{what}: fp32 error {err:.3g} (scale {scale:.3g})"
    else:
        base = _err(same_prec, ref)
        tol = 2 * base + torch.finfo(dtype).eps * scale
        assert err <= tol, f"{what}: {dtype} error {err:.3g} > {tol:.3g} (PyTorch {base:.3g})"


def _compare(shape, groups, dtype, variant, channels_last=False, offset=0.0):
    x, p, act = _inputs(shape, groups, dtype, variant, channels_last, offset)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y, grads = _run(gn.group_norm, x, p, groups, act, dy)
    y32, grads32 = _ref32(x, p, groups, act, dy)
    y_pt, grads_pt = _run(lambda *a, **k: gn.group_norm_ref(*a, **k, upcast=False),
                          x, p, groups, act, dy)
    assert y.dtype == x.dtype and y.shape == x.shape
    same_layout = all(a == b for a, b, n in zip(y.stride(), x.stride(), x.shape) if n > 1)
    assert same_layout, "output must keep the input's memory format"
    _check_close(y, y32, y_pt, dtype, "output")
    names = ["x"] + [k for k, v in p.items() if v is not None]
    for name, g, g32, gpt in zip(names, grads, grads32, grads_pt):
        _check_close(g, g32, gpt, dtype, f"grad {name}")


# ----------------------------------------------------------------------------- correctness

@pytest.fixture(params=["single", "split"])
def path(request, monkeypatch):
    """Run a test through the one-program-per-group kernels ('single': these tiny groups fit
    one tile) and through the tiled statistics/apply kernels that SD-sized groups take."""
    if request.param == "split":
        monkeypatch.setattr(gn, "_SINGLE_MAX", 0)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_odd_spatial(variant, dtype, path):
    """7×9 spatial, 10 channels per group (neither a power of two nor a multiple of 32)."""
    _compare((2, 40, 7, 9), 4, dtype, variant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["gn_silu", "gn_scaleshift_silu", "gn_add_silu"])
def test_channels_last(variant, dtype, path):
    _compare((2, 24, 7, 9), 8, dtype, variant, channels_last=True)


@pytest.mark.parametrize("shape,groups", [((3, 40, 5), 5), ((4, 6), 2), ((1, 32, 4, 4), 32),
                                          ((2, 8, 3, 4, 5), 4)],
                         ids=["1d", "no_spatial", "one_channel_per_group", "3d"])
def test_other_ranks(shape, groups, path):
    _compare(shape, groups, torch.float32, "gn_scaleshift_silu")


def test_large_mean_statistics_stay_exact(path):
    """fp32 statistics that do not cancel: mean 1000 with unit spread (E[x²]−E[x]² would
    lose about 3 significant digits here)."""
    _compare((2, 16, 7, 9), 4, torch.float32, "gn_silu", offset=1000.0)


def test_multi_tile_and_multi_chunk_paths(monkeypatch):
    """Tiny tiles force what SD-sized groups do: several channel blocks, several spatial
    tiles per statistics chunk and several chunks per channel to merge; channels-last tiles
    that span group boundaries (8-channel blocks over groups of 4), and ragged tails."""
    monkeypatch.setattr(gn, "_TILE", 16)
    monkeypatch.setattr(gn, "_MAX_SPLIT", 2)
    monkeypatch.setattr(gn, "_MAX_BLOCK_C", 8)
    monkeypatch.setattr(gn, "_SINGLE_MAX", 0)
    plan = gn._plan(12, 4, 35, channels_last=False)
    assert not plan.single and plan.n_cblk > 1 and plan.iters == 2 and plan.n_chunk == 2
    plan = gn._plan(12, 4, 35, channels_last=True)
    assert plan.block_c == 8 and plan.n_cblk == 2 and plan.iters > 1
    for groups in (1, 3):
        _compare((1, 12, 5, 7), groups, torch.float32, "gn_scaleshift_silu")
        _compare((1, 12, 5, 7), groups, torch.float32, "gn_silu", channels_last=True)
        _compare((1, 12, 5, 7), groups, torch.float32, "gn_add_silu", channels_last=True)


def test_only_some_inputs_need_grad():
    """Frozen parameters (inference or fine-tuning): only x requires grad."""
    x, p, act = _inputs((2, 8, 5, 5), 4, torch.float32, "gn_scaleshift_silu")
    xl = x.clone().requires_grad_()
    y = gn.group_norm(xl, 4, p["weight"], p["bias"], 1e-5, act, p["scale"], p["shift"])
    (gx,) = torch.autograd.grad(y.square().sum(), [xl])
    xr = x.clone().requires_grad_()
    yr = gn.group_norm_ref(xr, 4, p["weight"], p["bias"], 1e-5, act, p["scale"], p["shift"])
    (gr,) = torch.autograd.grad(yr.square().sum(), [xr])
    assert _err(gx, gr) <= 1e-4 * gr.abs().max().item()


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration agree with the kernel."""
    x, p, act = _inputs((2, 8, 3, 5), 4, torch.float32, "gn_scaleshift_silu")
    args = (x.requires_grad_(), *(p[k].requires_grad_() for k in ("weight", "bias")),
            *(p[k].detach().clone().requires_grad_() for k in ("scale", "shift")),
            torch.randn(2, 8).requires_grad_(), 4, 1e-5, act)
    torch.library.opcheck(torch.ops.ldm_fast.group_norm_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_sampling_skips_the_custom_op(monkeypatch):
    """Outside autograd and torch.compile the launcher is called directly (no custom-op
    dispatch), with the same result as the recorded path."""
    x, p, act = _inputs((2, 8, 5, 5), 4, torch.float32, "gn_scaleshift_silu")
    args = (x, 4, p["weight"], p["bias"], 1e-5, act, p["scale"], p["shift"])
    y_op = gn.group_norm(x.clone().requires_grad_(), *args[1:]).detach()
    calls = []
    monkeypatch.setattr(gn, "_group_norm_fwd_op", lambda *a: calls.append(a))
    with torch.no_grad():
        y = gn.group_norm(*args)
    assert not calls and torch.equal(y, y_op)


def test_pre_norm_bias_is_the_resblock_sum():
    """add= is GroupNorm(h + emb[..., None, None]) — what the ResBlock computes eagerly."""
    x, p, act = _inputs((2, 8, 5, 5), 4, torch.float32, "gn_add_silu")
    y = gn.group_norm(x, 4, p["weight"], p["bias"], 1e-5, act, add=p["add"])
    y_sum = gn.group_norm_ref(x + p["add"][:, :, None, None], 4, p["weight"], p["bias"], 1e-5,
                              act)
    assert _err(y, y_sum) <= 1e-5 * y_sum.abs().max().item()


# ----------------------------------------------------------------------------- 32-bit limits

def test_spatial_offsets_go_64_bit_only_where_needed():
    """Channels-last at 512 channels: a 2048² level (2³¹ elements per sample) needs 64-bit
    spatial offsets, the 1024² decoder level does not; channels-first never (its spatial
    stride is 1 and channel offsets are always 64-bit)."""
    def wide(shape, cl):
        x = torch.empty(shape, device="meta", dtype=torch.float16)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        return gn._add_args(None, x, gn._as_bcs(x))["WIDE"]
    assert wide((1, 512, 2048, 2048), True)
    assert not wide((1, 512, 1024, 1024), True)
    assert not wide((4, 512, 2048, 2048), False)


def test_64_bit_spatial_path_matches(monkeypatch, path):
    monkeypatch.setattr(gn, "_WIDE_LIMIT", 0)
    _compare((2, 24, 7, 9), 8, torch.float32, "gn_add_silu", channels_last=True)


def test_batch_offsets_beyond_int32(path):
    """The second sample starts 2³¹ elements into its storage (4 GiB of fp16, reserved but
    never touched): every batch offset must be 64-bit."""
    store = torch.empty(2**31 + 128, dtype=torch.float16, device=DEVICE)
    x = store.as_strided((2, 8, 4, 4), (2**31, 16, 4, 1))
    x.copy_(torch.randn(2, 8, 4, 4))
    y = gn.group_norm(x, 4, act=True)
    ref = gn.group_norm_ref(x.contiguous(), 4, act=True)
    assert _err(y, ref) <= 2 * torch.finfo(torch.float16).eps * ref.abs().max().item()


def test_bad_inputs_raise():
    x = torch.randn(2, 10, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="divisible"):
        gn.group_norm(x, 4)
    with pytest.raises(ValueError, match="scale"):
        gn.group_norm(x, 5, scale=torch.zeros(2, 3, device=DEVICE),
                      shift=torch.zeros(2, 10, device=DEVICE))


# ----------------------------------------------------------------------------- the ops switch

def test_ops_switch_routes_to_kernel_and_matches_eager():
    x, p, act = _inputs((2, 12, 7, 9), 4, torch.float16, "gn_scaleshift_silu")
    args = (x, 4, p["weight"], p["bias"], 1e-6)
    kw = dict(act=act, scale=p["scale"], shift=p["shift"])
    try:
        ops.set_backend("triton")
        assert ops.use_triton(x)
        y_tr = ops.group_norm(*args, **kw)
        ops.set_backend("eager")
        y_eager = ops.group_norm(*args, **kw)
    finally:
        ops.set_backend(None)
    # Both compute in fp32 and round once: at most one fp16 rounding step apart.
    assert _err(y_tr, y_eager) <= 2 * torch.finfo(torch.float16).eps * y_eager.abs().max()


def test_ops_switch_falls_back_loudly_for_unsupported_dtype():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, device=DEVICE)
    ops._warned.discard("group_norm-fallback")
    try:
        ops.set_backend("triton")
        with pytest.warns(UserWarning, match="group_norm"):
            y = ops.group_norm(x, 2, None, None)
    finally:
        ops.set_backend(None)
    torch.testing.assert_close(y, torch.nn.functional.group_norm(x, 2))


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16),
                                   (2, 1280, 8, 8), (1, 128, 256, 256)])
def test_sd_shapes_gpu(shape, dtype):
    """SD1.5 UNet shapes at 512² (the 8×8 level takes the single-tile kernels) and a VAE
    decoder shape (several tiles per statistics program), compiled, both memory formats."""
    _compare(shape, 32, dtype, "gn_scaleshift_silu")
    _compare(shape, 32, dtype, "gn_silu", channels_last=True)


def test_eager_use_never_imports_triton():
    """Without Triton installed, the eager path of every op works and nothing imports it; a
    requested kernel falls back with one line that names the reason."""
    import subprocess
    import sys
    code = """
import sys, warnings
# As if Triton were not installed: `import triton` fails and importlib.util.find_spec returns
# None (torch's CUDA builds probe it with find_spec at import).
sys.modules['triton'] = None
import torch
from ldm_fast import ops
x = torch.randn(2, 8, 4, 4)
ops.group_norm(x, 4, None, None, act=True)
ops.attention(*torch.randn(3, 1, 2, 4, 8).unbind(0))
ops.ddim_step(x, x, 0.5, 0.7)
ops.set_backend('triton')
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    ops.group_norm(x, 4, None, None)
assert any('not installed' in str(m.message) for m in w), [str(m.message) for m in w]
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
