"""Procedural shapes and image folders: determinism, annotations, resolutions, bad files."""

import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from ldm_fast.data.folder import ImageFolderDataset
from ldm_fast.data.procedural import (
    CLASS_NAMES, COLORS, MAX_BOXES, NUM_CLASSES, NUM_SEG_CLASSES, SHAPES, VOCAB, ProceduralShapes,
    class_id, class_name, procedural_split,
)


# ----------------------------------------------------------------------------- procedural

def _same(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] if isinstance(a[k], str) else torch.equal(a[k], b[k]) for k in a)


def test_constants():
    assert NUM_CLASSES == len(SHAPES) * len(COLORS) == len(CLASS_NAMES)
    assert NUM_SEG_CLASSES == NUM_CLASSES + 1
    assert class_name(class_id(2, 3)) == f"{COLORS[3]} {SHAPES[2]}"


@pytest.mark.parametrize("resolution", [32, 64, 128, 256, (32, 48)])
def test_item_shapes_dtypes_ranges(resolution):
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    ds = ProceduralShapes(3, resolution, seed=1)
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"image", "label", "caption", "boxes", "box_labels", "segmentation"}
        assert item["image"].shape == (3, h, w) and item["image"].dtype == torch.float32
        assert -1 <= item["image"].min() and item["image"].max() <= 1
        assert item["label"].shape == () and item["label"].dtype == torch.int64
        assert item["boxes"].shape == (MAX_BOXES, 4) and item["boxes"].dtype == torch.float32
        assert item["box_labels"].shape == (MAX_BOXES,) and item["box_labels"].dtype == torch.int64
        assert item["segmentation"].shape == (h, w) and item["segmentation"].dtype == torch.int64
        seg = item["segmentation"]
        assert 0 <= seg.min() and seg.max() < NUM_SEG_CLASSES


