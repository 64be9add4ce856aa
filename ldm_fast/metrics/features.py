"""The project's own feature network for offline evaluation ("FD-shapes", never "FID").

FID needs Inception weights that cannot be downloaded here, so quality is also measured in the
features of a small CNN that the project trains itself, on demand, on the procedural dataset
(`ldm_fast.data.procedural`). One network gives three task metrics:
  * penultimate (globally pooled) features → Fréchet distance, reported as "FD-shapes";
  * class probabilities over the dataset's `label` (main object's shape × colour) → accuracy
    of class-conditional samples, box-crop agreement for layouts;
  * a per-pixel segmentation head over the dataset's semantic map → mIoU for semantic synthesis.

Numbers in these features are comparable only between runs that used the same network: the
cache key holds the resolution, FEATURE_NET_VERSION and the seed, and the file records a
fingerprint of the data it was trained on, so a changed dataset retrains instead of silently
reusing a stale network. Training is deterministic from the seed (CPU, fixed thread count).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm_fast.metrics.frechet import frechet_distance_features

FD_NAME = "FD-shapes"  # the label every report must use for this distance
FEATURE_NET_VERSION = "1"  # bump when the architecture or the training recipe changes
CACHE_ENV = "LDM_FAST_CACHE"


def default_cache_dir() -> Path:
    """${LDM_FAST_CACHE} if set, else ~/.cache/ldm_fast."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ldm_fast")


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------

def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    # BatchNorm: converges in far fewer steps than GroupNorm here, and in eval mode it uses
    # stored statistics, so an image's features never depend on the rest of its batch.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def to_work_res(x: torch.Tensor, work_res: int) -> torch.Tensor:
    """Images at any size → short side ≤ work_res, antialiased (never upsampled)."""
    h, w = x.shape[-2:]
    s = work_res / min(h, w)
    if s < 1:
        x = F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))),
                          mode="bilinear", antialias=True, align_corners=False)
    return x


class ShapesOutput(NamedTuple):
    features: torch.Tensor    # (N, feature_dim) pooled penultimate features
    logits: torch.Tensor      # (N, num_classes)
    seg_logits: torch.Tensor  # (N, num_seg_classes, H, W) at the input resolution


class ShapesNet(nn.Module):
    """Small CNN: a stride-2 stem and three stages (1/2, 1/4, 1/8 resolution), global average
    pooling → classifier, and an FPN-style head that fuses the stages at 1/2 resolution for
    per-pixel classes. Inputs larger than `work_res` are first downsampled to it (antialiased),
    which keeps CPU training to seconds at any resolution.

    Classes are (shape, colour) pairs, class id = shape · num_colors + colour, as in the
    procedural data. Both heads score shape and colour separately and add the scores, i.e.
    p(shape, colour) = p(shape) · p(colour): every image then teaches all classes sharing its
    shape or its colour, which is what lets the network learn 30 classes in a few hundred
    CPU steps. Segmentation adds a background score as class 0.
    """

    def __init__(self, num_shapes: int, num_colors: int, width: int = 16, work_res: int = 64):
        super().__init__()
        self.num_shapes, self.num_colors, self.work_res = num_shapes, num_colors, work_res
        self.num_classes = num_shapes * num_colors
        self.num_seg_classes = 1 + self.num_classes
        c1, c2, c3, c4 = width, 2 * width, 4 * width, 8 * width
        self.stage1 = nn.Sequential(_conv(3, c1, 2), _conv(c1, c1))
        self.stage2 = nn.Sequential(_conv(c1, c2, 2), _conv(c2, c2))
        self.stage3 = nn.Sequential(_conv(c2, c3, 2), _conv(c3, c4))
        self.feature_dim = c4
        self.classifier = nn.Linear(c4, num_shapes + num_colors)
        self.lateral = nn.ModuleList([nn.Conv2d(c, c1, 1) for c in (c1, c2, c4)])
        self.seg_head = nn.Sequential(_conv(c1, c1), nn.Conv2d(c1, 1 + num_shapes + num_colors, 1))

    def _pair_logits(self, scores: torch.Tensor) -> torch.Tensor:
        # (N, S + C, ...) → (N, S·C, ...): logit(s, c) = shape_s + colour_c, flattened s-major.
        shape, colour = scores[:, :self.num_shapes], scores[:, self.num_shapes:]
        pair = shape.unsqueeze(2) + colour.unsqueeze(1)
        return pair.flatten(1, 2)

    def forward(self, x: torch.Tensor, segment: bool = True) -> ShapesOutput:
        size = x.shape[-2:]
        x = to_work_res(x, self.work_res)
        f1 = self.stage1(x)
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        features = f3.mean((2, 3))
        logits = self._pair_logits(self.classifier(features))
        seg = None
        if segment:
            fused = self.lateral[0](f1)
            for lat, f in zip(self.lateral[1:], (f2, f3)):
                fused = fused + F.interpolate(lat(f), size=f1.shape[-2:], mode="bilinear",
                                              align_corners=False)
            scores = self.seg_head(fused)
            seg = torch.cat([scores[:, :1], self._pair_logits(scores[:, 1:])], 1)
            seg = F.interpolate(seg, size=size, mode="bilinear", align_corners=False)
        return ShapesOutput(features, logits, seg)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass
