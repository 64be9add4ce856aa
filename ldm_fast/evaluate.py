"""`python -m ldm_fast.evaluate --ckpt RUN_DIR`: how good is a trained run?

- First stage: reconstruction PSNR / SSIM on held-out images.
- Conditional runs: the task's metric (ldm_fast.tasks.evaluate_task: class accuracy guided vs
  unguided, prompt agreement, box-crop accuracy, mIoU, PSNR/SSIM vs bicubic, masked L1).
- Unconditional LDM: FD-shapes — the Fréchet distance between samples and held-out images in the features of
  the project's own small network trained on the procedural data (it is *not* FID; FID needs
  the Inception weights, see ldm_fast.metrics.inception), and precision/recall in those features.
Prints a table and writes RUN_DIR/eval.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ldm_fast import ops
from ldm_fast.data.build import build_datasets
from ldm_fast.generate import generate
from ldm_fast.metrics import FD_NAME, extract, fd_shapes, load_shapes_net, precision_recall, psnr, ssim
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
    return {FD_NAME: fd_shapes(net, samples, reference), "precision": precision, "recall": recall,
            "sampler": args.sampler, "steps": args.steps}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.ckpt)
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