def test_deterministic_and_seed_dependent():
    a, b = ProceduralShapes(4, 32, seed=3), ProceduralShapes(4, 32, seed=3)
    assert all(_same(a[i], b[i]) for i in range(4))
    c = ProceduralShapes(4, 32, seed=4)
    assert not torch.equal(a[0]["image"], c[0]["image"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert _same(a[-1], a[3])
    with pytest.raises(IndexError):
        a[4]


def test_split_is_disjoint_continuation():
    train, held = procedural_split(32, 10, 5, seed=2)
    assert len(train) == 10 and len(held) == 5
    longer = ProceduralShapes(15, 32, seed=2)
    assert _same(held[0], longer[10]) and _same(train[9], longer[9])
    train_imgs = torch.stack([train[i]["image"] for i in range(10)])
    for j in range(5):
        assert (train_imgs - held[j]["image"]).abs().flatten(1).amax(1).min() > 0.05


def test_annotations_consistent():
    ds = ProceduralShapes(120, 48, seed=5)
    counts = set()
    for i in range(len(ds)):
        item = ds[i]
        labels, boxes, seg = item["box_labels"], item["boxes"], item["segmentation"]
        n = int((labels >= 0).sum())
        counts.add(n)
        assert 1 <= n <= MAX_BOXES and (labels[:n] >= 0).all() and (labels[n:] == -1).all()
        assert (boxes[n:] == 0).all()
        assert labels[0] == item["label"]  # main object first
        assert (boxes[:n, 0] < boxes[:n, 2]).all() and (boxes[:n, 1] < boxes[:n, 3]).all()
        assert (boxes[:n] >= 0).all() and (boxes[:n] <= 1).all()
        # Every object's pixels (pixel centres) lie inside the union of boxes of its class.
        H, W = seg.shape
        ys, xs = torch.meshgrid((torch.arange(H) + 0.5) / H, (torch.arange(W) + 0.5) / W, indexing="ij")
        areas = []
        for k in range(n):
            cls = int(labels[k])
            x0, y0, x1, y1 = boxes[k].tolist()
            inside = (xs >= x0 - 1e-5) & (xs <= x1 + 1e-5) & (ys >= y0 - 1e-5) & (ys <= y1 + 1e-5)
            areas.append(int(((seg == cls + 1) & inside).sum()))
            assert areas[-1] > 0, "every object is visible in the map"
        for cls in labels[:n].unique().tolist():
            union = torch.zeros_like(seg, dtype=torch.bool)
            for k in range(n):
                if labels[k] == cls:
                    x0, y0, x1, y1 = boxes[k].tolist()
                    union |= (xs >= x0 - 1e-5) & (xs <= x1 + 1e-5) & (ys >= y0 - 1e-5) & (ys <= y1 + 1e-5)
            assert not ((seg == cls + 1) & ~union).any()
        assert set(seg.unique().tolist()) <= {0} | {int(c) + 1 for c in labels[:n]}
        assert areas[0] == max(areas), "the main object is the largest"
        # The caption names the objects in box order, from the fixed vocabulary.
        cap = item["caption"]
        assert set(cap.replace(",", " , ").split()) <= set(VOCAB)
        pos = [cap.index(class_name(int(c))) for c in labels[:n]]
        assert pos == sorted(pos) and cap.startswith(f"a large {class_name(int(labels[0]))}")
    assert counts == {1, 2, 3}


def test_same_scene_at_every_resolution():
    lo, hi = ProceduralShapes(20, 32, seed=7), ProceduralShapes(20, 64, seed=7)
    for i in range(20):
        a, b = lo[i], hi[i]
        assert a["caption"] == b["caption"] and torch.allclose(a["boxes"], b["boxes"], atol=1e-6)
        assert (F.avg_pool2d(b["image"][None], 2)[0] - a["image"]).abs().mean() < 0.05


def test_default_collate_and_speed():
    ds = ProceduralShapes(2000, 32, seed=0)
    t = time.perf_counter()
    batches = list(DataLoader(ds, batch_size=100))
    elapsed = time.perf_counter() - t
    assert elapsed < 10, f"2000 images at 32x32 took {elapsed:.1f}s"  # ~0.7 s on a quiet core
    b = batches[0]
    assert b["image"].shape == (100, 3, 32, 32) and b["boxes"].shape == (100, MAX_BOXES, 4)
    assert len(b["caption"]) == 100 and b["label"].shape == (100,)
    labels = torch.cat([x["label"] for x in batches])
    assert len(labels.unique()) == NUM_CLASSES  # every class occurs


def test_backgrounds_are_compressible():
    # Guard on texture contrast: a x4 bicubic round trip (a crude stand-in for an f = 4
    # autoencoder, which does better) must stay well above noise level.
    ds = ProceduralShapes(64, 32, seed=11)
    x = torch.stack([ds[i]["image"] for i in range(64)])
    lo = F.interpolate(x, scale_factor=0.25, mode="bicubic", antialias=True)
    up = F.interpolate(lo, scale_factor=4, mode="bicubic")
    psnr = 10 * torch.log10(4 / ((up - x) ** 2).mean())
    assert psnr > 23


def test_options_and_bad_arguments():
    ds = ProceduralShapes(30, 32, max_objects=1, backgrounds=("plain",))
    assert all(int((ds[i]["box_labels"] >= 0).sum()) == 1 for i in range(30))
    assert all(ds[i]["caption"].endswith("on a plain background") for i in range(30))
    with pytest.raises(ValueError, match="resolution"):
        ProceduralShapes(1, 4)
    with pytest.raises(ValueError, match="num_samples"):
        ProceduralShapes(-1, 32)
    with pytest.raises(ValueError, match="max_objects"):
        ProceduralShapes(1, 32, max_objects=4)
    with pytest.raises(ValueError, match="backgrounds"):
        ProceduralShapes(1, 32, backgrounds=("marble",))


# ----------------------------------------------------------------------------- image folder

def _photo(h=40, w=60, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(_photo(seed=1)).save(tmp_path / "a.jpg", quality=92)
    Image.fromarray(_photo(seed=2)).save(tmp_path / "sub" / "b.PNG")
    Image.fromarray(_photo(seed=3)).save(tmp_path / "sub" / "deeper" / "c.webp")
    Image.fromarray(_photo(seed=4)).save(tmp_path / "d.JPEG")
    (tmp_path / "a.txt").write_text("  a red circle \n", encoding="utf-8")
    (tmp_path / "sub" / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not an image, not an image extension")
    return tmp_path


def _corrupt(folder):
    raw = (folder / "a.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (folder / "text.png").write_text("this is not a png")


def test_folder_recursive_captions_crop(folder):
    ds = ImageFolderDataset(folder, 16)
    assert len(ds) == 4 and ds.num_skipped == 0
    names = [p.name for p in ds.paths]
    assert names == ["a.jpg", "d.JPEG", "b.PNG", "c.webp"]
    items = [ds[i] for i in range(4)]
    assert [it["caption"] for it in items] == ["a red circle", "", "second", ""]
    for it in items:
        assert it["image"].shape == (3, 16, 16) and it["image"].dtype == torch.float32
        assert -1 <= it["image"].min() and it["image"].max() <= 1
    assert ImageFolderDataset(folder, 16, captions=False)[0]["caption"] == ""
    assert ImageFolderDataset(folder, (8, 12))[0]["image"].shape == (3, 8, 12)


def test_folder_centre_crop(tmp_path):
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:40] = (0, 255, 0)
    arr[:, 40:] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    img = ImageFolderDataset(tmp_path, 10)[0]["image"]
    assert torch.allclose(img[:, 2:-2, 2:-2], torch.tensor([-1.0, 1.0, -1.0])[:, None, None], atol=0.02)


def test_folder_skips_corrupt_files_at_construction(folder):
    _corrupt(folder)
    with pytest.warns(UserWarning, match="skipped 2 of 6"):
        ds = ImageFolderDataset(folder, 16)
    assert len(ds) == 4 and ds.num_skipped == 2
    assert sorted(p.split("/")[-1] for p, _ in ds.skipped) == ["text.png", "truncated.jpg"]


def test_folder_header_mode_never_crashes_an_epoch(folder):
    _corrupt(folder)
    with pytest.warns(UserWarning, match="skipped 1 of 6"):  # text.png: no image header
        ds = ImageFolderDataset(folder, 16, validate="header")
    assert len(ds) == 5  # the truncated JPEG has a valid header
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(DataLoader(ds, batch_size=5))  # one epoch, every index
    assert batches[0]["image"].shape == (5, 3, 16, 16)
    assert ds.num_skipped == 2 and any("truncated.jpg" in str(w.message) for w in caught)


def test_folder_empty_and_missing(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=str(tmp_path)):
        ImageFolderDataset(tmp_path, 16)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere", 16)
    (tmp_path / "bad.jpg").write_text("junk")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="unreadable"):
        ImageFolderDataset(tmp_path, 16)
    with pytest.raises(ValueError, match="validate"):
        ImageFolderDataset(tmp_path, 16, validate="sometimes")


def test_folder_special_modes(tmp_path):
    # 16-bit greyscale keeps its tones (a plain convert clips them); transparency becomes white.
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(tmp_path / "transparent.png")
    ds = ImageFolderDataset(tmp_path, 4)
    grey, clear = ds[0]["image"], ds[1]["image"]
    assert torch.allclose(grey, torch.full_like(grey, 128 / 127.5 - 1), atol=1e-3)
    assert torch.allclose(clear, torch.ones_like(clear))
