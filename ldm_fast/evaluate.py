"""`python -m ldm_fast.evaluate --ckpt RUN_DIR`: how good is a trained run?

- First stage: reconstruction PSNR / SSIM on held-out images.
- Conditional runs: the task's metric (ldm_fast.tasks.evaluate_task: class accuracy guided vs
  unguided, prompt agreement, box-crop accuracy, mIoU, PSNR/SSIM vs bicubic, masked L1).
- Unconditional LDM: FD-shapes — the Fréchet distance between samples and held-out images in the features of
  the project's own small network trained on the procedural data (it is *not* FID; FID needs
  the Inception weights, see ldm_fast.metrics.inception), and precision/recall in those features;
  with `--fid PATH` (or $LDM_FID_INCEPTION) also FID, preprocessed as torch-fidelity does
  (`--fid-mode` pytorch-fid / clean-fid for the others).
Prints a table and writes RUN_DIR/eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ldm_fast import ops
from ldm_fast.data.build import build_datasets
from ldm_fast.generate import generate
from ldm_fast.metrics import (FD_NAME, FID_DEFAULT_MODE, FID_MODES, extract, fd_shapes, load_shapes_net,
                              precision_recall, psnr, ssim)
from ldm_fast.metrics.inception import ENV_VAR as FID_ENV
from ldm_fast.run import load_config, load_first_stage, load_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ldm_fast.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run directory")
    p.add_argument("--n", type=int, default=256, help="held-out images and samples compared")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kernels", choices=ops.BACKENDS)
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale for the task metric")
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
    return p.parse_args(argv)


def heldout_images(dataset, n: int) -> torch.Tensor:
    n = min(n, len(dataset))
    return torch.stack([dataset[i]["image"] for i in range(n)])


@torch.no_grad()
def reconstruction_metrics(first_stage, images, batch_size: int, device) -> dict:
    recons = torch.cat([first_stage(chunk.to(device), sample=False)[0].clamp(-1, 1).cpu()
                        for chunk in images.split(batch_size)])
    return {"psnr_db": psnr(recons, images).mean, "ssim": ssim(recons, images).mean}


@torch.no_grad()
def sample_metrics(model, reference, args) -> dict:
    samples = []
    for i, chunk in enumerate(range(0, len(reference), args.batch_size)):
        n = min(args.batch_size, len(reference) - chunk)
        samples.append(generate(model, n, args.sampler, args.steps, seed=args.seed + i).cpu())
    samples = torch.cat(samples)
    net = load_shapes_net(model.cfg.data.resolution)
    precision, recall = precision_recall(extract(net, reference).features, extract(net, samples).features)
    out = {FD_NAME: fd_shapes(net, samples, reference), "precision": precision, "recall": recall,
           "sampler": args.sampler, "steps": args.steps}
    if args.fid:
        from ldm_fast.metrics.inception import fid

        out[f"fid_{args.fid_mode}"] = fid(samples, reference, args.fid, args.fid_mode, device=args.device)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.ckpt)
        if args.fid and not Path(args.fid).expanduser().is_file():
            raise FileNotFoundError(f"--fid {args.fid}: no such Inception weights file")
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ops.set_backend(args.kernels)
    from ldm_fast.tasks import task_fields

    _, heldout = build_datasets(cfg.data, task_fields(cfg))
    reference = heldout_images(heldout, args.n)
    results = {"n": len(reference)}
    if cfg.autoencoder.kind != "identity":
        results["autoencoder"] = reconstruction_metrics(load_first_stage(args.ckpt, args.device, cfg),
                                                        reference, args.batch_size, args.device)
    if not args.skip_samples and (Path(args.ckpt) / "ldm.safetensors").is_file():
        model, cond_state = load_model(args.ckpt, args.device)
        if cfg.conditioning.task == "unconditional":
            results["ldm"] = sample_metrics(model, reference, args)
        else:
            from ldm_fast.tasks import evaluate_task, load_conditioner

            conditioner = load_conditioner(args.ckpt, model, cond_state, device=args.device)
            results["task"] = evaluate_task(model, conditioner, heldout, n=args.n, guidance=args.guidance,
                                            sampler=args.sampler, steps=args.steps, seed=args.seed,
                                            batch_size=args.batch_size, photos=args.photos,
                                            sr_guidance=args.sr_guidance)
    for section, values in results.items():
        if isinstance(values, dict):
            print(f"{section}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in values.items()))
    (Path(args.ckpt) / "eval.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {Path(args.ckpt) / 'eval.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
