"""Procedural shapes: the embedded default dataset, carrying every annotation the paper's tasks use.

Each image holds 1-3 coloured shapes on a textured background. The first (main) object is
large; the others are small and never overlap it, so every object stays visible. An item is
a pure function of (seed, start + index): no files, no network, any resolution.

Item (fixed keys and shapes, so the default collate works):
    image         float32 (3, H, W) in [-1, 1]
    label         int64 () class of the main object, ``class_id(shape, colour)``
    caption       str, e.g. "a large red circle and a small blue square on a striped background"
    boxes         float32 (MAX_BOXES, 4) normalised (x0, y0, x1, y1), main object first, zero rows pad
    box_labels    int64 (MAX_BOXES,) class ids, -1 pads
    segmentation  int64 (H, W): 0 = background, 1 + class id where an object covers the pixel centre
                  (so NUM_SEG_CLASSES = 1 + NUM_CLASSES and the map fixes shape *and* colour)

Rendering is vectorised numpy over signed distance functions; coverage = clip(0.5 - d, 0, 1)
with d in pixels gives one-pixel anti-aliased edges at every resolution without supersampling.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "cyan")
BACKGROUNDS = ("plain", "gradient", "stripes", "checker", "noise")
NUM_CLASSES = len(SHAPES) * len(COLORS)
NUM_SEG_CLASSES = 1 + NUM_CLASSES
MAX_BOXES = 3
CLASS_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLORS)

# Saturated object colours against muted backgrounds: objects stay separable by colour alone.
_RGB = np.array(
    [
        [0.86, 0.16, 0.14],  # red
        [0.16, 0.68, 0.22],  # green
        [0.15, 0.32, 0.88],  # blue
        [0.96, 0.84, 0.16],  # yellow
        [0.58, 0.22, 0.76],  # purple
        [0.14, 0.80, 0.84],  # cyan
    ],
    dtype=np.float32,
)
_BG_WORDS = {"plain": "plain", "gradient": "gradient", "stripes": "striped",
             "checker": "checkered", "noise": "noisy"}
# Every word a caption can contain: a tokenizer trained on these covers all captions.
VOCAB = tuple(sorted({"a", "large", "small", "and", "on", "background", ","}
                     | set(SHAPES) | set(COLORS) | set(_BG_WORDS.values())))

_MAIN_SIZE = (0.19, 0.26)  # main object "radius" as a fraction of the short side
_SMALL_SIZE = (0.09, 0.13)  # secondary objects: clearly smaller than any main object
_MARGIN = 0.03  # keep objects off the border and apart from each other
_PLACE_TRIES = 12  # a secondary that finds no free spot in this many tries is left out


def class_id(shape: int, color: int) -> int:
    """Class id of a (shape index, colour index) pair."""
    return shape * len(COLORS) + color


def class_name(label: int) -> str:
    """'red circle' for a class id."""
    return CLASS_NAMES[int(label)]


def _extent(shape: int, r: float) -> tuple[float, float, float, float]:
    """Exact bounding box offsets (x0, y0, x1, y1) of a shape of size r around its centre."""
    if shape == 0:  # circle
        return (-r, -r, r, r)
    if shape == 1:  # square
        a = 0.86 * r
        return (-a, -a, a, a)
    if shape == 2:  # upward triangle, centroid at the centre, circumradius 1.25 r
        R = 1.25 * r
        h = R * np.sqrt(3) / 2
        return (-h, -R, h, R / 2)
    if shape == 3:  # diamond, half-diagonal 1.12 r
        a = 1.12 * r
        return (-a, -a, a, a)
    L = 1.05 * r  # cross
    return (-L, -L, L, L)


def _sdf(shape: int, r: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Signed distance (normalised units, < 0 inside) of a shape centred at the origin.

    Polygons use the max over edge half-planes: exact inside and along edges, slightly
    rounded outside corners, which only shifts the anti-aliasing band there.
    """
    if shape == 0:
        return np.sqrt(dx * dx + dy * dy) - r
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == 1:
        return np.maximum(ax, ay) - 0.86 * r
    if shape == 2:
        R = 1.25 * r
        s3 = np.sqrt(3) / 2
        # bottom edge and the two slanted edges (outward normals (0,1), (+-sqrt3/2, -1/2))
        return np.maximum(dy, s3 * ax - 0.5 * dy) - R / 2
    if shape == 3:
        return (ax + ay - 1.12 * r) / np.sqrt(2)
    L, t = 1.05 * r, 0.4 * r
    return np.minimum(np.maximum(ax - L, ay - t), np.maximum(ax - t, ay - L))


