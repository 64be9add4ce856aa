"""Discrete-time Gaussian diffusion (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):
noise schedules, the forward process q(x_t | x_0), the training loss and the conversions
between the three things a network may predict (ε, x_0, v).

Notation: ᾱ_t = Π_{s≤t} (1 − β_s) for t = 0 … T−1; α = √ᾱ and s = √(1 − ᾱ) are the signal and
noise scales, x_t = α·x_0 + s·ε. Schedules are computed in float64 and only cast where they
meet a tensor (as guided-diffusion does): 1 − ᾱ near t = 0 is ~1e-3, and the cumulative
product over 1000 steps loses several digits in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PARAMETERIZATIONS = ("eps", "v")
SCHEDULES = ("linear", "cosine")


# ----------------------------------------------------------------------------- schedules

def linear_betas(timesteps: int, linear_start: float, linear_end: float) -> torch.Tensor:
    """The LDM paper's "linear" schedule: linear in √β from √β_1 to √β_T, then squared."""
    return torch.linspace(math.sqrt(linear_start), math.sqrt(linear_end), timesteps,
                          dtype=torch.float64) ** 2


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 ("Improved DDPM", eq. 17): ᾱ(t) = f(t)/f(0) with
    f(t) = cos²((t/T + s)/(1 + s) · π/2); β_t = 1 − ᾱ(t+1)/ᾱ(t), clipped at `max_beta` so the
    last steps (where ᾱ → 0) stay finite."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, max_beta)


@dataclass(frozen=True)
class Schedule:
    """A discrete noise schedule and what the network predicts under it. Tensors are float64
    on the CPU; `gather` casts the entries a batch needs."""

    betas: torch.Tensor           # (T,) float64, β_t
    alphas_cumprod: torch.Tensor  # (T,) float64, ᾱ_t = Π_{s≤t} (1 − β_s)
    parameterization: str = "eps"  # the network's target: "eps" (ε) or "v" (Salimans & Ho 2022)

    def __post_init__(self):
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization: expected one of {PARAMETERIZATIONS}, "
                             f"got {self.parameterization!r}")

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def sigmas(self) -> torch.Tensor:
        """Noise levels of the equivalent variance-exploding process, σ_t = √((1 − ᾱ_t)/ᾱ_t)
        (k-diffusion's view of a VP schedule: x_t/α = x_0 + σ_t·ε)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] for a batch of integer timesteps t (B,), shaped (B, 1, …, 1) to broadcast
        against `like`, on its device, in float32 (cast after indexing the float64 table)."""
        out = values[t.detach().long().cpu()].to(device=like.device, dtype=torch.float32)
        return out.view(-1, *([1] * (like.dim() - 1)))


def make_schedule(kind: str = "linear", timesteps: int = 1000, linear_start: float = 0.0015,
                  linear_end: float = 0.0195, parameterization: str = "eps",
                  cosine_s: float = 0.008) -> Schedule:
    """Build a `Schedule` by name: "linear" (the paper's, in √β) or "cosine"."""
    if timesteps < 1:
        raise ValueError(f"timesteps: must be ≥ 1, got {timesteps}")
    if kind == "linear":
        if not 0 < linear_start <= linear_end < 1:
            raise ValueError(f"linear_start/linear_end: need 0 < start ≤ end < 1, "
                             f"got {linear_start}, {linear_end}")
        betas = linear_betas(timesteps, linear_start, linear_end)
    elif kind == "cosine":
        betas = cosine_betas(timesteps, cosine_s)
    else:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {kind!r}")
    return Schedule(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, dim=0),
                    parameterization=parameterization)


def schedule_from_config(cfg) -> Schedule:
    """Schedule from a `config.DiffusionConfig` (fields timesteps, schedule, linear_start,
    linear_end, parameterization)."""
    return make_schedule(cfg.schedule, cfg.timesteps, cfg.linear_start, cfg.linear_end,
                         cfg.parameterization)


# ----------------------------------------------------------------------------- forward process

