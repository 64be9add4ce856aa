"""Samplers for discrete-time diffusion models, as pure functions (k-diffusion style).

Every sampler has the form `sample_x(model, x, schedule, steps, …, cond, uncond, guidance,
generator, callback, disable_progress)` and returns the final, denoised latent.

- `model(x, t, cond) -> prediction`: x (B, C, H, W); t a float tensor (B,) of discrete
  timesteps in [0, T − 1]; cond a dict of batch-first tensors (possibly empty); the prediction
  is ε or v according to `schedule.parameterization`.
- `x` is the starting noise x_T ~ N(0, I) (drawn by the caller, which fixes the seed).
- Classifier-free guidance (Ho & Salimans 2022): with `uncond` given and `guidance` ≠ 1 the
  model is called once per step on the doubled batch — x twice, every cond entry as
  [uncond; cond] along dim 0 — and the stacked output goes to the update, where
  u + guidance·(c − u) is fused with the step. Otherwise one conditional call.
- Randomness (DDPM, η > 0, ancestral steps) comes from `generator`: same seed, same result,
  on the eager and the fused backend alike (the noise is drawn here, not in a kernel).
- The updates themselves are reached only through `ops` (fused Triton kernels or eager).

Timesteps: `steps` discrete timesteps (`make_timesteps`; by default evenly from T − 1 down
to 0, uniform in log-SNR for DPM-Solver++), then a final step to clean data (ᾱ = 1). With
steps = T this is the full DDPM chain. `timesteps=` overrides the grid.
"""

from __future__ import annotations

import inspect
import math

import torch
from tqdm.auto import tqdm

from ldm_fast import ops
from ldm_fast.diffusion import Schedule, randn_like

SPACINGS = ("linspace", "trailing", "leading", "logsnr")


# ----------------------------------------------------------------------------- shared pieces

def make_timesteps(schedule: Schedule, steps: int, spacing: str = "linspace") -> list[int]:
    """`steps` distinct discrete timesteps, descending. "linspace": evenly from T−1 to 0
    (both ends); "trailing": T−1, T−1−T/steps, … (ends at T/steps − 1); "leading": the LDM
    code's DDIM grid 0, T/steps, … shifted by +1 (never reaches T−1); "logsnr": evenly in
    λ = log(α/s) between λ(T−1) and λ(0), rounded to the nearest timesteps (DPM-Solver's
    "logSNR" grid; fewer than `steps` where rounding makes neighbours coincide)."""
    num_timesteps = schedule.num_timesteps
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps: must be in [1, {num_timesteps}], got {steps}")
    if spacing == "linspace":
        ts = torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()
    elif spacing == "trailing":
        ts = (torch.arange(num_timesteps, 0, -num_timesteps / steps, dtype=torch.float64).round() - 1).long()
    elif spacing == "leading":
        ts = torch.arange(0, num_timesteps, num_timesteps // steps).flip(0)[:steps] + 1
        ts = ts.clamp(max=num_timesteps - 1)
    elif spacing == "logsnr":
        ac = schedule.alphas_cumprod
        lam = 0.5 * (ac.log() - torch.log1p(-ac))  # decreasing in t
        targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
        ts = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).unique().flip(0)
    else:
        raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
    return ts.tolist()


def _plan(schedule: Schedule, steps: int, timesteps, spacing: str):
    """(timesteps, ᾱ values): ᾱ has one more entry, 1.0, the clean end of the last step."""
    ts = [int(t) for t in timesteps] if timesteps is not None else make_timesteps(schedule, steps, spacing)
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {ts}")
    ac = schedule.alphas_cumprod
    return ts, [float(ac[t]) for t in ts] + [1.0]


def _guidance_setup(cond, uncond, guidance):
    """(cond dict for the model call, whether the batch is doubled for CFG)."""
    cond = {} if cond is None else cond
    if uncond is None or guidance == 1.0:
        return cond, False
    if set(uncond) != set(cond):
        raise ValueError(f"uncond keys {sorted(uncond)} differ from cond keys {sorted(cond)}")
    # Built once per sampling run: the order [uncond; cond] is what the update kernels expect.
    return {k: torch.cat([uncond[k], cond[k]]) for k in cond}, True


