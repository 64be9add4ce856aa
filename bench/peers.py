"""ldm_fast against diffusers on the same weights, side by side in one run.

    python bench/peers.py                              # default rows, ~3.5 min on a 2-core CPU
    python bench/peers.py --parts unet-tiny,decode-tiny --modes eager,bf16,compile
    python bench/peers.py --smoke                      # tiny sizes, 2 repeats (tests)

What users would pick instead of ldm_fast is diffusers; this bench puts both on one set of
random weights (ours → the original checkpoint names by `ldm_fast.convert_rules`, original →
diffusers by diffusers' own single-file converters) and times them against each other:

  unet-tiny     one UNet call of the tiny preset (legacy AttentionBlocks; diffusers UNet2DModel)
  unet-sd       one call of an SD1.5-shaped but narrow text UNet (mult 1,2,4,4, 2 res blocks,
                attention at ds 4,2,1, 8 heads, 77×768 context; UNet2DConditionModel)
  decode-tiny   the tiny KL-f4 decoder (post_quant_conv + Decoder vs AutoencoderKL.decode)
  decode-sd     the SD KL-f8 decoder (128 channels, mult 1,2,4,4) on a small latent
  ddim          the whole DDIM-20 sampling loop around the tiny UNet (ours: samplers.sample_ddim;
                theirs: DDIMScheduler.set_timesteps + step), on the same timestep grid
  ddim-loop     the same loop around a trivial model (x ↦ 0.1·x): the loop's own overhead
  train         one training step of the tiny UNet (noising, ε-MSE, backward, AdamW step)

Modes: `eager` (fp32), `bf16` (weights and inputs in bf16; training under bf16 autocast) and
`compile` (torch.compile, default mode, of both models; first call reported separately).
Before any timing each row's outputs are checked equal (fp32: max |Δ| ≤ 1e-4 × output
scale; bf16: ≤ 5e-2 ×) — a row whose outputs differ is reported as failed, not timed.

Timing is interleaved: each repeat times one ldm_fast call and one diffusers call, the order
alternating, so drift on shared cores hits both; the ratio is the median of the per-repeat
ratios ldm_fast/diffusers (< 1: ldm_fast faster). On CPU only the ratios mean anything (one
thread by default; see benchlib.set_threads); on a GPU the times are absolute. diffusers is not
installed on the GPU image: there its column is skipped with the reason and ldm_fast's absolute
times are still reported. JSON + Markdown go to bench/results/peers-<machine>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import benchlib as bl  # noqa: E402
from ldm_fast import convert_rules as rules  # noqa: E402
from ldm_fast import ops, samplers  # noqa: E402
from ldm_fast.autoencoder import AutoencoderKL  # noqa: E402
from ldm_fast.config import AutoencoderConfig, UNetConfig, get_preset  # noqa: E402
from ldm_fast.diffusion import diffusion_loss, make_schedule  # noqa: E402
from ldm_fast.unet import UNet  # noqa: E402

PARTS = ("unet-tiny", "unet-sd", "decode-tiny", "decode-sd", "ddim", "ddim-loop", "train")
MODES = ("eager", "bf16", "compile")
# Inductor's C++ build costs ~40-60 s per model per side on the 2-core CPU: the default run
# compiles the two rows where the comparison is most informative (UNet step, decoder).
DEFAULT_COMPILE_PARTS = ("unet-tiny", "decode-tiny")
TOL = {"eager": 1e-4, "compile": 1e-4, "bf16": 5e-2}


class Skip(Exception):
    """A row or column that cannot run here; the message is the reason."""


def _diffusers():
    try:
        import diffusers
        from diffusers.loaders import single_file_utils as sfu
    except ImportError as e:
        raise Skip(f"diffusers is not installed ({e}); only ldm_fast is timed") from None
    return diffusers, sfu


# ----------------------------------------------------------------------------- the models

def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere: zero-initialised output layers get their default init and
    norms a non-trivial affine, so that an output comparison exercises every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.GroupNorm | nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear) and not m.weight.any():
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return module


def sd_narrow_unet() -> UNetConfig:
    """SD1.5's UNet layout (mult 1,2,4,4, 2 res blocks, attention at ds 4,2,1, 8 heads, context
    768, 4 latent channels) at 1/5 of its width (64 base channels) so a CPU call takes ~0.1 s."""
    return UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 4, 4),
                      num_res_blocks=2, attention_resolutions=(4, 2, 1), num_heads=8, num_head_channels=-1,
                      use_spatial_transformer=True, transformer_depth=1, context_dim=768, groups=32)


def sd_kl_f8() -> AutoencoderConfig:
    """The SD v1 / LDM KL-f8 first stage (128 channels, mult 1,2,4,4, 2 res blocks, z 4)."""
    return AutoencoderConfig(kind="kl", base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                             z_channels=4, resolution=256, groups=32)


def _original_state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Our tensors under the original checkpoint names (the converter's rule table)."""
    return {rules.to_original(prefix + k): v.detach().clone() for k, v in module.state_dict().items()}


