"""Super-resolution (the paper's ×4 ImageNet model): the low-resolution image concatenated to
z_t on the latent grid; metric: PSNR/SSIM and FD-shapes against bicubic upsampling (optionally
with post-hoc image guidance, and on real photographs)."""

import numpy as np
import torch
import torch.nn.functional as F

from ldm_fast.tasks.registry import Task, register


def _configure(cfg, mode):
    cfg.conditioning.sr_factor, cfg.conditioning.degradation = 4, "bicubic"
    cfg.unet.in_channels = cfg.autoencoder.z_channels + 3  # f = 4, ×4: the LR image is on the latent grid as is


def _pair(cfg, dataset, seed):
    from ldm_fast.data.degradations import SuperResolutionPairs

    return SuperResolutionPairs(dataset, cfg.conditioning.degradation, cfg.conditioning.sr_factor, seed)


def _parts(cfg, model, device):
    from ldm_fast.tasks.parts import _SRPart

    return [_SRPart(cfg.conditioning.sr_factor, cfg.autoencoder.factor, device)], 3, None


def real_photos(resolution: int) -> torch.Tensor | None:
    """Real photographs that ship with scikit-image (astronaut, coffee, chelsea, rocket) as
    (N, 3, res, res) in [-1, 1]: each centre square at res, and its four quarters at 2·res
    detail. None when scikit-image is not installed."""
    try:
        from skimage import data
    except ImportError:
        return None
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = torch.from_numpy(np.ascontiguousarray(getattr(data, name)()[..., :3])).permute(2, 0, 1).float()
        side = min(img.shape[-2:])
        top, left = (img.shape[1] - side) // 2, (img.shape[2] - side) // 2
        square = (img[None, :, top:top + side, left:left + side] / 127.5 - 1)
        for scale in (1, 2):
            x = F.interpolate(square, size=(resolution * scale,) * 2, mode="bicubic", antialias=True,
                              align_corners=False).clamp(-1, 1)
            out += [x[..., r:r + resolution, c:c + resolution] for r in range(0, resolution * scale, resolution)
                    for c in range(0, resolution * scale, resolution)]
    return torch.cat(out)


def _sr_scores(hr, sr, bicubic, period: int, prefix: str = "") -> dict:
    from ldm_fast.metrics import grid_ratio, psnr, ssim

    res = {f"{prefix}psnr": psnr(sr, hr).mean, f"{prefix}psnr_bicubic": psnr(bicubic, hr).mean}
    if min(hr.shape[-2:]) >= 11:  # SSIM's 11×11 window
        res.update({f"{prefix}ssim": ssim(sr, hr).mean, f"{prefix}ssim_bicubic": ssim(bicubic, hr).mean})
    if period > 1 and min(hr.shape[-2:]) > period:
        # edges on the latent grid: the samples' blotches show here (1 = none; the targets' own beside)
        res.update({f"{prefix}grid_ratio": grid_ratio(sr, period).mean,
                    f"{prefix}grid_ratio_target": grid_ratio(hr, period).mean})
    return res


def _metric(ctx) -> dict:
    from ldm_fast.data.degradations import degrade
    from ldm_fast.metrics import FD_NAME, fd_shapes

    cc = ctx.conditioner.cfg.conditioning
    period = ctx.conditioner.cfg.autoencoder.factor

    def run(hr, seed, image_guidance=0.0):
        lr = degrade(hr, cc.degradation, cc.sr_factor, generator=seed)
        bicubic = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
        return ctx.sample({"lr": lr}, 1.0, n=len(hr), image_guidance=image_guidance), bicubic

    hr = ctx.batch["image"]
    sr, bicubic = run(hr, ctx.seed)
    res = _sr_scores(hr, sr, bicubic, period)
    res.update({FD_NAME: fd_shapes(ctx.net, sr, hr), f"{FD_NAME}_bicubic": fd_shapes(ctx.net, bicubic, hr)})
    if ctx.sr_guidance > 0:  # the same inputs and seeds, pulled toward the LR input
        guided, _ = run(hr, ctx.seed, ctx.sr_guidance)
        scores = _sr_scores(hr, guided, bicubic, period)
        res.update({f"{k}_image_guided": v for k, v in scores.items() if not k.endswith(("_bicubic", "_target"))})
        res[f"{FD_NAME}_image_guided"] = fd_shapes(ctx.net, guided, hr)
    if ctx.photos:
        photos = real_photos(hr.shape[-1])
        if photos is None:
            res["photo_count"] = 0  # scikit-image is not installed
        else:
            sr_p, bic_p = run(photos, ctx.seed + 1)
            res.update(_sr_scores(photos, sr_p, bic_p, period, prefix="photo_"))
            res["photo_count"] = len(photos)
    return res


TASK = register(Task(
    name="sr", order=5, modes=("concat", "hybrid"), inputs=("lr",), concat=True, per_sample_pairs=True,
    configure=_configure, pair=_pair, parts=_parts, metric=_metric, export_part="sr",
    heldout=lambda items: {"lr": torch.stack([it["lr"] for it in items])}))
