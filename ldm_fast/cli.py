"""What the sampling CLIs share: one flag vocabulary (sample, deploy, evaluate), reading the
task inputs from files, writing PNGs with their metadata, and errors as one line.

Flags (names as in the original txt2img.py and diffusers): --prompt / --negative-prompt
(repeatable: one per image, cycled when fewer than --n), --class 3 7 (or 3,7), --boxes
"x0,y0,x1,y1,c;…" (repeatable: one layout per image), --semantic / --lr / --image / --mask
(image files), --n, --batch-size, --sampler, --steps, --eta, --guidance, --seed, --height /
--width (pixels), --tile, --outdir (one PNG per image + grid.png) or --out (the grid only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ldm_fast.checkpoint import CheckpointError

# The project's own errors: a bad flag, file, checkpoint or config. A CLI prints them as one
# line and exits with 2; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ImportError,
               NotImplementedError, CheckpointError)


def guarded(main, argv=None) -> int:
    """Run main(argv); a user error becomes `error: …` on stderr and exit status 2."""
    try:
        return main(argv)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def add_sampling_args(p, *, inputs: bool = True, outputs: bool = True, n_default: int | None = None) -> None:
    """The shared sampling flags; `inputs`: the task-input flags, `outputs`: where PNGs go."""
    import torch

    from ldm_fast import ops
    from ldm_fast.pipeline import SamplingDefaults
    from ldm_fast.samplers import SAMPLERS, SPACINGS

    d = SamplingDefaults()
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=n_default,
                   help=f"number of images (default: {n_default})" if n_default else
                   "number of images (default: one per given input, else 16)")
    g.add_argument("--batch-size", type=int, help="images per sampler batch (default: all at once)")
    g.add_argument("--sampler", choices=sorted(SAMPLERS), help=f"default {d.sampler}")
    g.add_argument("--steps", type=int, help=f"sampler steps (default {d.steps})")
    g.add_argument("--eta", type=float, help=f"DDIM stochasticity (default {d.eta}: deterministic)")
    g.add_argument("--spacing", choices=SPACINGS,
                   help="timestep grid (default: the run's config; a converted checkpoint: its original's)")
    g.add_argument("--guidance", type=float,
                   help=f"classifier-free guidance scale (default {d.guidance} where the task has a null "
                        "condition; 1 = off)")
    g.add_argument("--seed", type=int, default=0, help="image i starts from the noise of seed + i")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--kernels", choices=ops.BACKENDS, help="eager | triton | auto (default: the run's config)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="replay each denoising step as a CUDA graph (CUDA, PyTorch backend)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")
    if outputs:
        g.add_argument("--height", type=int, help="image height in pixels (default: the training resolution)")
        g.add_argument("--width", type=int, help="image width in pixels (default: the training resolution)")
        g.add_argument("--tile", type=int, default=0, help="decode in tiles of this many latent pixels (0 = whole)")
        g.add_argument("--outdir", help="write one PNG per image (with its metadata) and grid.png here")
        g.add_argument("--out", help="write the grid to this PNG (default samples.png without --outdir)")
        g.add_argument("--nrow", type=int, help="images per grid row")
    if inputs:
        t = p.add_argument_group("task inputs")
        t.add_argument("--prompt", action="append", help="text prompt (repeat for one per image)")
        t.add_argument("--negative-prompt", action="append",
                       help="prompt the guidance steers away from (replaces the empty prompt)")
        t.add_argument("--class", dest="class_labels", nargs="+", help="class id(s): 3 7 12 or 3,7,12")
        t.add_argument("--boxes", action="append",
                       help='one layout "x0,y0,x1,y1,class;…" (coordinates in [0, 1]); repeat per image')
        t.add_argument("--semantic", help="semantic map (8-bit image of class ids, or .npy)")
        t.add_argument("--lr", help="low-resolution image for super-resolution")
        t.add_argument("--image", help="image to inpaint")
        t.add_argument("--mask", help="inpainting mask (white = region to fill)")
        t.add_argument("--sr-guidance", type=float, default=0.0,
                       help="super-resolution: post-hoc image guidance toward the low-res input")


def _open_image(path: str):
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    return Image.open(path)


def _layout(text: str) -> list:
    """'x0,y0,x1,y1,c;…' → [(x0, y0, x1, y1, c), …]."""
    boxes = []
    for box in (b for b in text.split(";") if b.strip()):
        values = box.split(",")
        if len(values) != 5:
            raise ValueError(f"--boxes {text!r}: each box needs 5 numbers x0,y0,x1,y1,class")
        try:
            boxes.append((*(float(v) for v in values[:4]), int(values[4])))
        except ValueError:
            raise ValueError(f"--boxes {text!r}: not numbers") from None
    return boxes


def _classes(values: list[str]) -> list[int]:
    try:
        return [int(c) for v in values for c in v.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--class {' '.join(values)}: class ids are integers") from None


def pipeline_inputs(args) -> dict:
    """The task inputs given on the command line, as Pipeline keywords."""
    out = {}
    if args.prompt:
        out["prompt"] = list(args.prompt)
    if args.negative_prompt:
        out["negative_prompt"] = list(args.negative_prompt)
    if args.class_labels:
        out["class_labels"] = _classes(args.class_labels)
    if args.boxes:
        out["boxes"] = [_layout(b) for b in args.boxes]
    if args.semantic:
        if args.semantic.endswith(".npy"):
            import torch

            out["semantic"] = torch.from_numpy(np.asarray(np.load(args.semantic), dtype=np.int64))
        else:
            out["semantic"] = _open_image(args.semantic)
    if args.lr:
        out["lr"] = _open_image(args.lr)
    if args.image or args.mask:
        if not (args.image and args.mask):
            raise ValueError("inpainting needs both --image and --mask")
        out["image"], out["mask"] = _open_image(args.image), _open_image(args.mask)
    return out


def sampling_kwargs(args) -> dict:
    """The shared sampling flags as Pipeline keywords."""
    for name in ("n", "steps", "batch_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    out = {"n": args.n, "seed": args.seed, "sampler": args.sampler, "steps": args.steps, "eta": args.eta,
           "guidance": args.guidance, "batch_size": args.batch_size, "progress": not args.no_progress}
    for name in ("height", "width", "tile", "sr_guidance", "spacing"):
        if getattr(args, name, None):
            out[name] = getattr(args, name)
    return out


def write_outputs(result, args) -> list[Path]:
    """--outdir: DIR/00000.png … (each with its prompt, seed, sampler, steps, guidance and model
    in PNG text chunks) and DIR/grid.png; --out: the grid there. Returns the paths written."""
    from ldm_fast.images import save_grid, save_png, to_uint8

    images = result.images
    # Grids of the tiny models' 32² images are enlarged (nearest) to be visible; one image is
    # written at its true size, since ×4 pixel blocks would look like a grid texture in it.
    upscale = 4 if images.shape[-1] <= 64 and len(images) > 1 else 1
    shared = {k: v for k, v in result.metadata[0].items() if k in ("model", "backend", "sampler", "steps",
                                                                   "eta", "guidance")}
    shared["seeds"] = f"{result.seeds[0]}…{result.seeds[-1]}" if len(result.seeds) > 1 else str(result.seeds[0])
    written = []
    if args.outdir:
        outdir = Path(args.outdir)
        for i, (array, meta) in enumerate(zip(to_uint8(images), result.metadata)):
            written.append(save_png(array, outdir / f"{i:05d}.png", text=meta))
        written.append(save_grid(images, outdir / "grid.png", nrow=args.nrow, upscale=upscale, text=shared))
    if args.out or not args.outdir:
        written.append(save_grid(images, args.out or "samples.png", nrow=args.nrow, upscale=upscale, text=shared))
    return written


def png_text(path) -> dict:
    """The text chunks of a PNG (what write_outputs stored)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return dict(img.text)


def describe(result, written: list[Path], seconds: float) -> str:
    where = written[0].parent if len(written) > 1 else written[0]
    return (f"wrote {len(result.images)} images of {result.images.shape[-2]}x{result.images.shape[-1]} "
            f"to {Path(where).resolve()} in {seconds:.1f} s")

