"""Inpainting (the paper's Places model): the encoded masked image and the mask concatenated
to z_t, the known pixels pasted back into the decoded sample; metric: L1 inside the mask and
FD-shapes, each against filling the hole with the mean known colour."""

import numpy as np
import torch

from ldm_fast.tasks.registry import Task, register


def _configure(cfg, mode):
    cfg.unet.in_channels = 2 * cfg.autoencoder.z_channels + 1  # latent + encoded masked image + mask
    cfg.diffusion.loss = "l1"  # the paper's inpainting model


def _pair(cfg, dataset, seed):
    from ldm_fast.data.masks import InpaintingPairs

    # Boxes and strokes covering 10–60%: a spread around the 40–50% of the evaluation.
    return InpaintingPairs(dataset, kind="fraction", fraction=(0.1, 0.6), seed=seed)


def _parts(cfg, model, device):
    from ldm_fast.conditioning import InpaintingConcat
    from ldm_fast.tasks.parts import _InpaintPart, first_stage_of

    if model is None:
        raise ValueError("inpainting conditioning encodes the masked image: pass the model or its first stage")
    known = not (cfg.diffusion.scale_by_std and cfg.autoencoder.kind == "kl")
    concat = InpaintingConcat(first_stage_of(model), cfg.autoencoder.factor,
                              cfg.diffusion.scale_factor if known else None,
                              inputs=cfg.conditioning.inpaint_inputs)
    return [_InpaintPart(concat)], cfg.unet.out_channels + 1, None


def _metric(ctx) -> dict:
    from ldm_fast.data.masks import fraction_mask
    from ldm_fast.metrics import FD_NAME, fd_shapes

    images = ctx.batch["image"]
    h, w = images.shape[-2:]
    rng = np.random.default_rng(ctx.seed)
    masks = torch.stack([fraction_mask(h, w, (0.4, 0.5), generator=rng) for _ in range(len(images))])
    out = ctx.sample({"image": images, "mask": masks}, 1.0)  # the known pixels pasted back
    # Baseline: the masked region filled with the mean colour of each image's known pixels.
    known = (images * (1 - masks)).sum((2, 3), keepdim=True) / (1 - masks).sum((2, 3), keepdim=True).clamp_min(1)
    mean_fill = images * (1 - masks) + known * masks

    def l1_inside(x):  # mean |x − original| over masked pixels, in [0, 1] intensity units
        return float(((x - images).abs() * masks).sum() / (3 * masks.sum()).clamp_min(1) / 2)

    return {"l1_masked": l1_inside(out), "l1_masked_mean_fill": l1_inside(mean_fill),
            "masked_fraction": float(masks.mean()), FD_NAME: fd_shapes(ctx.net, out, images),
            # L1 rewards the blurry mean; the Fréchet distance tells plausible fills from it.
            f"{FD_NAME}_mean_fill": fd_shapes(ctx.net, mean_fill, images)}


def _original_config(cfg) -> None:
    cfg.conditioning.inpaint_inputs = "original"   # holes at −1, mask as ±1, nearest resize


def _cond_module(cfg, first_stage):
    from ldm_fast.conditioning import InpaintingConcat

    return InpaintingConcat(first_stage, cfg.autoencoder.factor, scale=cfg.diffusion.scale_factor,
                            inputs=cfg.conditioning.inpaint_inputs)


TASK = register(Task(
    name="inpaint", order=6, modes=("concat", "hybrid"), inputs=("image", "mask"), concat=True,
    per_sample_pairs=True, configure=_configure, pair=_pair, parts=_parts, metric=_metric, exportable=False,
    heldout=lambda items: {"image": torch.stack([it["image"] for it in items]),
                           "mask": torch.stack([it["mask"] for it in items])},
    original_config=_original_config, cond_module=_cond_module, cond_stage_is_first_stage=True))
