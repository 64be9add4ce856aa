"""`python -m ldm_fast.sample --ckpt RUN_DIR`: draw images from a trained run into a PNG grid.

Same flags, same seed → same image (the noise and every stochastic update come from one
seeded generator).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ldm_fast import ops
from ldm_fast.generate import generate
from ldm_fast.images import save_grid
from ldm_fast.run import load_model
from ldm_fast.samplers import SAMPLERS


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ldm_fast.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run directory written by ldm_fast.train")
    p.add_argument("--n", type=int, default=16, help="number of images")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    p.add_argument("--nrow", type=int, help="images per grid row")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kernels", choices=ops.BACKENDS, help="eager | triton | auto")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.n < 1 or args.steps < 1:
        print("error: --n and --steps must be positive", file=sys.stderr)
        return 2
    try:
        model, _ = load_model(args.ckpt, args.device)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ops.set_backend(args.kernels or (None if model.cfg.kernels == "auto" else model.cfg.kernels))
    images = generate(model, n=args.n, sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed)
    path = save_grid(images, args.out, nrow=args.nrow, upscale=4 if images.shape[-1] <= 64 else 1)
    print(f"wrote {len(images)} samples to {Path(path).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
