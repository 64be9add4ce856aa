"""The paper's compression-factor study (Rombach et al. 2022, Sec. 4.1, Figs. 6–7): LDM-f for
f ∈ {1, 2, 4, 8, 16, 32} — f = 1 is diffusion in pixel space — with the same UNet, trained on
the same procedural data for the same compute; quality during training and sampling throughput.

    python bench/compression.py --quick                  # seconds: proves it runs
    python bench/compression.py                          # the study: ≈ 1 h on one CPU core

Equal compute: every f gets the same CPU-time budget (`--ldm-cpu-s`, one thread, measured with
the process's CPU clock, so other jobs on a shared machine do not shrink any f's budget), and
every learned first stage the same `--ae-cpu-s` before it. Training runs in chunks, resumed from
the stage's checkpoint (the learning rate is constant after warm-up, so a chunked run is the
same run); the UNet is scored at geometrically spaced points of its budget — quality against
training progress, as in the paper's Fig. 6 — with `--progress-samples` images, and with
`--samples` at the end.

For each f: a KL autoencoder with f = 2^(levels−1) (z channels 3, 3, 4, 8, 64 for f = 2, 4, 8,
16, 32, after the paper's first stages; f = 1 uses the identity first stage) is trained with
L1 + KL (no discriminator: at this budget it would not switch on), then the LDM's UNet —
identical for every f: same widths, depths and attention, only the input/output channels follow
z — at the same batch on the same image stream. Samples are drawn with DDIM (`--sample-steps`)
and compared with held-out images in the project's own feature network (FD-shapes; FID too
when the Inception weights are present), with a bootstrap estimate of the distance's sampling
noise. Sampling throughput (images/s, decoding included) is timed after all training, at
`--sample-batch`, repetitions interleaved over f. The first stage's own limit is reported as
rFD: the same distance for its reconstructions of the held-out images.

The paper's findings to look for: small f (1, 2) learns slowly per unit of compute and samples
slowly; large f (16, 32) is limited by what its first stage loses (rFD) and stagnates; f = 4…16
balances both.

Writes JSON and a PNG plot (bench/results/compression-<machine>.{json,png}); the trained run
directories go to --work-dir (a temporary directory by default).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import benchlib as bl  # noqa: E402
from ldm_fast import ops  # noqa: E402
from ldm_fast.config import Config, UNetConfig, get_preset, validate  # noqa: E402
from ldm_fast.data.procedural import ProceduralShapes  # noqa: E402
from ldm_fast.pipeline import Pipeline  # noqa: E402
from ldm_fast.run import RunDir, load_model  # noqa: E402
from ldm_fast.training import save_config, train_autoencoder, train_ldm  # noqa: E402

CHANNEL_MULT = {2: (1, 2), 4: (1, 2, 2), 8: (1, 2, 2, 2), 16: (1, 2, 2, 2, 2), 32: (1, 2, 2, 2, 2, 2)}
Z_CHANNELS = {1: 3, 2: 3, 4: 3, 8: 4, 16: 8, 32: 64}


def study_config(f: int, args) -> Config:
    """The tiny preset with the first stage's factor set to f and the shared UNet."""
    cfg = get_preset("tiny")
    cfg.name = f"compression-f{f}"
    cfg.data.resolution = args.resolution
    ae = cfg.autoencoder
    z = Z_CHANNELS[f]
    if f == 1:
        ae.kind = "identity"
    else:
        ae.channel_mult, ae.z_channels = CHANNEL_MULT[f], z
        ae.base_channels, ae.groups, ae.resolution = args.ae_channels, 8, args.resolution
        ae.disc_start = 10 ** 9
    # One UNet for every f (the "same UNet budget"): two levels, so that even the smallest
    # latent (2×2) has a valid bottom level; attention at ds 2 and in the middle block.
    cfg.unet = UNetConfig(in_channels=z, out_channels=z, model_channels=args.unet_channels,
                          channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                          num_head_channels=32, groups=8)
    for tc in (cfg.train_autoencoder, cfg.train_ldm):
        tc.batch_size = args.batch
        tc.log_every = tc.ckpt_every = 10 ** 9   # a checkpoint at the end of every chunk only
        tc.warmup_steps = args.warmup
        tc.keep_last = 1
    cfg.train_ldm.ema_decay = args.ema
    return validate(cfg)


