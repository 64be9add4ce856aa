"""Fused sampler-step kernels (kernels/sampler_steps.py) against their PyTorch references.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before any kernel module is imported). The truth is the reference evaluated in float64 on the
same inputs; fp32 must match it tightly, and fp16/bf16 within 2× the error of the reference
run natively in that precision, plus a small atol.
"""


import pytest
import torch

from ldm_fast import ops, samplers
from ldm_fast.diffusion import make_schedule
from ldm_fast.kernels import sampler_steps as ss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU machine
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SCHED = make_schedule("linear")
AC = SCHED.alphas_cumprod


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: on a shared 2-core machine a second intra-op thread only adds wake-ups."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _a(t):
    return 1.0 if t is None else float(AC[t])


def _rand(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _ref64(ref, x, out, **kw):
    """The reference in float64 on exactly the inputs the kernel saw."""
    up = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    res = ref(x.double(), out.double(), **up, upcast=False)
    return res if isinstance(res, tuple) else (res,)


def _as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


# (a_t, a_next) pairs: the noisiest step (α ≈ 0.006, 1/α large), a middle one, the last one
# to clean data (a_next = 1), and a one-timestep step near t = 0.
STEPS = [(999, 979), (500, 480), (20, None), (1, 0)]
SHAPES = [(2, 3, 7, 9), (1, 4, 5, 5)]


def _cases():
    for op in ("ddim", "euler", "dpmpp"):
        for param in ("eps", "v"):
            for guided in (False, True):
                yield op, param, guided


def _call(op, fn, x, out, a_t, a_next, param, guided, noise, prev, a_prev):
    g = 4.5 if guided else 1.0
    if op == "ddim":
        return fn(x, out, a_t, a_next, eta=0.6, noise=noise, parameterization=param, guidance=g, return_x0=True)
    if op == "euler":
        return fn(x, out, a_t, a_next, eta=1.0, noise=noise, parameterization=param, guidance=g, return_x0=True)
    return fn(x, out, a_t, a_next, x0_prev=prev, a_prev=a_prev, parameterization=param, guidance=g)


REFS = {"ddim": ss.ddim_step_ref, "euler": ss.euler_step_ref, "dpmpp": ss.dpmpp_2m_step_ref}
FUSED = {"ddim": ss.ddim_step, "euler": ss.euler_step, "dpmpp": ss.dpmpp_2m_step}


@pytest.mark.parametrize("op,param,guided", list(_cases()))
def test_fp32_matches_reference(op, param, guided):
    for shape in SHAPES:
        b = shape[0]
        for k, (t, t_next) in enumerate(STEPS):
            a_t, a_next = _a(t), _a(t_next)
            x = _rand(shape, 10 * k)
            out = _rand(((2 if guided else 1) * b,) + shape[1:], 10 * k + 1)
            noise, prev = _rand(shape, 10 * k + 2), _rand(shape, 10 * k + 3)
            a_prev = _a(min(t + 20, 999)) if t != 999 else None
            prev = prev if a_prev is not None else None
            got = _as_tuple(_call(op, FUSED[op], x, out, a_t, a_next, param, guided, noise, prev, a_prev))
            kw = dict(a_t=a_t, a_next=a_next, parameterization=param, guidance=4.5 if guided else 1.0)
            if op == "dpmpp":
                want = _ref64(ss.dpmpp_2m_step_ref, x, out, x0_prev=prev, a_prev=a_prev, **kw)
            else:
                want = _ref64(REFS[op], x, out, eta=0.6 if op == "ddim" else 1.0, noise=noise,
                              return_x0=True, **kw)
            for g_, w_ in zip(got, want):
                assert g_.dtype == torch.float32 and g_.shape == x.shape
                scale = max(1.0, float(w_.abs().max()))
                torch.testing.assert_close(g_.double(), w_, rtol=2e-6, atol=2e-6 * scale)


LOWP = [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]


@pytest.mark.parametrize("dtype,atol", LOWP, ids=["fp16", "bf16"])
@pytest.mark.parametrize("op", ["ddim", "euler", "dpmpp"])
def test_low_precision_within_2x_of_torch(dtype, atol, op):
    """Latent and model output both in fp16/bf16 (x_next, x0 stored in that dtype)."""
    shape = (2, 3, 7, 9)
    for k, (t, t_next) in enumerate(STEPS[1:3]):
        a_t, a_next = _a(t), _a(t_next)
        x, out = _rand(shape, k, dtype), _rand((4,) + shape[1:], k + 1, dtype)
        noise, prev = _rand(shape, k + 2, dtype), _rand(shape, k + 3, dtype)
        a_prev = _a(t + 20)
        kw = dict(a_t=a_t, a_next=a_next, parameterization="v", guidance=3.0)
        if op == "dpmpp":
            kw.update(x0_prev=prev, a_prev=a_prev)
        else:
            kw.update(eta=0.5, noise=noise, return_x0=True)
        got = _as_tuple(FUSED[op](x, out, **kw))
        same_prec = _as_tuple(REFS[op](x, out, **kw, upcast=False))
        truth = _ref64(REFS[op], x, out, **kw)
        for g_, s_, w_ in zip(got, same_prec, truth):
            assert g_.dtype == dtype
            err_kernel = float((g_.double() - w_).abs().max())
            err_torch = float((s_.double() - w_).abs().max())
            scale = max(1.0, float(w_.abs().max()))
            assert err_kernel <= 2 * err_torch + atol * scale, (err_kernel, err_torch)


def test_mixed_dtypes_and_channels_last():
    """fp32 latent with a bf16 UNet output (the usual inference case), channels-last memory."""
    x = _rand((2, 4, 6, 5), 0).to(memory_format=torch.channels_last)
    out = _rand((4, 4, 6, 5), 1, torch.bfloat16).to(memory_format=torch.channels_last)
    noise = _rand((2, 4, 6, 5), 2)  # NCHW-contiguous while x is channels-last
    a_t, a_next = _a(600), _a(550)
    got, x0 = ss.ddim_step(x, out, a_t, a_next, eta=1.0, noise=noise, guidance=2.0, return_x0=True)
    want, want_x0 = _ref64(ss.ddim_step_ref, x, out, a_t=a_t, a_next=a_next, eta=1.0, noise=noise,
                           guidance=2.0, return_x0=True)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(x0.double(), want_x0, rtol=2e-6, atol=2e-6 * float(want_x0.abs().max()))


def test_large_flat_size_uses_big_blocks():
    """More than one program at the large block size, with a ragged tail."""
    n = (1 << 20) + 37
    x, out = _rand((1, n), 0), _rand((1, n), 1)
    got = ss.euler_step(x, out, _a(300), _a(280))
    want = _ref64(ss.euler_step_ref, x, out, a_t=_a(300), a_next=_a(280))[0]
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)


