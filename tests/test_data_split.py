"""Image folders as a run sees them: the seeded stratified held-out split, the split stored in
the run, the start-of-run summary and the missing-caption rule of text tasks."""

import numpy as np
import pytest
from PIL import Image

from ldm_fast.config import ConfigError, DataConfig, get_preset, validate
from ldm_fast.data.build import build_datasets
from ldm_fast.data.split import HELDOUT_FILE, stratified_heldout


def _write(folder, name, seed, caption=None, size=(8, 8)):
    folder.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(folder / f"{name}.png")
    if caption is not None:
        (folder / f"{name}.txt").write_text(caption)


@pytest.fixture
def classes(tmp_path):
    """Three class subfolders of 50, 30 and 20 images (sorted order puts 'c' last); every
    third image of 'a' has no caption."""
    root = tmp_path / "data"
    for cls, n in (("a", 50), ("b", 30), ("c", 20)):
        for i in range(n):
            _write(root / cls, f"{cls}{i:03d}", seed=ord(cls) * 1000 + i,
                   caption=None if cls == "a" and i % 3 == 0 else f"a picture of {cls}")
    return root


def _cfg(root, **kw):
    return DataConfig(dataset="folder", root=str(root), resolution=8, heldout_samples=10, **kw)


def _names(subset):
    return [subset.dataset.paths[i].relative_to(subset.dataset.root).as_posix() for i in subset.indices]


def test_split_is_stratified_random_and_seeded(classes):
    train, held = build_datasets(_cfg(classes))
    names = _names(held)
    assert len(held) == 10 and len(train) == 90 and not set(names) & set(_names(train))
    # Each class in proportion (5 / 3 / 2), not the last ten files of the sorted listing (all 'c').
    assert [sum(n.startswith(c) for n in names) for c in "abc"] == [5, 3, 2]
    assert names == _names(build_datasets(_cfg(classes))[1])  # same seed, same split
    other = _names(build_datasets(_cfg(classes, seed=1))[1])
    assert other != names and [sum(n.startswith(c) for n in other) for c in "abc"] == [5, 3, 2]


def test_stratified_rounding_fills_the_quota():
    from pathlib import Path

    root = Path("/r")
    paths = [root / g / f"{i}.png" for g, n in (("x", 7), ("y", 7), ("z", 7)) for i in range(n)]
    held = stratified_heldout(paths, root, 4, seed=0)  # 4/3 each: one group gives the extra one
    assert len(held) == 4 == len(set(held))
    per_group = sorted(sum(paths[i].parent.name == g for i in held) for g in "xyz")
    assert per_group == [1, 1, 2]
    flat = [root / f"{i}.png" for i in range(30)]  # no subfolders: a plain seeded sample
    assert len(stratified_heldout(flat, root, 3, seed=0)) == 3
    assert stratified_heldout(flat, root, 3, seed=0) != stratified_heldout(flat, root, 3, seed=5)


def test_the_run_keeps_its_split_when_the_folder_grows(classes, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _, held = build_datasets(_cfg(classes), run_dir=run, store_split=True)
    stored = (run / HELDOUT_FILE).read_text().split()
    assert stored == _names(held)
    for i in range(40):  # new files would shift a recomputed split
        _write(classes / "a", f"new{i:03d}", seed=1000 + i)
    train, again = build_datasets(_cfg(classes), run_dir=run)
    assert _names(again) == stored and not set(stored) & set(_names(train))
    assert len(train) == 130
    (classes / stored[0]).unlink()  # a held-out file gone: reported, the rest used
    with pytest.warns(UserWarning, match="1 of 10 held-out files are missing"):
        _, fewer = build_datasets(_cfg(classes), run_dir=run)
    assert _names(fewer) == stored[1:]


def test_summary_reports_found_skipped_heldout_captions_and_resolution(classes):
    (classes / "b" / "broken.png").write_text("not a png")
    _write(classes / "c", "wide", seed=7, size=(16, 8), caption="wide")
    summary = []
    with pytest.warns(UserWarning, match="skipped 1 of 102"):
        build_datasets(_cfg(classes), ("caption",), summary=summary)
    text = "\n".join(summary)
    assert "102 image files found" in text and "101 usable" in text
    assert "skipped 1 unreadable: 1 × UnidentifiedImageError" in text and "broken.png" in text
    assert "held out 10 (seeded random (data.seed=0), stratified over 3 subfolders), training on 91" in text
    assert "a 5/50, b 3/30, c 2/21" in text
    assert "84 present, 17 missing" in text and "data.missing_captions=null" in text
    assert "sizes 8×8 … 16×8" in text and "100 already that size, 1 cropped, 0 upscaled" in text
    plain = []
    build_datasets(_cfg(classes), summary=plain)  # not a text task: no caption rule mentioned
    assert "missing_captions" not in "\n".join(plain)


def test_missing_captions_null_or_skip(classes):
    train, held = build_datasets(_cfg(classes), ("caption",))
    captions = [train[i]["caption"] for i in range(len(train))] + [held[i]["caption"] for i in range(len(held))]
    assert captions.count("") == 17  # null: kept, trained as the empty (unconditional) prompt
    train_s, held_s = build_datasets(_cfg(classes, missing_captions="skip"), ("caption",))
    assert len(train_s) + len(held_s) == 83
    assert all(train_s[i]["caption"] for i in range(len(train_s)))
    assert all(held_s[i]["caption"] for i in range(len(held_s)))
    assert set(_names(held_s)) <= set(_names(held))  # the same split, captionless files left out
    train_i, _ = build_datasets(_cfg(classes, missing_captions="skip"))  # no text task: rule unused
    assert len(train_i) == 90
    cfg = get_preset("tiny")
    cfg.data.missing_captions = "empty"
    with pytest.raises(ConfigError, match="data.missing_captions"):
        validate(cfg)


def test_any_prefix_of_the_heldout_set_spans_the_subfolders(classes):
    # evaluate --n 10 and the 16-image grids take the first items: not all from one subfolder.
    _, held = build_datasets(DataConfig(dataset="folder", root=str(classes), resolution=8, heldout_samples=30))
    first = _names(held)[:4]  # sorted, these would all be from "a"
    assert len({n.split("/")[0] for n in first}) >= 2