def train_for(train_chunk, stage_tc, cpu_budget: float, targets: list[float], first_chunk: int = 10):
    """Run `train_chunk()` (one resumed training call up to `stage_tc.steps`) until the stage has
    used `cpu_budget` seconds of process CPU time; yields (cpu_s, steps) at each of `targets`
    (CPU seconds, ascending, the last = the budget). Chunk sizes follow the measured CPU time
    per step, so each yield lands at its target to within one step."""
    used, steps, rate = 0.0, 0, None
    for target in targets:
        while used < target - (rate or 0) / 2:
            n = first_chunk if rate is None else max(1, round((target - used) / rate))
            stage_tc.steps = steps + n
            c0 = time.process_time()
            train_chunk()
            dt = time.process_time() - c0
            used, steps = used + dt, steps + n
            rate = dt / n if rate is None else (rate + dt / n) / 2   # chunks also pay a reload
        yield used, steps


@torch.no_grad()
def draw(model, n: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """n unconditional DDIM samples through the Pipeline (image i from seed + i)."""
    return Pipeline.from_model(model)(n=n, batch_size=batch, sampler="ddim", steps=steps, seed=seed,
                                      progress=False).images


def progress_targets(budget: float, points: int) -> list[float]:
    """`points` CPU-time marks, geometrically spaced up to the budget (…, b/4, b/2, b)."""
    return [budget / 2 ** (points - 1 - i) for i in range(points)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--factors", default="1,2,4,8,16,32")
    ap.add_argument("--resolution", type=int, default=64, help="image side; every f needs a latent of at least 2×2")
    ap.add_argument("--ae-cpu-s", type=float, default=150, help="first-stage training budget per f, CPU seconds")
    ap.add_argument("--ldm-cpu-s", type=float, default=300, help="UNet training budget per f, CPU seconds "
                    "(the equal compute of the study)")
    ap.add_argument("--progress-points", type=int, default=4, help="scores during training (geometric in CPU time)")
    ap.add_argument("--progress-samples", type=int, default=128, help="samples per f at the points before the last")
    ap.add_argument("--batch", type=int, default=16, help="training batch (the same for every f)")
    ap.add_argument("--warmup", type=int, default=20, help="learning-rate warm-up steps")
    ap.add_argument("--ema", type=float, default=0.999, help="UNet EMA decay (with the usual (1+n)/(10+n) warm-up)")
    ap.add_argument("--ae-channels", type=int, default=16, help="first-stage base width")
    ap.add_argument("--unet-channels", type=int, default=32, help="UNet base width (the same for every f)")
    ap.add_argument("--samples", type=int, default=256, help="generated images per f for the final FD-shapes")
    ap.add_argument("--reference", type=int, default=512, help="held-out reference images")
    ap.add_argument("--sample-steps", type=int, default=10, help="DDIM steps")
    ap.add_argument("--sample-batch", type=int, default=32, help="images per sampling call (throughput is timed at this batch)")
    ap.add_argument("--time-reps", type=int, default=3, help="timed sampling calls per f (interleaved)")
    ap.add_argument("--train-size", type=int, default=20000, help="procedural training images")
    ap.add_argument("--work-dir", default=None, help="where the run directories go (default: a temp dir)")
    ap.add_argument("--inception", default=None, help="FID Inception weights (else $LDM_FID_INCEPTION)")
    ap.add_argument("--quick", action="store_true", help="a second of training per f, 8 samples, a seconds-trained "
                    "feature network: proves the script runs; the numbers mean nothing")
    ap.add_argument("--resume", action="store_true", help="reuse the factors an interrupted run with the same "
                    "budgets finished in --work-dir (its partial.json and trained runs); train the rest")
    ap.add_argument("--out", default=None, help="JSON path (PNG next to it)")
    bl.add_threads_arg(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.ae_cpu_s = args.ldm_cpu_s = 1.0
        args.progress_points, args.progress_samples, args.warmup = 2, 8, 1
        args.samples, args.reference, args.sample_steps, args.batch = 8, 16, 2, 4
        args.sample_batch, args.time_reps = 4, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = bl.command_line("compression.py", argv)
    bl.set_threads(args.threads)
    ops.set_backend("eager")
    try:
        factors = [int(f) for f in args.factors.split(",")]
    except ValueError:
        raise SystemExit(f"--factors {args.factors!r}: a comma-separated list of integers") from None
    if any(f not in Z_CHANNELS for f in factors):
        raise SystemExit(f"--factors: supported are {sorted(Z_CHANNELS)}")
    if args.resolution % max(factors) or args.resolution // max(factors) < 2:
        raise SystemExit(f"--resolution {args.resolution}: needs a latent of at least 2×2 at f = {max(factors)}")
    if min(args.ae_cpu_s, args.ldm_cpu_s) <= 0 or args.progress_points < 1:
        raise SystemExit("--ae-cpu-s, --ldm-cpu-s and --progress-points must be positive")
    info = bl.machine("cpu")
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory() if args.work_dir is None else None
    work = Path(args.work_dir or tmp.name)
    out = Path(args.out) if args.out else bl.default_out("compression", info, smoke=args.quick)

    train_set = ProceduralShapes(args.train_size, args.resolution, seed=0)
    heldout = ProceduralShapes(args.reference, args.resolution, seed=0, start=args.train_size)
    reference = torch.stack([heldout[i]["image"] for i in range(len(heldout))])
    probe = bl.QualityProbe(args.resolution, reference, quick=args.quick, inception=args.inception,
                            cache_dir=work / "featnet" if args.quick else None)
    targets = progress_targets(args.ldm_cpu_s, args.progress_points)

    rows, models = [], {}
    finished = finished_factors(work, args) if args.resume else {}
    for f in factors:
        cfg = study_config(f, args)
        run = RunDir(work / f"f{f}")
        if f in finished:
            rows.append(finished[f])
            models[f], _ = load_model(run.path)
            bl.log(f"f={f}: reused from {work / 'partial.json'}")
            continue
        save_config(cfg, run)
        row = {"f": f, "latent": [cfg.unet.out_channels, args.resolution // f, args.resolution // f]}
        if f == 1:
            ae = train_autoencoder(cfg, run, train_set, heldout, progress=False)   # the identity
            row["ae_cpu_s"], row["ae_steps"] = 0.0, 0
        else:
            box = {}
            chunk = lambda: box.update(ae=train_autoencoder(cfg, run, train_set, heldout, resume=True,  # noqa: E731
                                                            progress=False))
            row["ae_cpu_s"], row["ae_steps"] = list(train_for(chunk, cfg.train_autoencoder, args.ae_cpu_s,
                                                              [args.ae_cpu_s]))[-1]
            ae = box["ae"]
        row["progress"] = []
        chunk = lambda: train_ldm(cfg, run, ae, train_set, resume=True, progress=False)  # noqa: E731
        t0 = time.perf_counter()
        for i, (cpu_s, steps) in enumerate(train_for(chunk, cfg.train_ldm, args.ldm_cpu_s, targets)):
            model, _ = load_model(run.path)                     # the EMA weights, as sampling uses
            last = i == len(targets) - 1
            images = draw(model, args.samples if last else args.progress_samples, args.sample_batch,
                          args.sample_steps, seed=0)
            score = probe.score(images)
            row["progress"].append({"cpu_s": cpu_s, "steps": steps, "images": steps * args.batch, **score})
            bl.log(f"f={f}: {steps} UNet steps in {cpu_s:.0f} CPU s: {probe.fd_name} "
                   f"{score['fd_shapes']:.2f} ± {score['fd_shapes_noise']:.2f} ({score['n']} samples)")
        row["ldm_wall_s"] = time.perf_counter() - t0               # training and the scoring between
        row["ldm_cpu_s"], row["ldm_steps"] = cpu_s, steps
        row["ldm_steps_per_cpu_s"] = steps / cpu_s
        row["unet_params"] = sum(p.numel() for p in model.unet.parameters())
        row["quality"] = row["progress"][-1]
        with torch.no_grad():
            recon = torch.cat([model.decode(model.encode(x, sample=False)).clamp(-1, 1)
                               for x in reference.split(64)])
        row["reconstruction"] = probe.score(recon, n_boot=20)
        rows.append(row)
        models[f] = model
        bl.write_json({"args": vars(args), "results": rows}, work / "partial.json")   # survives an interrupted run
        bl.log(f"f={f}: latent {row['latent']}, first stage {row['ae_steps']} steps, UNet {steps} steps; "
               f"{probe.fd_name} {row['quality']['fd_shapes']:.2f} ± {row['quality']['fd_shapes_noise']:.2f} "
               f"(rFD {row['reconstruction']['fd_shapes']:.2f})")
        from ldm_fast.images import save_grid
        save_grid(images[:16], run.path / "samples.png", nrow=8, upscale=4 if args.resolution <= 64 else 1)

    # Throughput after all training, repetitions interleaved over f: on a shared machine a
    # slow spell then hits every f alike instead of whichever was sampling during it.
    for model in models.values():
        draw(model, args.sample_batch, args.sample_batch, steps=2, seed=10 ** 6)   # warm-up
    times = {f: [] for f in models}
    for _ in range(args.time_reps):
        for f, model in models.items():
            t0 = time.perf_counter()
            draw(model, args.sample_batch, args.sample_batch, args.sample_steps, seed=1)
            times[f].append(time.perf_counter() - t0)
    for row in rows:
        row["sample_s"] = bl.summarize(times[row["f"]])
        row["images_per_s"] = args.sample_batch / row["sample_s"]["median"]
        bl.log(f"f={row['f']}: {row['images_per_s']:.3g} img/s at batch {args.sample_batch}")

    base = next((r for r in rows if r["f"] == 1), None)
    for r in rows:
        if base:
            r["speedup_vs_f1"] = r["images_per_s"] / base["images_per_s"]
    payload = {"benchmark": "compression", "machine": info, "args": vars(args), "command": command,
               "results": rows, "fd_name": probe.fd_name, "fid_unavailable": probe.fid_unavailable,
               "reference_images": probe.reference_n, "total_s": time.perf_counter() - t_start,
               "smoke": args.quick, "findings": findings(rows),
               "notes": ["equal compute = equal process CPU time on one thread per stage and f",
                         "CPU absolute times are CPU times on shared cores; quote ratios"
                         if info["device_type"] == "cpu" else ""]}
    if args.quick:
        payload["notes"].append("--quick: smoke run, numbers meaningless")
    bl.write_report(payload, out, markdown(payload), plot, extra=f"({payload['total_s']:.0f} s)")
    if tmp is not None:
        tmp.cleanup()
    return 0


# Arguments that do not change what a finished factor's row means.
NOT_IDENTITY = ("factors", "time_reps", "sample_batch", "work_dir", "out", "resume", "threads")


def finished_factors(work: Path, args) -> dict[int, dict]:
    """{f: row} of the factors an earlier run in `work` finished with the same budgets and sizes."""
    import json

    path = work / "partial.json"
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    same = {k: v for k, v in vars(args).items() if k not in NOT_IDENTITY}
    differs = [k for k, v in same.items() if earlier["args"].get(k) != v]
    if differs:
        raise SystemExit(f"--resume: {path} was made with other settings ({', '.join(differs)}); "
                         "use another --work-dir")
    return {r["f"]: r for r in earlier["results"] if (work / f"f{r['f']}" / "ldm.safetensors").is_file()}


def separated(a: dict, b: dict, k: float = 3.0) -> bool:
    """a's distance is below b's by more than k times their combined bootstrap noise."""
    return b["fd_shapes"] - a["fd_shapes"] > k * math.hypot(a["fd_shapes_noise"], b["fd_shapes_noise"])


def findings(rows: list[dict]) -> list[str]:
    """The paper's claims, each checked against this run (at 3× the combined bootstrap noise)."""
    by_f = {r["f"]: r for r in rows}
    out = []
    if 1 in by_f:
        base = by_f[1]
        for f in sorted(set(by_f) & {4, 8, 16}):
            r = by_f[f]
            better = separated(r["quality"], base["quality"])
            speed = r.get("speedup_vs_f1")
            out.append(f"LDM-{f} vs LDM-1 at equal compute: {r['quality']['fd_shapes']:.2f} vs "
                       f"{base['quality']['fd_shapes']:.2f} — " + ("better beyond 3× noise" if better else
                                                                 "NOT better beyond 3× noise")
                       + (f"; {speed:.1f}× the sampling throughput" if speed else ""))
    mids = [by_f[f] for f in (4, 8, 16) if f in by_f]
    if mids and 32 in by_f:
        best = min(mids, key=lambda r: r["quality"]["fd_shapes"])
        out.append(f"LDM-32 vs the best of LDM-4…16 (LDM-{best['f']}): {by_f[32]['quality']['fd_shapes']:.2f} vs "
                   f"{best['quality']['fd_shapes']:.2f} — " + ("worse beyond 3× noise (f = 32 stagnates)"
                   if separated(best["quality"], by_f[32]["quality"]) else "not separated beyond 3× noise"))
    for f in (1, 2, 32):
        if f in by_f and len(by_f[f]["progress"]) > 1:
            p = by_f[f]["progress"]
            out.append(f"LDM-{f} over training: {p[0]['fd_shapes']:.2f} → {p[-1]['fd_shapes']:.2f} "
                       f"({p[0]['steps']} → {p[-1]['steps']} steps)")
    return out


def plot(payload: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(payload["results"], key=lambda r: r["f"])
    fd_name = payload["fd_name"]
    cpu = " (CPU)" if payload["machine"]["device_type"] == "cpu" else ""
    fs = [r["f"] for r in rows]
    fig, (a0, a1, a2) = plt.subplots(1, 3, figsize=(16, 4.6))
    for r in rows:
        p = r["progress"]
        a0.errorbar([q["cpu_s"] for q in p], [q["fd_shapes"] for q in p], yerr=[q["fd_shapes_noise"] for q in p],
                    fmt="o-", capsize=3, label=f"LDM-{r['f']}")
    a0.set_xscale("log")
    # Log distances: pixel space at a small budget sits an order of magnitude above the rest.
    for ax in (a0, a1, a2):
        ax.set_yscale("log")
    a0.set_xlabel("UNet training compute, CPU seconds (one thread)")
    a0.set_ylabel(f"{fd_name} (lower is better)")
    a0.set_title("quality vs training progress")
    a0.legend(fontsize=8)
    ips = [r["images_per_s"] for r in rows]
    fd = [r["quality"]["fd_shapes"] for r in rows]
    a1.errorbar(ips, fd, yerr=[r["quality"]["fd_shapes_noise"] for r in rows], fmt="o-", capsize=3)
    for f, x, y in zip(fs, ips, fd):
        a1.annotate(f"LDM-{f}", (x, y), textcoords="offset points", xytext=(5, 5))
    a1.set_xscale("log")
    a1.set_xlabel(f"sampling throughput, images/s{cpu}")
    a1.set_ylabel(fd_name)
    a1.set_title("quality vs throughput (end of budget)")
    a2.plot(fs, fd, "o-", label=f"samples {fd_name}")
    rec = [(f, r["reconstruction"]["fd_shapes"]) for f, r in zip(fs, rows)  # f = 1: identity, 0
           if r["reconstruction"]["fd_shapes"] > 1e-6]
    a2.plot([f for f, _ in rec], [v for _, v in rec], "s--", label=f"first-stage reconstructions {fd_name}")
    a2.set_xscale("log", base=2)
    a2.set_xticks(fs, [str(f) for f in fs])
    a2.set_xlabel("downsampling factor f")
    a2.set_ylabel(fd_name)
    a2.legend(fontsize=8)
    a2.set_title("samples vs first-stage limit")
    a = payload["args"]
    fig.suptitle(f"every f: {a['ldm_cpu_s']:g} CPU s of UNet training (+ {a['ae_cpu_s']:g} s first stage), "
                 f"batch {a['batch']}, {a['resolution']}² shapes; {a['samples']} samples, DDIM {a['sample_steps']}"
                 f"\n{bl.provenance(payload)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(payload: dict) -> str:
    cpu = payload["machine"]["device_type"] == "cpu"
    tag = " (CPU)" if cpu else ""
    a = payload["args"]
    name = payload["fd_name"]
    rows, prog = [], []
    for r in sorted(payload["results"], key=lambda r: r["f"]):
        q, rec = r["quality"], r["reconstruction"]
        rows.append([f"LDM-{r['f']}", "×".join(map(str, r["latent"])), str(r["ae_steps"]), str(r["ldm_steps"]),
                     bl.fmt(r["images_per_s"]), bl.fmt(r.get("speedup_vs_f1"), ".2f"),
                     f"{q['fd_shapes']:.2f} ± {q['fd_shapes_noise']:.2f}", f"{rec['fd_shapes']:.2f}",
                     f"{q['fid']:.2f} ± {q['fid_noise']:.2f}" if "fid" in q else "—"])
        prog.append(f"- LDM-{r['f']}: " + ", ".join(f"{p['fd_shapes']:.1f} ± {p['fd_shapes_noise']:.1f} "
                                                  f"@ {p['cpu_s']:.0f} s / {p['steps']} steps"
                                                  for p in r["progress"]))
    lines = [f"### Compression factor f — {payload['machine']['name']}",
             f"{payload['machine']['date']}; equal compute per f: {a['ldm_cpu_s']:g} CPU seconds (one thread, "
             f"process CPU clock) of UNet training at batch {a['batch']}, after {a['ae_cpu_s']:g} CPU s of "
             f"first-stage training (none for f = 1); {a['resolution']}² procedural shapes; {a['samples']} samples "
             f"(DDIM {a['sample_steps']}) against {payload['reference_images']} held-out images; ± is the "
             "bootstrap noise.", ""]
    if payload.get("command"):
        lines += [f"Command: `{payload['command']}`", ""]
    lines += [bl.table(["model", "latent", "first-stage steps", "UNet steps", f"images/s{tag}", "× LDM-1",
                        f"{name}", f"r{name} (first stage)", "FID"], rows),
              "", f"{name} during training ({a['progress_samples']} samples before the last point):", *prog]
    if payload.get("findings"):
        lines += ["", "Against the paper's claims (separation = more than 3× the combined bootstrap noise):",
                  *[f"- {x}" for x in payload["findings"]]]
    if payload.get("fid_unavailable"):
        lines += ["", f"FID not computed: {payload['fid_unavailable']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