def _smooth_noise(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, ax: float, ay: float,
                  cells: int) -> np.ndarray:
    """Value noise in [0, 1] on a cells-per-unit lattice, smoothstep-interpolated."""
    gw, gh = int(np.ceil(ax * cells)) + 2, int(np.ceil(ay * cells)) + 2
    grid = rng.random((gh, gw), dtype=np.float32)
    x, y = u * cells, v * cells  # (1, W) and (H, 1)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
    bot = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bot * fy


def _background(rng: np.random.Generator, kind: str, u: np.ndarray, v: np.ndarray, ax: float,
                ay: float, S: int) -> np.ndarray:
    """(H, W, 3) float32 background. Contrast is kept moderate (two muted colours, soft
    pattern edges) so that an f = 4 autoencoder can reconstruct it; the objects carry the detail."""
    hue = rng.random()
    sat = rng.uniform(0.08, 0.3)
    val = rng.uniform(0.38, 0.7)
    dv = rng.uniform(0.1, 0.2) * rng.choice([-1.0, 1.0])
    c1 = np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32)
    c2 = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(-0.08, 0.08)) % 1.0, sat,
                                      float(np.clip(val + dv, 0.2, 0.85))), dtype=np.float32)
    H, W = v.shape[0], u.shape[1]
    if kind == "plain":
        t = np.zeros((H, W), np.float32)
    elif kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        p = np.cos(a) * (u - ax / 2) + np.sin(a) * (v - ay / 2)
        half = 0.5 * (abs(np.cos(a)) * ax + abs(np.sin(a)) * ay)
        t = 0.5 + 0.5 * p / half
    elif kind == "stripes":
        a = rng.uniform(0, np.pi)
        period = rng.uniform(0.14, 0.28)
        p = np.cos(a) * u + np.sin(a) * v
        s = np.sin(2 * np.pi * p / period + rng.uniform(0, 2 * np.pi))
        # s * period / 2pi is the distance to the nearest stripe edge near a crossing; in
        # pixels over a 1.5 px soft edge it gives an anti-aliased, gently blurred square wave.
        t = np.clip(0.5 + s * period * S / (2 * np.pi * 1.5), 0, 1)
    elif kind == "checker":
        cell = rng.uniform(0.14, 0.26)
        ox, oy = rng.uniform(0, cell, size=2)
        s = np.sin(np.pi * (u + ox) / cell) * np.sin(np.pi * (v + oy) / cell)
        t = np.clip(0.5 + s * cell * S / (np.pi * 1.5), 0, 1)
    elif kind == "noise":
        t = _smooth_noise(rng, u, v, ax, ay, cells=int(rng.integers(3, 6)))
        # Mild grain from its own stream: the parent stream's later draws (the objects) must
        # not depend on the pixel count, so one (seed, index) is one scene at every resolution.
        grain = np.random.default_rng(int(rng.integers(2**63)))
        t = t + grain.normal(0, 0.06, size=(H, W)).astype(np.float32)
    else:
        raise ValueError(f"background: expected one of {BACKGROUNDS}, got {kind!r}")
    t = np.broadcast_to(np.asarray(t, np.float32), (H, W))
    return c1 + (c2 - c1) * t[..., None]


def _boxes_overlap(a: tuple, b: tuple, margin: float) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0]
                or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def render(seed: int, index: int, height: int, width: int, max_objects: int = MAX_BOXES,
           backgrounds: Sequence[str] = BACKGROUNDS) -> dict:
    """Render one sample as numpy arrays (image (H, W, 3) in [0, 1]); a pure function of its arguments."""
    rng = np.random.default_rng([int(seed), int(index)])
    S = min(height, width)
    ax, ay = width / S, height / S  # image extent in short-side units: shapes stay round
    u = ((np.arange(width, dtype=np.float32) + 0.5) / S)[None, :]
    v = ((np.arange(height, dtype=np.float32) + 0.5) / S)[:, None]

    bg = backgrounds[int(rng.integers(len(backgrounds)))]
    img = _background(rng, bg, u, v, ax, ay, S)

    # Place objects: main first, anywhere it fits; each secondary retries until its box
    # clears every placed box, so objects never overlap and annotations stay exact.
    n_obj = 1 + int(rng.choice(max_objects, p=_count_probs(max_objects)))
    objects = []  # (shape, colour, r, cx, cy, box)
    for k in range(n_obj):
        lo, hi = _MAIN_SIZE if k == 0 else _SMALL_SIZE
        shape, color = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLORS)))
        r = rng.uniform(lo, hi)
        x0, y0, x1, y1 = _extent(shape, r)
        for _ in range(1 if k == 0 else _PLACE_TRIES):
            cx = rng.uniform(_MARGIN - x0, ax - _MARGIN - x1)
            cy = rng.uniform(_MARGIN - y0, ay - _MARGIN - y1)
            box = (cx + x0, cy + y0, cx + x1, cy + y1)
            if all(not _boxes_overlap(box, o[5], _MARGIN) for o in objects):
                objects.append((shape, color, r, cx, cy, box))
                break

    seg = np.zeros((height, width), np.int64)
    boxes = np.zeros((MAX_BOXES, 4), np.float32)
    box_labels = np.full((MAX_BOXES,), -1, np.int64)
    shadow_soft = max(1.0, 0.03 * S)  # pixels
    for k, (shape, color, r, cx, cy, box) in enumerate(objects):
        # Soft drop shadow toward the bottom right: depth cue, only darkens.
        d = _sdf(shape, r, u - cx - 0.025, v - cy - 0.03)
        img *= (1 - 0.3 * np.clip(0.5 - d * S / shadow_soft, 0, 1))[..., None]
        dx, dy = u - cx, v - cy
        d = _sdf(shape, r, dx, dy)
        cov = np.clip(0.5 - d * S, 0, 1)  # analytic one-pixel anti-aliasing
        rgb = np.clip(_RGB[color] + rng.uniform(-0.06, 0.06, size=3).astype(np.float32), 0, 1)
        # Lit from the top left: a gentle ramp across the object gives it volume.
        light = 1 + 0.14 * np.clip(-(dx + dy) / (1.4 * r), -1, 1)
        fill = np.clip(rgb * light[..., None], 0, 1)
        img += (fill - img) * cov[..., None]
        cid = class_id(shape, color)
        seg[d <= 0] = 1 + cid
        boxes[k] = (box[0] / ax, box[1] / ay, box[2] / ax, box[3] / ay)
        box_labels[k] = cid

    caption = _caption(objects, bg)
    return {"image": np.clip(img, 0, 1), "label": class_id(objects[0][0], objects[0][1]),
            "caption": caption, "boxes": boxes, "box_labels": box_labels, "segmentation": seg}


