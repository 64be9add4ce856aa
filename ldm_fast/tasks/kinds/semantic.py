"""Semantic synthesis (the paper's landscapes model): the segmentation map, one-hot on the
latent grid through a learned 1×1 mapping, concatenated to z_t; metric: a segmenter's mIoU on
the samples against the input maps, and FD-shapes."""

import torch

from ldm_fast.tasks.registry import Task, register


def _configure(cfg, mode):
    from ldm_fast.data import procedural

    cfg.conditioning.num_classes = procedural.NUM_SEG_CLASSES  # background + 30 object classes
    cfg.unet.in_channels = cfg.autoencoder.z_channels + 3  # the paper maps the one-hot map to 3 channels


def _parts(cfg, model, device):
    from ldm_fast.conditioning import SemanticEncoder
    from ldm_fast.tasks.parts import _SemanticPart

    z = cfg.unet.out_channels
    concat_ch = cfg.unet.in_channels - z
    if concat_ch < 1:
        raise ValueError(f"unet.in_channels = {cfg.unet.in_channels}: semantic synthesis needs "
                         f"channels beyond the {z} latent ones for the mapped map")
    encoder = SemanticEncoder(cfg.conditioning.num_classes, concat_ch, cfg.autoencoder.factor)
    return [_SemanticPart(encoder)], concat_ch, None


def _metric(ctx) -> dict:
    from ldm_fast.metrics import FD_NAME, fd_shapes, segmentation_miou

    maps = ctx.batch["segmentation"]
    samples = ctx.sample({"semantic": maps}, 1.0)
    return {"miou": segmentation_miou(ctx.net, samples, maps),
            "reference_miou": segmentation_miou(ctx.net, ctx.batch["image"], maps),
            FD_NAME: fd_shapes(ctx.net, samples, ctx.batch["image"])}


def _cond_module(cfg, first_stage):
    from ldm_fast.conditioning import SemanticEncoder

    return SemanticEncoder(cfg.conditioning.num_classes, cfg.unet.in_channels - cfg.unet.out_channels,
                           cfg.autoencoder.factor)


TASK = register(Task(
    name="semantic", order=4, modes=("concat", "hybrid"), fields=("segmentation",), inputs=("semantic",),
    concat=True, configure=_configure, parts=_parts, metric=_metric, exportable=False,
    heldout=lambda items: {"semantic": torch.stack([it["segmentation"] for it in items])},
    cond_module=_cond_module))
