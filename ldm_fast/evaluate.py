"""`python -m ldm_fast.evaluate --ckpt RUN_DIR`: how good is a trained run?

- First stage: reconstruction PSNR / SSIM on held-out images (LPIPS too when the run names its
  weights file, autoencoder.lpips_weights).
- Conditional runs: the task's metric (ldm_fast.tasks.evaluate_task: class accuracy guided vs
  unguided, prompt agreement, box-crop accuracy, mIoU, PSNR/SSIM vs bicubic, masked L1).
- Unconditional LDM: FD-shapes — the Fréchet distance between samples and held-out images in the features of
  the project's own small network trained on the procedural data (it is *not* FID; FID needs
  the Inception weights, see ldm_fast.metrics.inception), and precision/recall in those features;
  with `--fid PATH` (or $LDM_FID_INCEPTION) also FID, preprocessed as torch-fidelity does
  (`--fid-mode` pytorch-fid / clean-fid for the others). On image-folder or shard runs FD-shapes
  and its precision/recall are left out — their feature network knows only the procedural shapes,
  so on other images they would measure nothing — and FID is the sample metric (with --fid).
Prints a table and writes RUN_DIR/eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ldm_fast import cli, ops
from ldm_fast.data.build import build_datasets
from ldm_fast.metrics import (FD_NAME, FID_DEFAULT_MODE, FID_MODES, extract, fd_shapes, load_shapes_net,
                              grid_ratio, precision_recall, psnr, ssim)
from ldm_fast.metrics.inception import ENV_VAR as FID_ENV
from ldm_fast.run import load_config, load_first_stage


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ldm_fast.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run directory")
    cli.add_sampling_args(p, inputs=False, outputs=False, n_default=256)
    p.add_argument("--skip-samples", action="store_true", help="only evaluate the autoencoder")
    p.add_argument("--fid", metavar="PATH", default=os.environ.get(FID_ENV) or None,
                   help=f"FID Inception weights (pt_inception-2015-12-05-6726825d.pth; default ${FID_ENV}): "
                        "adds FID of the samples against the held-out images")
    p.add_argument("--fid-mode", choices=FID_MODES, default=FID_DEFAULT_MODE,
                   help="whose resize/normalisation FID uses (default: torch-fidelity, the paper's tool)")
    p.add_argument("--photos", action="store_true",
                   help="super-resolution: also score on the photographs that ship with scikit-image")
    p.add_argument("--sr-guidance", type=float, default=0.0,
                   help="super-resolution: also score with post-hoc image guidance at this scale")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or 64
    return args


def heldout_images(dataset, n: int) -> torch.Tensor:
    n = min(n, len(dataset))
    return torch.stack([dataset[i]["image"] for i in range(n)])


def fd_shapes_unavailable(cfg) -> str | None:
    """Why FD-shapes says nothing about this run's images (None when it does)."""
    if cfg.data.dataset == "procedural":
        return None
    return (f"{FD_NAME} left out: its feature network is trained on the procedural shapes and says nothing "
            f"about {cfg.data.dataset} data ({cfg.data.root}); pass --fid PATH (Inception weights) for FID")


@torch.no_grad()
def reconstruction_metrics(first_stage, images, batch_size: int, device, lpips_weights: str = "") -> dict:
    recons = torch.cat([first_stage(chunk.to(device), sample=False)[0].clamp(-1, 1).cpu()
                        for chunk in images.split(batch_size)])
    results = {"psnr_db": psnr(recons, images).mean, "ssim": ssim(recons, images).mean}
    period = first_stage.cfg.factor
    if period > 1 and min(images.shape[-2:]) > period:
        # edges on the latent grid (1 = none; the held-out images' own value beside it)
        results.update(grid_ratio=grid_ratio(recons, period).mean, grid_ratio_images=grid_ratio(images, period).mean)
    if lpips_weights and Path(lpips_weights).expanduser().is_file():
        from ldm_fast.losses import LPIPS

        lpips = LPIPS.from_file(str(Path(lpips_weights).expanduser()))
        results["lpips"] = float(torch.cat([lpips(a, b) for a, b in zip(recons.split(batch_size),
                                                                          images.split(batch_size))]).mean())
    return results


