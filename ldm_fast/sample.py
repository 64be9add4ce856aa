"""`python -m ldm_fast.sample --ckpt RUN_DIR`: draw images from a trained run into a PNG grid.

Same flags, same seed → same image (the noise and every stochastic update come from one
seeded generator). Conditional runs take their task's inputs:

  class      --class 3,7,12            (ids; --guidance for classifier-free guidance)
  text       --prompt "a large red circle on a plain background"  (repeatable)
  layout     --boxes "0.1,0.1,0.5,0.5,3;0.6,0.6,0.9,0.9,8"        (x0,y0,x1,y1,class per box)
  semantic   --semantic map.png        (an 8-bit image of class ids, or .npy)
  sr         --lr low_res.png
  inpaint    --image photo.png --mask mask.png   (mask: white = fill)
Without inputs, held-out procedural inputs are used (the grid `train` writes). `--height` and
`--width` sample larger than the training size (convolutional sampling); `--tile` decodes in
tiles so memory stays bounded.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_fast import ops
from ldm_fast.data.build import build_datasets
from ldm_fast.images import save_grid
from ldm_fast.run import load_model
from ldm_fast.samplers import SAMPLERS, SPACINGS
from ldm_fast.tasks import load_conditioner, paste_known, task_dataset, task_fields


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ldm_fast.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run directory written by ldm_fast.train")
    p.add_argument("--n", type=int, default=16, help="number of images")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--spacing", choices=SPACINGS,
                   help="timestep grid (default: the run's config; a converted checkpoint: its original's)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale (1 = off; default 3 where the task has a null condition)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    p.add_argument("--nrow", type=int, help="images per grid row")
    p.add_argument("--height", type=int, help="image height (default: the training resolution)")
    p.add_argument("--width", type=int, help="image width (default: the training resolution)")
    p.add_argument("--tile", type=int, default=0, help="decode in tiles of this many latent pixels (0 = whole)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kernels", choices=ops.BACKENDS, help="eager | triton | auto")
    p.add_argument("--task", help="check that the run was trained for this task")
    inputs = p.add_argument_group("task inputs")
    inputs.add_argument("--class", dest="classes", help="comma-separated class ids")
    inputs.add_argument("--prompt", dest="prompts", action="append", help="text prompt (repeatable)")
    inputs.add_argument("--boxes", help="x0,y0,x1,y1,class per box, boxes separated by ';'")
    inputs.add_argument("--semantic", help="semantic map (8-bit image of class ids or .npy)")
    inputs.add_argument("--lr", help="low-resolution image for super-resolution")
    inputs.add_argument("--image", help="image to inpaint")
    inputs.add_argument("--mask", help="inpainting mask (white = region to fill)")
    inputs.add_argument("--sr-guidance", type=float, default=0.0,
                        help="post-hoc image guidance toward the low-res input (super-resolution)")
    return p.parse_args(argv)


def _image(path: str) -> torch.Tensor:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def user_inputs(args) -> dict:
    """The task inputs given on the command line, as tensors/lists encode_inputs takes."""
    out = {}
    if args.classes:
        out["classes"] = torch.tensor([int(c) for c in args.classes.split(",")])
    if args.prompts:
        out["prompts"] = list(args.prompts)
    if args.boxes:
        boxes = [[float(v) for v in box.split(",")] for box in args.boxes.split(";") if box.strip()]
        if any(len(b) != 5 for b in boxes):
            raise ValueError("--boxes: each box needs 5 numbers x0,y0,x1,y1,class")
        out["boxes"] = [[(b[0], b[1], b[2], b[3], int(b[4])) for b in boxes]]
    if args.semantic:
        arr = np.load(args.semantic) if args.semantic.endswith(".npy") else np.asarray(Image.open(args.semantic))
        out["semantic"] = torch.from_numpy(np.asarray(arr, dtype=np.int64))[None]
    if args.lr:
        out["lr"] = _image(args.lr)
    if args.image or args.mask:
        if not (args.image and args.mask):
            raise ValueError("inpainting needs both --image and --mask")
        out["image"] = _image(args.image)
        out["mask"] = (torch.from_numpy(np.asarray(Image.open(args.mask).convert("L"), dtype=np.float32)) > 127) \
            .float()[None, None]
    return out


def heldout_inputs(cfg, conditioner, n: int) -> dict:
    """Inputs taken from held-out items, for each name the conditioner needs (cycled when the
    held-out set is smaller than n)."""
    _, heldout = build_datasets(cfg.data, task_fields(cfg))
    paired = task_dataset(cfg, heldout)
    items = [paired[i % len(heldout)] for i in range(n)]
    take = {
        "classes": lambda: torch.stack([it["label"] for it in items]),
        "prompts": lambda: [it["caption"] for it in items],
        "boxes": lambda: [[(*b.tolist(), int(c)) for b, c in zip(it["boxes"], it["box_labels"]) if c >= 0]
                          for it in items],
        "semantic": lambda: torch.stack([it["segmentation"] for it in items]),
        "lr": lambda: torch.stack([it["lr"] for it in items]),
        "image": lambda: torch.stack([it["image"] for it in items]),
        "mask": lambda: torch.stack([it["mask"] for it in items]),
    }
    return {name: take[name]() for name in conditioner.inputs}


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.n < 1 or args.steps < 1:
        print("error: --n and --steps must be positive", file=sys.stderr)
        return 2
    try:
        model, cond_state = load_model(args.ckpt, args.device)
        cfg = model.cfg
        if args.task and args.task != cfg.conditioning.task:
            raise ValueError(f"--task {args.task}: this run was trained for {cfg.conditioning.task!r}")
        ops.set_backend(args.kernels or (None if cfg.kernels == "auto" else cfg.kernels))
        from ldm_fast.generate import generate

        conditioner = load_conditioner(args.ckpt, model, cond_state, device=args.device) \
            if cfg.conditioning.task != "unconditional" else None
        cond = uncond = None
        inputs = user_inputs(args)
        if conditioner is not None:
            inputs = inputs or heldout_inputs(cfg, conditioner, args.n)
            cond, uncond = conditioner.encode_inputs(**inputs, n=args.n)
            if args.guidance not in (None, 1.0) and not conditioner.supports_guidance:
                raise ValueError(f"task {cfg.conditioning.task!r} ({cfg.conditioning.mode}) has no null "
                                 "condition, so --guidance cannot apply; leave it out")
        elif inputs:
            raise ValueError("this run is unconditional: it takes no task inputs")
        n = next(iter(cond.values())).shape[0] if cond else args.n
        f = model.factor
        height, width = args.height or cfg.data.resolution, args.width or cfg.data.resolution
        if height % f or width % f:
            raise ValueError(f"--height/--width must be multiples of the first stage's factor {f}")
        latent_size = (conditioner.latent_size(cond) if conditioner else None) or (height // f, width // f)
        sampling_model = model
        if args.sr_guidance > 0:
            from ldm_fast.tasks import SRImageGuidance

            sampling_model = SRImageGuidance(model, inputs["lr"], scale=args.sr_guidance)
        images, z = generate(sampling_model, n=n, sampler=args.sampler, steps=args.steps, eta=args.eta,
                             seed=args.seed, cond=cond, uncond=uncond,
                             guidance=args.guidance if args.guidance is not None else (3.0 if uncond else 1.0),
                             latent_size=latent_size, return_latents=True, tile=args.tile, spacing=args.spacing)
        if cfg.conditioning.task == "inpaint":
            images = paste_known(images, inputs["image"].expand_as(images), inputs["mask"].expand(n, -1, -1, -1))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = save_grid(images, args.out, nrow=args.nrow, upscale=4 if images.shape[-1] <= 64 else 1)
    print(f"wrote {len(images)} samples of {images.shape[-2]}x{images.shape[-1]} to {Path(path).resolve()} "
          f"(peak memory {peak_memory_mb(args.device):.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
