"""Where an SR run's latent-grid texture comes from: its latent error, split and decoded.

    python bench/sr_latent_error.py RUN_DIR [--n 128] [--out scores.json]

For the run's held-out images x, the SR model samples latents z_sr from their low-resolution
inputs; z = encode(x) are the first stage's own. The error e = z_sr - z is split into a smooth
part (2×2 average, bilinear back up) and the rest (cell to cell), and the first stage decodes
z + each part, z + e taken from other images (same error pattern, not aligned with this image)
and z + random noise of e's rms. Each is scored with PSNR and metrics.grid_ratio against x.
Also printed: the spread and cell-to-cell energy of z_sr beside z's; how much of e a per-cell
linear fit on the low-resolution pixel and its local detail explains (R²; concat conditioning
lays that pixel on the cell); the first stage's posterior std against the spread of its
latents (the largest perturbation its decoder saw in training); and e's neighbour correlation
along each axis.
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
from ldm_fast.metrics import grid_ratio, psnr  # noqa: E402
from ldm_fast.pipeline import Pipeline  # noqa: E402
from ldm_fast.run import load_config  # noqa: E402
from ldm_fast.tasks import task_fields, task_of  # noqa: E402


def smooth(z: torch.Tensor) -> torch.Tensor:
    """The part of z that varies slower than one cell: 2×2 means, bilinearly enlarged back."""
    return F.interpolate(F.avg_pool2d(z, 2), size=z.shape[-2:], mode="bilinear", align_corners=False)


def rms(t: torch.Tensor) -> float:
    return round(t.pow(2).mean().sqrt().item(), 4)


def r_squared(features: torch.Tensor, target: torch.Tensor) -> list[float]:
    """Per target channel, the variance a per-cell least-squares fit on `features` explains."""
    X = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    Y = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
    residual = Y - X @ torch.linalg.lstsq(X, Y).solution
    return [round(v, 4) for v in (1 - residual.pow(2).sum(0) / (Y - Y.mean(0)).pow(2).sum(0)).tolist()]


def neighbour_corr(e: torch.Tensor, dim: int) -> float:
    a, b = e.narrow(dim, 1, e.shape[dim] - 1), e.narrow(dim, 0, e.shape[dim] - 1)
    a, b = a - a.mean(), b - b.mean()
    return round(((a * b).mean() / (a.std() * b.std())).item(), 3)


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a trained --task sr run directory")
    ap.add_argument("--n", type=int, default=128, help="held-out images used (default 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the scores as JSON here")
    args = ap.parse_args(argv)
    cfg = load_config(args.run)
    if "lr" not in task_of(cfg).inputs:
        print(f"sr_latent_error: {args.run} is not a super-resolution run", file=sys.stderr)
        return 2
    _, heldout = build_datasets(cfg.data, task_fields(cfg), run_dir=args.run)
    x = torch.stack([heldout[i]["image"] for i in range(min(args.n, len(heldout)))])
    pipe = Pipeline.from_run_dir(args.run, device="cpu")
    model, period = pipe.model, cfg.autoencoder.factor
    lr = degrade(x, cfg.conditioning.degradation, cfg.conditioning.sr_factor, generator=args.seed)
    z_sr = pipe(lr=lr, n=len(x), seed=args.seed, progress=False).latents
    z = model.encode(x, sample=False)
    e = z_sr - z
    e_smooth = smooth(e)
    e_cells = e - e_smooth
    gen = torch.Generator().manual_seed(args.seed)
    other = torch.roll(e, 1, dims=0)  # each image gets its neighbour's error
    noise = torch.randn(e.shape, generator=gen) * rms(e)
    decoded = {
        "SR latents": z_sr, "first stage's own latents": z,
        "own + smooth part of the error": z + e_smooth, "own + cell-to-cell part": z + e_cells,
        "own + another image's error": z + other, "own + random noise of the error's rms": z + noise,
    }
    rows = {}
    for name, latents in decoded.items():
        y = model.decode(latents).clamp(-1, 1)
        rows[name] = {"psnr": round(psnr(y, x).mean, 2), "grid_ratio": round(grid_ratio(y, period).mean, 3)}
        print(f"{name:40s} PSNR {rows[name]['psnr']:6.2f}  grid ratio {rows[name]['grid_ratio']:.3f}")
    # The low-resolution input at latent size (its pixel per cell) and its local detail.
    lr_cells = F.interpolate(lr, size=z.shape[-2:], mode="area")
    detail = lr_cells - F.avg_pool2d(F.pad(lr_cells, (1, 1, 1, 1), mode="replicate"), 3, 1)
    features = torch.cat([lr_cells, detail, torch.ones_like(lr_cells[:, :1])], 1)
    result = {
        "run": str(args.run), "n": len(x), "decoded": rows,
        "latent_std": round(z.std().item(), 4),
        "error_rms": rms(e), "error_rms_smooth": rms(e_smooth), "error_rms_cell_to_cell": rms(e_cells),
        # Are the SR latents' statistics right, only their content wrong?
        "std_per_channel": {"sr": [round(v, 3) for v in z_sr.std((0, 2, 3)).tolist()],
                            "own": [round(v, 3) for v in z.std((0, 2, 3)).tolist()]},
        "rms_cell_to_cell": {"sr": rms(z_sr - smooth(z_sr)), "own": rms(z - smooth(z))},
        "r2_error_on_lr_pixel": r_squared(features, e),
        "r2_latent_on_lr_pixel": r_squared(features, z),
        "error_neighbour_corr": {"x": neighbour_corr(e, 3), "y": neighbour_corr(e, 2)},
        "latent_neighbour_corr": {"x": neighbour_corr(z, 3), "y": neighbour_corr(z, 2)},
    }
    if cfg.autoencoder.kind == "kl":  # the decoder never saw latents perturbed by more than this
        posterior = model.first_stage.encode(x)
        result["posterior_std_over_latent_std"] = float(f"{(posterior.std.median() / posterior.mean.std()).item():.3g}")
    for key, value in result.items():
        if key not in ("run", "n", "decoded"):
            print(f"{key}: {value}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
