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

The original LDM / Stable Diffusion samplers, exactly (keywords named as in diffusers):
`spacing="uniform", steps_offset=1, set_alpha_to_one=False` is the CompVis DDIM/PLMS grid
c·k + 1 with c = T // steps, k = 0, 1, … while c·k < T (one step more than asked when steps
does not divide T, as the original runs), ending at ᾱ = alphas_cumprod[0] instead of 1.
`spacing="leading"` is diffusers' variant of it (exactly `steps` entries). A converted
checkpoint stores these in its config; `schedule_defaults` reads them for a sampler. Where
diffusers steps from t to t − T//steps whatever the grid ("linspace"/"trailing" DDIM, PNDM),
ldm_fast steps to the next grid entry: the grid the user asked for is the one that runs.
"""

from __future__ import annotations

import inspect
import math

import torch
from tqdm.auto import tqdm

from ldm_fast import ops
from ldm_fast.diffusion import Schedule, randn_like

SPACINGS = ("linspace", "trailing", "leading", "uniform", "quad", "logsnr")
OFFSET_SPACINGS = ("leading", "uniform", "quad")  # grids that start at 0 and take steps_offset


# ----------------------------------------------------------------------------- shared pieces

def make_timesteps(schedule: Schedule, steps: int, spacing: str = "linspace", steps_offset: int = 0) -> list[int]:
    """Distinct discrete timesteps, descending. "linspace": `steps` evenly from T−1 to 0 (both
    ends); "trailing": T−1, T−1−T/steps, … (ends at T/steps − 1); "leading" (diffusers):
    c·k for k < steps, c = T // steps; "uniform" (the CompVis DDIM/PLMS grid, its
    ddim_discretize "uniform"): c·k for every c·k < T — one entry more than `steps` when steps
    does not divide T; "quad" (CompVis "quad"): ⌊(k·√(0.8T)/(steps−1))²⌋; "logsnr": evenly in
    λ = log(α/s) between λ(T−1) and λ(0), rounded to the nearest timesteps (DPM-Solver's
    "logSNR" grid; fewer than `steps` where rounding makes neighbours coincide).
    `steps_offset` is added to the grids that start at 0 ("leading", "uniform", "quad"; the
    original and SD's diffusers configs use 1) and ignored by the others, as in diffusers."""
    num_timesteps = schedule.num_timesteps
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps: must be in [1, {num_timesteps}], got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
    if spacing == "linspace":
        ts = torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()
    elif spacing == "trailing":
        ts = (torch.arange(num_timesteps, 0, -num_timesteps / steps, dtype=torch.float64).round() - 1).long()
    elif spacing == "logsnr":
        ac = schedule.alphas_cumprod
        lam = 0.5 * (ac.log() - torch.log1p(-ac))  # decreasing in t
        targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
        ts = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).unique().flip(0)
    else:  # OFFSET_SPACINGS: grids from 0 in strides of c, shifted by steps_offset
        c = num_timesteps // steps
        if spacing == "leading":
            ts = torch.arange(steps) * c
        elif spacing == "uniform":
            ts = torch.arange(0, num_timesteps, c)
        else:  # quad: the original truncates to integers (astype(int))
            ts = (torch.linspace(0, math.sqrt(num_timesteps * 0.8), steps, dtype=torch.float64) ** 2).long()
        ts = (ts + int(steps_offset)).flip(0)
        if int(ts[0]) >= num_timesteps:
            raise ValueError(f"spacing {spacing!r} with steps_offset {steps_offset}: {steps} steps reach timestep "
                             f"{int(ts[0])} ≥ T = {num_timesteps} (the original code fails there too); "
                             f"use fewer steps or steps_offset 0")
    return ts.tolist()


