"""PSNR and SSIM on image batches in the model's range [-1, 1].

Both metrics are computed on images mapped to [0, 1] (data range 1), per image, then averaged:
that is the convention of the super-resolution and autoencoder literature (PSNR in dB of the
[0, 255] image equals PSNR of the [0, 1] image, since the ratio MAX²/MSE is scale-free).

SSIM is Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity"
(IEEE TIP 2004): an 11×11 Gaussian window with σ = 1.5, K1 = 0.01, K2 = 0.03, population
(not sample) variances, statistics computed per channel, averaged over the *valid* interior
(no padding, so borders are not biased by an invented edge) and then over channels.
This matches `skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1, channel_axis=0)`, which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class QualityResult:
    """A batch metric: one value per image and their mean."""

    per_image: torch.Tensor  # (N,) float64
    mean: float


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1] in float64; clamped, since a generator may overshoot its range and the
    metric is defined on displayable images."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    return ((x.detach().to(torch.float64) + 1.0) / 2.0).clamp(0.0, 1.0)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, max_db: float = 100.0) -> QualityResult:
    """Peak signal-to-noise ratio in dB between batches in [-1, 1], per image.

    Identical images have infinite PSNR; it is capped at `max_db` so a mean stays finite.
    """
    x, y = _to_unit(x), _to_unit(y)
    _check_pair(x, y)
    mse = (x - y).pow(2).flatten(1).mean(1)
    # data range is 1 after mapping to [0, 1]: PSNR = 10 log10(1 / MSE)
    val = torch.where(mse > 0, -10.0 * torch.log10(mse.clamp_min(1e-300)),
                      torch.full_like(mse, max_db)).clamp(max=max_db)
    return QualityResult(per_image=val, mean=float(val.mean()))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    # Normalised over the truncated support, as scipy.ndimage.gaussian_filter does.
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> QualityResult:
    """Structural similarity (Wang et al. 2004, Gaussian window) between batches in [-1, 1]."""
    x, y = _to_unit(x), _to_unit(y)
    _check_pair(x, y)
    n, c, h, w = x.shape
    if h < win_size or w < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {h}x{w}")
    g = _gaussian_window(win_size, sigma)
    # Separable filter applied depthwise (each channel on its own), valid region only.
    kh = g.view(1, 1, win_size, 1).expand(c, 1, win_size, 1)
    kw = g.view(1, 1, 1, win_size).expand(c, 1, 1, win_size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    # E[x²] − E[x]², i.e. population variance under the window weights.
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * 1.0) ** 2, (k2 * 1.0) ** 2  # data range 1
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    val = s.flatten(1).mean(1)  # mean over channels and valid positions (equal counts)
    return QualityResult(per_image=val, mean=float(val.mean()))


def grid_ratio(x: torch.Tensor, period: int) -> QualityResult:
    """How much a batch's edges line up with a grid of `period` pixels: the mean squared
    difference between neighbouring pixels across the grid's lines over the same mean at the
    grid's other phases.

    A latent diffusion model whose latent cells err one by one renders each cell's error as a
    blob the size of the cell, so its outputs get edges on the first stage's latent grid
    (`period` = f) and the ratio rises above 1; images with no preferred offset score ≈ 1.
    Per axis, the step from pixel k to k+1 is binned by (k+1) mod `period`; the grid's lines
    are the bin with the most energy relative to the others over the batch (not assumed to be
    0 — where a decoder puts its cell borders is learned; the first stages here put them at 0,
    the cells' edges in the decoder). A little above 1 on clean images, as that bin is picked
    from noise: compare against the reference images' own value.

    `mean` pools the batch (energies summed over images, then the ratio), so that it is
    carried by the images with visible edges; `per_image` is each image's own ratio, noisy
    for nearly flat images, whose few edges make any ratio. The same measure scores the
    blockiness of block-coded images.
    """
    x = _to_unit(x)
    n, c, h, w = x.shape
    if period < 2 or h <= period or w <= period:
        raise ValueError(f"grid_ratio needs period ≥ 2 and images larger than it, got period {period} "
                         f"for {h}x{w}")
    on, off = x.new_zeros(n), x.new_zeros(n)
    for d, size in ((x.diff(dim=-1), w), (x.diff(dim=-2).transpose(-1, -2), h)):
        # d[..., k] is the step from pixel k to k+1, binned by (k+1) mod period
        bins = torch.arange(1, size, device=x.device) % period
        energy = torch.stack([d[..., bins == b].pow(2).flatten(1).mean(1) for b in range(period)], 1)
        phase = int(energy.sum(0).argmax())  # the most energy is also the most relative to the rest
        on += energy[:, phase]
        off += (energy.sum(1) - energy[:, phase]) / (period - 1)
    return QualityResult(per_image=on / off.clamp_min(1e-12), mean=float(on.sum() / off.sum().clamp_min(1e-12)))
