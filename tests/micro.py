"""A micro configuration shared by tests that train: the tiny preset shrunk to seconds."""

from ldm_fast.config import get_preset


def micro_config(steps: int = 6, batch_size: int = 4):
    cfg = get_preset("tiny")
    cfg.data.resolution, cfg.data.num_samples, cfg.data.heldout_samples = 16, 40, 4
    cfg.autoencoder.base_channels, cfg.autoencoder.resolution = 16, 16
    cfg.autoencoder.disc_start = 2  # exercise the adversarial branch and its optimizer
    cfg.autoencoder.disc_warmup = 1  # step 2 trains the discriminator alone, the generator's term from 3
    cfg.autoencoder.disc_channels = 8
    cfg.unet.model_channels, cfg.unet.num_head_channels = 32, 16
    for tc in (cfg.train_autoencoder, cfg.train_ldm):
        tc.steps, tc.batch_size, tc.ckpt_every, tc.log_every, tc.warmup_steps = steps, batch_size, 3, 1, 2
    return cfg
