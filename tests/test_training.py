"""Training behaviour on CPU with a micro configuration: exact resume, non-finite losses,
the CLI's guard rails."""

import json

import pytest
import torch

from ldm_fast import checkpoint as ckpt
from ldm_fast.data.procedural import ProceduralShapes
from ldm_fast.run import RunDir
from ldm_fast.train import main as train_main
from ldm_fast.training import ResumableSampler, TrainingDiverged, train_autoencoder, train_ldm
from micro import micro_config


def micro(steps=6):
    return micro_config(steps)


def data():
    return ProceduralShapes(40, 16), ProceduralShapes(4, 16, start=40)


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), k


def test_sampler_resumes_mid_epoch():
    full = [i for _, i in zip(range(25), ResumableSampler(10, seed=3))]
    tail = [i for _, i in zip(range(12), ResumableSampler(10, seed=3, start=13))]
    assert full[13:] == tail and sorted(full[:10]) == list(range(10))
    assert [i.epoch for i in full] == [0] * 10 + [1] * 10 + [2] * 5


def test_training_loader_gives_per_item_randomness_a_fresh_draw_each_epoch():
    # Masks (and SR degradations, cached-latent noise) are seeded by (seed, epoch, index): the
    # loader's indices carry the epoch, also through worker processes, so item 0 is masked
    # differently in its second pass, and the same way again when the run is resumed.
    from ldm_fast.config import TrainConfig
    from ldm_fast.data.masks import InpaintingPairs
    from ldm_fast.distributed import DistContext
    from ldm_fast.training import make_loader

    ds = InpaintingPairs(ProceduralShapes(4, 16), "fraction", (0.3, 0.6), seed=0)
    tc = TrainConfig(batch_size=4)

    def masks(start_step, steps, workers=0):
        loader = iter(make_loader(ds, tc, seed=1, step=start_step, num_workers=workers, ctx=DistContext()))
        out = []
        for _ in range(steps):
            batch = next(loader)
            out.append(batch["mask"][batch["image"].flatten(1).sum(1).argsort()])  # item order
        return out

    e0, e1, e2 = masks(0, 3)
    assert not torch.equal(e0, e1) and not torch.equal(e1, e2)
    assert torch.equal(masks(1, 1)[0], e1)                 # resumed at step 1: epoch 1's masks
    assert torch.equal(masks(0, 2, workers=1)[1], e1)      # indices keep their epoch across pickling


def test_interrupted_and_resumed_runs_end_with_the_same_weights(tmp_path):
    train, held = data()
    cfg = micro()
    ae_full = train_autoencoder(cfg, RunDir(tmp_path / "full"), train, held, progress=False)
    model_full, ema_full = train_ldm(cfg, RunDir(tmp_path / "full"), ae_full, train, progress=False)

    half = micro()
    half.train_autoencoder.steps = half.train_ldm.steps = 3
    run = RunDir(tmp_path / "split")
    train_autoencoder(half, run, train, held, progress=False)
    # Each resume rebuilds everything from the files alone, as a fresh process would.
    ae_resumed = train_autoencoder(cfg, run, train, held, resume=True, progress=False)
    train_ldm(half, run, ae_resumed, train, progress=False)
    model_resumed, ema_resumed = train_ldm(cfg, run, ae_resumed, train, resume=True, progress=False)

    assert_same(state(ae_full), state(ae_resumed))
    assert_same(state(ema_full.module), state(ema_resumed.module))
    assert torch.allclose(model_full.scale_factor, model_resumed.scale_factor)


def test_nonfinite_losses_skip_steps_then_stop_without_touching_checkpoints(tmp_path, monkeypatch):
    train, held = data()
    cfg = micro(steps=12)
    cfg.train_ldm.max_nonfinite = 2
    run = RunDir(tmp_path)
    ae = train_autoencoder(cfg, run, train, held, progress=False)
    cfg_first = micro(steps=3)
    train_ldm(cfg_first, run, ae, train, progress=False)
    good = ckpt.list_checkpoints(run.stage_dir("ldm"))[-1]
    good_bytes = good.read_bytes()

    import ldm_fast.training as training

    real_loss = training.diffusion_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] != 2 else loss  # one good step among NaNs

    monkeypatch.setattr(training, "diffusion_loss", flaky)
    with pytest.raises(TrainingDiverged, match="consecutive non-finite"):
        train_ldm(cfg, run, ae, train, resume=True, progress=False)
    # Skipped steps change nothing: the checkpoint written at step 6 (after the one good step)
    # is finite and verified, and the earlier one is untouched; nothing was written after the NaNs.
    assert good.read_bytes() == good_bytes
    newest = ckpt.list_checkpoints(run.stage_dir("ldm"))[-1]
    assert newest.name == "step_00000006.safetensors"
    tensors, _ = ckpt.load_checkpoint(newest)
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("unet."))
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("nonfinite_skipped", 0) for r in records) >= 2


def test_cli_refuses_to_overwrite_a_run_and_reports_bad_overrides(tmp_path, capsys):
    assert train_main(["--out", str(tmp_path), "--set", "unet.model_channels=-3"]) == 2
    assert "unet.model_channels" in capsys.readouterr().err
    (tmp_path / "autoencoder").mkdir()
    ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path / "autoencoder", 1), {"w": torch.zeros(1)})
    assert train_main(["--out", str(tmp_path), "--steps", "1"]) == 2
    assert "--resume" in capsys.readouterr().err