def _model_output(model, x, t: int, cond, doubled: bool):
    """One model call at discrete timestep t: on x, or on [x; x] for guidance."""
    x_in = torch.cat([x, x]) if doubled else x
    t_in = torch.full((x_in.shape[0],), float(t), device=x.device, dtype=torch.float32)
    return model(x_in, t_in, cond)


def _report(callback, i, t, x, x0):
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "denoised": x0})


def _one_step_chain(step, desc, model, x, schedule, steps, eta, cond, uncond, guidance, generator, callback,
                    disable_progress, timesteps, spacing):
    """The loop DDIM and Euler(-ancestral) share: one model call, then the fused `step`
    (ops.ddim_step / ops.euler_step) from ᾱ_i to ᾱ_{i+1}, fresh noise where η > 0."""
    ts, a = _plan(schedule, steps, timesteps, spacing)
    cond_in, doubled = _guidance_setup(cond, uncond, guidance)
    for i in tqdm(range(len(ts)), disable=disable_progress, desc=desc):
        out = _model_output(model, x, ts[i], cond_in, doubled)
        noise = randn_like(x, generator) if eta > 0 and a[i + 1] < 1.0 else None
        res = step(x, out, a[i], a[i + 1], eta=eta, noise=noise, parameterization=schedule.parameterization,
                   guidance=guidance, return_x0=callback is not None)
        x, x0 = res if callback is not None else (res, None)
        _report(callback, i, ts[i], x, x0)
    return x


# ----------------------------------------------------------------------------- samplers

@torch.no_grad()
def sample_ddim(model, x, schedule: Schedule, steps: int = 50, eta: float = 0.0, cond=None,
                uncond=None, guidance: float = 1.0, generator=None, callback=None,
                disable_progress: bool = True, timesteps=None, spacing: str = "linspace"):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12); η = 0 is the
    deterministic sampler, η = 1 the DDPM posterior on the strided chain."""
    return _one_step_chain(ops.ddim_step, "ddim", model, x, schedule, steps, eta, cond, uncond, guidance,
                           generator, callback, disable_progress, timesteps, spacing)


@torch.no_grad()
def sample_ddpm(model, x, schedule: Schedule, steps: int | None = None, cond=None, uncond=None,
                guidance: float = 1.0, generator=None, callback=None, disable_progress: bool = True,
                timesteps=None, spacing: str = "linspace"):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) with σ_t² = β̃_t, the posterior
    variance; steps < T samples the respaced chain (Nichol & Dhariwal 2021, §4). This is DDIM
    with η = 1, which the tests check against the posterior formula."""
    return sample_ddim(model, x, schedule, steps=steps or schedule.num_timesteps, eta=1.0, cond=cond,
                       uncond=uncond, guidance=guidance, generator=generator, callback=callback,
                       disable_progress=disable_progress, timesteps=timesteps, spacing=spacing)


@torch.no_grad()
def sample_euler(model, x, schedule: Schedule, steps: int = 50, cond=None, uncond=None,
                 guidance: float = 1.0, generator=None, callback=None,
                 disable_progress: bool = True, timesteps=None, spacing: str = "linspace"):
    """Euler on the probability-flow ODE in σ = √((1 − ᾱ)/ᾱ) (Karras et al. 2022, Algorithm 1
    without churn). On the discrete schedule's own σ grid this coincides with DDIM (η = 0)."""
    return sample_euler_ancestral(model, x, schedule, steps=steps, eta=0.0, cond=cond, uncond=uncond,
                                  guidance=guidance, generator=generator, callback=callback,
                                  disable_progress=disable_progress, timesteps=timesteps, spacing=spacing)


