"""ldm_fast's samplers against diffusers' schedulers: same model, same initial noise, same
stochastic draws (one torch.Generator per run), final latents within 1e-5 relative in fp32
(and in fp64 for the deterministic samplers).

The model is a fixed, nonlinear function of (x, t), so a wrong timestep, a wrong ᾱ or a step
taken between the wrong grid points changes the result by far more than the tolerance. The
diffusers schedulers get ldm_fast's float64 schedule tables (they build theirs in float32, a
1e-6-level difference that is not what these tests are about). The SD configuration is the
one Stable Diffusion ships (β 0.00085 → 0.012 "scaled_linear" = ldm_fast's "linear").
"""

import inspect

import pytest
import torch

from ldm_fast import ops, samplers
from ldm_fast.diffusion import make_schedule

diffusers = pytest.importorskip("diffusers")
# diffusers' schedulers build numpy arrays from tensors in a way numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

T = 1000
SD = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 6, 6)


@pytest.fixture(autouse=True)
def _eager():
    ops.set_backend("eager")
    yield
    ops.set_backend(None)


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("linear", T, 0.00085, 0.012)


def toy_model(x, t, cond=None):
    """A deterministic ε-predictor that depends on x and t nonlinearly."""
    field = torch.linspace(-1, 1, x[0].numel()).reshape(x.shape[1:]).to(x.dtype)
    tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) / T
    return torch.tanh(0.7 * x + field) * (0.5 + tt) + 0.1 * x * torch.cos(3 * tt)


def _noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _tables(sched, schedule):
    """Give the diffusers scheduler ldm_fast's float64 ᾱ table (and what it derives from it)."""
    ac = schedule.alphas_cumprod.clone()
    sched.betas, sched.alphas, sched.alphas_cumprod = schedule.betas.clone(), 1 - schedule.betas, ac
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if sched.config.set_alpha_to_one \
            else ac[0]
    if hasattr(sched, "lambda_t"):  # DPM-Solver's α_t, σ_t, λ_t
        sched.alpha_t, sched.sigma_t = ac.sqrt(), (1 - ac).sqrt()
        sched.lambda_t = sched.alpha_t.log() - sched.sigma_t.log()
    return sched


def _run_diffusers(sched, x_vp, seed):
    """diffusers' denoising loop. Karras-style schedulers (Euler) work on x_vp·√(σ²+1); their
    input scaling hands the model x_vp back, and they end at σ = 0, where the two agree."""
    gen = torch.Generator().manual_seed(seed)
    takes_gen = "generator" in inspect.signature(sched.step).parameters
    x = x_vp * (sched.sigmas[0] ** 2 + 1).sqrt().float() if hasattr(sched, "sigmas") and \
        type(sched).__name__.startswith("Euler") else x_vp.clone()
    for t in sched.timesteps:
        out = toy_model(sched.scale_model_input(x, t), torch.full((x.shape[0],), float(t)))
        kwargs = {"generator": gen} if takes_gen else {}
        if type(sched).__name__ == "DDIMScheduler":
            kwargs["eta"] = sched._test_eta
        x = sched.step(out, t, x, **kwargs).prev_sample
    return x


def _run_ours(name, x, schedule, seed, **kwargs):
    model = lambda x, t, cond: toy_model(x, t)  # noqa: E731
    return samplers.sample(name, model, x, schedule, generator=torch.Generator().manual_seed(seed), **kwargs)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _ddim(steps, eta=0.0, **config):
    s = diffusers.DDIMScheduler(**{**SD, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                                   **config})
    s.set_timesteps(steps)
    s._test_eta = eta
    return s


# ----------------------------------------------------------------------------- grids

@pytest.mark.parametrize("steps", [1, 7, 10, 30, 50, 250])
def test_original_uniform_grid(steps, schedule):
    """CompVis make_ddim_timesteps("uniform"): range(0, T, T // steps) + 1 — one more step than
    asked when steps does not divide T (7 → 8, 30 → 31)."""
    c = T // steps
    expected = [k + 1 for k in range(0, T, c)][::-1]
    got = samplers.make_timesteps(schedule, steps, "uniform", steps_offset=1)
    assert got == expected
    assert len(got) == (steps if T % steps == 0 else steps + 1) or steps == 7 and len(got) == 8


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("steps", [7, 10, 50])
def test_grid_matches_diffusers_ddim(spacing, offset, steps, schedule):
    s = _ddim(steps, timestep_spacing=spacing, steps_offset=offset)
    assert samplers.make_timesteps(schedule, steps, spacing, steps_offset=offset) == s.timesteps.tolist()


def test_grid_refuses_past_T(schedule):
    with pytest.raises(ValueError, match="steps_offset"):
        samplers.make_timesteps(schedule, 1000, "uniform", steps_offset=1)