class FeatureNetTraining:
    """How the feature network is trained; part of its identity (stored in the cache file)."""

    steps: int = 1000           # optimiser steps: ~25 s at 32², ~80 s at ≥ 64² on one CPU core
    batch_size: int = 32
    lr: float = 3e-3            # AdamW peak; linear warm-up then cosine decay to 0
    weight_decay: float = 1e-4
    train_size: int = 4000      # rendered once, then sampled with replacement per batch
    heldout_size: int = 500     # disjoint images for the accuracy/mIoU recorded with the net
    width: int = 16             # channels of the first stage (doubling per stage)
    work_res: int = 64          # inputs above this are downsampled (keeps CPU training fast)
    seg_weight: float = 1.0     # weight of the per-pixel loss next to the classification loss
    data_seed_offset: int = 7919  # the net trains on its own stream, not on the project's eval images
    num_threads: int = 1        # intra-op threads while training. One: convolutions this small
    # gain little from more, several threads collapse (OpenMP spinning) when the cores are
    # shared, and a fixed count keeps the trained weights independent of the machine's cores.


def _render(dataset, work_res: int, chunk: int = 256):
    """Render a dataset to (images fp16 at ≤ work_res, labels, segmentation at that size)."""
    imgs, labels, segs = [], [], []
    for start in range(0, len(dataset), chunk):
        items = [dataset[i] for i in range(start, min(len(dataset), start + chunk))]
        x = to_work_res(torch.stack([it["image"] for it in items]), work_res)
        seg = torch.stack([it["segmentation"] for it in items])
        # Targets at the working size by picking each output pixel's centre from the
        # full-resolution map (nearest), as class ids cannot be averaged.
        seg = F.interpolate(seg[:, None].float(), size=x.shape[-2:], mode="nearest")[:, 0].long()
        imgs.append(x.half())
        labels.append(torch.stack([it["label"] for it in items]))
        segs.append(seg.to(torch.uint8) if seg.max() < 256 else seg)
    return torch.cat(imgs), torch.cat(labels), torch.cat(segs)


def _data_fingerprint(resolution: int, seed: int) -> str:
    """Hash of a few rendered training images: a changed dataset means a stale network."""
    from ldm_fast.data.procedural import ProceduralShapes

    ds = ProceduralShapes(4, resolution, seed=seed)
    h = hashlib.sha1()
    for i in range(len(ds)):
        it = ds[i]
        h.update(it["image"].numpy().round(3).tobytes())
        h.update(it["segmentation"].numpy().tobytes())
    return h.hexdigest()[:16]


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean intersection-over-union over classes, accumulated over the whole set (not per
    image); classes absent from both prediction and target are left out of the mean."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target sizes differ: {pred.numel()} vs {target.numel()}")
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target class ids must lie in [0, {num_classes})")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted class ids must lie in [0, {num_classes})")
    conf = torch.bincount(target * num_classes + pred,
                          minlength=num_classes * num_classes).view(num_classes, num_classes)
    inter = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter
    valid = union > 0
    return float((inter[valid] / union[valid]).mean()) if valid.any() else float("nan")


