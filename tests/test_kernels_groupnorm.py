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
    """Tiny tiles force what SD-sized groups do: several channel blocks per group, several
    spatial tiles per statistics program, several partials to merge."""
    monkeypatch.setattr(gn, "_TILE", 16)
    monkeypatch.setattr(gn, "_MAX_SPLIT", 3)
    monkeypatch.setattr(gn, "_MAX_BLOCK_C", 4)
    monkeypatch.setattr(gn, "_SINGLE_MAX", 0)
    block_c, block_s, n_cblk, n_stile, iters, n_chunk, single = gn._plan(12, 35)
    assert not single
    assert (n_cblk, iters, n_chunk) == (3, 3, 3)   # 3 channel blocks, 3 tiles × 3 chunks
    _compare((1, 12, 5, 7), 1, torch.float32, "gn_scaleshift_silu")
    _compare((1, 12, 5, 7), 1, torch.float32, "gn_silu", channels_last=True)
    _compare((1, 12, 5, 7), 1, torch.float32, "gn_add_silu", channels_last=True)


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


def test_pre_norm_bias_is_the_resblock_sum():
    """add= is GroupNorm(h + emb[..., None, None]) — what the ResBlock computes eagerly."""
    x, p, act = _inputs((2, 8, 5, 5), 4, torch.float32, "gn_add_silu")
    y = gn.group_norm(x, 4, p["weight"], p["bias"], 1e-5, act, add=p["add"])
    y_sum = gn.group_norm_ref(x + p["add"][:, :, None, None], 4, p["weight"], p["bias"], 1e-5,
                              act)
    assert _err(y, y_sum) <= 1e-5 * y_sum.abs().max().item()


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


# ----------------------------------------------------------------------------- GPU code, no GPU

# Compiles kernels to sm_90 machine code (Triton's own ptxas; no GPU or driver involved) in a
# subprocess without TRITON_INTERPRET. The interpreter runs the kernels' Python, so it cannot
# catch what only the compiler sees (types of loop-carried values, integer arguments equal to
# 1 turned into compile-time constants, layouts, register allocation): this does, on CPU CI.
COMPILE_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
jobs = json.loads(sys.argv[1])
for mod, name, ptrs, consts, warps, stages in jobs:
    fn = getattr(importlib.import_module(mod), name)
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    assert k.asm["cubin"], name
    print("compiled", name, flush=True)
"""


def compile_for_sm90(jobs):
    """jobs: (module, kernel, {arg: type for pointers/floats}, {constexpr: value}, warps,
    stages). Skips (saying why) where this Triton lacks the offline-compile API."""
    import json
    import os
    import subprocess
    import sys
    import inspect
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU tests compile and run the real kernels")
    try:
        import triton.compiler
        from triton.backends.compiler import GPUTarget  # noqa: F401
        params = inspect.signature(triton.compiler.ASTSource).parameters
    except (ImportError, AttributeError) as e:
        pytest.skip(f"offline compile API not available in this Triton: {e}")
    if "constexprs" not in params:
        pytest.skip("this Triton's ASTSource predates the constexprs argument")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(jobs)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("compiled") == len(jobs)


def test_kernels_compile_for_sm90():
    """All six GroupNorm kernels, every flag on, for fp16 and bf16 — once with the integer
    arguments that Triton specialises when they equal 1 (1 channel per group, HW = 1, ...)."""
    m = "ldm_fast.kernels.groupnorm"
    jobs = []
    for dt, ones in (("fp16", {}), ("bf16", {"HW": 1, "CPG": 1, "ITERS": 1, "sxs": 1})):
        ptrs = {a: "*" + dt for a in ("X", "Y", "DY", "DX", "W", "BETA", "SCALE", "SHIFT",
                                              "ADD")}
        ptrs.update({a: "*fp32" for a in ("PART", "MEAN", "RSTD", "PS1", "PS2", "PW", "PB",
                                          "DSCALE", "DSHIFT")}, eps="fp32")
        flags = dict(HAS_W=True, HAS_B=True, HAS_SCALE=True, HAS_SHIFT=True, ACT=True,
                     HAS_ADD=True)
        for name, extra in (("_gn_stats_kernel", {"HAS_ADD": True}), ("_gn_fwd_kernel", dict(flags, BLOCK_P=16)),
                            ("_gn_bwd_reduce_kernel", flags),
                            ("_gn_bwd_dx_kernel", dict(flags, BLOCK_P=16)),
                            ("_gn_fwd_single_kernel", flags), ("_gn_bwd_single_kernel", flags)):
            args = getattr(gn, name).arg_names
            consts = dict(BLOCK_C=16, BLOCK_S=256, **extra,
                          **{k: v for k, v in ones.items() if k in args})
            jobs.append((m, name, ptrs, consts, 8, 1))
    compile_for_sm90(jobs)
