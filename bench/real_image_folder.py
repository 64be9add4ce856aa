"""Build a folder of real 32×32 photographs from pictures that ship inside installed packages
(scikit-image's `skimage.data` colour photographs, matplotlib's Grace Hopper portrait), so
the image-folder path can be trained and measured on real images without a download.

    python bench/real_image_folder.py /tmp/photos32            # ~2,500 PNGs in 9 subfolders

Layout: OUT/<photo>/<photo>-<scale>-<row>-<col>.png, one subfolder per source photo (the
usual "one folder per class/source" layout the stratified held-out split is for), with a
caption side file `.txt` for 9 of every 10 crops (the rest have none, as in real folders).
Each photo is resized so its short side is 384, 256 and 128 pixels (LANCZOS) and cut into
non-overlapping 32×32 tiles: three scales of detail per photo. Nearly uniform tiles (pixel
std < 3 of 255: the black sky of the Hubble field, the retina's black border) are left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Source photo → what its caption says.
PHOTOS = {
    "astronaut": "a photograph of an astronaut with a flag",
    "coffee": "a photograph of a cup of coffee",
    "chelsea": "a photograph of a tabby cat",
    "rocket": "a photograph of a rocket on a launch pad",
    "hubble_deep_field": "a telescope photograph of distant galaxies",
    "immunohistochemistry": "a microscope photograph of stained tissue",
    "retina": "a photograph of a human retina",
    "stereo_motorcycle": "a photograph of a motorcycle",
    "grace_hopper": "a portrait photograph of a woman in uniform",
}
SIDE = 32
SHORT_SIDES = (384, 256, 128)
MIN_STD = 3.0


def load_photo(name: str) -> np.ndarray:
    """uint8 (H, W, 3) of one of PHOTOS."""
    if name == "grace_hopper":
        import matplotlib.cbook

        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
            return np.asarray(im.convert("RGB"))
    from skimage import data

    arr = getattr(data, name)()
    arr = arr[0] if isinstance(arr, tuple) else arr  # stereo_motorcycle: (left, right, disparity)
    return np.ascontiguousarray(arr[..., :3])


def crops(photo: np.ndarray):
    """(scale, row, col, uint8 SIDE×SIDE×3 tile) for each kept tile of the photo."""
    im = Image.fromarray(photo)
    for short in SHORT_SIDES:
        k = short / min(im.size)
        scaled = np.asarray(im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.LANCZOS))
        for r in range(scaled.shape[0] // SIDE):
            for c in range(scaled.shape[1] // SIDE):
                tile = scaled[r * SIDE:(r + 1) * SIDE, c * SIDE:(c + 1) * SIDE]
                if tile.astype(np.float32).std() >= MIN_STD:
                    yield short, r, c, tile


def build(out: Path) -> dict[str, int]:
    """Write the folder; returns crops per photo."""
    counts = {}
    for name, caption in PHOTOS.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        n = 0
        for short, r, c, tile in crops(load_photo(name)):
            stem = folder / f"{name}-{short}-{r:02d}-{c:02d}"
            Image.fromarray(tile).save(stem.with_suffix(".png"))
            if n % 10 != 9:
                stem.with_suffix(".txt").write_text(caption + "\n")
            n += 1
        counts[name] = n
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (created)")
    args = p.parse_args(argv)
    try:
        counts = build(Path(args.out))
    except ImportError as exc:
        print(f"error: {exc} (the photographs come from scikit-image and matplotlib)", file=sys.stderr)
        return 2
    print(f"wrote {sum(counts.values())} crops to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
