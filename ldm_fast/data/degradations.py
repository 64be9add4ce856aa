"""Low-resolution inputs for super-resolution: bicubic x4 (LDM-SR) and the generic LDM-BSR pipeline.

LDM-BSR follows the degradation model of BSR-GAN (Zhang et al., "Designing a Practical
Degradation Model for Deep Blind Image Super-Resolution", ICCV 2021), as the LDM paper's
appendix describes: isotropic and anisotropic Gaussian blur, downsampling with a randomly
chosen interpolation, Gaussian noise, camera sensor noise and JPEG compression, applied in
random order, then a final resize to the exact target size and a last JPEG round.

Images are float tensors in [-1, 1], (3, H, W) or (B, 3, H, W); H and W must be multiples of
the factor. All randomness comes from one numpy Generator (a torch Generator or an int seed
is turned into one), so a degradation is reproducible.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .epoch import epoch_of

MODES = ("bicubic", "bsr")
INTERPOLATIONS = ("area", "bilinear", "bicubic")

GeneratorLike = np.random.Generator | torch.Generator | int | None


def as_numpy_rng(generator: GeneratorLike) -> np.random.Generator:
    """A numpy Generator from a numpy/torch generator or a seed (None: fresh entropy)."""
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        # One draw advances the torch generator, so successive calls differ yet replay exactly.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return np.random.default_rng(seed)
    return np.random.default_rng(generator)


def check_image(image: torch.Tensor, factor: int) -> None:
    """Raise ValueError unless `image` is (3, H, W) or (B, 3, H, W), finite, in [-1, 1], and
    H, W are multiples of `factor`."""
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor: must be a positive integer, got {factor!r}")
    if not torch.is_tensor(image) or image.dim() not in (3, 4) or image.shape[-3] != 3:
        shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise ValueError(f"image: expected a (3, H, W) or (B, 3, H, W) tensor, got {shape}")
    h, w = image.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not a multiple of the downsampling factor {factor}")
    # One reduction: min/max propagate NaN and expose infinities.
    lo, hi = (v.item() for v in torch.aminmax(image.detach().float()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("image: contains NaN or infinite values")
    if lo < -1.01 or hi > 1.01:  # small float overshoot is fine; [0, 255] data is not
        raise ValueError(f"image: values must lie in [-1, 1], got [{lo:.3g}, {hi:.3g}]")


def bicubic_downsample(image: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """LDM-SR degradation: antialiased bicubic downsampling by `factor` (as Pillow/MATLAB resize)."""
    check_image(image, factor)
    x = image if image.dim() == 4 else image[None]
    h, w = x.shape[-2:]
    y = F.interpolate(x.float(), size=(h // factor, w // factor), mode="bicubic",
                      antialias=True, align_corners=False).clamp(-1, 1)
    return y if image.dim() == 4 else y[0]


@dataclass
class BSRConfig:
    """Parameter ranges of the LDM-BSR pipeline (pixel units refer to the current image size)."""

    blur_prob: float = 0.85  # chance each of the two blur steps runs
    isotropic_prob: float = 0.5  # isotropic vs anisotropic (rotated, two sigmas) kernel
    blur_sigma: tuple[float, float] = (0.2, 3.0)  # Gaussian std in pixels
    max_kernel: int = 21  # kernel side cap; 2 * ceil(3 sigma) + 1 below it
    resize_prob: float = 0.5  # chance of an extra intermediate downscale by a random ratio
    noise_prob: float = 0.9  # additive Gaussian noise
    noise_sigma: tuple[float, float] = (1 / 255, 25 / 255)  # std, in [0, 1] intensity units
    gray_noise_prob: float = 0.4  # same noise on all channels (luminance) vs per channel
    camera_prob: float = 0.25  # sensor noise: shot (signal-dependent) + read noise in linear light
    shot_noise: tuple[float, float] = (5e-4, 1e-2)  # variance per unit linear intensity
    read_noise: tuple[float, float] = (2e-4, 2e-3)  # std in linear intensity (gamma magnifies it in shadows)
    jpeg_prob: float = 0.5  # JPEG inside the shuffled sequence (one more always ends it)
    jpeg_quality: tuple[int, int] = (30, 95)


def gaussian_kernel(rng: np.random.Generator, config: BSRConfig) -> np.ndarray:
    """Random isotropic or anisotropic Gaussian kernel, normalised to sum 1."""
    lo, hi = config.blur_sigma
    if rng.random() < config.isotropic_prob:
        s1 = s2 = rng.uniform(lo, hi)
        theta = 0.0
    else:
        s1, s2 = rng.uniform(lo, hi, size=2)
        theta = rng.uniform(0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([s1 * s1, s2 * s2]) @ rot.T
    half = min(int(np.ceil(3 * max(s1, s2))), config.max_kernel // 2)
    r = np.arange(-half, half + 1)
    xy = np.stack(np.meshgrid(r, r, indexing="xy"), -1).astype(np.float64)  # (k, k, 2)
    k = np.exp(-0.5 * np.einsum("...i,ij,...j->...", xy, np.linalg.inv(cov), xy))
    return (k / k.sum()).astype(np.float32)


def _blur(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Filter (H, W, 3) with a centred (k, k) Gaussian, edges replicated (any image size).

    Done by FFT: cost independent of the kernel size, and numpy's FFT is single-threaded,
    so it stays fast inside busy DataLoader workers. Gaussians are symmetric, so convolution
    and correlation agree.
    """
    h, w = x.shape[:2]
    p = kernel.shape[0] // 2
    padded = np.pad(x, ((p, p), (p, p), (0, 0)), mode="edge")
    shape = padded.shape[:2]
    spec = np.fft.rfft2(padded, axes=(0, 1)) * np.fft.rfft2(kernel, s=shape)[..., None]
    full = np.fft.irfft2(spec, s=shape, axes=(0, 1))
    # Linear convolution output index i = y + 2p reads padded rows y .. y + 2p: no wrap-around.
    return full[2 * p:2 * p + h, 2 * p:2 * p + w].astype(np.float32)