@torch.no_grad()
def _evaluate(net: ShapesNet, imgs, labels, segs, batch_size: int = 256) -> dict:
    net.eval()
    correct, preds = 0, []
    for i in range(0, len(imgs), batch_size):
        out = net(imgs[i:i + batch_size].float())
        correct += (out.logits.argmax(1) == labels[i:i + batch_size]).sum().item()
        preds.append(out.seg_logits.argmax(1))
    miou = mean_iou(torch.cat(preds), segs.long(), net.num_seg_classes)
    return {"heldout_accuracy": correct / len(imgs), "heldout_miou": miou}


@torch.enable_grad()
def train_shapes_net(resolution: int, seed: int = 0, cfg: FeatureNetTraining | None = None,
                     log: Callable[[str], None] | None = print) -> tuple[ShapesNet, dict]:
    """Train the feature network on procedural images at `resolution`; returns the network
    (eval mode) and a report with held-out accuracy and mIoU. Deterministic from `seed`.
    Gradients are switched on here: the first use of a metric (no cached network yet) often
    happens inside a caller's torch.no_grad() sampling code."""
    from ldm_fast.data import procedural

    cfg = cfg or FeatureNetTraining()
    S, C = len(procedural.SHAPES), len(procedural.COLORS)
    if any(procedural.class_id(s, c) != s * C + c for s in range(S) for c in range(C)):
        raise RuntimeError("procedural class ids are no longer shape·num_colors + colour; "
                           "ShapesNet's factorised heads must be updated (and FEATURE_NET_VERSION bumped)")
    t0 = time.perf_counter()
    data_seed = cfg.data_seed_offset + seed
    train_ds, held_ds = procedural.procedural_split(resolution, cfg.train_size, cfg.heldout_size,
                                                    seed=data_seed)
    x_tr, y_tr, s_tr = _render(train_ds, cfg.work_res)
    x_ho, y_ho, s_ho = _render(held_ds, cfg.work_res)

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        net, loss = _train(x_tr, y_tr, s_tr, S, C, seed, cfg)
    finally:
        torch.set_num_threads(threads)
    report = _evaluate(net, x_ho, y_ho, s_ho)
    report.update(train_seconds=time.perf_counter() - t0, final_loss=loss)
    if log:
        log(f"[{FD_NAME}] feature network at {resolution}px: held-out accuracy "
            f"{report['heldout_accuracy']:.3f}, mIoU {report['heldout_miou']:.3f} "
            f"({report['train_seconds']:.0f} s)")
    return net.eval().requires_grad_(False), report


