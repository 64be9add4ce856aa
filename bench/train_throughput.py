"""Training throughput: steps/s and images/s of both stages per backend, and the LDM stage on
cached latents against encoding every batch.

    python bench/train_throughput.py                 # tiny preset; about a minute on a 2-core CPU
    python bench/train_throughput.py --backends eager,triton,compile --batch 64 --steps 20
    python bench/train_throughput.py --quick         # seconds: proves it runs

Parts:
  autoencoder  one step of the first stage as ldm_fast.training runs it (its Phases through
               Trainer.train_step) before the discriminator starts: forward, L1/NLL + KL loss,
               backward, clip, Adam step;
  ldm          one step of stage 2, the same way: posterior sample of the (frozen) encoder,
               ε-loss at random t, backward, clip, AdamW step, EMA update;
  for backends eager (ldm_fast.ops eager), triton (the fused kernels; CUDA only) and compile
  (torch.compile of the model, eager ops inside). These steps take pre-rendered batches from
  memory, so they time the compute, not the data pipeline.
  cache        the ldm step end to end with its DataLoader: from procedural images (rendered,
               then encoded every step) vs from a latent cache (ldm_fast.data.latent_cache:
               encoded once, posterior sampled per item). The one-off cache build time is
               reported next to it, with the number of steps after which it has paid for itself.
Warm-up steps are excluded; every step is synchronised and timed on its own; repetitions of the
backends are interleaved so that a slow spell on a shared machine hits all of them alike.
Medians with the interquartile range; speed-ups are against eager in the same run. On CPU
only the ratios mean anything. JSON (+ Markdown) goes to bench/results/train_throughput-<machine>.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import benchlib as bl  # noqa: E402
from ldm_fast import ops  # noqa: E402
from ldm_fast.autoencoder import build_first_stage  # noqa: E402
from ldm_fast.config import get_preset  # noqa: E402
from ldm_fast.data.latent_cache import LatentCacheDataset, build_latent_cache  # noqa: E402
from ldm_fast.data.procedural import ProceduralShapes  # noqa: E402
from ldm_fast.losses import AutoencoderLoss  # noqa: E402
from ldm_fast.model import EMA, LatentDiffusion  # noqa: E402
from ldm_fast.training import autoencoder_phases, ldm_phase  # noqa: E402

BACKENDS = ("eager", "triton", "compile")


class Skip(Exception):
    pass


def _check_backend(backend: str, device, explicit: bool):
    if backend == "triton" and device.type != "cuda":
        raise Skip("Triton kernels need CUDA; on CPU they run only under TRITON_INTERPRET=1 "
                   "(numpy: speed meaningless)")
    if backend == "compile" and device.type != "cuda" and not explicit:
        raise Skip("not in the CPU default run: Inductor's C++ build of forward + backward took "
                   "~60 s per model on the 2-core CPU; add compile to --backends to measure it")
    if backend not in BACKENDS:
        raise SystemExit(f"--backends: unknown backend {backend!r} ({', '.join(BACKENDS)})")


# ----------------------------------------------------------------------------- step functions
# The steps ldm_fast.training runs (its Phases, through Trainer.train_step), without logging
# and checkpoints, which are not throughput; batches come from the caller's iterator.

def _trainer(cfg, stage: str, device, precision, seed: int):
    from ldm_fast.run import RunDir
    from ldm_fast.trainer import Trainer

    cfg = copy.deepcopy(cfg)
    cfg.precision = precision
    tc = getattr(cfg, f"train_{stage}")
    run = RunDir(tempfile.mkdtemp(prefix="ldm_fast_train_bench_"))  # never written: no checkpoints here
    return cfg, Trainer(stage, cfg, tc, run, device, seed, progress=False)


def autoencoder_trainee(cfg, backend, device, precision, batches):
    """step() → one stage-1 step on the next batch of `batches` ({'image': …} dicts)."""
    cfg, trainer = _trainer(cfg, "autoencoder", device, precision, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_first_stage(cfg.autoencoder).to(device).train()
    loss_fn = AutoencoderLoss(cfg.autoencoder).to(device)
    tc = cfg.train_autoencoder
    opt_g = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=tc.lr, betas=(0.5, 0.9))
    forward = torch.compile(model) if backend == "compile" else model
    phases = autoencoder_phases(cfg, model, loss_fn, opt_g, opt_d, batches, trainer.generator, device,
                                forward=forward)
    return lambda: trainer.train_step(phases, 0)  # step 0: before the discriminator starts


def ldm_trainee(cfg, first_stage, backend, device, precision, batches, seed=1):
    """(model, step()) → one stage-2 step on the next batch ({'image': …} or {'latent': …})."""
    cfg, trainer = _trainer(cfg, "ldm", device, precision, cfg.seed + seed)
    torch.manual_seed(cfg.seed + seed)
    model = LatentDiffusion(cfg, first_stage).to(device)
    model.train()
    tc = cfg.train_ldm
    params = list(model.unet.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    ema = EMA(model.unet, tc.ema_decay).to(device) if tc.ema_decay > 0 else None
    denoiser = torch.compile(model) if backend == "compile" else None
    phase = ldm_phase(cfg, model, opt, params, batches, trainer.generator, device, ema=ema, denoiser=denoiser)
    return model, lambda: trainer.train_step([phase], 0)


# ----------------------------------------------------------------------------- timing

def time_interleaved(entries: dict, device, warmup: int, steps: int) -> dict:
    """entries: name → (kernels, fn) where fn() does one training step. Returns name →
    {first_step_s, step_s: summarize()}; failures → {error}."""
    out, live = {}, {}
    for name, (kernels, fn) in entries.items():
        try:
            with ops.backend(kernels):
                first, _ = bl.time_once(fn, device)
                for _ in range(max(0, warmup - 1)):
                    fn()
                bl.synchronize(device)
            out[name] = {"first_step_s": first, "samples": []}
            live[name] = (kernels, fn)
        except Exception as e:  # noqa: BLE001 - report, keep measuring the others
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            bl.log(f"{name}: FAILED {out[name]['error']}")
    for _ in range(steps):
        for name, (kernels, fn) in live.items():
            with ops.backend(kernels):
                dt, _ = bl.time_once(fn, device)
            out[name]["samples"].append(dt)
    for name in live:
        out[name]["step_s"] = bl.summarize(out[name].pop("samples"))
    return out


def cycle(batches):
    while True:
        yield from batches


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--parts", default="autoencoder,ldm,cache", help="comma list of autoencoder, ldm, cache")
    ap.add_argument("--backends", default=None, help="comma list of eager, triton, compile (default: all; "
                    "those that cannot run, or are left out of the CPU default, are listed as skipped)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: the preset's)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first is timed separately)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                    help="autocast dtype on CUDA (CPU always fp32)")
    ap.add_argument("--cache-items", type=int, default=512, help="images encoded into the latent cache")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for the cache part")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true", help="batch 4, 2 steps, 1 warm-up, 32-image cache")
    ap.add_argument("--out", default=None)
    bl.add_threads_arg(ap)
    args = ap.parse_args(argv)
    bl.set_threads(args.threads)
    device = bl.pick_device(args.device)
    if args.quick:
        args.batch, args.steps, args.warmup, args.cache_items = args.batch or 4, 2, 1, 32
    cfg = get_preset(args.preset)
    if args.batch:
        cfg.train_autoencoder.batch_size = cfg.train_ldm.batch_size = args.batch
    parts = args.parts.split(",")
    info = bl.machine(device)
    explicit = args.backends is not None
    wanted = (args.backends or ",".join(BACKENDS)).split(",")
    backends, skipped = [], []
    for b in wanted:
        try:
            _check_backend(b, device, explicit)
            backends.append(b)
        except Skip as e:
            skipped.append({"backend": b, "reason": str(e)})
            bl.log(f"{b}: skipped — {e}")
    res = cfg.data.resolution
    data = ProceduralShapes(max(args.cache_items, 4 * max(cfg.train_autoencoder.batch_size,
                                                           cfg.train_ldm.batch_size)), res)
    bl.log(f"train throughput on {info['name']}: preset {args.preset}, parts {parts}, backends {backends}")

    def images(bs, n_batches=2):
        x = torch.stack([data[i]["image"] for i in range(bs * n_batches)]).to(device)
        return list(x.split(bs))

    rows = []

    def record(part, batch, measured, extra=None):
        for name, m in measured.items():
            row = {"part": part, "config": name, "batch": batch, **m, **(extra or {}).get(name, {})}
            if "step_s" in m:
                row["steps_per_s"] = 1 / m["step_s"]["median"]
                row["images_per_s"] = batch / m["step_s"]["median"]
            rows.append(row)
            bl.log(f"{part} {name}: {bl.fmt_spread(m.get('step_s'))} ms/step")

    if "autoencoder" in parts:
        bs = cfg.train_autoencoder.batch_size
        xs = ({"image": x} for x in cycle(images(bs)))
        entries = {}
        for b in backends:
            step = autoencoder_trainee(cfg, b, device, args.precision, xs)
            entries[b] = ("triton" if b == "triton" else "eager", step)
        record("autoencoder", bs, time_interleaved(entries, device, args.warmup, args.steps))

    if "ldm" in parts or "cache" in parts:
        torch.manual_seed(0)
        first_stage = build_first_stage(cfg.autoencoder).to(device).eval()
    if "ldm" in parts:
        bs = cfg.train_ldm.batch_size
        xs = ({"image": x} for x in cycle(images(bs)))
        entries = {}
        for b in backends:
            _, step = ldm_trainee(cfg, first_stage, b, device, args.precision, xs)
            entries[b] = ("triton" if b == "triton" else "eager", step)
        record("ldm", bs, time_interleaved(entries, device, args.warmup, args.steps))

    cache_info = None
    if "cache" in parts:
        bs = cfg.train_ldm.batch_size
        subset = ProceduralShapes(args.cache_items, res)
        with tempfile.TemporaryDirectory() as tmp:
            t_build, manifest = bl.time_once(
                lambda: build_latent_cache(first_stage, subset, tmp, batch_size=64, device=device,
                                           reuse=False), device)
            # Same sampler settings for both loaders: shuffled, drop_last, the same workers.
            loader_kw = dict(batch_size=bs, shuffle=True, drop_last=True, num_workers=args.workers,
                             persistent_workers=args.workers > 0)
            img_batches = _forever(DataLoader(subset, generator=torch.Generator().manual_seed(0), **loader_kw))
            # Unscaled latents: the step applies the model's scale factor, as training does.
            lat_ds = LatentCacheDataset(tmp, scale_factor=1.0)
            lat_batches = _forever(DataLoader(lat_ds, generator=torch.Generator().manual_seed(0), **loader_kw))
            _, step_e = ldm_trainee(cfg, first_stage, "eager", device, args.precision, img_batches)
            _, step_c = ldm_trainee(cfg, first_stage, "eager", device, args.precision, lat_batches)
            entries = {"encode every step": ("eager", step_e), "cached latents": ("eager", step_c)}
            measured = time_interleaved(entries, device, args.warmup, args.steps)
        cache_info = {"items": args.cache_items, "build_s": t_build,
                      "build_s_per_item": t_build / args.cache_items,
                      "encode_seconds": manifest["encode_seconds"], "store": manifest["store"]}
        record("cache", bs, measured)
        e, c = measured.get("encode every step", {}), measured.get("cached latents", {})
        if "step_s" in e and "step_s" in c:
            saved = e["step_s"]["median"] - c["step_s"]["median"]
            cache_info["speedup"] = e["step_s"]["median"] / c["step_s"]["median"]
            # Steps after which encoding once has cost less than encoding every step.
            cache_info["break_even_steps"] = t_build / saved if saved > 0 else None

    for r in rows:   # speed-up over eager of the same part
        base = next((x for x in rows if x["part"] == r["part"] and x["config"] in ("eager", "encode every step")
                     and "step_s" in x), None)
        if base and "step_s" in r:
            r["speedup"] = base["step_s"]["median"] / r["step_s"]["median"]

    payload = {"benchmark": "train_throughput", "machine": info, "args": vars(args),
               "preset": args.preset, "results": rows, "skipped": skipped, "cache": cache_info,
               "smoke": args.quick}
    out = Path(args.out) if args.out else bl.default_out("train_throughput", info, smoke=args.quick)
    bl.write_report(payload, out, markdown(payload))
    return 1 if any("error" in r for r in rows) else 0


def _forever(loader):
    while True:
        yield from loader


def markdown(payload: dict) -> str:
    info = payload["machine"]
    cpu = info["device_type"] == "cpu"
    tag = " (CPU)" if cpu else ""
    lines = [f"### Training throughput — {info['name']}",
             f"{info['date']}; torch {info['torch']}; preset {payload['preset']}, "
             f"precision {payload['args']['precision']}.", ""]
    if cpu:
        lines += ["CPU run: absolute numbers are CPU times on shared cores; quote the ratios.", ""]
    rows = []
    for r in payload["results"]:
        if "error" in r:
            rows.append([r["part"], r["config"], r["batch"], "FAILED: " + r["error"][:80], "", "", "", ""])
            continue
        rows.append([r["part"], r["config"], r["batch"], bl.fmt_spread(r.get("step_s")),
                     bl.fmt(r.get("steps_per_s")), bl.fmt(r.get("images_per_s")),
                     bl.fmt(r.get("speedup"), ".2f"), bl.fmt(r.get("first_step_s"), ".2g")])
    lines.append(bl.table(["part", "config", "batch", f"step ms{tag}, median (IQR)", f"steps/s{tag}",
                           f"images/s{tag}", "× baseline", "first step s"], rows))
    c = payload.get("cache")
    if c:
        lines += ["", f"Latent cache: {c['items']} images encoded once in {c['build_s']:.3g} s{tag} "
                  f"(store: {c['store']}); cached vs encode-every-step step speed-up "
                  f"{bl.fmt(c.get('speedup'), '.2f')}×, pays for itself after "
                  f"{bl.fmt(c.get('break_even_steps'), '.3g')} steps. Baselines: eager (autoencoder, "
                  "ldm), encode every step (cache)."]
    if payload["skipped"]:
        lines += ["", "Skipped:"] + [f"- {s['backend']}: {s['reason']}" for s in payload["skipped"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