def _original_unet_yaml(cfg: UNetConfig) -> dict:
    """The original config an LDM checkpoint of this UNet would ship with (openaimodel.UNetModel
    parameters: ours are named after them)."""
    p = dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, model_channels=cfg.model_channels,
             channel_mult=list(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
             attention_resolutions=list(cfg.attention_resolutions), num_heads=cfg.num_heads,
             num_head_channels=cfg.num_head_channels, use_spatial_transformer=cfg.use_spatial_transformer,
             transformer_depth=cfg.transformer_depth, context_dim=cfg.context_dim or None, image_size=32)
    # diffusers reads the latent size off the first stage's f (SD's KL-f8 here).
    vae = {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}
    return {"model": {"params": {"unet_config": {"params": p}, "first_stage_config": vae}}}


def diffusers_text_unet(ours: UNet):
    """diffusers' UNet2DConditionModel built and filled by diffusers' own single-file code."""
    diffusers, sfu = _diffusers()
    sd = _original_state(ours, "unet.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = sfu.create_unet_diffusers_config_from_ldm(_original_unet_yaml(ours.cfg), sd)
        config["norm_num_groups"] = ours.cfg.groups
        unet = diffusers.UNet2DConditionModel(**config)
        unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, config), strict=True)
    return unet.eval()