def _train(x_tr, y_tr, s_tr, S: int, C: int, seed: int, cfg: FeatureNetTraining) -> tuple[ShapesNet, float]:
    # fork_rng: training must not move the caller's global RNG (e.g. mid-way through sampling).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ShapesNet(S, C, cfg.width, cfg.work_res)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, cfg.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.steps)))))
        net.train()
        for step in range(cfg.steps):
            idx = torch.randint(len(x_tr), (cfg.batch_size,), generator=gen)
            out = net(x_tr[idx].float())
            loss = F.cross_entropy(out.logits, y_tr[idx]) \
                + cfg.seg_weight * F.cross_entropy(out.seg_logits, s_tr[idx].long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net, loss.item()


def load_shapes_net(resolution: int, cache_dir: str | os.PathLike | None = None, seed: int = 0,
                    cfg: FeatureNetTraining | None = None, device: str | torch.device = "cpu",
                    log: Callable[[str], None] | None = print) -> ShapesNet:
    """The feature network for `resolution`: loaded from the cache if a matching file exists,
    otherwise trained now (on one CPU core about half a minute at 32², a minute and a half at
    64² and above, where inputs are downsampled to 64²) and cached as safetensors.

    The held-out accuracy and mIoU it reached are on `net.report`.
    """
    from safetensors.torch import load_file, save_file

    from ldm_fast.data import procedural

    cfg = cfg or FeatureNetTraining()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"shapes_net_r{resolution}_v{FEATURE_NET_VERSION}_s{seed}.safetensors"
    identity = {"version": FEATURE_NET_VERSION, "resolution": str(resolution), "seed": str(seed),
                "num_classes": str(procedural.NUM_CLASSES),
                "num_seg_classes": str(procedural.NUM_SEG_CLASSES),
                "data": _data_fingerprint(resolution, cfg.data_seed_offset + seed),
                "training": repr(sorted(asdict(cfg).items()))}
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        stale = [k for k, v in identity.items() if meta.get(k) != v]
        if not stale:
            net = ShapesNet(len(procedural.SHAPES), len(procedural.COLORS), cfg.width, cfg.work_res)
            net.load_state_dict(load_file(str(path)), strict=True)
            net.report = {k: float(meta[k]) for k in ("heldout_accuracy", "heldout_miou") if k in meta}
            return net.eval().requires_grad_(False).to(device)
        if log:
            log(f"[{FD_NAME}] cached feature network {path} is stale "
                f"({', '.join(stale)} changed); retraining")
    elif log:
        log(f"[{FD_NAME}] no cached feature network for {resolution}px; training one (cached at {path})")
    net, report = train_shapes_net(resolution, seed, cfg, log)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(identity, **{k: repr(v) for k, v in report.items()})
    # Atomic: a concurrent reader sees the old file or the complete new one, never half.
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    net.report = report
    return net.to(device)


# --------------------------------------------------------------------------------------------
# Using it
# --------------------------------------------------------------------------------------------

class ShapesExtraction(NamedTuple):
    features: np.ndarray            # (N, D) float64
    probs: np.ndarray               # (N, num_classes) float64
    segmentation: torch.Tensor | None  # (N, H, W) int64 predicted class map, when asked for


@torch.no_grad()
def extract(net: ShapesNet, images, batch_size: int = 256,
            segmentation: bool = False) -> ShapesExtraction:
    """Features, class probabilities and (optionally) segmentation maps for images in [-1, 1]:
    a (N, 3, H, W) tensor or an iterable of batches, processed `batch_size` at a time."""
    device = next(net.parameters()).device
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    feats, probs, segs = [], [], []
    for batch in batches:
        for chunk in batch.split(batch_size):
            out = net(chunk.to(device, torch.float32).clamp(-1, 1), segment=segmentation)
            feats.append(out.features.double().cpu().numpy())
            probs.append(torch.softmax(out.logits.double(), 1).cpu().numpy())
            if segmentation:
                segs.append(out.seg_logits.argmax(1).cpu())
    if not feats:
        raise ValueError("no images given")
    return ShapesExtraction(np.concatenate(feats), np.concatenate(probs),
                            torch.cat(segs) if segmentation else None)


def fd_shapes(net: ShapesNet, images, reference_images, batch_size: int = 256) -> float:
    """FD-shapes: Fréchet distance between two image sets in the feature network's features."""
    return frechet_distance_features(extract(net, images, batch_size).features,
                                     extract(net, reference_images, batch_size).features)


def classifier_accuracy(net: ShapesNet, images, labels, batch_size: int = 256) -> float:
    """Fraction of images the network assigns to the given class (e.g. the class a sample was
    conditioned on)."""
    pred = extract(net, images, batch_size).probs.argmax(1)
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if pred.shape[0] != labels.shape[0]:
        raise ValueError(f"{pred.shape[0]} images but {labels.shape[0]} labels")
    return float((pred == labels).mean())


def segmentation_miou(net: ShapesNet, images, target_maps: torch.Tensor, batch_size: int = 256) -> float:
    """mIoU between the network's per-pixel classes on `images` and the maps they should show
    (e.g. the semantic maps that conditioned the samples)."""
    seg = extract(net, images, batch_size, segmentation=True).segmentation
    if seg.shape != target_maps.shape:
        raise ValueError(f"segmentation maps {tuple(target_maps.shape)} do not match the "
                         f"images' size {tuple(seg.shape)}")
    return mean_iou(seg, target_maps, net.num_seg_classes)
