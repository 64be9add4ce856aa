"""Tar shards: round trip, brace lists, rank/worker splits, and surviving bad data."""

import io
import os
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm_fast.data.procedural import ProceduralShapes
from ldm_fast.data.shards import (
    ShardDataset, ShardWriter, decode_sample, encode_sample, expand_urls, folder_to_shards, write_shards,
)


@pytest.fixture
def shards(tmp_path):
    ds = ProceduralShapes(40, 16, seed=0)
    paths = write_shards((ds[i] for i in range(len(ds))), str(tmp_path / "data-%03d.tar"), max_count=8)
    return ds, paths, str(tmp_path / "data-{000..004}.tar")


def _keys(dataset):
    return [s["__key__"] for s in dataset]


def test_expand_urls():
    assert expand_urls("d-{000..003}.tar") == [f"d-{i:03d}.tar" for i in range(4)]
    assert expand_urls("d-{8..11}.tar") == ["d-8.tar", "d-9.tar", "d-10.tar", "d-11.tar"]
    assert expand_urls("{a,b}/x{1..2}") == ["a/x1", "a/x2", "b/x1", "b/x2"]
    assert expand_urls(["p.tar", "q{0..1}.tar"]) == ["p.tar", "q0.tar", "q1.tar"]
    with pytest.raises(ValueError, match="expand"):
        expand_urls("d-{x}.tar")