@torch.no_grad()
def sample_metrics(pipe, reference, args) -> dict | None:
    """FD-shapes + precision/recall (procedural runs) and FID (with --fid) of len(reference)
    samples; None, after saying why, when no metric is valid for the run's data."""
    unavailable = fd_shapes_unavailable(pipe.cfg)
    if unavailable:
        print(unavailable)
        if not args.fid:
            return None
    out = pipe(n=len(reference), seed=args.seed, sampler=args.sampler, steps=args.steps, eta=args.eta,
               batch_size=args.batch_size, progress=not args.no_progress)
    samples = out.images
    results = {"sampler": out.metadata[0]["sampler"], "steps": out.metadata[0]["steps"]}
    if not unavailable:
        net = load_shapes_net(pipe.cfg.data.resolution)
        precision, recall = precision_recall(extract(net, reference).features, extract(net, samples).features)
        results.update({FD_NAME: fd_shapes(net, samples, reference), "precision": precision, "recall": recall})
    if args.fid:
        from ldm_fast.metrics.inception import fid

        results[f"fid_{args.fid_mode}"] = fid(samples, reference, args.fid, args.fid_mode, device=args.device)
    return results


def _main(argv=None) -> int:
    from ldm_fast.pipeline import Pipeline, sampling_defaults

    args = parse_args(argv)
    cli.sampling_kwargs(args)  # the shared checks (positive --n, --steps, --batch-size)
    cfg = load_config(args.ckpt)
    if args.fid and not Path(args.fid).expanduser().is_file():
        raise FileNotFoundError(f"--fid {args.fid}: no such Inception weights file")
    from ldm_fast.tasks import task_fields

    _, heldout = build_datasets(cfg.data, task_fields(cfg), run_dir=args.ckpt)  # the run's stored split
    reference = heldout_images(heldout, args.n)
    results = {"n": len(reference)}
    if cfg.autoencoder.kind != "identity":
        with ops.backend(args.kernels):
            results["autoencoder"] = reconstruction_metrics(load_first_stage(args.ckpt, args.device, cfg),
                                                            reference, args.batch_size, args.device,
                                                            cfg.autoencoder.lpips_weights)
    if not args.skip_samples and (Path(args.ckpt) / "ldm.safetensors").is_file():
        pipe = Pipeline.from_run_dir(args.ckpt, device=args.device, kernels=args.kernels)
        if pipe.conditioner is None:
            ldm = sample_metrics(pipe, reference, args)
            if ldm is not None:
                results["ldm"] = ldm
        else:
            from ldm_fast.tasks import evaluate_task

            d = sampling_defaults(cfg)
            results["task"] = evaluate_task(pipe.model, pipe.conditioner, heldout, n=args.n,
                                            guidance=d.guidance if args.guidance is None else args.guidance,
                                            sampler=args.sampler or d.sampler,
                                            steps=d.steps if args.steps is None else args.steps,
                                            seed=args.seed, batch_size=args.batch_size, photos=args.photos,
                                            sr_guidance=args.sr_guidance, kernels=pipe.kernels)
    if cfg.data.dataset != "procedural" and any(FD_NAME in v for v in results.values() if isinstance(v, dict)):
        results["note"] = (f"{FD_NAME} and precision/recall use a feature network trained on the procedural "
                           "shapes: on other images they compare runs, not datasets (--fid adds FID)")
    for section, values in results.items():
        if isinstance(values, dict):
            print(f"{section}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in values.items()))
    if "note" in results:
        print(f"note: {results['note']}")
    (Path(args.ckpt) / "eval.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {Path(args.ckpt) / 'eval.json'}")
    return 0


def main(argv=None) -> int:
    return cli.guarded(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