def test_rejects_bad_inputs():
    x = torch.zeros(2, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="does not match"):
        ss.ddim_step(x, torch.zeros(3, 3, 4, 4, device=DEVICE), 0.5, 0.6)
    with pytest.raises(ValueError, match="noise"):
        ss.ddim_step(x, x, 0.5, 0.6, eta=1.0)
    with pytest.raises(ValueError, match="a_prev"):
        ss.dpmpp_2m_step(x, x, 0.5, 0.6, x0_prev=x)


def test_custom_ops_trace_without_graph_break():
    """torch.library registration: opcheck (schema, fake tensor, AOT dispatch) and a
    fullgraph compile through all three ops."""
    x, out, z = _rand((2, 3, 5, 5), 0), _rand((4, 3, 5, 5), 1), _rand((2, 3, 5, 5), 2)
    torch.library.opcheck(torch.ops.ldm_fast.ddim_step.default,
                          (x, out, 0.3, 0.5, 0.5, z, "eps", 2.0, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.ldm_fast.dpmpp_2m_step.default,
                          (x, out, 0.3, 0.5, x, 0.2, "v", 2.0), test_utils=("test_schema", "test_faketensor"))

    def step(x, out, z):
        y = ss.ddim_step(x, out, 0.3, 0.5, eta=0.5, noise=z, guidance=2.0)
        y = ss.euler_step(y, out, 0.5, 0.7, parameterization="v", guidance=2.0)
        return ss.dpmpp_2m_step(y, out, 0.7, 0.9, x0_prev=x, a_prev=0.5, guidance=2.0)[0]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, out, z), step(x, out, z), rtol=0, atol=0)


# ----------------------------------------------------------------------------- whole sampling runs