def test_round_trip(shards):
    ds, paths, spec = shards
    assert len(paths) == 5 and all(os.path.isfile(p) for p in paths)
    assert not [f for f in os.listdir(os.path.dirname(paths[0])) if ".tmp" in f]
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
    assert sorted(names[:6]) == ["000000000.box_labels.npy", "000000000.boxes.npy", "000000000.cls",
                                 "000000000.png", "000000000.segmentation.npy", "000000000.txt"]
    out = list(ShardDataset(spec))
    assert len(out) == 40
    for i, s in enumerate(out):
        ref = ds[i]
        assert s["__key__"] == f"{i:09d}"
        assert (s["image"] - ref["image"]).abs().max() <= 1 / 127.5 + 1e-6  # uint8 PNG
        assert s["caption"] == ref["caption"] and s["label"].dtype == torch.int64
        for k in ("label", "boxes", "box_labels", "segmentation"):
            assert torch.equal(s[k], ref[k]) and s[k].dtype == ref[k].dtype, k
    batch = next(iter(DataLoader(ShardDataset(spec), batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["segmentation"].shape == (4, 16, 16)


def test_encode_decode_types():
    sample = {"image": torch.zeros(3, 4, 4), "caption": "hi", "label": 3, "json": {"a": [1, 2]},
              "latent": torch.randn(4, 2, 2), "step": torch.tensor(7), "jpg": b"raw"}
    enc = encode_sample(sample)
    assert set(enc) == {"png", "txt", "cls", "json", "latent.npy", "step.cls", "jpg"}
    dec = decode_sample({k: v for k, v in enc.items() if k != "jpg"})
    assert torch.equal(dec["latent"], sample["latent"]) and dec["json"] == {"a": [1, 2]}
    assert dec["label"].item() == 3 and dec["step"].item() == 7 and dec["caption"] == "hi"


def test_writer_is_deterministic_and_atomic(tmp_path, shards):
    ds, paths, _ = shards
    again = write_shards((ds[i] for i in range(40)), str(tmp_path / "again-%03d.tar"), max_count=8)
    assert [open(a, "rb").read() == open(b, "rb").read() for a, b in zip(paths, again)] == [True] * 5
    with pytest.raises(RuntimeError), ShardWriter(str(tmp_path / "fail-%02d.tar"), max_count=10) as w:
        w.write(ds[0])
        raise RuntimeError("converter died")
    assert not [f for f in os.listdir(tmp_path) if f.startswith("fail")]
    with pytest.raises(ValueError, match="placeholder"):
        ShardWriter(str(tmp_path / "noindex.tar"))
    with ShardWriter(str(tmp_path / "k-%02d.tar")) as w:
        w.write({"caption": "x"}, key="a")
        with pytest.raises(ValueError, match="unique"):
            w.write({"caption": "y"}, key="a")
        with pytest.raises(ValueError, match="'.'"):
            w.write({"caption": "y"}, key="b.c")


@pytest.mark.parametrize("split", ["shard", "sample"])
def test_rank_split_disjoint_and_complete(shards, split):
    _, _, spec = shards
    per_rank = [_keys(ShardDataset(spec, rank=r, world_size=3, split=split)) for r in range(3)]
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == len(set(flat)) == 40
    if split == "sample":
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


def test_worker_split_disjoint_and_complete(shards):
    _, _, spec = shards
    for rank in range(2):
        loader = DataLoader(ShardDataset(spec, rank=rank, world_size=2, split="sample"),
                            batch_size=None, num_workers=2)
        keys = [s["__key__"] for s in loader]
        assert len(keys) == len(set(keys)) == 20
    with pytest.raises(ValueError, match="consumers"):
        list(ShardDataset(spec, rank=0, world_size=6))  # 5 shards, 6 ranks


def test_shuffle(shards):
    _, _, spec = shards
    ds = ShardDataset(spec, shuffle=True, shuffle_buffer=10, seed=1)
    a = _keys(ds)
    assert _keys(ds) == a and sorted(a) == _keys(ShardDataset(spec)) and a != sorted(a)
    ds.set_epoch(1)
    assert _keys(ds) != a


def test_truncated_shard_and_corrupt_sample_skipped(shards, tmp_path):
    _, paths, spec = shards
    raw = open(paths[1], "rb").read()
    with open(paths[1], "wb") as f:
        f.write(raw[: len(raw) // 2])  # cut through the middle of a sample
    # A shard with an undecodable image and a sample missing its image.
    bad = tmp_path / "data-005.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in [("x.png", b"not a png"), ("x.txt", b"broken"), ("y.txt", b"no image")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = ShardDataset(str(tmp_path / "data-{000..005}.tar"), required=("image", "caption"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = _keys(ds)
    assert 32 < len(keys) < 40 and len(keys) == len(set(keys))
    assert set(keys) >= {f"{i:09d}" for i in [*range(8), *range(16, 40)]}  # other shards intact
    assert ds.stats["truncated_shards"] == 1 and ds.stats["samples"] == len(keys)
    assert ds.stats["skipped_samples"] == 3  # the cut sample, x (decode) and y (missing image)
    messages = " ".join(str(w.message) for w in caught)
    assert "data-001.tar is truncated" in messages and "'x'" in messages and "'y'" in messages


def test_missing_shard_is_an_early_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ShardDataset(str(tmp_path / "none-{0..2}.tar"))


def test_folder_to_shards(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.png", "sub/c.webp", "sub/d.v2.png"):
        Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8)).save(src / name)
    (src / "a.txt").write_text("first caption")
    (src / "broken.jpg").write_text("nope")
    with pytest.warns(UserWarning, match="skipped 1 of 5"):
        raw = folder_to_shards(src, str(tmp_path / "raw-%02d.tar"), max_count=3)
    with pytest.warns(UserWarning, match="skipped 1 of 5"):
        small = folder_to_shards(src, str(tmp_path / "small-%02d.tar"), resolution=8)
    assert len(raw) == 2 and len(small) == 1
    got = {s["__key__"]: s for s in ShardDataset(raw)}
    assert sorted(got) == ["a", "b", "sub/c", "sub/d_v2"]
    assert got["a"]["caption"] == "first caption" and got["b"]["caption"] == ""
    assert got["sub/c"]["image"].shape == (3, 20, 30)
    with tarfile.open(raw[0]) as tar:
        assert "a.jpg" in tar.getnames()  # bytes copied as they were
    assert all(s["image"].shape == (3, 8, 8) for s in ShardDataset(small))


def test_make_shards_cli_writes_trainable_shards_and_reports_bad_files(tmp_path, capsys):
    from ldm_fast.data.build import build_datasets
    from ldm_fast.config import DataConfig
    from ldm_fast.make_shards import main

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(src / f"p{i}.png")
    (src / "p1.txt").write_text("a grey square")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    assert main([str(src), str(tmp_path / "out" / "train-%03d.tar"), "--resolution", "16", "--max-count", "2"]) == 0
    out, err = capsys.readouterr()
    root = out.split("data.root=")[1].strip().strip('"')
    assert root == str(tmp_path / "out" / "train-{000..002}.tar") and "skipped 1 of 6" in err
    train, held = build_datasets(DataConfig(dataset="shards", root=root, resolution=16, heldout_samples=1))
    assert len(train.urls) == 2 and held[0]["image"].shape == (3, 16, 16)
    assert main([str(tmp_path / "missing"), str(tmp_path / "x-%d.tar")]) == 2