def q_sample(x0: torch.Tensor, t: torch.Tensor, schedule: Schedule,
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample q(x_t | x_0) = N(√ᾱ_t·x_0, (1 − ᾱ_t)·I) (Ho et al. 2020, eq. 4)."""
    if noise is None:
        noise = randn_like(x0, generator)
    a = schedule.gather(schedule.alphas_cumprod, t, x0)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (so a CPU
    generator gives the same numbers whatever device x lives on), then moved to x."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(
        device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------- conversions
# a is ᾱ_t: a Python float or a tensor broadcastable against x (e.g. Schedule.gather's output).
# x_t = α·x0 + s·ε and v = α·ε − s·x0 (α = √a, s = √(1 − a)); every pair determines the rest.

def _scales(a):
    if isinstance(a, torch.Tensor):
        return a.sqrt(), (1 - a).sqrt()
    return math.sqrt(a), math.sqrt(1 - a)


def x0_from_eps(x_t, eps, a):
    """x0 = (x_t − s·ε)/α."""
    alpha, sigma = _scales(a)
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t, x0, a):
    """ε = (x_t − α·x0)/s."""
    alpha, sigma = _scales(a)
    return (x_t - alpha * x0) / sigma


def v_from_eps_x0(eps, x0, a):
    """v = α·ε − s·x0 (Salimans & Ho 2022, "Progressive Distillation", §4)."""
    alpha, sigma = _scales(a)
    return alpha * eps - sigma * x0


def x0_from_v(x_t, v, a):
    """x0 = α·x_t − s·v (x_t and v are a rotation of (x0, ε) by the angle atan(s/α))."""
    alpha, sigma = _scales(a)
    return alpha * x_t - sigma * v


def eps_from_v(x_t, v, a):
    """ε = s·x_t + α·v."""
    alpha, sigma = _scales(a)
    return sigma * x_t + alpha * v


def v_from_eps(x_t, eps, a):
    """v from (x_t, ε), through x0."""
    return v_from_eps_x0(eps, x0_from_eps(x_t, eps, a), a)


def x0_eps_from_prediction(pred, x_t, a, parameterization: str):
    """(x0, ε) implied by a network prediction of kind `parameterization` ("eps" or "v")."""
    if parameterization == "eps":
        return x0_from_eps(x_t, pred, a), pred
    if parameterization == "v":
        return x0_from_v(x_t, pred, a), eps_from_v(x_t, pred, a)
    raise ValueError(f"parameterization: expected one of {PARAMETERIZATIONS}, got {parameterization!r}")


# ----------------------------------------------------------------------------- training loss

def diffusion_loss(model_fn, x0: torch.Tensor, schedule: Schedule, cond: dict | None = None,
                   loss_type: str = "l2", generator: torch.Generator | None = None,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The simplified objective (Ho et al. 2020, Algorithm 1; LDM eq. 2): t ~ U{0, …, T−1},
    ε ~ N(0, I), loss = ‖target − model_fn(x_t, t, cond)‖ averaged over C, H, W, then over the
    batch; the target is ε or v (schedule.parameterization). `t` and `noise` may be given
    (tests, importance sampling); otherwise they are drawn from `generator`."""
    if loss_type not in ("l2", "l1"):
        raise ValueError(f"loss: expected 'l2' or 'l1', got {loss_type!r}")
    b = x0.shape[0]
    if t is None:
        device = generator.device if generator is not None else x0.device
        t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator, device=device)
    t = t.to(x0.device)
    if noise is None:
        noise = randn_like(x0, generator)
    x_t = q_sample(x0, t, schedule, noise=noise)
    # The model sees t as a float tensor of discrete timesteps (the samplers' interface).
    pred = model_fn(x_t, t.to(torch.float32), cond if cond is not None else {})
    if schedule.parameterization == "eps":
        target = noise.float()
    else:
        target = v_from_eps_x0(noise.float(), x0.float(), schedule.gather(schedule.alphas_cumprod, t, x0))
    if loss_type == "l2":
        per_elem = F.mse_loss(pred.float(), target, reduction="none")
    else:
        per_elem = F.l1_loss(pred.float(), target, reduction="none")
    return per_elem.reshape(b, -1).mean(dim=1).mean()
