"""Image tensors ↔ files: [-1, 1] float tensors to uint8 grids written with Pillow."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile a batch into one uint8 image, `nrow` images per row (default: square-ish), on a
    white background `pad` pixels wide. A single image is returned as it is: a frame around
    it would read as part of the picture (e.g. a white border on a super-resolved photo)."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    if b == 1:
        return arr[0]
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = arr[i]
    return grid


def _png_info(text: dict | None):
    """PNG tEXt chunks (key → str(value)); Pillow writes non-Latin-1 text as iTXt."""
    from PIL.PngImagePlugin import PngInfo

    if not text:
        return None
    info = PngInfo()
    for key, value in text.items():
        info.add_text(str(key), str(value))
    return info


def save_png(array: np.ndarray, path, text: dict | None = None, upscale: int = 1) -> Path:
    """Write one (H, W, 3) uint8 image with `text` in its PNG text chunks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    img.save(path, pnginfo=_png_info(text))
    return path


def save_grid(images: torch.Tensor, path, nrow: int | None = None, upscale: int = 1,
              text: dict | None = None) -> Path:
    """Write a PNG grid; `upscale` enlarges small images (nearest) so they can be seen;
    `text` goes into the PNG's text chunks."""
    return save_png(make_grid(images, nrow), path, text=text, upscale=upscale)
