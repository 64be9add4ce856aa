"""Tiled decoding: decode a large latent in overlapping tiles and blend the seams, so decoding a
megapixel image from convolutional sampling needs the memory of one tile, not of the image."""

from __future__ import annotations

import torch


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]  # the last tile ends flush with the border


def _ramp(n: int, overlap: int, device) -> torch.Tensor:
    """1 in the middle, rising linearly over `overlap` pixels at both ends (never 0, so a pixel
    covered by one tile keeps its weight)."""
    w = torch.ones(n, device=device)
    if overlap > 0:
        edge = torch.linspace(1.0 / (overlap + 1), 1.0, overlap + 1, device=device)[:-1]
        w[:overlap] = edge
        w[n - overlap:] = edge.flip(0)
    return w


@torch.no_grad()
def decode_tiled(decode, z: torch.Tensor, factor: int, tile: int = 32, overlap: int = 8) -> torch.Tensor:
    """decode: latents (B, C, h, w) → images (B, 3, h·f, w·f). `tile` and `overlap` in latent
    pixels. Overlapping tiles are averaged with linear ramps, which hides the seams the decoder's
    border effects would otherwise leave."""
    if overlap >= tile:
        raise ValueError(f"overlap ({overlap}) must be smaller than tile ({tile})")
    b, _, h, w = z.shape
    if h <= tile and w <= tile:
        return decode(z)
    out = weight = None
    for y in _starts(h, tile, tile - overlap):
        for x in _starts(w, tile, tile - overlap):
            piece = decode(z[:, :, y:y + tile, x:x + tile]).float()
            ph, pw = piece.shape[-2:]
            if out is None:
                out = torch.zeros(b, piece.shape[1], h * factor, w * factor, device=piece.device)
                weight = torch.zeros(1, 1, h * factor, w * factor, device=piece.device)
            ov = overlap * factor
            wy = _ramp(ph, ov if y > 0 or y + tile < h else 0, piece.device)
            wx = _ramp(pw, ov if x > 0 or x + tile < w else 0, piece.device)
            mask = wy[:, None] * wx[None, :]
            ys, xs = y * factor, x * factor
            out[:, :, ys:ys + ph, xs:xs + pw] += piece * mask
            weight[:, :, ys:ys + ph, xs:xs + pw] += mask
    return (out / weight).to(z.dtype)