_PIL_FILTERS = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC}


def _resize(x: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    # Pillow resizes float ('F') planes with antialiasing, channel by channel.
    h, w = size
    planes = [np.asarray(Image.fromarray(x[..., c]).resize((w, h), _PIL_FILTERS[mode]))
              for c in range(3)]
    return np.stack(planes, -1).astype(np.float32)


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    arr = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _gaussian_noise(x: np.ndarray, rng: np.random.Generator, config: BSRConfig) -> np.ndarray:
    sigma = rng.uniform(*config.noise_sigma)
    shape = (*x.shape[:2], 1) if rng.random() < config.gray_noise_prob else x.shape
    return x + rng.normal(0, sigma, size=shape).astype(np.float32)


def _camera_noise(x: np.ndarray, rng: np.random.Generator, config: BSRConfig) -> np.ndarray:
    # Sensor noise lives in linear light: undo the display gamma, add Poisson-Gaussian noise
    # (variance a*signal + b^2), reapply gamma, so shadows get the visible grain real cameras show.
    lin = np.clip(x, 0, 1) ** 2.2
    a, b = rng.uniform(*config.shot_noise), rng.uniform(*config.read_noise)
    noisy = lin + np.sqrt(a * lin + b * b) * rng.normal(0, 1, size=x.shape)
    return (np.clip(noisy, 0, 1) ** (1 / 2.2)).astype(np.float32)


def _bsr_one(x: np.ndarray, factor: int, rng: np.random.Generator, config: BSRConfig) -> np.ndarray:
    """One (H, W, 3) image in [0, 1] through the shuffled pipeline.

    numpy + Pillow rather than torch: these are many small ops on one image, typically in a
    DataLoader worker, where torch's intra-op threading only adds overhead.
    """
    h, w = x.shape[:2]
    th, tw = h // factor, w // factor
    for step in rng.permutation(["blur", "blur", "resize", "noise", "camera", "jpeg"]):
        if step == "blur" and rng.random() < config.blur_prob:
            x = _blur(x, gaussian_kernel(rng, config))
        elif step == "resize" and rng.random() < config.resize_prob and factor > 1:
            # Downscale by a random ratio in [1, factor] now; the exact size comes at the end.
            s = rng.uniform(1, factor)
            size = (max(th, round(x.shape[0] / s)), max(tw, round(x.shape[1] / s)))
            x = _resize(x, size, INTERPOLATIONS[int(rng.integers(len(INTERPOLATIONS)))])
        elif step == "noise" and rng.random() < config.noise_prob:
            x = _gaussian_noise(x, rng, config)
        elif step == "camera" and rng.random() < config.camera_prob:
            x = _camera_noise(x, rng, config)
        elif step == "jpeg" and rng.random() < config.jpeg_prob:
            x = _jpeg(x, rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
        x = np.clip(x, 0, 1)
    if x.shape[:2] != (th, tw):
        x = np.clip(_resize(x, (th, tw), INTERPOLATIONS[int(rng.integers(len(INTERPOLATIONS)))]), 0, 1)
    return _jpeg(x, rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))


def bsr_degrade(image: torch.Tensor, factor: int = 4, generator: GeneratorLike = None,
                config: BSRConfig | None = None) -> torch.Tensor:
    """LDM-BSR degradation of (3, H, W) or (B, 3, H, W) in [-1, 1] to (…, H/f, W/f) in [-1, 1]."""
    check_image(image, factor)
    rng, config = as_numpy_rng(generator), config or BSRConfig()
    batch = image if image.dim() == 4 else image[None]
    out = [_bsr_one((x.detach().float().cpu().permute(1, 2, 0).numpy() + 1) / 2, factor, rng, config)
           for x in batch]
    y = torch.from_numpy(np.stack(out).transpose(0, 3, 1, 2) * 2 - 1).clamp(-1, 1).to(image.device)
    return y if image.dim() == 4 else y[0]


def degrade(image: torch.Tensor, mode: str = "bicubic", factor: int = 4,
            generator: GeneratorLike = None) -> torch.Tensor:
    """The low-resolution input for super-resolution: mode 'bicubic' (LDM-SR) or 'bsr' (LDM-BSR)."""
    if mode == "bicubic":
        return bicubic_downsample(image, factor)
    if mode == "bsr":
        return bsr_degrade(image, factor, generator)
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


class SuperResolutionPairs(Dataset):
    """Wraps a dataset of {'image', ...} and adds 'lr': its degraded (3, H/f, W/f) version.

    The degradation of item i is drawn from (seed, epoch, i): reproducible, and fresh each
    epoch — the epoch comes with the index from the training sampler (ldm_fast.data.epoch),
    or from `set_epoch` for plain int indices.
    """

    def __init__(self, dataset: Dataset, mode: str = "bicubic", factor: int = 4, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.dataset, self.mode, self.factor, self.seed, self.epoch = dataset, mode, factor, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch_of(index, self.epoch), int(index)])
        return self.add_to(self.dataset[index], rng)

    def add_to(self, item: dict, rng: np.random.Generator) -> dict:
        """`item` plus its 'lr' drawn from `rng` (also used on streamed shard samples)."""
        item = dict(item)
        item["lr"] = degrade(item["image"], self.mode, self.factor, rng)
        return item
