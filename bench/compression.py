"""The paper's compression-factor study (Rombach et al. 2022, Sec. 4.1, Figs. 6–7): LDM-f for
f ∈ {1, 2, 4, 8, 16} — f = 1 is diffusion in pixel space — with the same UNet, trained on the
same procedural data for the same number of steps; sampling throughput and FD-shapes of each.

    python bench/compression.py                          # ≲ 10 min on a 2-core CPU
    python bench/compression.py --ae-steps 2000 --ldm-steps 5000 --samples 1000   # a real run
    python bench/compression.py --quick                  # seconds: proves it runs

For each f: a KL autoencoder with f = 2^(levels−1) (z channels 3, 3, 4, 8 for f = 2, 4, 8, 16 as
in the paper's tables; f = 1 uses the identity first stage) is trained with L1 + KL (no
discriminator: the budget is too small for it to matter), then the LDM's UNet — identical for
every f: same widths, depths and attention, only the input/output channels follow z — is
trained for the same number of steps at the same batch size on the same image stream. Then
`--samples` images are drawn with DDIM (`--sample-steps`) and compared with held-out images in the project's own feature network
(FD-shapes; FID too when the Inception weights are present), with a bootstrap estimate of
the distance's sampling noise. Sampling throughput (images/s, decoding included) is timed
after all training, at `--sample-batch`, repetitions interleaved over f. The first stage's own limit is reported as rFD: the same
distance for its reconstructions of the held-out images.

At the default budget (minutes of CPU) the quality numbers are only indicative — the models
are far from converged and the sample sets small; the throughput ratios are robust. The
paper's finding to look for: small f (1, 2) is slow and learns slowly, large f (16) loses
detail in the first stage; f = 4…8 balances both.

Writes JSON and a PNG plot (bench/results/compression-<machine>.{json,png}); the trained run
directories go to --work-dir (a temporary directory by default).
"""

from __future__ import annotations

import argparse
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