class _TinyModel:
    """A fixed non-linear 'UNet': conv + tanh, time and a conditioning vector mixed in."""

    def __init__(self, channels):
        g = torch.Generator().manual_seed(0)
        self.w = (torch.randn(channels, channels, 3, 3, generator=g) * 0.2).to(DEVICE)
        self.proj = torch.randn(3, channels, generator=g).to(DEVICE)

    def __call__(self, x, t, cond):
        h = torch.nn.functional.conv2d(x.float(), self.w, padding=1)
        h = h + (t / 1000.0)[:, None, None, None] + (cond["y"] @ self.proj)[:, :, None, None]
        return torch.tanh(h).to(x.dtype)


@pytest.mark.parametrize("name,kwargs", [("ddim", {"eta": 0.5}), ("ddpm", {}), ("euler", {}),
                                         ("euler_ancestral", {}), ("dpmpp_2m", {}), ("plms", {})])
@pytest.mark.parametrize("param", ["eps", "v"])
def test_sampling_run_matches_eager_step_for_step(name, kwargs, param):
    schedule = make_schedule("linear", parameterization=param)
    model = _TinyModel(4)
    x = _rand((2, 4, 5, 7), 0)
    cond = {"y": _rand((2, 3), 1)}
    uncond = {"y": torch.zeros(2, 3, device=DEVICE)}

    def run(backend, x):
        trace = []
        ops.set_backend(backend)
        try:
            final = samplers.sample(name, model, x, schedule, steps=8, cond=cond, uncond=uncond,
                                    guidance=5.0, generator=torch.Generator().manual_seed(3),
                                    callback=trace.append, **kwargs)
        finally:
            ops.set_backend(None)
        return [(d["x"], d["denoised"]) for d in trace] + [(final, final)]

    # The eager chain and the folded kernel round differently (x0 = (x − s·ε)/α at α ≈ 0.006
    # amplifies fp32 rounding), so each step is also held against a float64 eager run: the
    # fused run may not drift further from it than 2× the eager fp32 run does.
    truth, eager, fused = run("eager", x.double()), run("eager", x), run("triton", x)
    assert len(fused) == len(eager) == 9
    for step, (t64, e32, f32) in enumerate(zip(truth, eager, fused)):
        for what, t_, e_, f_ in zip(("x", "denoised"), t64, e32, f32):
            scale = max(1.0, float(t_.abs().max()))
            torch.testing.assert_close(f_, e_, rtol=1e-4, atol=1e-4 * scale, msg=f"step {step} {what}")
            err_f, err_e = float((f_.double() - t_).abs().max()), float((e_.double() - t_).abs().max())
            assert err_f <= 2 * err_e + 2e-6 * scale, (step, what, err_f, err_e)
    assert not torch.equal(fused[-1][0], x)


def test_backend_switch_really_runs_the_kernel(monkeypatch):
    """Guard against a silent fallback: with LDM_KERNELS=triton the op goes through the
    custom op (and so the kernel), with eager it does not."""
    calls = []
    real = ss._launch
    monkeypatch.setattr(ss, "_launch", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _rand((1, 2, 3, 3), 0)
    monkeypatch.setenv("LDM_KERNELS", "triton")
    ops.ddim_step(x, x, 0.3, 0.5)
    assert calls == [1]
    monkeypatch.setenv("LDM_KERNELS", "eager")
    ops.ddim_step(x, x, 0.3, 0.5)
    assert calls == [1]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_sd_sized_guided_step_on_gpu(out_dtype):
    """SD1.5 at 512²: fp32 latent (2, 4, 64, 64), CFG-stacked half-precision UNet output."""
    x, out, prev = _rand((2, 4, 64, 64), 0), _rand((4, 4, 64, 64), 1, out_dtype), _rand((2, 4, 64, 64), 2)
    a_t, a_next, a_prev = _a(500), _a(480), _a(520)
    got = ss.dpmpp_2m_step(x, out, a_t, a_next, x0_prev=prev, a_prev=a_prev, guidance=7.5)
    want = _ref64(ss.dpmpp_2m_step_ref, x, out, a_t=a_t, a_next=a_next, x0_prev=prev, a_prev=a_prev,
                  guidance=7.5)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.double(), w_, rtol=2e-6, atol=2e-6 * max(1.0, float(w_.abs().max())))
