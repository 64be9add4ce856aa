"""Latent cache: what is served equals what the frozen first stage computes, annotations
survive, chunks and manifest are consistent, stale or incomplete caches are rebuilt."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from ldm_fast.autoencoder import build_first_stage
from ldm_fast.config import AutoencoderConfig
from ldm_fast.data.latent_cache import (LatentCacheDataset, LatentCacheError, build_latent_cache,
                                        first_stage_fingerprint, read_manifest)
from ldm_fast.data.procedural import ProceduralShapes
from ldm_fast.data.shards import write_shards
from ldm_fast.data.stream import ShardStream


def first_stage(kind="kl", seed=0):
    torch.manual_seed(seed)
    cfg = AutoencoderConfig(kind=kind, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                            z_channels=3, resolution=16, groups=4, n_embed=16, mid_attention=False)
    return build_first_stage(cfg).eval()


@pytest.fixture(scope="module")
def data():
    return ProceduralShapes(10, 16)


@pytest.fixture(scope="module")
def kl_cache(tmp_path_factory, data):
    fs = first_stage()
    root = tmp_path_factory.mktemp("cache")
    manifest = build_latent_cache(fs, data, root, batch_size=3, chunk_size=4)
    return fs, root, manifest


def test_manifest_and_chunks(kl_cache):
    _, root, manifest = kl_cache
    assert manifest == read_manifest(root)
    assert manifest["num_items"] == 10 and [c["count"] for c in manifest["chunks"]] == [4, 4, 2]
    assert manifest["store"] == "moments" and manifest["latent_shape"] == [3, 8, 8]
    assert {"label", "boxes", "box_labels", "segmentation"} <= set(manifest["fields"])
    assert manifest["string_fields"] == ["caption"]
    assert all((root / c["file"]).is_file() for c in manifest["chunks"])


def test_mean_latents_and_annotations_match_direct_encoding(kl_cache, data):
    fs, root, _ = kl_cache
    ds = LatentCacheDataset(root, scale_factor=0.5, posterior="mean")
    assert len(ds) == len(data)
    x = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.no_grad():
        expected = fs.encode_latent(x, sample=False) * 0.5
    for i in range(len(data)):
        item, ref = ds[i], data[i]
        torch.testing.assert_close(item["latent"], expected[i], atol=1e-5, rtol=1e-5)
        assert item["caption"] == ref["caption"]
        assert torch.equal(item["label"], ref["label"])
        assert torch.equal(item["segmentation"], ref["segmentation"])
        torch.testing.assert_close(item["boxes"], ref["boxes"])


def test_posterior_samples_are_reproducible_per_epoch_and_fresh_across_epochs(kl_cache):
    fs, root, _ = kl_cache
    ds = LatentCacheDataset(root, posterior="sample", seed=3)
    raw = ds.raw(5)
    a, b = ds[5]["latent"], ds[5]["latent"]
    assert torch.equal(a, b)
    ds.set_epoch(1)
    c = ds[5]["latent"]
    assert not torch.equal(a, c)
    # Each draw is mean + std·ε with standard normal ε.
    eps = torch.stack([(s - raw["mean"]) / torch.exp(0.5 * raw["logvar"]) for s in (a, c)])
    assert 0.5 < eps.std() < 1.5 and eps.abs().mean() < 1.5
    assert not torch.equal(LatentCacheDataset(root, seed=4)[5]["latent"], a)


def test_batches_through_a_dataloader(kl_cache):
    _, root, _ = kl_cache
    ds = LatentCacheDataset(root, fields=["label", "caption"])
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert batch["latent"].shape == (4, 3, 8, 8) and batch["latent"].dtype == torch.float32
    assert batch["label"].shape == (4,) and len(batch["caption"]) == 4
    assert set(batch) == {"latent", "label", "caption"}
    with pytest.raises(LatentCacheError, match="not in the cache"):
        LatentCacheDataset(root, fields=["depth"])


def test_reuse_only_when_the_first_stage_is_the_same(tmp_path, data, monkeypatch):
    fs = first_stage()
    build_latent_cache(fs, data, tmp_path, chunk_size=8)
    import ldm_fast.data.latent_cache as lc

    calls = {"n": 0}
    real = lc._encode

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(lc, "_encode", counting)
    build_latent_cache(fs, data, tmp_path, chunk_size=8)
    assert calls["n"] == 0                       # same weights, same data size: reused
    other = first_stage(seed=1)
    assert first_stage_fingerprint(other) != first_stage_fingerprint(fs)
    manifest = build_latent_cache(other, data, tmp_path, chunk_size=8)
    assert calls["n"] > 0                        # retrained first stage: rebuilt
    assert manifest["first_stage"]["fingerprint"] == first_stage_fingerprint(other)
    assert len(list(tmp_path.glob("chunk_*.safetensors"))) == 2


def test_incomplete_cache_is_rebuilt_and_missing_chunks_are_reported(tmp_path, data):
    fs = first_stage()
    build_latent_cache(fs, data, tmp_path, chunk_size=4)
    (tmp_path / "manifest.json").unlink()       # as if interrupted before the manifest
    with pytest.raises(LatentCacheError, match="no manifest.json"):
        LatentCacheDataset(tmp_path)
    build_latent_cache(fs, data, tmp_path, chunk_size=4)
    assert len(LatentCacheDataset(tmp_path)) == 10
    (tmp_path / "chunk_00001.safetensors").unlink()
    with pytest.raises(LatentCacheError, match="chunk_00001"):
        LatentCacheDataset(tmp_path)


@pytest.mark.parametrize("kind", ["vq", "identity"])
def test_deterministic_first_stages_store_latents(tmp_path, data, kind):
    fs = first_stage(kind)
    manifest = build_latent_cache(fs, data, tmp_path, store=None, storage_dtype=torch.float16)
    assert manifest["store"] == "latent"
    ds = LatentCacheDataset(tmp_path, posterior="sample")
    x = data[2]["image"][None]
    with torch.no_grad():
        ref = fs.encode_latent(x, sample=False)[0]
    # fp16 storage: one rounding step (batched vs single-image encoding may round differently).
    torch.testing.assert_close(ds[2]["latent"], ref, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="KL first stage"):
        build_latent_cache(fs, data, tmp_path / "x", store="moments")


def test_latent_std_matches_the_scale_by_std_measurement(kl_cache):
    _, root, _ = kl_cache
    ds = LatentCacheDataset(root, scale_factor=3.0)
    std = ds.latent_std()
    z = torch.stack([ds[i]["latent"] for i in range(len(ds))]) / 3.0
    assert abs(std - float(z.flatten().std())) < 1e-5
    assert ds.scale_factor == 3.0
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["source"]["len"] == 10


# ----------------------------------------------------------------------------- shards, ranks

def write_test_shards(data, folder, per_shard):
    write_shards((data[i] for i in range(len(data))), str(folder / "s-%03d.tar"), max_count=per_shard)
    n = -(-len(data) // per_shard)
    return str(folder / f"s-{{000..{n - 1:03d}}}.tar")


def count_encodes(monkeypatch):
    import ldm_fast.data.latent_cache as lc

    calls = {"n": 0}
    real = lc._encode

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(lc, "_encode", counting)
    return calls


def test_one_pass_over_shards_is_cached_in_listed_order_and_reused_per_shard_list(tmp_path, data, monkeypatch):
    fs = first_stage()
    stream = ShardStream(write_test_shards(data, tmp_path, 4), 16, fields=("caption", "label"))
    with pytest.raises(ValueError, match="one_pass"):
        build_latent_cache(fs, stream, tmp_path / "cache")      # endless: never finishes a pass
    manifest = build_latent_cache(fs, stream.one_pass(), tmp_path / "cache", batch_size=3, chunk_size=4)
    assert manifest["num_items"] == 10 and len(manifest["source"]["shards"]) == 3
    ds = LatentCacheDataset(tmp_path / "cache", posterior="mean")
    x = torch.stack([s["image"] for s in stream.first_samples(10)])
    with torch.no_grad():
        expected = fs.encode_latent(x, sample=False)
    for i in range(10):
        item = ds[i]
        assert set(item) == {"latent", "caption", "label"}      # the stream's fields only
        assert item["caption"] == data[i]["caption"] and int(item["label"]) == int(data[i]["label"])
        torch.testing.assert_close(item["latent"], expected[i], atol=1e-5, rtol=1e-5)

    calls = count_encodes(monkeypatch)
    build_latent_cache(fs, stream.one_pass(), tmp_path / "cache", batch_size=3, chunk_size=4)
    assert calls["n"] == 0                                     # same shards: reused
    st = os.stat(stream.urls[1])
    os.utime(stream.urls[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    build_latent_cache(fs, stream.one_pass(), tmp_path / "cache", batch_size=3, chunk_size=4)
    assert calls["n"] > 0                                      # a shard rewritten: rebuilt


def test_train_caches_shards_and_refuses_streamed_task_pairs(tmp_path, data):
    from ldm_fast.tasks import task_dataset, tiny_task_config
    from ldm_fast.train import _cached

    cfg = tiny_task_config("sr")
    cfg.train_ldm.cached_latents = str(tmp_path / "cache")
    stream = ShardStream(write_test_shards(data, tmp_path, 5), 16)
    with pytest.raises(ValueError, match="train_ldm.cached_latents"):
        _cached(cfg, first_stage(), task_dataset(cfg, stream), "cpu", False)
    cached = _cached(cfg, first_stage(), stream, "cpu", False)
    assert len(cached) == 10 and cached[3]["latent"].shape == (3, 8, 8)


def _distributed_build(out, shards):
    """Run by each of 2 torchrun ranks (see the next test): the map and the shard cache, built
    by both ranks together, and a second call that must reuse, not rebuild."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    fs = first_stage()
    data = ProceduralShapes(24, 16)
    manifest = build_latent_cache(fs, data, f"{out}/map", batch_size=2, chunk_size=4)
    assert build_latent_cache(fs, data, f"{out}/map", batch_size=2, chunk_size=4) == manifest
    stream = ShardStream(shards, 16, fields=("caption",))
    build_latent_cache(fs, stream.one_pass(), f"{out}/shards", batch_size=2, chunk_size=4)
    dist.destroy_process_group()


