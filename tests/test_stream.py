"""Training from tar shards: endless shuffled stream, exact resume (also across DataLoader
workers), bad samples skipped without shifting positions, and training runs that resume."""

import io
import json
import tarfile
import warnings

import pytest
import torch

from ldm_fast import checkpoint as ckpt
from ldm_fast.config import TrainConfig
from ldm_fast.data.build import build_datasets
from ldm_fast.data.procedural import ProceduralShapes
from ldm_fast.data.shards import write_shards
from ldm_fast.data.stream import ShardStream
from ldm_fast.distributed import DistContext
from ldm_fast.run import RunDir
from ldm_fast.training import make_loader, train_autoencoder
from micro import micro_config


@pytest.fixture
def shards(tmp_path):
    ds = ProceduralShapes(40, 16, seed=0)
    write_shards((ds[i] for i in range(len(ds))), str(tmp_path / "data-%03d.tar"), max_count=8)
    return str(tmp_path / "data-{000..004}.tar")


def labels(batch):
    return batch["label"].tolist()


def take(stream, n_batches, workers=0, state=None, batch_size=4):
    loader = make_loader(stream, TrainConfig(batch_size=batch_size), seed=0, step=0, num_workers=workers,
                         ctx=DistContext(), data_state=state)
    return [next(loader) for _ in range(n_batches)], loader


def keys(batch):
    # Procedural images are distinct: their pixel sums identify them.
    return [round(float(v), 3) for v in batch["image"].flatten(1).sum(1)]


def test_stream_is_endless_and_each_epoch_is_a_fresh_permutation(shards):
    stream = ShardStream(shards, 16, ("label",), seed=3)
    batches, _ = take(stream, 20)  # 80 samples: two epochs of 40
    epoch0 = [k for b in batches[:10] for k in keys(b)]
    epoch1 = [k for b in batches[10:] for k in keys(b)]
    assert sorted(epoch0) == sorted(epoch1) and len(set(epoch0)) == 40
    assert epoch0 != epoch1
    assert batches[0]["image"].shape == (4, 3, 16, 16) and "__pos__" not in batches[0]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cut", [3, 4])  # after an even and an odd number of batches
def test_resumed_stream_continues_exactly(shards, workers, cut):
    stream = ShardStream(shards, 16, ("label",), seed=1)
    unbroken, _ = take(stream, 8, workers)
    first, tracker = take(stream, cut, workers)
    state = json.loads(json.dumps(tracker.state()))  # as stored in a checkpoint
    rest, _ = take(stream, 8 - cut, workers, state)
    assert [keys(b) for b in first + rest] == [keys(b) for b in unbroken]


def test_resizes_and_keeps_only_the_task_fields(shards):
    sample = next(iter(ShardStream(shards, 8, ("caption",))))
    assert sample["image"].shape == (3, 8, 8) and set(sample) == {"image", "caption", "__pos__"}


def test_samples_without_a_field_or_that_do_not_decode_are_skipped_and_positions_hold(tmp_path):
    ds = ProceduralShapes(8, 16, seed=0)
    items = [dict(ds[i]) for i in range(8)]
    del items[2]["caption"]
    pattern = str(tmp_path / "s-%03d.tar")
    write_shards(items[:4], pattern, max_count=4)
    write_shards(items[4:], str(tmp_path / "t-%03d.tar"), max_count=4)
    # Replace one image by garbage bytes in the second shard.
    bad = tmp_path / "t-000.tar"
    with tarfile.open(bad) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(bad, "w") as tar:
        for m, data in members:
            if m.name == "000000001.png":
                data = b"not an image"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    stream = ShardStream([str(tmp_path / "s-000.tar"), str(bad)], 16, ("caption",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches, tracker = take(stream, 3, batch_size=2)  # 6 of the 6 usable samples
    assert len({k for b in batches for k in keys(b)}) == 6
    assert any("missing field" in str(w.message) for w in caught)
    assert any("UnidentifiedImageError" in str(w.message) for w in caught)
    # Positions count the shard's members before decoding: resuming after batch 1 is exact.
    first, tracker = take(stream, 1, batch_size=2)
    rest, _ = take(stream, 2, batch_size=2, state=tracker.state())
    assert [keys(b) for b in first + rest] == [keys(b) for b in batches]


def test_build_datasets_holds_out_the_last_shard_or_a_given_one(shards, tmp_path):
    cfg = micro_config().data
    cfg.dataset, cfg.root, cfg.heldout_samples = "shards", shards, 3
    train, held = build_datasets(cfg, ("label",))
    assert len(train.urls) == 4 and len(held) == 3 and set(held[0]) == {"image", "label"}
    cfg.heldout_root = shards.replace("{000..004}", "004")
    train, _ = build_datasets(cfg, ())
    assert len(train.urls) == 5
    cfg.root, cfg.heldout_root = shards.replace("{000..004}", "000"), ""
    with pytest.raises(ValueError, match="at least 2"):
        build_datasets(cfg, ())


def test_too_few_shards_for_the_consumers_is_a_clear_error(shards):
    stream = ShardStream(shards.replace("{000..004}", "{000..001}"), 16)
    with pytest.raises(ValueError, match="cannot be split"):
        take(stream, 1, workers=3)


def test_autoencoder_trained_on_shards_resumes_exactly(shards, tmp_path):
    def config(steps):
        cfg = micro_config(steps)
        cfg.data.dataset, cfg.data.root = "shards", shards
        return cfg

    def run(name, steps, resume=False):
        cfg = config(steps)
        train, held = build_datasets(cfg.data)
        return train_autoencoder(cfg, RunDir(tmp_path / name), train, held, resume=resume, progress=False)

    full = run("full", 6)
    run("split", 3)
    meta = ckpt.load_checkpoint(ckpt.checkpoint_path(RunDir(tmp_path / "split").stage_dir("autoencoder"), 3))[1]
    assert json.loads(meta["data"])["positions"]  # the data position travels in the checkpoint
    resumed = run("split", 6, resume=True)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_train_cli_text_to_image_from_shards(shards, tmp_path):
    # The whole command-line path: tokenizer trained on the shards' captions (the same on every
    # rank), both stages, and the final sample grid prompted by the 4 held-out captions (cycled to 16).
    from ldm_fast.config import save_yaml
    from ldm_fast.tasks import tiny_task_config
    from ldm_fast.train import main as train_main

    cfg = tiny_task_config("text")
    micro = micro_config(2)
    cfg.data, cfg.autoencoder, cfg.train_autoencoder, cfg.train_ldm = (
        micro.data, micro.autoencoder, micro.train_autoencoder, micro.train_ldm)
    cfg.unet.model_channels, cfg.unet.num_head_channels = 32, 16
    cfg.data.dataset, cfg.data.root = "shards", shards
    save_yaml(cfg, tmp_path / "text.yaml")
    out = tmp_path / "run"
    assert train_main(["--config", str(tmp_path / "text.yaml"), "--out", str(out), "--no-progress",
                       "--kernels", "eager"]) == 0
    assert (out / "samples.png").is_file() and (out / "tokenizer.json").is_file()
