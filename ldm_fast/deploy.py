"""`python -m ldm_fast.deploy --engine-dir DIR --backend onnxruntime --n 4 --steps 25 --out grid.png`:
sample from an export folder (written by `python -m ldm_fast.export`).

The whole loop runs from the exported files: conditioning encoder (class ids / prompt tokens /
layout tokens → context), UNet steps with classifier-free guidance (--guidance G ≠ 1 doubles
the batch with the null condition), the sampler update (ldm_fast.samplers; the fused Triton
step kernel on CUDA), the decoder, and the PNG grid. Backends: onnxruntime (the .onnx graphs,
CPU), tensorrt (DIR/engines, checked against their sidecars first), torch (the original run
directory recorded in DIR/manifest.json, or --run-dir). Same seed → same images across
backends, up to the graphs' arithmetic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ldm_fast import ops
from ldm_fast.images import save_grid
from ldm_fast.samplers import SAMPLERS


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ldm_fast.deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True, help="export folder (manifest.json, *.onnx, engines/)")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="onnxruntime")
    p.add_argument("--n", type=int, default=4, help="number of images")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--class", dest="classes", type=int, nargs="+", help="class id(s): one, or one per image")
    p.add_argument("--prompt", dest="prompts", nargs="+", help="text prompt(s): one, or one per image")
    p.add_argument("--layout", help="JSON list of boxes [[x0, y0, x1, y1, class], …] (or a file holding it)")
    p.add_argument("--lr", help="super-resolution: the low-resolution input image file")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="latent size (default: the config's)")
    p.add_argument("--out", default="grid.png")
    p.add_argument("--nrow", type=int)
    p.add_argument("--run-dir", help="torch backend: the run directory, if not where the manifest says")
    p.add_argument("--device", help="torch backend device (default cuda if available)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="tensorrt: plain enqueue, no graph replay")
    p.add_argument("--kernels", choices=ops.BACKENDS, help="sampler-step kernels: eager | triton | auto")
    return p.parse_args(argv)


def _load_image(path) -> torch.Tensor:
    from PIL import Image

    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def _layout(text: str):
    p = Path(text)
    return json.loads(p.read_text() if p.is_file() else text)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ldm_fast.export.runtime import load_deployment

    if args.n < 1 or args.steps < 1:
        print("error: --n and --steps must be positive", file=sys.stderr)
        return 2
    if args.kernels:
        ops.set_backend(args.kernels)
    try:
        dep = load_deployment(args.engine_dir, args.backend, device=args.device, run_dir=args.run_dir,
                              cuda_graphs=not args.no_cuda_graphs)
    except (FileNotFoundError, ImportError, NotImplementedError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    inputs = {"classes": args.classes, "prompts": args.prompts,
              "boxes": _layout(args.layout) if args.layout else None,
              "lr": _load_image(args.lr) if args.lr else None}
    t0 = time.perf_counter()
    try:
        images = dep.generate(args.n, sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed,
                              guidance=args.guidance, latent_size=args.size, **inputs)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    path = save_grid(images, args.out, nrow=args.nrow, upscale=4 if images.shape[-1] <= 64 else 1)
    print(f"{args.backend}: {len(images)} images in {seconds:.2f} s → {Path(path).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
