"""Quality against speed: sampler × steps × backend on one trained model, as a Pareto plot.

    python bench/fid_vs_throughput.py --ckpt RUN_DIR                 # the full sweep (GPU-sized)
    python bench/fid_vs_throughput.py --ckpt RUN_DIR --quick         # a CPU-sized sweep, minutes
    python bench/fid_vs_throughput.py --quick                        # trains a micro run first
    python bench/fid_vs_throughput.py --smoke                        # seconds: proves it runs

For every point (sampler, steps, backend) it draws `--samples` images — the same seeds for
every backend — in batches interleaved over the backends, each batch timed (images/s from the
median per-image time, decoding included, after an untimed warm-up per backend), and measures their distance to held-out images: FD-shapes in the project's own
feature network (never called FID), and FID when the Inception weights are present
($LDM_FID_INCEPTION or --inception). Each distance carries a bootstrap estimate of its sampling
noise (the std over resamplings of the generated set).

Backend agreement: a fast path is only a speed-up if quality did not move. At every (sampler,
steps) each backend's distance is compared with eager fp32's; a backend is FLAGGED when the
difference exceeds 2·√(σ_backend² + σ_eager²), σ the bootstrap noise — i.e. when it is larger
than the finite sample set alone explains. (The sets share their seeds, so genuine agreement
gives differences far below this bound.) The script exits non-zero if anything is flagged.

Without --ckpt it trains a micro model first (tiny preset at reduced width, a few hundred
steps; it says so, and its quality is far below a trained tiny run) — pass a real run to get
meaningful distances. Backends are those of bench/throughput.py (eager:fp32, eager:bf16/fp16,
triton, compile, triton-cudagraph, onnxruntime, tensorrt); each one that cannot run here is
listed as skipped with the reason. JSON + PNG go to bench/results/fid_vs_throughput-<machine>.
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
import throughput as tp  # noqa: E402
from ldm_fast.config import get_preset  # noqa: E402
from ldm_fast.data.procedural import ProceduralShapes  # noqa: E402

FULL_SWEEP = "ddim:10,25,50,100,250;plms:10,25,50;dpmpp_2m:5,10,20,50;ddpm:1000"
QUICK_SWEEP = "ddim:10,25,50;plms:10,25;dpmpp_2m:5,10,20;ddpm:100"
SMOKE_SWEEP = "ddim:2;dpmpp_2m:2"
DEFAULT_BACKENDS = {
    "cuda": "eager:fp32,eager:fp16,triton:fp16,compile:fp16,triton-cudagraph:fp16,onnxruntime:fp16,tensorrt:fp16",
    "cpu": "eager:fp32,eager:bf16,triton:fp16,onnxruntime:fp32,tensorrt:fp16",
}
AGREEMENT_K = 2.0


def parse_sweep(text: str) -> list[tuple[str, int]]:
    points = []
    for part in filter(None, text.split(";")):
        name, _, steps = part.partition(":")
        if name not in tp.samplers.SAMPLERS:
            raise SystemExit(f"--sweep: unknown sampler {name!r} ({', '.join(sorted(tp.samplers.SAMPLERS))})")
        points += [(name, int(s)) for s in steps.split(",") if s]
    return points


def micro_config(ae_steps: int, ldm_steps: int, batch: int):
    """The tiny preset at reduced width: trains in minutes on a CPU."""
    cfg = get_preset("tiny")
    cfg.name = "micro"
    cfg.autoencoder.base_channels, cfg.autoencoder.disc_start = 16, 10 ** 9
    cfg.unet.model_channels, cfg.unet.num_head_channels = 32, 32
    for tc, steps in ((cfg.train_autoencoder, ae_steps), (cfg.train_ldm, ldm_steps)):
        tc.steps, tc.batch_size = steps, batch
        tc.ckpt_every = tc.log_every = max(1, steps)
        tc.warmup_steps = min(tc.warmup_steps, max(1, steps // 10))
    cfg.train_ldm.ema_decay = 0.99
    return cfg


def train_micro(run_dir: Path, args) -> float:
    from ldm_fast.run import RunDir
    from ldm_fast.training import save_config, train_autoencoder, train_ldm

    cfg = micro_config(args.train_ae_steps, args.train_ldm_steps, args.train_batch)
    run = RunDir(run_dir)
    save_config(cfg, run)
    t0 = time.perf_counter()
    train_set = ProceduralShapes(cfg.data.num_samples, cfg.data.resolution, seed=cfg.data.seed)
    heldout = ProceduralShapes(16, cfg.data.resolution, seed=cfg.data.seed, start=cfg.data.num_samples)
    ae = train_autoencoder(cfg, run, train_set, heldout, progress=False)
    train_ldm(cfg, run, ae, train_set, progress=False)
    return time.perf_counter() - t0


def generate_sets(runners, names, size, schedule, sampler: str, steps: int, n: int, batch: int,
                  device) -> dict:
    """n images per runner, in batches through the Pipeline (tp.sample_images); image j
    starts from the noise of seed 1000 + j for every runner, so all backends start from the
    same noise. The batches are interleaved over the runners (batch 1
    of each, then batch 2, …) and each is timed on its own: a slow spell on a shared machine
    then hits every backend alike. Returns {name: (images, per-batch seconds, batch sizes)}."""
    out = {names[id(r)]: ([], [], []) for r in runners}
    for start in range(0, n, batch):
        b = min(batch, n - start)
        for r in runners:
            dt, images = bl.time_once(lambda: tp._call(r, lambda: tp.sample_images(
                r, size, schedule, b, steps, sampler, device, seed=1000 + start)), device)
            imgs, times, sizes = out[names[id(r)]]
            imgs.append(images.float().clamp(-1, 1).cpu())
            times.append(dt)
            sizes.append(b)
    return {k: (torch.cat(v[0]), v[1], v[2]) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--ckpt", default=None, help="trained RUN_DIR (default: train a micro run first)")
    ap.add_argument("--sweep", default=None, help=f"sampler:steps,…;… (default {FULL_SWEEP!r}; "
                    f"--quick {QUICK_SWEEP!r})")
    ap.add_argument("--backends", default=None, help="comma list of name:dtype (bench/throughput.py's)")
    ap.add_argument("--samples", type=int, default=None, help="images per point (default 1000; --quick 128)")
    ap.add_argument("--batch", type=int, default=None, help="images per sampling call (default 100; --quick 32)")
    ap.add_argument("--reference", type=int, default=None, help="held-out reference images (default 2000; --quick 512)")
    ap.add_argument("--boot", type=int, default=100, help="bootstrap resamplings for the noise estimate")
    ap.add_argument("--train-ae-steps", type=int, default=150, help="micro run (no --ckpt): first-stage steps")
    ap.add_argument("--train-ldm-steps", type=int, default=300, help="micro run: UNet steps")
    ap.add_argument("--train-batch", type=int, default=16, help="micro run: batch")
    ap.add_argument("--work-dir", default=None, help="where the micro run is trained (reused if complete)")
    ap.add_argument("--inception", default=None, help="FID Inception weights (else $LDM_FID_INCEPTION)")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true", help="CPU-sized sweep and sample counts")
    ap.add_argument("--smoke", action="store_true", help="seconds: 2-step micro run, 2-step samplers, "
                    "8 images, a seconds-trained feature network — numbers meaningless")
    ap.add_argument("--out", default=None, help="JSON path (PNG next to it)")
    bl.add_threads_arg(ap)
    args = ap.parse_args(argv)
    bl.set_threads(args.threads)
    device = bl.pick_device(args.device)
    dev = device.type if device.type == "cuda" else "cpu"
    if args.smoke:
        args.train_ae_steps = args.train_ldm_steps = 2
        args.train_batch, args.boot = 4, 10
        defaults = (SMOKE_SWEEP, 8, 8, 16)
    elif args.quick:
        defaults = (QUICK_SWEEP, 128, 32, 512)
    else:
        defaults = (FULL_SWEEP, 1000, 100, 2000)
    args.sweep = args.sweep or defaults[0]
    args.samples = args.samples or defaults[1]
    args.batch = args.batch or defaults[2]
    args.reference = args.reference or defaults[3]
    points = parse_sweep(args.sweep)
    backends = tp.parse_backends(args.backends or DEFAULT_BACKENDS[dev])
    info = bl.machine(device)
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory() if args.work_dir is None else None
    work = Path(args.work_dir or tmp.name)

    provenance = {"ckpt": args.ckpt}
    run_dir = Path(args.ckpt) if args.ckpt else work / "micro-run"
    if not args.ckpt:
        if (run_dir / "ldm.safetensors").is_file():
            from ldm_fast.run import load_config as _cfg
            tc = _cfg(run_dir)
            provenance["trained_micro_run"] = (
                f"no --ckpt given: reused the micro model trained earlier in {run_dir} "
                f"({tc.train_autoencoder.steps} first-stage + {tc.train_ldm.steps} UNet steps at batch "
                f"{tc.train_ldm.batch_size}) — its distances say little about a trained model")
        else:
            seconds = train_micro(run_dir, args)
            provenance["trained_micro_run"] = (
                f"no --ckpt given: trained a micro model ({args.train_ae_steps} first-stage + "
                f"{args.train_ldm_steps} UNet steps at batch {args.train_batch}, {seconds:.0f} s) — "
                "its distances say little about a trained model")
        bl.log(provenance["trained_micro_run"])

    from ldm_fast.run import load_config
    cfg = load_config(run_dir)
    from ldm_fast.tasks import task_of

    if task_of(cfg).conditional:
        raise SystemExit(f"{run_dir}: a {cfg.conditioning.task}-conditional run; this sweep draws "
                         "unconditional samples only (their distance to the held-out set would be wrong)")
    size = tp.make_size("tiny", str(run_dir))
    size.cfg = cfg
    base = tp.build_model(size, device)
    res = cfg.data.resolution
    heldout = ProceduralShapes(args.reference, res, seed=cfg.data.seed, start=cfg.data.num_samples)
    reference = torch.stack([heldout[i]["image"] for i in range(len(heldout))])
    probe = bl.QualityProbe(res, reference, quick=args.smoke, inception=args.inception,
                            cache_dir=work / "featnet" if args.smoke else None)

    runners, skipped, cache = [], [], {}
    for backend, dt in backends:
        try:
            runners.append(tp.make_runner(backend, tp.DTYPES[dt], base, size, device, args.batch, cache,
                                          args.compile_mode))
        except tp.Skip as e:
            skipped.append({"backend": f"{backend}:{dt}", "reason": str(e)})
            bl.log(f"{backend}:{dt}: skipped — {e}")

    def name(r):
        return f"{r.backend}:{next(k for k, v in tp.DTYPES.items() if v == r.dtype)}"

    # Warm-up per backend (compilation, autotuning, graph capture happen here, untimed).
    warm = {}
    with torch.inference_mode():
        for r in list(runners):
            try:
                warm[name(r)], _ = bl.time_once(lambda: tp._call(r, lambda: tp.sample_images(
                    r, size, base.schedule, args.batch, 2, "ddim", device)), device)
            except Exception as e:  # noqa: BLE001 - one failing backend must not hide the others
                skipped.append({"backend": name(r), "reason": f"failed at warm-up: {type(e).__name__}: {e}"})
                runners.remove(r)

    results = []
    names = {id(r): name(r) for r in runners}
    with torch.inference_mode():
        for sampler, steps in points:
            sets = generate_sets(runners, names, size, base.schedule, sampler, steps, args.samples,
                                 args.batch, device)
            for r in runners:
                images, times, sizes = sets[names[id(r)]]
                # Throughput from the median per-image time over the timed batches.
                per_image = sorted(t / b for t, b in zip(times, sizes))
                row = {"sampler": sampler, "steps": steps, "backend": names[id(r)], "images": args.samples,
                       "seconds": sum(times), "batch_seconds": times,
                       "images_per_s": 1 / per_image[len(per_image) // 2] if len(per_image) % 2 else
                       2 / (per_image[len(per_image) // 2 - 1] + per_image[len(per_image) // 2]),
                       "nfe_per_image": steps + (1 if sampler == "plms" else 0),
                       **probe.score(images, n_boot=args.boot)}
                results.append(row)
                bl.log(f"{sampler} {steps:4d} {row['backend']:>22}: {row['images_per_s']:8.3g} img/s, "
                       f"{probe.fd_name} {row['fd_shapes']:.3f} ± {row['fd_shapes_noise']:.3f}")
    flags = agreement(results)
    pareto(results)
    payload = {"benchmark": "fid_vs_throughput", "machine": info, "args": vars(args),
               "command": bl.command_line("fid_vs_throughput.py", argv),
               "model": {"run_dir": str(run_dir), "config": cfg.name, **provenance,
                         "unet_params": sum(p.numel() for p in base.unet.parameters())},
               "fd_name": probe.fd_name, "fid_unavailable": probe.fid_unavailable,
               "reference_images": probe.reference_n, "warmup_s": warm, "results": results,
               "skipped": skipped, "flags": flags, "agreement_rule":
                   f"|d_backend − d_eager| > {AGREEMENT_K}·sqrt(σ_backend² + σ_eager²), σ = bootstrap std",
               "total_s": time.perf_counter() - t_start, "smoke": args.smoke}
    if args.smoke:
        payload["notes"] = ["--smoke: numbers meaningless"]
    out = Path(args.out) if args.out else bl.default_out("fid_vs_throughput", info, smoke=args.smoke)
    bl.write_report(payload, out, markdown(payload), plot, extra=f"({payload['total_s']:.0f} s)")
    if tmp is not None:
        tmp.cleanup()
    return 1 if flags else 0


def agreement(results: list[dict]) -> list[dict]:
    """Compare each backend's distances with eager fp32's at the same (sampler, steps)."""
    flags = []
    by_point = {}
    for r in results:
        by_point.setdefault((r["sampler"], r["steps"]), []).append(r)
    for (sampler, steps), rows in by_point.items():
        ref = next((r for r in rows if r["backend"] == "eager:fp32"), None)
        if ref is None:
            continue
        for r in rows:
            for metric in ("fd_shapes", "fid"):
                if metric not in r or r is ref:
                    continue
                diff = r[metric] - ref[metric]
                noise = math.sqrt(r[f"{metric}_noise"] ** 2 + ref[f"{metric}_noise"] ** 2)
                r[f"{metric}_diff_vs_eager"] = diff
                r[f"{metric}_agrees"] = abs(diff) <= AGREEMENT_K * noise
                if not r[f"{metric}_agrees"]:
                    flags.append({"sampler": sampler, "steps": steps, "backend": r["backend"], "metric": metric,
                                  "diff": diff, "noise": noise})
                    bl.log(f"FLAG: {r['backend']} {sampler} {steps}: {metric} differs from eager fp32 by "
                           f"{diff:+.3f}, more than {AGREEMENT_K}× the sampling noise {noise:.3f}")
    return flags


def pareto(results: list[dict]) -> None:
    """Mark points no other point beats in both images/s and FD-shapes."""
    for r in results:
        r["pareto"] = not any(o is not r and o["images_per_s"] >= r["images_per_s"]
                              and o["fd_shapes"] <= r["fd_shapes"]
                              and (o["images_per_s"] > r["images_per_s"] or o["fd_shapes"] < r["fd_shapes"])
                              for o in results)


def plot(payload: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["results"]
    if not rows:
        return
    samplers_ = sorted({r["sampler"] for r in rows})
    backends = sorted({r["backend"] for r in rows})
    colors = dict(zip(samplers_, plt.cm.tab10.colors))
    markers = dict(zip(backends, "osD^v<>P*X"))
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for r in rows:
        ax.errorbar(r["images_per_s"], r["fd_shapes"], yerr=r["fd_shapes_noise"], fmt=markers[r["backend"]],
                    color=colors[r["sampler"]], alpha=0.85, capsize=2, ms=6,
                    mfc="none" if r["backend"] != "eager:fp32" else colors[r["sampler"]])
        ax.annotate(str(r["steps"]), (r["images_per_s"], r["fd_shapes"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 3))
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["images_per_s"])
    ax.plot([r["images_per_s"] for r in front], [r["fd_shapes"] for r in front], "k--", lw=1,
            label="Pareto front")
    for s in samplers_:
        ax.plot([], [], "o", color=colors[s], label=s)
    for b in backends:
        ax.plot([], [], markers[b], color="gray", mfc="none", label=b)
    ax.set_xscale("log")
    cpu = payload["machine"]["device_type"] == "cpu"
    ax.set_xlabel("images/s" + (" (CPU)" if cpu else "") + " — decoding included")
    ax.set_ylabel(f"{payload['fd_name']} (lower is better; bars: bootstrap noise)")
    ax.set_title(f"{payload['model']['config']} — labels: sampler steps\n{bl.provenance(payload)}", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(payload: dict) -> str:
    cpu = payload["machine"]["device_type"] == "cpu"
    tag = " (CPU)" if cpu else ""
    name = payload["fd_name"]
    lines = [f"### {name} vs throughput — {payload['machine']['name']}",
             f"{payload['machine']['date']}; model {payload['model']['config']} ({payload['model']['run_dir']}); "
             f"{payload['args']['samples']} samples per point against {payload['reference_images']} held-out images."]
    if payload.get("command"):
        lines.append(f"Command: `{payload['command']}`")
    if payload["model"].get("trained_micro_run"):
        lines.append(f"Model: {payload['model']['trained_micro_run']}.")
    lines.append("")
    rows = []
    for r in payload["results"]:
        agree = r.get("fd_shapes_agrees")
        rows.append([r["sampler"], r["steps"], r["backend"], bl.fmt(r["images_per_s"]),
                     f"{r['fd_shapes']:.3f} ± {r['fd_shapes_noise']:.3f}",
                     "—" if agree is None else ("ok" if agree else "**FLAG**") +
                     f" ({r['fd_shapes_diff_vs_eager']:+.3f})",
                     f"{r['fid']:.2f} ± {r['fid_noise']:.2f}" if "fid" in r else "—",
                     "★" if r["pareto"] else ""])
    lines.append(bl.table(["sampler", "steps", "backend", f"images/s{tag}", name, "vs eager fp32",
                           "FID", "Pareto"], rows))
    lines += ["", f"Agreement rule: {payload['agreement_rule']}. "
              + (f"{len(payload['flags'])} flagged." if payload["flags"] else "No backend flagged.")]
    if payload.get("fid_unavailable"):
        lines.append(f"FID not computed: {payload['fid_unavailable']}.")
    if payload["skipped"]:
        lines += ["", "Skipped:"] + [f"- {s['backend']}: {s['reason']}" for s in payload["skipped"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
