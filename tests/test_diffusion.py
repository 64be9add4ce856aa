"""Schedules, forward process, training loss and prediction conversions (ldm_fast/diffusion.py)."""

import math

import pytest
import torch

from ldm_fast import diffusion as D


def test_linear_schedule_closed_form():
    s = D.make_schedule("linear", 1000, 0.0015, 0.0195)
    assert s.betas.dtype == torch.float64 and s.betas.shape == (1000,)
    assert math.isclose(float(s.betas[0]), 0.0015, rel_tol=1e-12)
    assert math.isclose(float(s.betas[-1]), 0.0195, rel_tol=1e-12)
    r0, r1 = math.sqrt(0.0015), math.sqrt(0.0195)
    for k in (1, 137, 500, 998):  # linear in √β, not in β
        assert math.isclose(float(s.betas[k]), (r0 + k * (r1 - r0) / 999) ** 2, rel_tol=1e-12)
    assert float(s.betas[500]) < (0.0015 + 0.0195) / 2
    prod = 1.0
    for k in range(1000):
        prod *= 1 - float(s.betas[k])
        if k in (0, 9, 499, 999):
            assert math.isclose(float(s.alphas_cumprod[k]), prod, rel_tol=1e-12)
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())
    torch.testing.assert_close(s.sigmas, ((1 - s.alphas_cumprod) / s.alphas_cumprod).sqrt())


def test_cosine_schedule_closed_form():
    T, off = 1000, 0.008
    s = D.make_schedule("cosine", T)
    f = lambda t: math.cos((t / T + off) / (1 + off) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 1, 250, 500, 900, 990):  # ᾱ_t = f(t+1)/f(0) where β is not clipped
        assert math.isclose(float(s.alphas_cumprod[t]), f(t + 1) / f(0), rel_tol=1e-9)
    assert float(s.betas.max()) == 0.999 and float(s.betas[-1]) == 0.999  # the clip at t → T
    assert bool((s.betas > 0).all())


def test_invalid_schedule_names_the_field():
    with pytest.raises(ValueError, match="schedule"):
        D.make_schedule("quadratic")
    with pytest.raises(ValueError, match="linear_start"):
        D.make_schedule("linear", linear_start=0.02, linear_end=0.01)
    with pytest.raises(ValueError, match="timesteps"):
        D.make_schedule("linear", timesteps=0)
    with pytest.raises(ValueError, match="parameterization"):
        D.make_schedule("linear", parameterization="x0")


def test_schedule_from_config():
    from ldm_fast.config import DiffusionConfig
    cfg = DiffusionConfig(schedule="cosine", parameterization="v")
    s = D.schedule_from_config(cfg)
    assert s.parameterization == "v" and s.num_timesteps == cfg.timesteps
    torch.testing.assert_close(s.betas, D.make_schedule("cosine").betas)


def test_q_sample_formula_and_statistics():
    s = D.make_schedule("linear")
    x0 = torch.full((20000, 1, 2, 2), 0.7)
    for t in (0, 300, 999):
        tt = torch.full((x0.shape[0],), t)
        a = float(s.alphas_cumprod[t])
        x_t = D.q_sample(x0, tt, s, generator=torch.Generator().manual_seed(t))
        assert math.isclose(float(x_t.mean()), math.sqrt(a) * 0.7, abs_tol=0.01)
        assert math.isclose(float(x_t.var()), 1 - a, rel_tol=0.03, abs_tol=1e-4)
    noise = torch.randn(3, 4, 5, 5)
    x0 = torch.randn(3, 4, 5, 5)
    t = torch.tensor([0, 10, 999])
    a = s.alphas_cumprod[t].view(3, 1, 1, 1)
    want = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    torch.testing.assert_close(D.q_sample(x0, t, s, noise=noise).double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_loss_targets(param, loss_type):
    """A model that returns the exact target plus a per-sample offset d_b has loss mean_b(d_b²)
    (l2) or mean_b|d_b| (l1): averaged over C, H, W, then over the batch."""
    s = D.make_schedule("linear", parameterization=param)
    x0 = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 5, 500, 999])
    offsets = torch.tensor([0.0, 0.1, -0.2, 0.3])
    seen = {}

    def model(x_t, tt, cond):
        seen.update(t=tt, cond=cond, x_t=x_t)
        a = s.alphas_cumprod[tt.long()].view(-1, 1, 1, 1).float()
        target = noise if param == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
        return target + offsets.view(-1, 1, 1, 1)

    loss = D.diffusion_loss(model, x0, s, cond={"y": torch.arange(4)}, loss_type=loss_type, t=t, noise=noise)
    want = (offsets ** 2).mean() if loss_type == "l2" else offsets.abs().mean()
    assert math.isclose(float(loss), float(want), rel_tol=1e-4, abs_tol=1e-6)
    assert seen["t"].dtype == torch.float32 and torch.equal(seen["t"], t.float())
    assert torch.equal(seen["cond"]["y"], torch.arange(4))
    torch.testing.assert_close(seen["x_t"], D.q_sample(x0, t, s, noise=noise))


def test_loss_draws_from_generator_and_backpropagates():
    s = D.make_schedule("linear")
    w = torch.nn.Parameter(torch.tensor(0.5))
    x0 = torch.randn(8, 2, 4, 4)
    model = lambda x, t, c: w * x  # noqa: E731
    l1 = D.diffusion_loss(model, x0, s, generator=torch.Generator().manual_seed(3))
    l2 = D.diffusion_loss(model, x0, s, generator=torch.Generator().manual_seed(3))
    l3 = D.diffusion_loss(model, x0, s, generator=torch.Generator().manual_seed(4))
    assert float(l1.detach()) == float(l2.detach()) != float(l3.detach()) and l1.dim() == 0
    l1.backward()
    assert w.grad is not None and torch.isfinite(w.grad)
    with pytest.raises(ValueError, match="loss"):
        D.diffusion_loss(model, x0, s, loss_type="huber")


@pytest.mark.parametrize("a", [0.9985, 0.5, 0.004, "tensor"])
def test_conversions_round_trip(a):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g).double(), torch.randn(3, 2, 4, 4, generator=g).double()
    if a == "tensor":
        a = torch.tensor([0.9, 0.3, 0.01], dtype=torch.float64).view(3, 1, 1, 1)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
    else:
        alpha, sigma = math.sqrt(a), math.sqrt(1 - a)
    x_t = alpha * x0 + sigma * eps
    v = alpha * eps - sigma * x0
    close = lambda p, q: torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)  # noqa: E731
    close(D.x0_from_eps(x_t, eps, a), x0)
    close(D.eps_from_x0(x_t, x0, a), eps)
    close(D.v_from_eps_x0(eps, x0, a), v)
    close(D.x0_from_v(x_t, v, a), x0)
    close(D.eps_from_v(x_t, v, a), eps)
    close(D.v_from_eps(x_t, eps, a), v)
    for param, pred in (("eps", eps), ("v", v)):
        got_x0, got_eps = D.x0_eps_from_prediction(pred, x_t, a, param)
        close(got_x0, x0)
        close(got_eps, eps)
    # v is a rotation of (x0, ε): norms are preserved, ‖x_t‖² + ‖v‖² = ‖x0‖² + ‖ε‖²
    close(x_t ** 2 + v ** 2, x0 ** 2 + eps ** 2)