# ----------------------------------------------------------------------------- final latents

@pytest.mark.parametrize("steps,eta,dtype", [(10, 0.0, torch.float32), (50, 0.0, torch.float32),
                                             (20, 0.6, torch.float32), (10, 0.0, torch.float64)])
def test_ddim_matches_diffusers(steps, eta, dtype, schedule):
    x = _noise(1).to(dtype)
    theirs = _run_diffusers(_tables(_ddim(steps, eta), schedule), x, seed=5)
    ours = _run_ours("ddim", x, schedule, 5, steps=steps, eta=eta, spacing="leading", steps_offset=1,
                     set_alpha_to_one=False)
    assert ours.dtype == theirs.dtype == dtype and _rel(ours, theirs) < 1e-5


@pytest.mark.parametrize("steps", [7, 30])
def test_ddim_original_extra_step(steps, schedule):
    """Step counts that do not divide T: the original runs c·k + 1 for every c·k < T (one step
    more). diffusers' DDIM steps t → t − T // steps, which is the original's stride, so given
    the original's grid it reproduces the original's run."""
    x = _noise(2)
    s = _tables(_ddim(steps), schedule)
    grid = samplers.make_timesteps(schedule, steps, "uniform", steps_offset=1)
    s.timesteps = torch.tensor(grid)
    theirs = _run_diffusers(s, x, seed=0)
    ours = _run_ours("ddim", x, schedule, 0, steps=steps, spacing="uniform", steps_offset=1, set_alpha_to_one=False)
    assert _rel(ours, theirs) < 1e-5
    truncated = _run_ours("ddim", x, schedule, 0, steps=steps, spacing="leading", steps_offset=1,
                          set_alpha_to_one=False)
    assert _rel(truncated, theirs) > 1e-3  # the diffusers-style grid is another run


def test_plms_original_extra_step(schedule):
    """PLMS on the original's 8-step grid for 7 steps: diffusers' PNDM (its stride T // 7 is
    the grid's) given that grid in its own PLMS call order — the first timestep, the second
    twice (the pseudo improved-Euler start), then the rest."""
    x = _noise(9)
    s = diffusers.PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(7)
    grid = samplers.make_timesteps(schedule, 7, "uniform", steps_offset=1)
    assert len(grid) == 8
    s.timesteps = torch.tensor([grid[0], grid[1], *grid[1:]])
    theirs = _run_diffusers(_tables(s, schedule), x, seed=0)
    ours = _run_ours("plms", x, schedule, 0, steps=7, spacing="uniform", steps_offset=1, set_alpha_to_one=False)
    assert _rel(ours, theirs) < 1e-5


def test_final_alpha_matters(schedule):
    """set_alpha_to_one=False (the original, SD's diffusers config) ends at alphas_cumprod[0];
    True ends at clean data — a visibly different last step."""
    x = _noise(3)
    theirs = _run_diffusers(_tables(_ddim(10), schedule), x, seed=0)
    to_one = _run_ours("ddim", x, schedule, 0, steps=10, spacing="leading", steps_offset=1, set_alpha_to_one=True)
    assert _rel(to_one, theirs) > 1e-3


@pytest.mark.parametrize("steps,dtype", [(10, torch.float32), (20, torch.float32), (10, torch.float64)])
def test_plms_matches_diffusers_pndm(steps, dtype, schedule):
    x = _noise(4).to(dtype)
    s = diffusers.PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(steps)
    theirs = _run_diffusers(_tables(s, schedule), x, seed=0)
    ours = _run_ours("plms", x, schedule, 0, steps=steps, spacing="leading", steps_offset=1, set_alpha_to_one=False)
    assert _rel(ours, theirs) < 1e-5


@pytest.mark.parametrize("steps,offset", [(50, 1), (1000, 0)])
def test_ddpm_matches_diffusers(steps, offset, schedule):
    x = _noise(5)
    s = diffusers.DDPMScheduler(**SD, clip_sample=False, variance_type="fixed_small", steps_offset=offset)
    s.set_timesteps(steps)
    theirs = _run_diffusers(_tables(s, schedule), x, seed=11)
    ours = _run_ours("ddpm", x, schedule, 11, steps=steps, spacing="leading", steps_offset=offset)
    assert _rel(ours, theirs) < 1e-5


@pytest.mark.parametrize("steps,dtype", [(10, torch.float32), (20, torch.float32), (10, torch.float64)])
def test_dpmpp_2m_matches_diffusers(steps, dtype, schedule):
    """DPM-Solver++(2M), midpoint, first order on the last step (final σ = 0), on diffusers'
    own grid for SD (its "leading": N + 1 points with the 0 dropped)."""
    x = _noise(6).to(dtype)
    s = diffusers.DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2,
                                              timestep_spacing="leading", steps_offset=1)
    s.set_timesteps(steps)
    theirs = _run_diffusers(_tables(s, schedule), x, seed=0)
    ours = _run_ours("dpmpp_2m", x, schedule, 0, steps=steps, timesteps=s.timesteps.tolist())
    assert _rel(ours, theirs) < 1e-5


