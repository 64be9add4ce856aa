"""Super-resolution ×4 on photographs, shown and scored beside what bounds it.

    python bench/sr_figure.py RUN_DIR bench/results/real-photos-sr.png [--photos | --n 16]

RUN_DIR is a trained `--task sr` run. Rows of the figure, for the same images:
  1. the low-resolution input (nearest-neighbour enlarged, so its pixels show),
  2. bicubic upsampling of it,
  3. the LDM's super-resolution (DDIM, the run's defaults),
  4. the first stage's reconstruction of the high-resolution target — encode, then decode: the
     best any latent the LDM can sample decodes to, so its artefacts (blur, edges on the latent
     grid, colour shifts) are the floor of the LDM's,
  5. the target.
Each row is also scored (PSNR / SSIM against the target, and metrics.grid_ratio: edges on the
latent grid against edges elsewhere, 1 = none) and the scores are printed and written beside
the figure as JSON. Images: the run's held-out split (first --n), or with --photos the
photographs `evaluate --photos` scores (scikit-image's astronaut, coffee, chelsea, rocket).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_fast.data.build import build_datasets  # noqa: E402
from ldm_fast.data.degradations import degrade  # noqa: E402
from ldm_fast.images import save_grid  # noqa: E402
from ldm_fast.metrics import grid_ratio, psnr, ssim  # noqa: E402
from ldm_fast.pipeline import Pipeline  # noqa: E402
from ldm_fast.run import load_config  # noqa: E402
from ldm_fast.tasks import task_fields, task_of  # noqa: E402
from ldm_fast.tasks.kinds.sr import real_photos  # noqa: E402


def scores(x: torch.Tensor, target: torch.Tensor, period: int, blocks: bool = False) -> dict:
    """PSNR/SSIM against the target and the grid ratio; None for `blocks` (the nearest-neighbour
    enlarged input is made of f×f blocks by construction, so its ratio is unbounded)."""
    return {"psnr": round(psnr(x, target).mean, 2), "ssim": round(ssim(x, target).mean, 3),
            "grid_ratio": None if blocks else round(grid_ratio(x, period).mean, 3)}


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a trained --task sr run directory")
    ap.add_argument("out", help="the figure (PNG); the scores go to the same name with .json")
    ap.add_argument("--photos", action="store_true", help="the scikit-image photographs instead of held-out images")
    ap.add_argument("--n", type=int, default=16, help="held-out images shown (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = load_config(args.run)
    if "lr" not in task_of(cfg).inputs:
        print(f"sr_figure: {args.run} is not a super-resolution run", file=sys.stderr)
        return 2
    if args.photos:
        target = real_photos(cfg.data.resolution)
        if target is None:
            print("sr_figure: --photos needs scikit-image", file=sys.stderr)
            return 2
    else:
        _, heldout = build_datasets(cfg.data, task_fields(cfg), run_dir=args.run)
        target = torch.stack([heldout[i]["image"] for i in range(min(args.n, len(heldout)))])
    pipe = Pipeline.from_run_dir(args.run, device="cpu")
    factor, period = cfg.conditioning.sr_factor, cfg.autoencoder.factor
    lr = degrade(target, cfg.conditioning.degradation, factor, generator=args.seed)
    rows = {
        "low-resolution input": F.interpolate(lr, scale_factor=factor, mode="nearest"),
        "bicubic": F.interpolate(lr, size=target.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1),
        "LDM super-resolution": pipe(lr=lr, n=len(target), seed=args.seed, progress=False).images,
        "first-stage reconstruction of the target":
            pipe.model.decode(pipe.model.encode(target, sample=False)).clamp(-1, 1),
        "target": target,
    }
    result = {"run": str(args.run), "images": "photos" if args.photos else "held-out", "n": len(target),
              "rows": {name: scores(x, target, period, blocks=name == "low-resolution input")
                       for name, x in rows.items()}}
    for name, s in result["rows"].items():
        grid = "—" if s["grid_ratio"] is None else f"{s['grid_ratio']:.3f}"
        print(f"{name:42s} PSNR {s['psnr']:6.2f}  SSIM {s['ssim']:.3f}  grid ratio {grid}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(torch.cat(list(rows.values())), out, nrow=len(target), upscale=4,
              text={"rows": " | ".join(rows), "run": str(args.run)})
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