def diffusers_legacy_unet(ours: UNet):
    """diffusers' UNet2DModel for a UNet with legacy AttentionBlocks (the tiny preset). diffusers
    converts the ResBlocks and resamplers; it has no converter for the legacy attention, whose
    fused qkv (per head: q, k, v rows) is split here into its to_q/to_k/to_v."""
    diffusers, sfu = _diffusers()
    cfg = ours.cfg
    attn = [2 ** i in cfg.attention_resolutions for i in range(len(cfg.channel_mult))]
    config = dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                  block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
                  layers_per_block=cfg.num_res_blocks,
                  down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                  up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
                  attention_head_dim=cfg.num_head_channels, norm_num_groups=cfg.groups, norm_eps=1e-5,
                  flip_sin_to_cos=True, freq_shift=0, downsample_padding=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mapped = sfu.convert_ldm_unet_checkpoint(_original_state(ours, "unet."),
                                                 {"layers_per_block": cfg.num_res_blocks})
    state = {}
    for k, v in mapped.items():
        if ".attentions." not in k:
            state[k] = v
            continue
        stem, layer, leaf = k.rsplit(".", 2)
        if layer == "norm":
            state[f"{stem}.group_norm.{leaf}"] = v
        elif layer == "proj_out":
            state[f"{stem}.to_out.0.{leaf}"] = v.flatten(1) if v.dim() > 1 else v
        elif layer == "qkv":
            c, head = v.shape[0] // 3, cfg.num_head_channels
            per_head = v.reshape(c // head, 3, head, -1)
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                part = per_head[:, i].reshape(c, -1)
                state[f"{stem}.{name}.{leaf}"] = part if v.dim() > 1 else part.reshape(c)
        else:
            raise AssertionError(f"unexpected attention tensor {k}")
    unet = diffusers.UNet2DModel(**config)
    unet.load_state_dict(state, strict=True)
    return unet.eval()


def diffusers_kl(ours: AutoencoderKL):
    """diffusers' AutoencoderKL from the original first-stage config, by its own converter."""
    diffusers, sfu = _diffusers()
    c = ours.cfg
    dd = dict(double_z=True, z_channels=c.z_channels, resolution=c.resolution, in_channels=c.in_channels,
              out_ch=c.in_channels, ch=c.base_channels, ch_mult=list(c.channel_mult),
              num_res_blocks=c.num_res_blocks, attn_resolutions=list(c.attn_resolutions), dropout=0.0)
    raw = {"model": {"params": {"first_stage_config": {"params": {"embed_dim": c.z_channels, "ddconfig": dd}}}}}
    sd = {rules.to_original("first_stage." + k): v.detach().clone()
          for k, v in ours.state_dict().items() if k != "logvar"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = sfu.create_vae_diffusers_config_from_ldm(raw, sd, image_size=c.resolution)
        config["norm_num_groups"] = c.groups
        model = diffusers.AutoencoderKL(**config)
        model.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, config), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- the rows
# Each builder returns (ours, theirs, why): two argument-less callables on the same weights and
# inputs, each returning the tensor compared for equality; `theirs` is None when diffusers
# cannot run, and `why` then says so.

def _rand(shape, seed, device, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def _cast(module, mode, device):
    module = module.to(device)
    return module.to(torch.bfloat16) if mode == "bf16" else module


def _compiled(fn, mode):
    return torch.compile(fn) if mode == "compile" else fn


def _peer(build_theirs):
    try:
        return build_theirs(), None
    except Skip as e:
        return None, str(e)


def row_unet(size, mode, device, batch, smoke):
    dt = torch.bfloat16 if mode == "bf16" else torch.float32
    if size == "tiny":
        cfg, side, ctx = get_preset("tiny").unet, 8, None
    else:
        cfg, side, ctx = sd_narrow_unet(), (8 if smoke else 32), (batch, 77, 768)
    ours = randomize(UNet(cfg), 0).eval()
    theirs, why = _peer(lambda: diffusers_legacy_unet(ours) if size == "tiny" else diffusers_text_unet(ours))
    ours = _cast(ours, mode, device)
    x, t = _rand((batch, cfg.in_channels, side, side), 1, device, dt), torch.tensor([917.0] * batch, device=device)
    context = _rand(ctx, 2, device, dt) if ctx else None
    fo = _compiled(ours, mode)
    f_ours = lambda: fo(x, t, context=context)  # noqa: E731
    f_theirs = None
    if theirs is not None:
        ft = _compiled(_cast(theirs, mode, device), mode)
        kw = {"encoder_hidden_states": context} if ctx else {}
        f_theirs = lambda: ft(x, t, **kw).sample  # noqa: E731
    return f_ours, f_theirs, why


def row_decode(size, mode, device, batch, smoke):
    dt = torch.bfloat16 if mode == "bf16" else torch.float32
    cfg = get_preset("tiny").autoencoder if size == "tiny" else sd_kl_f8()
    side = 8 if size == "tiny" else (4 if smoke else 16)
    ours = randomize(AutoencoderKL(cfg), 3).eval()
    theirs, why = _peer(lambda: diffusers_kl(ours))
    z = _rand((batch, cfg.z_channels, side, side), 4, device, dt)
    fo = _compiled(_cast(ours, mode, device).decode, mode)
    f_theirs = None
    if theirs is not None:
        ft = _compiled(_cast(theirs, mode, device).decode, mode)
        f_theirs = lambda: ft(z).sample  # noqa: E731
    return lambda: fo(z), f_theirs, why


def _ddim_pair(unet_ours, unet_theirs, x, steps):
    """The two sampling loops on one timestep grid: diffusers' DDIM ("leading" spacing, no
    offset, ᾱ = 1 at the end, no clipping) and ours given that grid explicitly."""
    diffusers, _ = _diffusers() if unet_theirs is not None else (None, None)
    cfg = get_preset("tiny").diffusion
    schedule = make_schedule(cfg.schedule, cfg.timesteps, cfg.linear_start, cfg.linear_end)
    grid = list(range(0, cfg.timesteps, cfg.timesteps // steps))[::-1]

    def ours():
        return samplers.sample_ddim(unet_ours, x, schedule, steps=steps, timesteps=grid)

    theirs = None
    if unet_theirs is not None:
        scheduler = diffusers.DDIMScheduler(num_train_timesteps=cfg.timesteps, trained_betas=schedule.betas.tolist(),
                                            clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                            timestep_spacing="leading")

        @torch.no_grad()
        def theirs():
            scheduler.set_timesteps(steps)
            sample = x
            for t in scheduler.timesteps:
                sample = scheduler.step(unet_theirs(sample, t), t, sample).prev_sample
            return sample
    return ours, theirs


def row_ddim(trivial, mode, device, batch, smoke):
    dt = torch.bfloat16 if mode == "bf16" else torch.float32
    steps = 20
    x = _rand((batch, 3, 8, 8), 5, device, dt)
    if trivial:
        def model(x, t, cond=None):
            return 0.1 * x
        have = _have_diffusers()
        ours, theirs = _ddim_pair(model, model if have else None, x, steps)
        return ours, theirs, None if have else "diffusers is not installed; only ldm_fast is timed"
    net = randomize(UNet(get_preset("tiny").unet), 0).eval()
    peer, why = _peer(lambda: diffusers_legacy_unet(net))
    fo = _compiled(_cast(net, mode, device), mode)
    ft = _compiled(_cast(peer, mode, device), mode) if peer is not None else None
    ours, theirs = _ddim_pair(lambda x, t, cond: fo(x, t),
                              (lambda x, t: ft(x, t).sample) if ft is not None else None, x, steps)
    return ours, theirs, why


def _have_diffusers() -> bool:
    try:
        _diffusers()
        return True
    except Skip:
        return False


def row_train(mode, device, batch, smoke):
    """One optimisation step each. Ours: diffusion.diffusion_loss (the engine's training loss);
    theirs: DDPMScheduler.add_noise + UNet + MSE, diffusers' training recipe. Same t and noise."""
    cfg = get_preset("tiny")
    net = randomize(UNet(cfg.unet), 0).train()
    peer, why = _peer(lambda: diffusers_legacy_unet(net).train())
    net = net.to(device)
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps, cfg.diffusion.linear_start,
                             cfg.diffusion.linear_end)
    x0, noise = _rand((batch, 3, 8, 8), 6, device), _rand((batch, 3, 8, 8), 7, device)
    t = torch.randint(0, schedule.num_timesteps, (batch,), generator=torch.Generator().manual_seed(8)).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")

    def stepper(model, loss_fn):
        model = model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        fwd = _compiled(model, mode)

        def step():
            with autocast:
                loss = loss_fn(fwd)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach().float()
        return step

    ours = stepper(net, lambda m: diffusion_loss(lambda x, tt, c: m(x, tt), x0, schedule, t=t, noise=noise))
    theirs = None
    if peer is not None:
        diffusers, _ = _diffusers()
        sched = diffusers.DDPMScheduler(num_train_timesteps=schedule.num_timesteps,
                                        trained_betas=schedule.betas.tolist())

        def their_loss(m):
            noisy = sched.add_noise(x0, noise, t)
            return F.mse_loss(m(noisy, t).sample.float(), noise)
        theirs = stepper(peer, their_loss)
    return ours, theirs, why


def build_row(part, mode, device, batch, smoke):
    if part.startswith("unet-"):
        return row_unet(part[5:], mode, device, batch, smoke)
    if part.startswith("decode-"):
        return row_decode(part[7:], mode, device, batch, smoke)
    if part in ("ddim", "ddim-loop"):
        return row_ddim(part == "ddim-loop", mode, device, batch, smoke)
    return row_train(mode, device, batch, smoke)


# ----------------------------------------------------------------------------- timing

def check_equal(a: torch.Tensor, b: torch.Tensor, mode: str) -> dict:
    scale = max(1.0, b.float().abs().max().item())
    err = (a.float() - b.float()).abs().max().item()
    return {"max_abs_diff": err, "output_scale": scale, "tolerance": TOL[mode] * scale,
            "equal": err <= TOL[mode] * scale}


def interleaved(f_ours, f_theirs, device, repeats: int, warmup: int) -> dict:
    """Times per repeat for both sides, the order alternating; the ratio is the median of the
    per-repeat ratios (ours/theirs)."""
    for _ in range(warmup):
        f_ours()
        if f_theirs is not None:
            f_theirs()
    times = {"ours": [], "theirs": []}
    for r in range(repeats):
        order = [("ours", f_ours), ("theirs", f_theirs)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            if fn is None:
                continue
            bl.synchronize(device)
            t0 = time.perf_counter()
            fn()
            bl.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    out = {"ours": bl.summarize(times["ours"])}
    if times["theirs"]:
        out["theirs"] = bl.summarize(times["theirs"])
        out["ratio"] = statistics.median(a / b for a, b in zip(times["ours"], times["theirs"]))
    return out


DEFAULT_BATCH = {"unet-tiny": 8, "unet-sd": 1, "decode-tiny": 8, "decode-sd": 1, "ddim": 8, "ddim-loop": 8,
                 "train": 32}


def run_row(part, mode, device, repeats, warmup, smoke) -> dict:
    batch = 2 if smoke else DEFAULT_BATCH[part]
    row = {"part": part, "mode": mode, "batch": batch}
    torch.manual_seed(0)
    f_ours, f_theirs, why = build_row(part, mode, device, batch, smoke)
    if why:
        row["theirs_skipped"] = why
    no_grad = torch.no_grad() if part != "train" else torch.enable_grad()
    with no_grad:
        first_ours, out_ours = bl.time_once(f_ours, device)
        row["first_call_s"] = {"ours": first_ours}
        if f_theirs is not None:
            first_theirs, out_theirs = bl.time_once(f_theirs, device)
            row["first_call_s"]["theirs"] = first_theirs
            row["check"] = check_equal(out_ours, out_theirs, mode)
            if not row["check"]["equal"]:
                row["failed"] = (f"outputs differ: max |Δ| {row['check']['max_abs_diff']:.3g} > "
                                 f"{row['check']['tolerance']:.3g}; not timed")
                return row
            if part == "train":   # the first step moved both models: they must still agree
                row["check_after_step"] = check_equal(f_ours(), f_theirs(), mode)
                if not row["check_after_step"]["equal"]:
                    row["failed"] = "losses differ after one optimiser step (gradients differ); not timed"
                    return row
        row.update(interleaved(f_ours, f_theirs, device, repeats, warmup))
    if part == "ddim-loop":   # the loop's own cost per step
        row["per_step_us"] = {k: row[k]["median"] / 20 * 1e6 for k in ("ours", "theirs") if k in row}
    return row


# ----------------------------------------------------------------------------- report

def markdown(payload: dict) -> str:
    info, cpu = payload["machine"], payload["machine"]["device_type"] == "cpu"
    unit = "ms (CPU)" if cpu else "ms"
    lines = [f"{info['date']}; {info['name']}; torch {info['torch']}, diffusers {payload['diffusers']}; "
             f"{info['torch_threads']} thread(s); ldm_fast kernels={payload['kernels']}.", "", f"Command: `{payload['command']}`", ""]
    if cpu:
        lines += ["CPU run: the absolute times are CPU times on shared cores; quote the ratios.", ""]
    rows = []
    for r in payload["rows"]:
        if "failed" in r or "ours" not in r:
            rows.append([r["part"], r["mode"], r["batch"], "—", "—", "—", "—", r.get("failed", "")])
            continue
        theirs = bl.fmt_spread(r.get("theirs"))
        note = r.get("theirs_skipped", "")
        if "per_step_us" in r:
            note = "loop µs/step: " + " vs ".join(f"{v:.0f}" for v in r["per_step_us"].values())
        rows.append([r["part"], r["mode"], r["batch"], bl.fmt_spread(r["ours"]), theirs,
                     bl.fmt(r.get("ratio"), ".2f"), bl.fmt(r.get("check", {}).get("max_abs_diff"), ".2g"), note])
    lines.append(bl.table(["row", "mode", "batch", f"ldm_fast {unit}, median (IQR)", f"diffusers {unit}",
                           "ldm_fast / diffusers", "max |Δ| out", "note"], rows))
    lines += ["", "Ratio: median over interleaved repeats of ldm_fast time / diffusers time (< 1: ldm_fast "
              "faster). Same random weights on both sides; outputs checked equal before timing."]
    if payload["skipped"]:
        lines += ["", "Skipped:"] + [f"- {k}: {v}" for k, v in payload["skipped"].items()]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--compile-parts", default=",".join(DEFAULT_COMPILE_PARTS),
                    help="rows the compile mode runs for ('all' for every part; compilation is slow on CPU)")
    ap.add_argument("--repeats", type=int, default=15, help="interleaved timed repeats per row")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per side after the first")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--kernels", default="auto", choices=ops.BACKENDS,
                    help="ldm_fast's kernel switch (default auto, the engine's default path)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 repeats, no compile; numbers meaningless")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/peers-<machine>.json)")
    bl.add_threads_arg(ap)
    args = ap.parse_args(argv)
    for name, allowed in (("parts", PARTS), ("modes", MODES)):
        values = [v for v in getattr(args, name).split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            ap.error(f"--{name}: unknown {bad or 'empty list'}; choose from {', '.join(allowed)}")
        setattr(args, name, values)
    args.compile_parts = list(PARTS) if args.compile_parts == "all" else args.compile_parts.split(",")
    if args.repeats < 1:
        ap.error("--repeats: must be ≥ 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bl.set_threads(args.threads)
    device = bl.pick_device(args.device)
    ops.set_backend(args.kernels)
    if args.smoke:
        args.repeats, args.warmup = 2, 0
    info = bl.machine(device)
    try:
        import diffusers
        version = diffusers.__version__
    except ImportError:
        version = None
    payload = {"benchmark": "peers", "machine": info, "smoke": args.smoke, "diffusers": version, "kernels": args.kernels,
               "command": "python bench/peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": [], "skipped": {}}
    for part in args.parts:
        for mode in args.modes:
            key = f"{part} {mode}"
            if mode == "compile" and (args.smoke or part not in args.compile_parts):
                payload["skipped"][key] = ("compile rows are left out of smoke runs" if args.smoke else
                                           "not in --compile-parts (Inductor's CPU build takes ~1 min per "
                                           "model and side here)")
                continue
            if mode == "bf16" and part == "ddim-loop":
                payload["skipped"][key] = "a trivial model: the loop overhead does not depend on the dtype"
                continue
            bl.log(f"peers: {key}")
            try:
                row = run_row(part, mode, device, args.repeats, args.warmup, args.smoke)
            except Skip as e:
                payload["skipped"][key] = str(e)
                continue
            payload["rows"].append(row)
    out = Path(args.out) if args.out else bl.default_out("peers", info, smoke=args.smoke)
    bl.write_report(payload, out, markdown(payload))
    failed = [r for r in payload["rows"] if "failed" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