@pytest.mark.parametrize("name,cls,dtype", [("euler", "EulerDiscreteScheduler", torch.float32),
                                            ("euler", "EulerDiscreteScheduler", torch.float64),
                                            ("euler_ancestral", "EulerAncestralDiscreteScheduler", torch.float32)])
def test_euler_matches_diffusers(name, cls, dtype, schedule):
    """fp64 for the deterministic sampler only: diffusers draws fp64 noise itself, ldm_fast
    draws fp32 noise (the same stream on every backend) and casts it."""
    x = _noise(7).to(dtype)
    s = _tables(getattr(diffusers, cls)(**SD, timestep_spacing="leading", steps_offset=1), schedule)
    s.set_timesteps(20)
    theirs = _run_diffusers(s, x, seed=3)
    ours = _run_ours(name, x, schedule, 3, steps=20, spacing="leading", steps_offset=1)
    assert _rel(ours, theirs) < 1e-5


def test_linspace_steps_to_next_grid_point(schedule):
    """Deliberate difference: on the "linspace" grid diffusers' DDIM steps t → t − T // steps
    (999 → 899 while the next grid point is 888), so its run does not follow its own grid;
    ldm_fast steps between consecutive grid points. Same grid, other result."""
    x = _noise(8)
    s = _tables(_ddim(10, timestep_spacing="linspace", steps_offset=0), schedule)
    grid = samplers.make_timesteps(schedule, 10, "linspace")
    assert grid == s.timesteps.tolist() and grid[1] != grid[0] - T // 10
    theirs = _run_diffusers(s, x, seed=0)
    ours = _run_ours("ddim", x, schedule, 0, steps=10, spacing="linspace", set_alpha_to_one=False)
    assert _rel(ours, theirs) > 1e-3


def test_schedule_defaults_from_config():
    """A converted checkpoint's config asks for the original grid; a native one keeps its own."""
    from ldm_fast.config import Config
    from ldm_fast.convert import ORIGINAL_SAMPLING

    native = Config()
    assert samplers.schedule_defaults(native, "ddim") == {"spacing": "linspace", "steps_offset": 0,
                                                          "set_alpha_to_one": True}
    assert samplers.schedule_defaults(native, "dpmpp_2m") == {"steps_offset": 0}  # its log-SNR grid
    converted = Config()
    for k, v in ORIGINAL_SAMPLING.items():
        setattr(converted.diffusion, k, v)
    assert samplers.schedule_defaults(converted, "plms") == {"spacing": "uniform", "steps_offset": 1,
                                                             "set_alpha_to_one": False}
    assert samplers.schedule_defaults(converted, "euler") == {"spacing": "uniform", "steps_offset": 1}


def test_generate_uses_the_runs_grid():
    """generate() on a converted run samples on the original's grid (7 steps → 8 timesteps,
    last step to alphas_cumprod[0]); an explicit spacing overrides it."""
    from micro import micro_config

    from ldm_fast.convert import ORIGINAL_SAMPLING
    from ldm_fast.generate import generate
    from ldm_fast.model import LatentDiffusion

    cfg = micro_config()
    for k, v in ORIGINAL_SAMPLING.items():
        setattr(cfg.diffusion, k, v)
    torch.manual_seed(0)
    model = LatentDiffusion(cfg).eval()
    seen = []
    generate(model, 1, "ddim", steps=7, callback=lambda d: seen.append(d["t"]))
    assert seen == samplers.make_timesteps(model.schedule, 7, "uniform", steps_offset=1) and len(seen) == 8
    seen.clear()
    generate(model, 1, "ddim", steps=7, spacing="linspace", callback=lambda d: seen.append(d["t"]))
    assert seen[0] == 999 and seen[-1] == 0 and len(seen) == 7


def test_ddpm_full_chain_on_a_converted_run(schedule):
    """DDPM with steps = T is the full chain whatever the grid settings (the original's
    p_sample_loop), so a converted run's uniform/offset defaults do not push it past T − 1."""
    seen = []
    model = lambda x, t, cond: toy_model(x, t)  # noqa: E731
    samplers.sample("ddpm", model, _noise(10)[:1], schedule, spacing="uniform", steps_offset=1,
                    generator=torch.Generator().manual_seed(0), callback=lambda d: seen.append(d["t"]))
    assert seen == list(range(T - 1, -1, -1))
