"""The Trainer loop on its own: loss scaling (fp16's GradScaler) leaves the updates of an
unscaled run unchanged, clipping included; plain progress lines in logs; the inpainting latent
scale taken over the global batch."""

import io

import torch

from ldm_fast import distributed
from ldm_fast.progress import progress_bar
from ldm_fast.run import RunDir
from ldm_fast.trainer import Phase, Trainer
from micro import micro_config


def _fit(tmp_path, scaler: torch.amp.GradScaler | None, steps: int = 4):
    cfg = micro_config(steps)
    tc = cfg.train_ldm
    tc.grad_clip, tc.grad_accum, tc.ckpt_every = 0.05, 2, 100  # clipping active on every step
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.randn(steps * 2, 4, 6, generator=torch.Generator().manual_seed(1))
    trainer = Trainer("ldm", cfg, tc, RunDir(tmp_path), "cpu", seed=0, progress=False)
    if scaler is not None:
        trainer.scaler = scaler
    count = iter(range(10 ** 6))

    def loss(micro, step):
        value = model(data[next(count)]).pow(2).mean()
        return value, {"loss": value.detach()}

    trainer.fit([Phase("p", opt, loss, list(model.parameters()))], None, lambda keep: ({}, {}))
    return model.weight.detach().clone()


def test_scaled_loss_gives_the_unscaled_updates(tmp_path):
    plain = _fit(tmp_path / "a", None)
    # A loss scale of 2^12, never changed: gradients are unscaled before clipping and the step.
    scaled = _fit(tmp_path / "b", torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=10 ** 6))
    torch.testing.assert_close(scaled, plain, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(plain, _fit(tmp_path / "c", None, steps=2))  # the steps did move it


def test_progress_in_a_log_file_is_occasional_plain_lines():
    log = io.StringIO()
    bar = progress_bar(1000, "ldm", stream=log, interval=3600)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.count("\n") == 1 and text.startswith("ldm: 1000/1000")


def test_inpainting_latent_scale_uses_the_global_batch(monkeypatch):
    """Two 'ranks' each holding half a batch: with the moments averaged (as all_reduce_mean
    does over gloo), each half's scale equals the one of the whole batch."""
    from ldm_fast.autoencoder import build_first_stage
    from ldm_fast.conditioning import InpaintingConcat
    from ldm_fast.tasks import tiny_task_config
    from ldm_fast.tasks.parts import calibrate_over_ranks

    cfg = tiny_task_config("inpaint")
    fs = build_first_stage(cfg.autoencoder).eval()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    halves = images[:2], images[2:]
    with torch.no_grad():
        z = [fs.encode_latent(h, sample=False).float() for h in halves]
    other = {0: torch.stack([z[1].mean(), z[1].pow(2).mean()]), 1: torch.stack([z[0].mean(), z[0].pow(2).mean()])}
    scales = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "all_reduce_mean", lambda t, r=rank: (t + other[r]) / 2)
        concat = InpaintingConcat(fs, cfg.autoencoder.factor, None)
        scales.append(calibrate_over_ranks(concat, halves[rank]))
    whole = torch.cat(z)
    want = 1.0 / float((whole.pow(2).mean() - whole.mean() ** 2).sqrt())
    assert abs(scales[0] - want) < 1e-4 * want and abs(scales[1] - want) < 1e-4 * want


def test_loss_scale_is_checkpointed_and_resumed(tmp_path):
    cfg = micro_config(2)
    tc = cfg.train_ldm
    tc.ckpt_every = 1
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss(micro, step):
        value = model(torch.ones(1, 2)).pow(2).mean()
        return value, {"loss": value.detach()}

    def state(keep):
        return {"w": model.weight.detach().clone()}, {}

    first = Trainer("ldm", cfg, tc, RunDir(tmp_path), "cpu", seed=0, progress=False)
    first.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 9, growth_interval=1)  # doubles per good step
    first.fit([Phase("p", opt, loss, list(model.parameters()))], None, state)
    again = Trainer("ldm", cfg, tc, RunDir(tmp_path), "cpu", seed=0, progress=False)
    again.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    assert again.resume(lambda tensors, meta: None) and again.start == 2
    assert again.scaler.get_scale() == first.scaler.get_scale() == 2.0 ** 11


def test_learning_rate_warms_up_then_stays_or_decays_to_zero(tmp_path):
    cfg = micro_config(110)
    tc = cfg.train_ldm
    tc.lr, tc.warmup_steps = 1e-3, 10
    trainer = Trainer("ldm", cfg, tc, RunDir(tmp_path), "cpu", seed=0, progress=False)
    assert trainer.lr_at(0) == 1e-3 / 10 and trainer.lr_at(9) == 1e-3
    assert trainer.lr_at(10) == trainer.lr_at(109) == 1e-3  # constant: the original's
    tc.lr_decay = "cosine"
    assert trainer.lr_at(9) == 1e-3 and trainer.lr_at(10) == 1e-3
    assert abs(trainer.lr_at(60) - 0.5e-3) < 1e-12  # half way through the decay
    assert 0 < trainer.lr_at(109) < 1e-6 and trainer.lr_at(110) == 0.0
    lrs = [trainer.lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