def test_two_gloo_ranks_build_the_single_process_cache(tmp_path):
    data = ProceduralShapes(24, 16)
    shards = write_test_shards(data, tmp_path, 6)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29551", __file__, str(tmp_path / "dist"), shards],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the ranks: the same kernels, so the same bits
    try:
        fs = first_stage()
        single = build_latent_cache(fs, data, tmp_path / "map", batch_size=2, chunk_size=4)
        stream = ShardStream(shards, 16, fields=("caption",))
        build_latent_cache(fs, stream.one_pass(), tmp_path / "shards", batch_size=2, chunk_size=4)
    finally:
        torch.set_num_threads(threads)

    dist = read_manifest(tmp_path / "dist" / "map")
    assert dist["chunks"] == single["chunks"] and dist["num_items"] == 24
    for c in single["chunks"]:   # the same chunk files, byte for byte
        assert (tmp_path / "dist" / "map" / c["file"]).read_bytes() == (tmp_path / "map" / c["file"]).read_bytes()
    for key in ("fields", "string_fields", "latent_shape", "source", "first_stage"):
        assert dist[key] == single[key], key

    by_ranks = LatentCacheDataset(tmp_path / "dist" / "shards", posterior="mean")
    one = LatentCacheDataset(tmp_path / "shards", posterior="mean")
    assert {c["file"][:10] for c in by_ranks.manifest["chunks"]} == {"chunk_r000", "chunk_r001"}
    assert len(by_ranks) == len(one) == 24
    for i in range(24):
        a, b = by_ranks[i], one[i]
        assert a["caption"] == b["caption"] == data[i]["caption"]
        torch.testing.assert_close(a["latent"], b["latent"], atol=1e-6, rtol=1e-6)


if __name__ == "__main__":   # a torchrun rank of test_two_gloo_ranks_build_the_single_process_cache
    _distributed_build(*sys.argv[1:])
