"""Image-folder dataset: the user's own pictures, with optional caption side files.

A corrupt file must never stop a training run, so validation happens twice:

* at construction (`validate="full"`, the default), every candidate is decoded once (JPEGs
  at reduced scale, which still reads every byte). Files that are not images, empty,
  truncated or otherwise broken are skipped here, listed in `skipped` and reported in one
  warning, so the count is complete before training starts. For very large folders
  `validate="header"` only checks headers (no pixel decoding; misses truncated data) and
  `"none"` checks nothing; tar shards (`ldm_fast.data.shards`) are the better format there.
* at load time, a file that still fails to decode (e.g. a truncated JPEG whose header was
  fine, or a file changed since) is recorded, warned about once, and the next good index
  is returned instead, so a batch always fills. Load-time skips are recorded in the process that hit them (a
  DataLoader worker has its own copy of `skipped`); the warning reaches stderr from there.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
VALIDATE_MODES = ("header", "full", "none")


def load_image(path: str | os.PathLike, height: int, width: int) -> torch.Tensor:
    """Decode, centre-crop to the target aspect and resize; float32 (3, H, W) in [-1, 1]."""
    with Image.open(path) as im:
        # JPEG can decode at 1/2, 1/4, 1/8 scale: ask for the smallest that still covers the
        # crop, which makes large photos several times cheaper to load.
        scale = max(height / im.height, width / im.width)
        if scale < 1:
            im.draft("RGB", (int(np.ceil(im.width * scale)), int(np.ceil(im.height * scale))))
        im = ImageOps.exif_transpose(im)  # camera rotation, so portraits stay upright
        im = _to_rgb(im)
    W, H = im.size
    # Largest centred box with the target aspect ratio.
    if W * height > H * width:
        cw, ch = H * width / height, H
    else:
        cw, ch = W, W * height / width
    box = ((W - cw) / 2, (H - ch) / 2, (W + cw) / 2, (H + ch) / 2)
    # LANCZOS (antialiased) when shrinking, BICUBIC when enlarging.
    resample = Image.Resampling.LANCZOS if cw > width else Image.Resampling.BICUBIC
    im = im.resize((width, height), resample=resample, box=box)
    arr = np.asarray(im, dtype=np.float32).transpose(2, 0, 1)
    return torch.from_numpy(arr / 127.5 - 1.0)


def pil_rgb(im: Image.Image) -> Image.Image:
    """A decoded picture the way training sees it: camera rotation applied (EXIF), 16-bit
    tones kept, transparency composited on white. Sampling inputs (`--lr`, `--image`) go
    through this too, so a photograph is read the same way it would be for training."""
    return _to_rgb(ImageOps.exif_transpose(im))


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (a plain convert would expose whatever
    colour the transparent pixels happen to store, often black)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit greyscale (e.g. PNG): Pillow's convert would clip everything above 255.
        arr = np.asarray(im, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def find_images(root: str | os.PathLike) -> list[Path]:
    """Image files under `root`, recursively, sorted; a clear error for a missing or empty folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found or not a directory: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return paths


def caption_path(path: Path) -> Path:
    """The caption side file of an image: same basename, .txt."""
    return path.with_suffix(".txt")


def validate_images(paths: list[Path], mode: str = "full",
                    sizes: list | None = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """Split `paths` into readable images and (path, reason) pairs for the rest (see module doc).
    `sizes`, when given, receives the (width, height) of each readable image (None in mode "none")."""
    if mode not in VALIDATE_MODES:
        raise ValueError(f"validate: expected one of {VALIDATE_MODES}, got {mode!r}")
    good, skipped = [], []
    for p in paths:
        try:
            size = _check(p, mode)
            good.append(p)
            if sizes is not None:
                sizes.append(size)
        except Exception as e:  # Pillow raises many types for bad files; all mean "skip"
            skipped.append((str(p), f"{type(e).__name__}: {e}"))
    return good, skipped


def report_skipped(what: str, skipped: list[tuple[str, str]], total: int) -> None:
    """One warning naming the first few skipped files and the count."""
    if skipped:
        shown = "; ".join(f"{p} ({r})" for p, r in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(f"{what}: skipped {len(skipped)} of {total} files as unreadable: {shown}{more}",
                      stacklevel=3)


def _check(path: Path, mode: str) -> tuple[int, int] | None:
    """Raise if the file is not a readable image (header only, or a full decode); its size."""
    if mode == "none":
        return None
    with Image.open(path) as im:
        size = im.size  # before draft(), which shrinks it
        if mode == "full":
            im.draft("RGB", (64, 64))  # a reduced JPEG decode still reads every byte
            im.load()
        else:
            im.verify()  # header sanity; PNG chunk CRCs too, without decompressing
    return size


class ImageFolderDataset(Dataset):
    """Images under `root` (recursive; .jpg/.jpeg/.png/.webp in any case), centre-cropped and resized.

    Items: {'image': float32 (3, H, W) in [-1, 1], 'caption': str} where the caption is the
    text of a side file with the same basename and a .txt extension ('' when there is none,
    or when captions=False). Unreadable files are skipped (see the module docstring);
    `skipped` lists (path, reason) pairs and `num_skipped` counts them.
    """

    def __init__(self, root: str | os.PathLike, resolution: int | tuple[int, int],
                 captions: bool = True, validate: str = "full"):
        self.root = Path(root)
        h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if min(h, w) < 1:
            raise ValueError(f"resolution: must be positive, got {(h, w)}")
        self.height, self.width, self.captions = int(h), int(w), bool(captions)
        candidates = find_images(self.root)
        self.num_found = len(candidates)
        self.sizes: list = []  # (width, height) per path, for the run's data summary
        self.paths, self.skipped = validate_images(candidates, validate, self.sizes)
        report_skipped(f"ImageFolderDataset({self.root})", self.skipped, len(candidates))
        if not self.paths:
            raise ValueError(f"all {len(candidates)} image files under {self.root} are unreadable")
        self._bad: set[int] = set()

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.paths)

    def has_caption(self, index: int) -> bool:
        return caption_path(self.paths[index]).is_file()

    def caption_for(self, path: Path) -> str:
        side = caption_path(path)
        if not self.captions or not side.is_file():
            return ""
        return side.read_text(encoding="utf-8", errors="replace").strip()

    def __getitem__(self, index: int) -> dict:
        n = len(self.paths)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        # Walk forward from the requested index past files that fail to decode; the
        # substitute is deterministic, so a resumed run sees the same batches.
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            path = self.paths[i]
            try:
                image = load_image(path, self.height, self.width)
            except Exception as e:
                self._bad.add(i)
                self.skipped.append((str(path), f"{type(e).__name__}: {e}"))
                warnings.warn(f"ImageFolderDataset: skipping unreadable {path} "
                              f"({type(e).__name__}: {e}); using another image in its place")
                continue
            return {"image": image, "caption": self.caption_for(path)}
        raise RuntimeError(f"every image under {self.root} failed to decode; see .skipped")