CHANNEL_MULT = {2: (1, 2), 4: (1, 2, 2), 8: (1, 2, 2, 2), 16: (1, 2, 2, 2, 2)}
Z_CHANNELS = {1: 3, 2: 3, 4: 3, 8: 4, 16: 8}


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
    # One UNet for every f (the "same UNet budget"): two levels, so that even f = 16's 2×2
    # latent (at 32²) has a valid bottom level; attention at ds 2 and in the middle block.
    cfg.unet = UNetConfig(in_channels=z, out_channels=z, model_channels=args.unet_channels,
                          channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                          num_head_channels=32, groups=8)
    for tc, steps in ((cfg.train_autoencoder, args.ae_steps), (cfg.train_ldm, args.ldm_steps)):
        tc.steps, tc.batch_size = steps, args.batch
        tc.ckpt_every = tc.log_every = max(1, steps)
        tc.warmup_steps = min(tc.warmup_steps, max(1, steps // 10))
    # EMA with a horizon that fits a short run (0.999 would still be near the initial weights).
    cfg.train_ldm.ema_decay = 0.99 if args.ldm_steps < 2000 else 0.999
    return validate(cfg)


@torch.no_grad()
def draw(model, n: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """n unconditional DDIM samples through the Pipeline (image i from seed + i)."""
    return Pipeline.from_model(model)(n=n, batch_size=batch, sampler="ddim", steps=steps, seed=seed,
                                      progress=False).images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--factors", default="1,2,4,8,16")
    ap.add_argument("--resolution", type=int, default=32, help="image side (must be a multiple of 16 for f = 16)")
    ap.add_argument("--ae-steps", type=int, default=150, help="first-stage training steps")
    ap.add_argument("--ldm-steps", type=int, default=200, help="UNet training steps (the same for every f)")
    ap.add_argument("--batch", type=int, default=8, help="training batch (the same for every f)")
    ap.add_argument("--ae-channels", type=int, default=16, help="first-stage base width")
    ap.add_argument("--unet-channels", type=int, default=32, help="UNet base width (the same for every f)")
    ap.add_argument("--samples", type=int, default=64, help="generated images per f for FD-shapes")
    ap.add_argument("--reference", type=int, default=512, help="held-out reference images")
    ap.add_argument("--sample-steps", type=int, default=10, help="DDIM steps")
    ap.add_argument("--sample-batch", type=int, default=32, help="images per sampling call (throughput is timed at this batch)")
    ap.add_argument("--time-reps", type=int, default=3, help="timed sampling calls per f (interleaved)")
    ap.add_argument("--train-size", type=int, default=20000, help="procedural training images")
    ap.add_argument("--work-dir", default=None, help="where the run directories go (default: a temp dir)")
    ap.add_argument("--inception", default=None, help="FID Inception weights (else $LDM_FID_INCEPTION)")
    ap.add_argument("--quick", action="store_true", help="2 training steps, 8 samples, a seconds-trained "
                    "feature network: proves the script runs; the numbers mean nothing")
    ap.add_argument("--out", default=None, help="JSON path (PNG next to it)")
    bl.add_threads_arg(ap)
    args = ap.parse_args(argv)
    bl.set_threads(args.threads)
    ops.set_backend("eager")
    if args.quick:
        args.ae_steps = args.ldm_steps = 2
        args.samples, args.reference, args.sample_steps, args.batch = 8, 16, 2, 4
        args.sample_batch, args.time_reps = 4, 1
    factors = [int(f) for f in args.factors.split(",")]
    if any(f not in Z_CHANNELS for f in factors):
        raise SystemExit(f"--factors: supported are {sorted(Z_CHANNELS)}")
    if args.resolution % max(factors) or args.resolution // max(factors) < 2:
        raise SystemExit(f"--resolution {args.resolution}: needs a latent of at least 2×2 at f = {max(factors)}")
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

    rows, models = [], {}
    for f in factors:
        cfg = study_config(f, args)
        run = RunDir(work / f"f{f}")
        save_config(cfg, run)
        row = {"f": f, "latent": [cfg.unet.out_channels, args.resolution // f, args.resolution // f]}
        t0 = time.perf_counter()
        ae = train_autoencoder(cfg, run, train_set, heldout, progress=False)
        row["ae_train_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        train_ldm(cfg, run, ae, train_set, progress=False)
        row["ldm_train_s"] = time.perf_counter() - t0
        row["ldm_steps_per_s"] = args.ldm_steps / row["ldm_train_s"]
        model, _ = load_model(run.path)                       # the EMA weights, as sampling uses
        row["unet_params"] = sum(p.numel() for p in model.unet.parameters())
        with torch.no_grad():
            recon = torch.cat([model.decode(model.encode(x, sample=False)).clamp(-1, 1)
                               for x in reference.split(64)])
        row["reconstruction"] = probe.score(recon, n_boot=20)
        images = draw(model, args.samples, args.sample_batch, args.sample_steps, seed=0)
        row["quality"] = probe.score(images)
        rows.append(row)
        models[f] = model
        bl.log(f"f={f}: latent {row['latent']}, train {row['ae_train_s']:.0f}+{row['ldm_train_s']:.0f} s, "
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
    payload = {"benchmark": "compression", "machine": info, "args": vars(args), "results": rows,
               "fd_name": probe.fd_name, "fid_unavailable": probe.fid_unavailable,
               "reference_images": probe.reference_n, "total_s": time.perf_counter() - t_start,
               "smoke": args.quick,
               "notes": ["quality at this budget is indicative only (short training, small sample sets)",
                         "CPU absolute times are CPU times on shared cores; quote ratios"
                         if info["device_type"] == "cpu" else ""]}
    if args.quick:
        payload["notes"].append("--quick: smoke run, numbers meaningless")
    bl.write_report(payload, out, markdown(payload), plot, extra=f"({payload['total_s']:.0f} s)")
    if tmp is not None:
        tmp.cleanup()
    return 0


def plot(payload: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["results"]
    fd_name = payload["fd_name"]
    fs = [r["f"] for r in rows]
    ips = [r["images_per_s"] for r in rows]
    fd = [r["quality"]["fd_shapes"] for r in rows]
    err = [r["quality"]["fd_shapes_noise"] for r in rows]
    rfd = [r["reconstruction"]["fd_shapes"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.errorbar(ips, fd, yerr=err, fmt="o-", capsize=3, color="tab:blue")
    for f, x, y in zip(fs, ips, fd):
        a1.annotate(f"LDM-{f}", (x, y), textcoords="offset points", xytext=(5, 5))
    a1.set_xscale("log")
    a1.set_xlabel("sampling throughput, images/s" + (" (CPU)" if payload["machine"]["device_type"] == "cpu" else ""))
    a1.set_ylabel(f"{fd_name} (lower is better)")
    a1.set_title("quality vs throughput per compression factor f")
    a2.plot(fs, fd, "o-", label=f"samples {fd_name}")
    a2.plot(fs, rfd, "s--", label=f"first-stage reconstructions {fd_name}")
    a2.set_xscale("log", base=2)
    a2.set_xticks(fs, [str(f) for f in fs])
    a2.set_xlabel("downsampling factor f")
    a2.set_ylabel(fd_name)
    a2.legend()
    a2.set_title("after equal training steps")
    a = payload["args"]
    fig.suptitle(f"{payload['machine']['name']} — {a['ldm_steps']} UNet steps × batch {a['batch']}, "
                 f"{a['samples']} samples, DDIM {a['sample_steps']} (indicative at this budget)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(payload: dict) -> str:
    cpu = payload["machine"]["device_type"] == "cpu"
    tag = " (CPU)" if cpu else ""
    a = payload["args"]
    name = payload["fd_name"]
    rows = []
    for r in payload["results"]:
        q, rec = r["quality"], r["reconstruction"]
        rows.append([f"LDM-{r['f']}", "×".join(map(str, r["latent"])), bl.fmt(r["images_per_s"]),
                     bl.fmt(r.get("speedup_vs_f1"), ".2f"), bl.fmt(r["ldm_steps_per_s"]),
                     f"{q['fd_shapes']:.2f} ± {q['fd_shapes_noise']:.2f}", f"{rec['fd_shapes']:.2f}",
                     f"{q['fid']:.2f} ± {q['fid_noise']:.2f}" if "fid" in q else "—"])
    lines = [f"### Compression factor f — {payload['machine']['name']}",
             f"{payload['machine']['date']}; {a['ae_steps']} first-stage + {a['ldm_steps']} UNet steps "
             f"at batch {a['batch']}, {a['resolution']}² procedural shapes; {a['samples']} samples "
             f"(DDIM {a['sample_steps']}) against {payload['reference_images']} held-out images. "
             "Quality is indicative only at this budget; ± is the bootstrap noise.", "",
             bl.table(["model", "latent", f"images/s{tag}", "× LDM-1", f"train steps/s{tag}",
                       f"{name}", f"r{name} (first stage)", "FID"], rows)]
    if payload.get("fid_unavailable"):
        lines += ["", f"FID not computed: {payload['fid_unavailable']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
