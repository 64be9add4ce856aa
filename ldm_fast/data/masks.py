"""Inpainting masks: random boxes, free-form strokes, and masks with a chosen masked fraction.

A mask is float32 (1, H, W) with 1 = region to fill, 0 = known pixels. Sizes are fractions
of the short side, so a generator gives the same kind of mask at every resolution. All
randomness comes from one numpy Generator (torch Generators and int seeds are converted),
so masks are reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .degradations import GeneratorLike, as_numpy_rng
from .epoch import epoch_of

MASK_KINDS = ("box", "stroke", "fraction")


def _box(rng: np.random.Generator, h: int, w: int, size: tuple[float, float]) -> np.ndarray:
    S = min(h, w)
    bh = max(1, round(rng.uniform(*size) * S))
    bw = max(1, round(rng.uniform(*size) * S))
    y, x = int(rng.integers(0, max(1, h - bh + 1))), int(rng.integers(0, max(1, w - bw + 1)))
    m = np.zeros((h, w), bool)
    m[y:y + bh, x:x + bw] = True
    return m


def _stroke(rng: np.random.Generator, h: int, w: int, stroke_width: tuple[float, float],
            num_vertices: tuple[int, int], step: tuple[float, float]) -> np.ndarray:
    """One free-form brush stroke: a random walk with momentum, drawn thick with round joints
    (the DeepFill v2 style of irregular mask)."""
    S = min(h, w)
    width = max(1, round(rng.uniform(*stroke_width) * S))
    pts = [(rng.uniform(0, w), rng.uniform(0, h))]
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(num_vertices[0], num_vertices[1] + 1))):
        angle += rng.normal(0, 0.9)  # momentum: strokes bend rather than jitter
        length = rng.uniform(*step) * S
        x = pts[-1][0] + length * np.cos(angle)
        y = pts[-1][1] + length * np.sin(angle)
        # Bounce off the border (reflect the point and the heading) instead of clamping,
        # which would leave strokes running along the image edge.
        if not 0 <= x <= w - 1:
            x, angle = float(np.clip(-x if x < 0 else 2 * (w - 1) - x, 0, w - 1)), np.pi - angle
        if not 0 <= y <= h - 1:
            y, angle = float(np.clip(-y if y < 0 else 2 * (h - 1) - y, 0, h - 1)), -angle
        pts.append((float(x), float(y)))
    im = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(im)
    draw.line(pts, fill=255, width=width, joint="curve")
    r = width / 2  # round caps, so ends look brushed, not sawn off
    for x, y in (pts[0], pts[-1]):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(im) > 0


def _as_tensor(m: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(m.astype(np.float32))[None]


def _check_size(height: int, width: int) -> None:
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"mask size must be positive, got {height}x{width}")


def box_mask(height: int, width: int, generator: GeneratorLike = None,
             num_boxes: tuple[int, int] = (1, 3), size: tuple[float, float] = (0.1, 0.5)) -> torch.Tensor:
    """Union of 1..n axis-aligned boxes, each side a `size` fraction of the short side."""
    _check_size(height, width)
    rng = as_numpy_rng(generator)
    m = np.zeros((height, width), bool)
    for _ in range(int(rng.integers(num_boxes[0], num_boxes[1] + 1))):
        m |= _box(rng, height, width, size)
    return _as_tensor(m)


def stroke_mask(height: int, width: int, generator: GeneratorLike = None,
                num_strokes: tuple[int, int] = (1, 4), stroke_width: tuple[float, float] = (0.05, 0.14),
                num_vertices: tuple[int, int] = (3, 8), step: tuple[float, float] = (0.1, 0.3)) -> torch.Tensor:
    """Union of free-form brush strokes (widths and step lengths as fractions of the short side)."""
    _check_size(height, width)
    rng = as_numpy_rng(generator)
    m = np.zeros((height, width), bool)
    for _ in range(int(rng.integers(num_strokes[0], num_strokes[1] + 1))):
        m |= _stroke(rng, height, width, stroke_width, num_vertices, step)
    return _as_tensor(m)


def fraction_mask(height: int, width: int, fraction: tuple[float, float] = (0.4, 0.5),
                  generator: GeneratorLike = None, kinds: tuple[str, ...] = ("box", "stroke"),
                  max_tries: int = 64) -> torch.Tensor:
    """Boxes and strokes added until the masked fraction lies in [lo, hi] (guaranteed).

    Elements that would overshoot `hi` are rejected and later ones drawn smaller; if the
    budget of tries runs out below `lo`, the nearest free pixels around a random point are
    added (a compact blob), which lands exactly on the lower bound.
    """
    _check_size(height, width)
    lo, hi = fraction
    n = height * width
    lo_n, hi_n = int(np.ceil(lo * n)), int(np.floor(hi * n))
    if not 0 <= lo <= hi <= 1 or lo_n > hi_n:
        raise ValueError(f"fraction: need 0 <= lo <= hi <= 1 with at least one pixel count between "
                         f"them for a {height}x{width} mask, got {fraction}")
    unknown = [k for k in kinds if k not in ("box", "stroke")]
    if unknown or not kinds:
        raise ValueError(f"kinds: expected a non-empty subset of ('box', 'stroke'), got {kinds}")
    rng = as_numpy_rng(generator)
    m = np.zeros((height, width), bool)
    count = 0
    for t in range(max_tries):
        if count >= lo_n:
            break
        scale = max(0.25, 1.0 - t / max_tries)  # shrink elements as the budget is used
        if kinds[int(rng.integers(len(kinds)))] == "box":
            e = _box(rng, height, width, (0.15 * scale, 0.6 * scale))
        else:
            e = _stroke(rng, height, width, (0.06 * scale, 0.18 * scale), (3, 8), (0.15, 0.4))
        new = m | e
        c = int(new.sum())
        if c <= hi_n:
            m, count = new, c
    if count < lo_n:
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        yy, xx = np.mgrid[0:height, 0:width]
        d = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2
        d[m] = np.inf  # already masked pixels are not candidates
        add = np.argsort(d, axis=None, kind="stable")[: lo_n - count]
        m.flat[add] = True
    return _as_tensor(m)


def random_mask(height: int, width: int, kind: str = "fraction", generator: GeneratorLike = None,
                fraction: tuple[float, float] = (0.4, 0.5)) -> torch.Tensor:
    """One mask of the named kind ('box', 'stroke' or 'fraction')."""
    if kind == "box":
        return box_mask(height, width, generator)
    if kind == "stroke":
        return stroke_mask(height, width, generator)
    if kind == "fraction":
        return fraction_mask(height, width, fraction, generator)
    raise ValueError(f"mask kind: expected one of {MASK_KINDS}, got {kind!r}")


def check_mask(image: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise ValueError unless `mask` is (1, H, W) / (B, 1, H, W), matches `image` and lies in [0, 1]."""
    if mask.dim() != image.dim() or mask.shape[-3] != 1:
        raise ValueError(f"mask: expected shape (1, H, W) or (B, 1, H, W) to go with image "
                         f"{tuple(image.shape)}, got {tuple(mask.shape)}")
    if mask.shape[-2:] != image.shape[-2:] or (mask.dim() == 4 and mask.shape[0] != image.shape[0]):
        raise ValueError(f"mask size {tuple(mask.shape)} does not match image size {tuple(image.shape)}")
    lo, hi = (v.item() for v in torch.aminmax(mask.detach().float()))
    if not (0 <= lo and hi <= 1):  # also false for NaN
        raise ValueError(f"mask: values must lie in [0, 1] (1 = fill), got [{lo:.3g}, {hi:.3g}]")


