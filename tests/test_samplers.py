"""Samplers driven by the exact denoiser of a known Gaussian: no training, a closed-form truth.

For data x0 ~ N(μ, Σ), x_t = α·x0 + s·ε is Gaussian too, and
    E[ε | x_t]  = s·(ᾱΣ + (1 − ᾱ)I)⁻¹ (x_t − α·μ)
    E[x0 | x_t] = μ + α·Σ(ᾱΣ + (1 − ᾱ)I)⁻¹ (x_t − α·μ),    E[v | x_t] = α·E[ε] − s·E[x0].
This is the optimal network, so every sampler run with it must return samples distributed as
N(μ, Σ) up to its discretisation error and Monte Carlo noise.

Tolerances. N = 20 000 samples of a 4-dim Gaussian (eigenvalues 0.09 … 1.67, correlations up
to 0.45). Monte Carlo noise: ≈ 0.008 on the largest mean entry and ≈ 0.013 on the relative
Frobenius error of the covariance, rel_cov = ‖Ĉ − Σ‖_F/‖Σ‖_F. Discretisation bias of each
sampler, measured at N = 50 000 on two seeds (mean error ≤ 0.01 everywhere):
    sampler (steps)                 rel_cov bias   tolerance
    DDIM / Euler (50, linear)            0.069        0.10   first order; the uniform-in-t
    DDIM (50, cosine)                    0.049        0.08   grid is coarse near t = 0
    PLMS (50)                            0.006        0.04
    DPM-Solver++(2M) (25 linear, 50 cosine) 0.015     0.04
    DDPM (1000)                          0.011        0.04
    DDIM η = 0.5 (200)                   0.030        0.06
    Euler-ancestral (200)                0.051        0.08
Mean tolerance: 0.05 everywhere. A wrong coefficient (sign, missing √, swapped CFG halves)
moves these by O(0.1–1).
"""

import math

import pytest
import torch

from ldm_fast import ops, samplers
from ldm_fast.diffusion import make_schedule

N = 20_000
MU = torch.tensor([0.5, -0.3, 0.2, 0.8], dtype=torch.float64)
_A = torch.tensor([[1.0, 0.6, 0.0, 0.2], [0.0, 0.8, -0.4, 0.0],
                   [0.0, 0.0, 0.5, 0.3], [0.0, 0.0, 0.0, 0.4]], dtype=torch.float64)
SIGMA = _A @ _A.T


class GaussianDenoiser:
    """The exact ε- or v-predictor for data ~ N(μ, Σ) (flattened per sample, any latent shape
    with Σ's size). With `mu_uncond`, cond["y"] = 1 selects μ and 0 selects mu_uncond, both
    with covariance Σ. Records the batch size of every call."""

    def __init__(self, schedule, mu=MU, sigma=SIGMA, mu_uncond=None):
        self.schedule, self.mu, self.mu_uncond = schedule, mu, mu_uncond
        self.lam, self.q = torch.linalg.eigh(sigma)
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append(x.shape[0])
        assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
        b = x.shape[0]
        xf = x.reshape(b, -1).double()
        a = self.schedule.alphas_cumprod[t.long()].double()[:, None]
        alpha, s = a.sqrt(), (1 - a).sqrt()
        mu = self.mu.expand(b, -1)
        if self.mu_uncond is not None:
            y = cond["y"].double().reshape(b, 1)
            mu = y * self.mu + (1 - y) * self.mu_uncond
        kz = ((xf - alpha * mu) @ self.q) / (a * self.lam + 1 - a)  # (ᾱΣ + (1−ᾱ)I)⁻¹(x − αμ), eigenbasis
        eps = s * (kz @ self.q.T)
        if self.schedule.parameterization == "eps":
            out = eps
        else:
            x0 = mu + alpha * ((self.lam * kz) @ self.q.T)
            out = alpha * eps - s * x0
        return out.to(x.dtype).reshape(x.shape)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run thousands of small ops (20k × 4 floats); on a shared 2-core machine
    waking a second thread for each costs more than the op itself."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _noise(shape=(N, 4, 1, 1), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _errors(samples, mu=MU, sigma=SIGMA):
    x = samples.reshape(samples.shape[0], -1).double()
    cov = torch.cov(x.T)
    return float((x.mean(0) - mu).abs().max()), float(torch.linalg.norm(cov - sigma) / torch.linalg.norm(sigma))


CASES = [  # (sampler, steps, schedule, parameterization, extra kwargs, rel_cov tolerance)
    ("ddim", 50, "linear", "eps", {}, 0.10),
    ("ddim", 50, "linear", "v", {}, 0.10),
    ("ddim", 50, "cosine", "eps", {}, 0.08),
    ("euler", 50, "linear", "eps", {}, 0.10),
    ("plms", 50, "linear", "eps", {}, 0.04),
    ("plms", 50, "linear", "v", {}, 0.04),
    ("dpmpp_2m", 25, "linear", "eps", {}, 0.04),
    ("dpmpp_2m", 25, "linear", "v", {}, 0.04),
    ("dpmpp_2m", 50, "cosine", "eps", {}, 0.04),
    ("ddpm", 1000, "linear", "eps", {}, 0.04),
    ("ddim", 200, "linear", "v", {"eta": 0.5}, 0.06),
    ("euler_ancestral", 200, "linear", "eps", {}, 0.08),
]