def schedule_defaults(cfg, sampler: str) -> dict:
    """The timestep-grid keyword arguments a run's config asks `sampler` to use by default
    (config.DiffusionConfig's timestep_spacing, steps_offset, set_alpha_to_one), restricted
    to those the sampler takes. DPM-Solver++ keeps its log-SNR grid unless the config names
    another spacing than the native "linspace"."""
    d = cfg.diffusion
    spacing = getattr(d, "timestep_spacing", "linspace")
    out = {"steps_offset": int(getattr(d, "steps_offset", 0)),
           "set_alpha_to_one": bool(getattr(d, "set_alpha_to_one", True))}
    if not (sampler == "dpmpp_2m" and spacing == "linspace"):
        out["spacing"] = spacing
    accepted = inspect.signature(SAMPLERS[sampler]).parameters if sampler in SAMPLERS else {}
    return {k: v for k, v in out.items() if k in accepted}


def _plan(schedule: Schedule, steps: int, timesteps, spacing: str, steps_offset: int = 0,
          set_alpha_to_one: bool = True):
    """(timesteps, ᾱ values): ᾱ has one more entry, the end of the last step: 1.0 (clean
    data), or alphas_cumprod[0] with set_alpha_to_one=False (the original DDIM/PLMS)."""
    ts = [int(t) for t in timesteps] if timesteps is not None else \
        make_timesteps(schedule, steps, spacing, steps_offset)
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {ts}")
    if ts and not 0 <= ts[-1] <= ts[0] < schedule.num_timesteps:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_timesteps - 1}], got {ts}")
    ac = schedule.alphas_cumprod
    final = 1.0 if set_alpha_to_one else float(ac[0])
    return ts, [float(ac[t]) for t in ts] + [final]


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
                    disable_progress, timesteps, spacing, steps_offset=0, set_alpha_to_one=True):
    """The loop DDIM and Euler(-ancestral) share: one model call, then the fused `step`
    (ops.ddim_step / ops.euler_step) from ᾱ_i to ᾱ_{i+1}, fresh noise where η > 0."""
    ts, a = _plan(schedule, steps, timesteps, spacing, steps_offset, set_alpha_to_one)
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
                disable_progress: bool = True, timesteps=None, spacing: str = "linspace", steps_offset: int = 0,
                set_alpha_to_one: bool = True):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12); η = 0 is the
    deterministic sampler, η = 1 the DDPM posterior on the strided chain."""
    return _one_step_chain(ops.ddim_step, "ddim", model, x, schedule, steps, eta, cond, uncond, guidance,
                           generator, callback, disable_progress, timesteps, spacing, steps_offset,
                           set_alpha_to_one)


@torch.no_grad()
def sample_ddpm(model, x, schedule: Schedule, steps: int | None = None, cond=None, uncond=None,
                guidance: float = 1.0, generator=None, callback=None, disable_progress: bool = True,
                timesteps=None, spacing: str = "linspace", steps_offset: int = 0):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) with σ_t² = β̃_t, the posterior
    variance; steps < T samples the respaced chain (Nichol & Dhariwal 2021, §4). This is DDIM
    with η = 1, which the tests check against the posterior formula. The last step always
    ends at clean data (the posterior at t = 0 is x0 itself, in the original and diffusers).
    steps = T (the default) is the full chain T − 1 … 0 whatever the spacing asks, as the
    original's p_sample_loop runs it."""
    steps = steps or schedule.num_timesteps
    if steps == schedule.num_timesteps and timesteps is None:
        spacing, steps_offset = "linspace", 0
    return sample_ddim(model, x, schedule, steps=steps, eta=1.0, cond=cond,
                       uncond=uncond, guidance=guidance, generator=generator, callback=callback,
                       disable_progress=disable_progress, timesteps=timesteps, spacing=spacing,
                       steps_offset=steps_offset, set_alpha_to_one=True)


@torch.no_grad()
def sample_euler(model, x, schedule: Schedule, steps: int = 50, cond=None, uncond=None,
                 guidance: float = 1.0, generator=None, callback=None,
                 disable_progress: bool = True, timesteps=None, spacing: str = "linspace", steps_offset: int = 0):
    """Euler on the probability-flow ODE in σ = √((1 − ᾱ)/ᾱ) (Karras et al. 2022, Algorithm 1
    without churn). On the discrete schedule's own σ grid this coincides with DDIM (η = 0).
    Ends at σ = 0, as k-diffusion and diffusers do."""
    return sample_euler_ancestral(model, x, schedule, steps=steps, eta=0.0, cond=cond, uncond=uncond,
                                  guidance=guidance, generator=generator, callback=callback,
                                  disable_progress=disable_progress, timesteps=timesteps, spacing=spacing,
                                  steps_offset=steps_offset)