def apply_mask(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked image the inpainting model sees: pixels to fill set to 0 (mid-grey in [-1, 1])."""
    check_mask(image, mask)
    return image * (1 - mask.to(image.dtype))


class InpaintingPairs(Dataset):
    """Wraps a dataset of {'image', ...} and adds 'mask' (1, H, W) and 'masked_image' (3, H, W).

    The mask of item i is drawn from (seed, epoch, i): fresh each epoch, the epoch coming with
    the index from the training sampler (ldm_fast.data.epoch), or from `set_epoch` for plain ints.
    """

    def __init__(self, dataset: Dataset, kind: str = "fraction", fraction: tuple[float, float] = (0.4, 0.5),
                 seed: int = 0):
        if kind not in MASK_KINDS:
            raise ValueError(f"mask kind: expected one of {MASK_KINDS}, got {kind!r}")
        self.dataset, self.kind, self.fraction, self.seed, self.epoch = dataset, kind, fraction, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch_of(index, self.epoch), int(index)])
        return self.add_to(self.dataset[index], rng)

    def add_to(self, item: dict, rng: np.random.Generator) -> dict:
        """`item` plus 'mask' and 'masked_image' drawn from `rng` (also used on streamed samples)."""
        item = dict(item)
        h, w = item["image"].shape[-2:]
        item["mask"] = random_mask(h, w, self.kind, rng, self.fraction)
        item["masked_image"] = apply_mask(item["image"], item["mask"])
        return item
