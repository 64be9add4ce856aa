"""The InceptionV3 network that FID, KID, IS and precision/recall are defined on.

FID numbers are only comparable when computed with the *same* network: the TensorFlow graph
`inception-2015-12-05` (Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016),
whose weights are widely distributed for PyTorch as `pt_inception-2015-12-05-6726825d.pth`.
This module builds that architecture with the state-dict key names of that file
(`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, …, `fc.weight`) and
loads it from a local path — weights are never downloaded here.

The FID variant of InceptionV3 differs from the ImageNet classifier in four small ways that
come from the TF graph and change the numbers if ignored:
  * the average-pool branches of the A, C and first E blocks exclude the zero padding from
    the average (`count_include_pad=False`);
  * the last block (Mixed_7c) pools its pool branch with a *max* pool, not an average;
  * BatchNorm ε = 0.001;
  * 1008 output classes (the TF graph's label map).

Input pipeline: images are first quantised to uint8 exactly as they would be when saved to
PNG, then resized to 299×299 and normalised the way one of the published FID tools does it
(`RESIZE_MODES`; the same network and weights, different numbers at small resolutions):
  * "torch-fidelity" (the default): bilinear resize as TensorFlow 1.x computes it (source
    coordinate = output index × in/out, no half-pixel offset, no antialiasing) on float
    [0, 255], then (x − 128)/128. The LDM paper's FIDs come from torch-fidelity: it is the one
    FID tool of the original repository, pinned at 0.3.0 in its environment.yaml and installed
    by its ImageNet sampling notebook.
  * "pytorch-fid": x/255, `F.interpolate(bilinear, align_corners=False)` (half-pixel centres,
    no antialiasing), then 2x − 1.
  * "clean-fid" (Parmar et al., "On Aliased Resizing and Surprising Subtleties in GAN
    Evaluation", CVPR 2022): each channel as a float32 PIL image resized with PIL's
    antialiased bicubic filter, clipped to [0, 255], then (x − 128)/128.
Tests check each mode against that library's own code where it runs offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

ENV_VAR = "LDM_FID_INCEPTION"
RESIZE_MODES = ("torch-fidelity", "pytorch-fid", "clean-fid")
DEFAULT_MODE = "torch-fidelity"  # the tool behind the LDM paper's numbers (see the module docstring)
INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008


class InceptionWeightsUnavailable(FileNotFoundError):
    """The FID Inception weights are not on this machine, so FID/IS/KID cannot be computed."""


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (ε = 1e-3) → ReLU: the unit every Inception layer is made of."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    # TF's 'SAME' average pooling divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35×35 block: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avgpool→1×1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x)),
        ], 1)


class InceptionB(nn.Module):
    """Grid reduction 35→17: stride-2 3×3 | 1×1→3×3→stride-2 3×3 | max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """17×17 block with factorised 7×7 convolutions (1×7 then 7×1), `c7` inner channels."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17→8: 1×1→stride-2 3×3 | 1×1→1×7→7×1→stride-2 3×3 | max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8×8 block with expanded filter banks (1×3 and 3×1 side by side). `pool` is 'avg' for
    Mixed_7b and 'max' for Mixed_7c, as in the FID graph."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 as used for FID: (N, 3, 299, 299) in [-1, 1] → pool3 (N, 2048) and logits
    (N, 1008). Layer names follow the `pt_inception-2015-12-05` state dict."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)      # 299 → 149
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)               # → 147
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)    # → 147, max pool → 73
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)              # → 71, max pool → 35
        self.Mixed_5b = InceptionA(192, pool_features=32)         # → 256
        self.Mixed_5c = InceptionA(256, pool_features=64)         # → 288
        self.Mixed_5d = InceptionA(288, pool_features=64)         # → 288
        self.Mixed_6a = InceptionB(288)                           # → 768 @ 17×17
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)                           # → 1280 @ 8×8
        self.Mixed_7b = InceptionE(1280, pool="avg")              # → 2048
        self.Mixed_7c = InceptionE(2048, pool="max")              # → 2048
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """The 2048-d global-average-pooled features FID and precision/recall use."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return x.mean((2, 3))

    def logits(self, pool: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
        """Class logits from pool3. The reference Inception Score code multiplies pool3 by the
        softmax weight matrix *without* its bias, so IS uses `unbiased=True` to stay comparable
        with published scores."""
        return pool @ self.fc.weight.T if unbiased else self.fc(pool)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.pool3(x)
        return pool, self.logits(pool)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

def _unavailable(reason: str) -> InceptionWeightsUnavailable:
    return InceptionWeightsUnavailable(
        f"FID is unavailable: {reason}. FID/KID/IS need the standard InceptionV3 FID weights "
        f"'pt_inception-2015-12-05-6726825d.pth' (released with pytorch-fid, 'fid_weights'), "
        f"which this program never downloads. Copy the file to this machine and pass its path "
        f"(e.g. --inception PATH) or set {ENV_VAR}=PATH; a .safetensors conversion also works. "
        f"Without it, use the offline Fréchet distance in the project's own features "
        f"(ldm_fast.metrics.features, reported as FD-shapes, not FID).")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    # weights_only: a weights file must not be able to run code when loaded.
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return sd


def load_fid_inception(path: str | os.PathLike | None = None,
                       device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Build FIDInceptionV3 and load its weights from `path`, else from ${LDM_FID_INCEPTION}.

    Loading is strict: every parameter and buffer must be present with its shape, and no
    unknown keys are accepted. The one tolerated gap is BatchNorm's `num_batches_tracked`
    counter, which older PyTorch versions did not save and which evaluation never reads.
    Raises InceptionWeightsUnavailable when no file is given or found.
    """
    if path is None:
        path = os.environ.get(ENV_VAR) or None
        if path is None:
            raise _unavailable(f"no weights path given and ${ENV_VAR} is not set")
    path = Path(path).expanduser()
    if not path.is_file():
        raise _unavailable(f"weights file {str(path)!r} does not exist")
    sd = dict(_read_state_dict(path))
    model = FIDInceptionV3()
    own = model.state_dict()
    for key in own:
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = own[key]
    model.load_state_dict(sd, strict=True)
    return model.eval().requires_grad_(False).to(device)


# --------------------------------------------------------------------------------------------
# Input pipeline and feature extraction
# --------------------------------------------------------------------------------------------

def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] → (N, H, W, 3) uint8, rounded as an image writer would."""
    x = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def resize_for_inception(images_uint8: np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    """clean-fid's resize: each channel as a float32 PIL image, bicubic to size×size, clipped
    to [0, 255]; then (x − 128)/128 as in the TF graph. Input (N, H, W, 3) uint8; output
    (N, 3, size, size) float32."""
    if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8, got {images_uint8.dtype} {images_uint8.shape}")
    out = np.empty((images_uint8.shape[0], 3, size, size), dtype=np.float32)
    for i, img in enumerate(images_uint8):
        for c in range(3):
            ch = Image.fromarray(img[:, :, c].astype(np.float32))  # float32 → mode "F"
            out[i, c] = np.asarray(ch.resize((size, size), resample=Image.BICUBIC))
    out = np.clip(out, 0.0, 255.0)
    return torch.from_numpy((out - 128.0) / 128.0)


def _tf1_bilinear_weights(n_in: int, n_out: int):
    """TensorFlow 1.x resize_bilinear (align_corners=False) along one axis: output i reads
    source position i·n_in/n_out (float32, no half-pixel offset), between floor and the next
    pixel (clamped at the border)."""
    pos = torch.arange(n_out, dtype=torch.float32) * torch.tensor(n_in / n_out, dtype=torch.float32)
    lo = pos.long()
    return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.float()


def resize_tf1_bilinear(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """(N, C, H, W) float → (N, C, size, size), torch-fidelity's resize (TF 1.x bilinear)."""
    ylo, yhi, dy = _tf1_bilinear_weights(x.shape[2], size)
    xlo, xhi, dx = _tf1_bilinear_weights(x.shape[3], size)
    top, bottom = x[:, :, ylo], x[:, :, yhi]
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * dx
    bottom = bottom[..., xlo] + (bottom[..., xhi] - bottom[..., xlo]) * dx
    return top + (bottom - top) * dy[:, None]


def preprocess(images_uint8: np.ndarray, mode: str = DEFAULT_MODE, size: int = INPUT_SIZE) -> torch.Tensor:
    """(N, H, W, 3) uint8 → the (N, 3, size, size) float32 network input of FID tool `mode`."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"FID mode: expected one of {RESIZE_MODES}, got {mode!r}")
    if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8, got {images_uint8.dtype} {images_uint8.shape}")
    if mode == "clean-fid":
        return resize_for_inception(images_uint8, size)
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float()
    if mode == "torch-fidelity":
        return (resize_tf1_bilinear(x, size) - 128) / 128
    x = F.interpolate(x / 255, size=(size, size), mode="bilinear", align_corners=False)
    return 2 * x - 1


@torch.no_grad()
def inception_features(model: FIDInceptionV3, images, batch_size: int = 50,
                       device: str | torch.device | None = None,
                       mode: str = DEFAULT_MODE) -> tuple[np.ndarray, np.ndarray]:
    """pool3 features (N, 2048) and class probabilities (N, 1008) for images in [-1, 1].

    `images` is a (N, 3, H, W) tensor or an iterable of such batches (e.g. a sampler's output
    stream), processed `batch_size` at a time so memory stays bounded; `mode` picks the FID
    tool whose resize and normalisation are reproduced (RESIZE_MODES).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"FID mode: expected one of {RESIZE_MODES}, got {mode!r}")
    device = device or next(model.parameters()).device
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    pools, probs = [], []
    for batch in batches:
        for chunk in batch.split(batch_size):
            x = preprocess(to_uint8(chunk), mode).to(device)
            pool, logits = model(x)
            pools.append(pool.double().cpu().numpy())
            probs.append(torch.softmax(logits.double(), 1).cpu().numpy())
    if not pools:
        raise ValueError("no images given")
    return np.concatenate(pools), np.concatenate(probs)


def fid(images_a, images_b, weights: str | os.PathLike | None = None, mode: str = DEFAULT_MODE,
        batch_size: int = 50, device: str | torch.device = "cpu") -> float:
    """FID between two image sets in [-1, 1] ((N, 3, H, W) tensors or iterables of batches),
    with the FID Inception from `weights` (else ${LDM_FID_INCEPTION}) and the input pipeline
    of FID tool `mode`. Raises InceptionWeightsUnavailable without the weights file."""
    from ldm_fast.metrics.frechet import feature_statistics, frechet_distance

    model = load_fid_inception(weights, device)
    stats = [feature_statistics(inception_features(model, x, batch_size, device, mode)[0])
             for x in (images_a, images_b)]
    return frechet_distance(*stats[0], *stats[1])