@pytest.mark.parametrize("name,steps,kind,param,kwargs,tol_cov", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}{'-eta' if c[4] else ''}" for c in CASES])
def test_sampler_matches_gaussian(name, steps, kind, param, kwargs, tol_cov):
    with ops.backend("eager"):
        schedule = make_schedule(kind, parameterization=param)
        model = GaussianDenoiser(schedule)
        out = samplers.sample(name, model, _noise(), schedule, steps=steps,
                              generator=torch.Generator().manual_seed(1), **kwargs)
    err_mu, err_cov = _errors(out)
    assert out.shape == (N, 4, 1, 1) and out.dtype == torch.float32
    assert err_mu < 0.05, f"{name}: mean off by {err_mu:.4f}"
    assert err_cov < tol_cov, f"{name}: covariance off by {err_cov:.4f} (relative Frobenius)"


def test_ddpm_on_spatial_latent_shape():
    """The same Gaussian laid out as a (B, 1, 2, 2) latent: samplers must not care about layout."""
    schedule = make_schedule("linear")
    out = samplers.sample_ddpm(GaussianDenoiser(schedule), _noise((N, 1, 2, 2)), schedule, steps=250,
                               generator=torch.Generator().manual_seed(2))
    err_mu, err_cov = _errors(out)
    assert out.shape == (N, 1, 2, 2)
    assert err_mu < 0.05 and err_cov < 0.08  # 250 strided DDPM steps: bias ≈ 0.04


# ----------------------------------------------------------------------------- guidance

MU_UNCOND = torch.tensor([0.2, -0.1, 0.4, 0.5], dtype=torch.float64)


def _cfg_inputs(n):
    return {"y": torch.ones(n, 1)}, {"y": torch.zeros(n, 1)}


@pytest.mark.parametrize("name,steps,param", [("ddim", 50, "eps"), ("dpmpp_2m", 25, "v"),
                                              ("plms", 50, "eps"), ("euler_ancestral", 200, "v")])
def test_guided_gaussian(name, steps, param):
    """Conditional N(μ_c, Σ) and unconditional N(μ_u, Σ) share Σ, and every prediction is
    affine in μ, so u + g·(c − u) is exactly the predictor of N(μ_u + g·(μ_c − μ_u), Σ):
    guided samples must have that mean (swapped [uncond; cond] halves would give
    μ_c + g·(μ_u − μ_c)) and the data's covariance. One model call per step on 2B."""
    g = 3.0
    schedule = make_schedule("linear", parameterization=param)
    model = GaussianDenoiser(schedule, mu=MU, mu_uncond=MU_UNCOND)
    cond, uncond = _cfg_inputs(N)
    out = samplers.sample(name, model, _noise(seed=3), schedule, steps=steps, cond=cond, uncond=uncond,
                          guidance=g, generator=torch.Generator().manual_seed(4))
    err_mu, err_cov = _errors(out, mu=MU_UNCOND + g * (MU - MU_UNCOND))
    assert err_mu < 0.05, f"guided mean off by {err_mu:.4f}"
    assert err_cov < 0.10
    assert set(model.calls) == {2 * N}  # always the doubled batch
    expected_calls = steps + (1 if name == "plms" else 0)  # PLMS: two calls on its first step
    assert len(model.calls) == expected_calls


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_guidance_one_is_conditional(name):
    schedule = make_schedule("linear")
    cond, uncond = _cfg_inputs(64)
    x = _noise((64, 4, 1, 1), seed=5)
    steps = 10
    m1 = GaussianDenoiser(schedule, mu_uncond=MU_UNCOND)
    m2 = GaussianDenoiser(schedule, mu_uncond=MU_UNCOND)
    a = samplers.sample(name, m1, x, schedule, steps=steps, cond=cond, uncond=uncond, guidance=1.0,
                        generator=torch.Generator().manual_seed(6))
    b = samplers.sample(name, m2, x, schedule, steps=steps, cond=cond,
                        generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert set(m1.calls) == {64}  # guidance 1: a single conditional call, no doubled batch


def test_doubled_batch_order():
    """The model sees x twice and every cond entry as [uncond; cond]."""
    seen = {}

    def model(x, t, cond):
        seen.update(x=x.clone(), t=t.clone(), c=cond["c"].clone())
        return torch.zeros_like(x)

    schedule = make_schedule("linear")
    x = _noise((3, 2, 2, 2), seed=7)
    cond, uncond = {"c": torch.full((3, 5), 1.0)}, {"c": torch.full((3, 5), -1.0)}
    samplers.sample_ddim(model, x, schedule, steps=1, cond=cond, uncond=uncond, guidance=2.0)
    assert torch.equal(seen["x"], torch.cat([x, x]))
    assert torch.equal(seen["c"], torch.cat([uncond["c"], cond["c"]]))
    assert torch.equal(seen["t"], torch.full((6,), 999.0))


# ----------------------------------------------------------------------------- determinism & API

@pytest.mark.parametrize("name,kwargs", [("ddpm", {"steps": 20}), ("ddim", {"eta": 0.7}),
                                         ("euler_ancestral", {}), ("dpmpp_2m", {})])
def test_same_seed_same_result(name, kwargs):
    schedule = make_schedule("linear")
    x = _noise((256, 4, 1, 1), seed=8)
    kwargs = {"steps": 20, **kwargs}
    run = lambda seed: samplers.sample(name, GaussianDenoiser(schedule), x, schedule,  # noqa: E731
                                       generator=torch.Generator().manual_seed(seed), **kwargs)
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    if name != "dpmpp_2m":  # stochastic samplers: another seed, other samples
        assert not torch.allclose(a, c)


def test_ddim_eta1_is_ddpm_posterior():
    """DDIM with η = 1 is DDPM's ancestral step: mean μ̃ = √ᾱ'β/(1−ᾱ)·x0 + √(ᾱ/ᾱ')(1−ᾱ')/(1−ᾱ)·x_t
    and variance β̃ = (1−ᾱ')/(1−ᾱ)·β, with β = 1 − ᾱ/ᾱ' on a strided chain (Ho et al. eq. 7)."""
    schedule = make_schedule("linear")
    ac = schedule.alphas_cumprod
    x, eps, z = _noise((4, 3, 5, 5), 0), _noise((4, 3, 5, 5), 1), _noise((4, 3, 5, 5), 2)
    for t, t_next in [(999, 979), (500, 499), (40, 0)]:
        a, a_next = float(ac[t]), float(ac[t_next])
        x0 = (x.double() - math.sqrt(1 - a) * eps.double()) / math.sqrt(a)
        beta = 1 - a / a_next
        mean = (math.sqrt(a_next) * beta / (1 - a) * x0
                + math.sqrt(a / a_next) * (1 - a_next) / (1 - a) * x.double())
        expected = mean + math.sqrt((1 - a_next) / (1 - a) * beta) * z.double()
        got = ops.ddim_step(x, eps, a, a_next, eta=1.0, noise=z)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.4, 1.0])