@torch.no_grad()
def sample_euler_ancestral(model, x, schedule: Schedule, steps: int = 50, eta: float = 1.0, cond=None,
                           uncond=None, guidance: float = 1.0, generator=None, callback=None,
                           disable_progress: bool = True, timesteps=None, spacing: str = "linspace"):
    """Euler-ancestral (k-diffusion `sample_euler_ancestral`): an Euler step down to σ_down,
    then fresh noise σ_up, σ_up² + σ_down² = σ'² (η scales σ_up)."""
    return _one_step_chain(ops.euler_step, "euler", model, x, schedule, steps, eta, cond, uncond, guidance,
                           generator, callback, disable_progress, timesteps, spacing)



@torch.no_grad()
def sample_plms(model, x, schedule: Schedule, steps: int = 50, cond=None, uncond=None,
                guidance: float = 1.0, generator=None, callback=None, disable_progress: bool = True,
                timesteps=None, spacing: str = "linspace"):
    """PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models", §3.3, as in the
    LDM code): 4th-order Adams–Bashforth on ε inside the DDIM transfer, started by one pseudo
    improved-Euler step (two model calls on the first step)."""
    ts, a = _plan(schedule, steps, timesteps, spacing)
    cond_in, doubled = _guidance_setup(cond, uncond, guidance)
    param, history = schedule.parameterization, []
    for i in tqdm(range(len(ts)), disable=disable_progress, desc="plms"):
        out = _model_output(model, x, ts[i], cond_in, doubled)
        eps = ops.prediction_to_eps(x, out, a[i], param, guidance)
        if not history and a[i + 1] < 1.0:
            x_pred = ops.plms_step(x, eps, a[i], a[i + 1])
            out_next = _model_output(model, x_pred, ts[i + 1], cond_in, doubled)
            eps_next = ops.prediction_to_eps(x_pred, out_next, a[i + 1], param, guidance)
            x_new = ops.plms_step(x, eps, a[i], a[i + 1], eps_next=eps_next)
        else:
            x_new = ops.plms_step(x, eps, a[i], a[i + 1], eps_history=history)
        if callback is not None:
            _report(callback, i, ts[i], x_new,
                    ((x.float() - math.sqrt(1 - a[i]) * eps) / math.sqrt(a[i])).to(x.dtype))
        history = (history + [eps])[-3:]
        x = x_new
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, schedule: Schedule, steps: int = 25, cond=None, uncond=None,
                    guidance: float = 1.0, generator=None, callback=None,
                    disable_progress: bool = True, timesteps=None, spacing: str = "logsnr"):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): second-order multistep
    in λ = log(α/σ) on the data prediction; first order on the first and the final step.
    Default grid uniform in λ: the extrapolation weight 1/2r grows when consecutive steps in λ
    differ a lot, which a grid uniform in t has at its end on the linear schedule."""
    ts, a = _plan(schedule, steps, timesteps, spacing)
    cond_in, doubled = _guidance_setup(cond, uncond, guidance)
    x0_prev, a_prev = None, None
    for i in tqdm(range(len(ts)), disable=disable_progress, desc="dpm++2m"):
        out = _model_output(model, x, ts[i], cond_in, doubled)
        x, x0 = ops.dpmpp_2m_step(x, out, a[i], a[i + 1], x0_prev=x0_prev, a_prev=a_prev,
                                  parameterization=schedule.parameterization, guidance=guidance)
        x0_prev, a_prev = x0, a[i]
        _report(callback, i, ts[i], x, x0)
    return x


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
}


def sample(name: str, model, x, schedule: Schedule, **kwargs):
    """Run the sampler `name` (a key of SAMPLERS). Keyword arguments a sampler does not take
    are dropped when they are at their neutral value (eta = 0, steps = None) and rejected
    otherwise, so a CLI can pass the same flags to every sampler."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {sorted(SAMPLERS)}, got {name!r}")
    fn = SAMPLERS[name]
    accepted = inspect.signature(fn).parameters
    for key in list(kwargs):
        if key in accepted and kwargs[key] is None and accepted[key].default is not None:
            del kwargs[key]  # e.g. steps=None: the sampler's own default
        elif key not in accepted:
            if kwargs[key] in (None, 0, 0.0):
                del kwargs[key]
            else:
                raise ValueError(f"sampler {name!r} takes no {key!r} (got {kwargs[key]!r})")
    return fn(model, x, schedule, **kwargs)
