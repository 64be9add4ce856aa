"""A photograph given to `sample --lr` / `--image` is read as training reads images, goes
through the SR degradation as Pillow would resize it, and comes back without a frame."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_fast import cli
from ldm_fast.data.degradations import bicubic_downsample
from ldm_fast.data.folder import load_image
from ldm_fast.images import to_uint8


def _photo(h=24, w=32):
    skdata = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(skdata.astronaut()[40:40 + h, 180:180 + w])


def _args(**kw):
    base = dict(prompt=None, negative_prompt=None, class_labels=None, boxes=None, semantic=None, lr=None,
                image=None, mask=None)
    return argparse.Namespace(**{**base, **kw})


def test_lr_photo_is_read_like_training_images_edges_included(tmp_path):
    photo = _photo()
    Image.fromarray(photo).save(tmp_path / "photo.png")
    lr = cli.pipeline_inputs(_args(lr=str(tmp_path / "photo.png")))["lr"]
    from ldm_fast.pipeline_inputs import as_batch

    x = as_batch("lr", lr)[0]
    expected = torch.from_numpy(photo.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.equal(x, expected)  # every pixel, the outermost rows and columns too
    assert torch.equal(x, load_image(tmp_path / "photo.png", 24, 32))


def test_lr_photo_with_alpha_is_composited_on_white_as_in_training(tmp_path):
    rgba = np.concatenate([_photo(), np.full((24, 32, 1), 255, np.uint8)], -1)
    rgba[:2, :, 3] = 0  # a transparent top strip storing black pixels
    rgba[:2, :, :3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    from ldm_fast.pipeline_inputs import as_batch

    x = as_batch("lr", cli.pipeline_inputs(_args(lr=str(tmp_path / "alpha.png")))["lr"])[0]
    assert torch.equal(x, load_image(tmp_path / "alpha.png", 24, 32))
    assert torch.equal(x[:, :2], torch.ones_like(x[:, :2]))


def test_sr_degradation_matches_pillow_at_the_border():
    photo = _photo(64, 64)
    x = torch.from_numpy(photo.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    ref = np.asarray(Image.fromarray(photo).resize((16, 16), Image.Resampling.BICUBIC), np.float32) / 127.5 - 1
    diff = (bicubic_downsample(x, 4) - torch.from_numpy(ref).permute(2, 0, 1)).abs()
    assert diff.max() < 1.5 / 127.5  # uint8 rounding, in the outermost rows/columns as inside
    assert diff[:, [0, -1]].max() < 1.5 / 127.5 and diff[:, :, [0, -1]].max() < 1.5 / 127.5


def test_one_output_image_is_written_without_frame_or_pixel_blocks(tmp_path):
    from types import SimpleNamespace

    image = torch.rand(1, 3, 32, 32) * 2 - 1
    result = SimpleNamespace(images=image, seeds=[0], metadata=[{"model": "m", "seed": 0}])
    out = tmp_path / "sr.png"
    cli.write_outputs(result, argparse.Namespace(outdir=None, out=str(out), nrow=None))
    with Image.open(out) as im:
        written = np.asarray(im.convert("RGB"))
    assert np.array_equal(written, to_uint8(image)[0])  # same size, same edge pixels
    grid = tmp_path / "grid.png"
    result2 = SimpleNamespace(images=image.repeat(2, 1, 1, 1), seeds=[0, 1], metadata=[{}, {}])
    cli.write_outputs(result2, argparse.Namespace(outdir=None, out=str(grid), nrow=None))
    with Image.open(grid) as im:
        assert im.size == (4 * (2 * 34 + 2), 4 * 36)  # a grid of tiny images: framed, enlarged ×4