def _count_probs(max_objects: int) -> np.ndarray:
    p = np.array([0.3, 0.4, 0.3][:max_objects])
    return p / p.sum()


def _caption(objects: list, bg: str) -> str:
    parts = [f"a {'large' if k == 0 else 'small'} {COLORS[o[1]]} {SHAPES[o[0]]}"
             for k, o in enumerate(objects)]
    if len(parts) == 1:
        text = parts[0]
    else:
        text = " , ".join(parts[:-1]) + " and " + parts[-1]
    text = text.replace(" , ", ", ")
    return f"{text} on a {_BG_WORDS[bg]} background"


class ProceduralShapes(Dataset):
    """Coloured shapes on textured backgrounds; item i is rendered from (seed, start + i).

    `start` offsets the index stream, so datasets with the same seed and non-overlapping
    [start, start + num_samples) ranges are disjoint (see `procedural_split`).
    """

    def __init__(self, num_samples: int, resolution: int | tuple[int, int], seed: int = 0,
                 start: int = 0, max_objects: int = MAX_BOXES,
                 backgrounds: Sequence[str] = BACKGROUNDS):
        if num_samples < 0:
            raise ValueError(f"num_samples: must be >= 0, got {num_samples}")
        h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if min(h, w) < 8:
            raise ValueError(f"resolution: each side must be >= 8 pixels, got {(h, w)}")
        if not 1 <= max_objects <= MAX_BOXES:
            raise ValueError(f"max_objects: must be in [1, {MAX_BOXES}], got {max_objects}")
        unknown = [b for b in backgrounds if b not in BACKGROUNDS]
        if unknown or not backgrounds:
            raise ValueError(f"backgrounds: expected a non-empty subset of {BACKGROUNDS}, got {backgrounds}")
        self.num_samples, self.height, self.width = int(num_samples), int(h), int(w)
        self.seed, self.start, self.max_objects = int(seed), int(start), int(max_objects)
        self.backgrounds = tuple(backgrounds)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        s = render(self.seed, self.start + index, self.height, self.width, self.max_objects,
                   self.backgrounds)
        image = torch.from_numpy(np.ascontiguousarray(s["image"].transpose(2, 0, 1)))
        return {
            "image": image * 2 - 1,
            "label": torch.tensor(s["label"], dtype=torch.int64),
            "caption": s["caption"],
            "boxes": torch.from_numpy(s["boxes"]),
            "box_labels": torch.from_numpy(s["box_labels"]),
            "segmentation": torch.from_numpy(s["segmentation"]),
        }


def procedural_split(resolution: int | tuple[int, int], train_size: int, heldout_size: int,
                     seed: int = 0, **kwargs) -> tuple[ProceduralShapes, ProceduralShapes]:
    """Disjoint (train, held-out) datasets: held-out items follow the training indices."""
    train = ProceduralShapes(train_size, resolution, seed=seed, start=0, **kwargs)
    heldout = ProceduralShapes(heldout_size, resolution, seed=seed, start=train_size, **kwargs)
    return train, heldout
