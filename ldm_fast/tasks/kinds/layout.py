"""Layout-to-image (the paper's OpenImages / COCO model): boxes as (l, b, c) tokens through a
transformer τθ as cross-attention context; metric: a classifier's accuracy on crops around
each box of the samples."""

import torch
import torch.nn.functional as F

from ldm_fast.tasks.registry import Task, register


def _configure(cfg, mode):
    from ldm_fast.data import procedural

    cfg.conditioning.num_classes, cfg.conditioning.max_length = procedural.NUM_CLASSES, 3 * procedural.MAX_BOXES


def _parts(cfg, model, device):
    from ldm_fast.conditioning import LayoutEncoder
    from ldm_fast.tasks.parts import _LayoutPart

    cc = cfg.conditioning
    encoder = LayoutEncoder(cc.num_classes, cc.max_length, cc.embed_dim, cc.n_layers, cc.n_heads, grid=cc.layout_grid)
    return [_LayoutPart(encoder, device)], 0, cc.embed_dim


def box_crops(images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
              context: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Square crops around each box (label ≥ 0), `context` × the box's long side added on each
    side, shifted to stay inside the image, resized to the image size: the object then fills
    about half the crop, as the main object fills a procedural image, which is what the
    classifier was trained on."""
    n, _, h, w = images.shape
    crops, classes = [], []
    for i in range(n):
        for j in range(boxes.shape[1]):
            if labels[i, j] < 0:
                continue
            x0, y0, x1, y1 = (float(v) for v in boxes[i, j])
            side = min(max((x1 - x0) * w, (y1 - y0) * h) * (1 + 2 * context), min(h, w))
            s = max(1, int(round(side)))
            left = int(round(min(max((x0 + x1) / 2 * w - s / 2, 0), w - s)))
            top = int(round(min(max((y0 + y1) / 2 * h - s / 2, 0), h - s)))
            crop = images[i:i + 1, :, top:top + s, left:left + s].float()
            crops.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False,
                                       antialias=s > h))
            classes.append(int(labels[i, j]))
    return torch.cat(crops), torch.tensor(classes, dtype=torch.long)


def _metric(ctx) -> dict:
    from ldm_fast.metrics import classifier_accuracy

    boxes, labels = ctx.batch["boxes"], ctx.batch["box_labels"]
    ref_crops, classes = box_crops(ctx.batch["image"], boxes, labels)
    res = {"reference_box_accuracy": classifier_accuracy(ctx.net, ref_crops, classes),
           "boxes": len(classes)}
    for name, g in ctx.guidances():
        crops, _ = box_crops(ctx.sample({"boxes": (boxes, labels)}, g), boxes, labels)
        res[f"box_accuracy_{name}"] = classifier_accuracy(ctx.net, crops, classes)
    return res


def _heldout(items) -> dict:
    return {"boxes": [[(*b.tolist(), int(c)) for b, c in zip(it["boxes"], it["box_labels"]) if c >= 0]
                      for it in items]}


TASK = register(Task(name="layout", order=3, modes=("crossattn",), fields=("boxes", "box_labels"),
                     inputs=("boxes",), configure=_configure, parts=_parts, metric=_metric, heldout=_heldout,
                     export_part="layout"))