def test_euler_is_ddim_on_discrete_grid(eta):
    """Euler(-ancestral) in σ on the schedule's own σ grid equals DDIM with the same η."""
    schedule = make_schedule("linear", parameterization="v")
    x, out, z = _noise((2, 4, 3, 3), 0), _noise((2, 4, 3, 3), 1), _noise((2, 4, 3, 3), 2)
    ac = schedule.alphas_cumprod
    for t, t_next in [(999, 950), (300, 280), (10, 0)]:
        a, b = ops.euler_step(x, out, float(ac[t]), float(ac[t_next]), eta=eta, noise=z, parameterization="v"), \
            ops.ddim_step(x, out, float(ac[t]), float(ac[t_next]), eta=eta, noise=z, parameterization="v")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_callback_and_denoised():
    schedule = make_schedule("linear")
    seen = []
    x = _noise((8, 4, 1, 1), seed=9)
    for name in samplers.SAMPLERS:
        seen.clear()
        samplers.sample(name, GaussianDenoiser(schedule), x, schedule, steps=5, callback=seen.append,
                        generator=torch.Generator().manual_seed(0))
        assert [d["i"] for d in seen] == list(range(5))
        assert all(d["denoised"].shape == x.shape and d["x"].shape == x.shape for d in seen)
        assert seen[0]["t"] == 999 and seen[-1]["t"] == 0


def test_timesteps_and_dispatch():
    schedule = make_schedule("linear")
    assert samplers.make_timesteps(schedule, 1000) == list(range(999, -1, -1))
    assert samplers.make_timesteps(schedule, 1000, "trailing") == list(range(999, -1, -1))
    lin = samplers.make_timesteps(schedule, 50)
    assert lin[0] == 999 and lin[-1] == 0 and len(set(lin)) == 50
    trailing = samplers.make_timesteps(schedule, 50, "trailing")
    assert trailing[0] == 999 and trailing[-1] == 19
    assert samplers.make_timesteps(schedule, 50, "leading", steps_offset=1)[-1] == 1
    logsnr = samplers.make_timesteps(schedule, 25, "logsnr")
    assert logsnr[0] == 999 and logsnr[-1] == 0 and logsnr == sorted(set(logsnr), reverse=True)
    with pytest.raises(ValueError, match="sampler"):
        samplers.sample("nope", None, None, schedule)
    with pytest.raises(ValueError, match="eta"):
        samplers.sample("plms", GaussianDenoiser(schedule), _noise((2, 4, 1, 1)), schedule, eta=0.5)
    # neutral values of flags a sampler does not take are dropped (one CLI for all samplers)
    samplers.sample("plms", GaussianDenoiser(schedule), _noise((2, 4, 1, 1)), schedule, steps=3, eta=0.0)
    with pytest.raises(ValueError, match="uncond keys"):
        samplers.sample_ddim(GaussianDenoiser(schedule), _noise((2, 4, 1, 1)), schedule, steps=2,
                             cond={"a": torch.zeros(2)}, uncond={"b": torch.zeros(2)}, guidance=2.0)