@torch.no_grad()
def sample_euler_ancestral(model, x, schedule: Schedule, steps: int = 50, eta: float = 1.0, cond=None,
                           uncond=None, guidance: float = 1.0, generator=None, callback=None,
                           disable_progress: bool = True, timesteps=None, spacing: str = "linspace",
                           steps_offset: int = 0):
    """Euler-ancestral (k-diffusion `sample_euler_ancestral`): an Euler step down to σ_down,
    then fresh noise σ_up, σ_up² + σ_down² = σ'² (η scales σ_up). Ends at σ = 0."""
    return _one_step_chain(ops.euler_step, "euler", model, x, schedule, steps, eta, cond, uncond, guidance,
                           generator, callback, disable_progress, timesteps, spacing, steps_offset)



@torch.no_grad()
def sample_plms(model, x, schedule: Schedule, steps: int = 50, cond=None, uncond=None,
                guidance: float = 1.0, generator=None, callback=None, disable_progress: bool = True,
                timesteps=None, spacing: str = "linspace", steps_offset: int = 0, set_alpha_to_one: bool = True):
    """PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models", §3.3, as in the
    LDM code): 4th-order Adams–Bashforth on ε inside the DDIM transfer, started by one pseudo
    improved-Euler step (two model calls on the first step; a single-step run is one DDIM
    step, as in diffusers' PNDM)."""
    ts, a = _plan(schedule, steps, timesteps, spacing, steps_offset, set_alpha_to_one)
    cond_in, doubled = _guidance_setup(cond, uncond, guidance)
    param, history = schedule.parameterization, []
    for i in tqdm(range(len(ts)), disable=disable_progress, desc="plms"):
        out = _model_output(model, x, ts[i], cond_in, doubled)
        eps = ops.prediction_to_eps(x, out, a[i], param, guidance)
        if not history and i + 1 < len(ts):
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
                    disable_progress: bool = True, timesteps=None, spacing: str = "logsnr", steps_offset: int = 0):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): second-order multistep
    in λ = log(α/σ) on the data prediction; first order on the first and the final step.
    Default grid uniform in λ: the extrapolation weight 1/2r grows when consecutive steps in λ
    differ a lot, which a grid uniform in t has at its end on the linear schedule. Ends at
    σ = 0 (diffusers' final_sigmas_type "zero")."""
    ts, a = _plan(schedule, steps, timesteps, spacing, steps_offset)
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


_NEUTRAL = {"eta": 0.0, "steps_offset": 0, "set_alpha_to_one": True}


def sample(name: str, model, x, schedule: Schedule, **kwargs):
    """Run the sampler `name` (a key of SAMPLERS). Keyword arguments a sampler does not take
    are dropped when they are None or at their neutral value (eta = 0, steps_offset = 0,
    set_alpha_to_one = True) and rejected otherwise, so a CLI can pass the same flags to every
    sampler; None means the sampler's own default."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {sorted(SAMPLERS)}, got {name!r}")
    fn = SAMPLERS[name]
    accepted = inspect.signature(fn).parameters
    for key in list(kwargs):
        if key in accepted and kwargs[key] is None and accepted[key].default is not None:
            del kwargs[key]  # e.g. steps=None: the sampler's own default
        elif key not in accepted:
            v = kwargs[key]
            neutral = v == _NEUTRAL[key] if key in _NEUTRAL else (not isinstance(v, bool) and v in (0, 0.0))
            if v is None or neutral:
                del kwargs[key]
            else:
                raise ValueError(f"sampler {name!r} takes no {key!r} (got {kwargs[key]!r})")
    return fn(model, x, schedule, **kwargs)
