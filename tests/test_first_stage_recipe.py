"""The first stage's adversarial schedule: discriminator warm-up, then a linear ramp of the
generator's adversarial term (autoencoder.disc_warmup; 0 keeps the original's switch)."""

import pytest
import torch

from ldm_fast.autoencoder import build_first_stage
from ldm_fast.config import AutoencoderConfig, ConfigError, get_preset, validate
from ldm_fast.losses import AutoencoderLoss


def _cfg(**kw):
    return AutoencoderConfig(kind="kl", base_channels=16, channel_mult=(1, 2), num_res_blocks=1, z_channels=3,
                             groups=8, resolution=16, perceptual_weight=0.0, disc_channels=8, disc_layers=2, **kw)


def test_factor_schedule():
    original = AutoencoderLoss(_cfg(disc_start=10))
    assert [original.adversarial_factor(s) for s in (0, 9, 10, 500)] == [0, 0, 1, 1]
    warm = AutoencoderLoss(_cfg(disc_start=10, disc_warmup=4))
    assert [warm.adversarial_factor(s) for s in range(9, 20)] == [0, 0, 0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1]


def test_discriminator_trains_alone_during_the_warm_up_then_the_term_ramps():
    torch.manual_seed(0)
    cfg = _cfg(disc_start=5, disc_warmup=2)
    model, loss_fn = build_first_stage(cfg), AutoencoderLoss(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, reg, _ = model(x, noise=torch.zeros(2, 3, 8, 8))
    args = (x, recon, reg)
    for step in (5, 6):  # warm-up: the discriminator's loss is on, the generator's term is not
        assert loss_fn.discriminator_loss(x, recon, step)[0] is not None
        loss, logs = loss_fn.generator(*args, step, model.decoder.last_layer, model.logvar)
        assert "g" not in logs
    plain = loss
    half, logs = loss_fn.generator(*args, 7, model.decoder.last_layer, model.logvar)
    full, logs_full = loss_fn.generator(*args, 8, model.decoder.last_layer, model.logvar)
    assert float(logs["adv_factor"]) == 0.5 and float(logs_full["adv_factor"]) == 1.0
    adv = logs_full["d_weight"] * logs_full["g"]
    assert torch.allclose(half - plain, 0.5 * adv, rtol=1e-4, atol=1e-4)
    assert torch.allclose(full - plain, adv, rtol=1e-4, atol=1e-4)


def test_disc_warmup_is_validated():
    cfg = get_preset("tiny")
    cfg.autoencoder.disc_warmup = -1
    with pytest.raises(ConfigError, match="autoencoder.disc_warmup"):
        validate(cfg)


def test_progress_shows_reconstruction_error_and_nll_separately(tmp_path, capsys):
    """The autoencoder's progress line leads with the reconstruction L1; the learned-variance
    NLL (far below zero once logvar falls) comes as its own, labelled figure."""
    from ldm_fast.run import RunDir
    from ldm_fast.trainer import Phase, Trainer
    from micro import micro_config

    cfg = micro_config(2)
    tc = cfg.train_autoencoder
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    trainer = Trainer("autoencoder", cfg, tc, RunDir(tmp_path), "cpu", seed=0, progress=True,
                      shown={"rec_l1": "l1", "nll": "nll", "d_weight": "d_weight"})

    def loss(micro, step):
        value = w.sum()
        return value, {"loss": value.detach(), "l1": torch.tensor(0.0812), "nll": torch.tensor(-3233.0)}

    trainer.fit([Phase("generator", opt, loss, [w])], None, lambda keep: ({}, {}))
    err = capsys.readouterr().err
    assert "rec_l1=0.0812" in err and "nll=-3233" in err and "loss=" not in err and "d_weight" not in err
