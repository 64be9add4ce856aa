import pytest
import torch

from ldm_fast.autoencoder import build_first_stage
from ldm_fast.config import (PRESETS, ConfigError, apply_override, get_preset, load_yaml, save_yaml,
                             validate)
from ldm_fast.unet import UNet


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_builds_on_meta(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        unet, first_stage = UNet(cfg.unet), build_first_stage(cfg.autoencoder)
    assert n_params(unet) > 0 and (cfg.autoencoder.kind == "identity" or n_params(first_stage) > 0)


@pytest.mark.parametrize("name, millions, tolerance", [
    ("celebahq-ldm-vq-4", 274, 1),      # paper Tab. 15 (CelebA-HQ LDM-4): 274M
    ("cin256-ldm-vq-4", 400, 2),        # ImageNet LDM-4 (cin256-v2): 400M
    ("churches-ldm-kl-8", 294, 2),      # LSUN-Churches LDM-8: 294M
    ("inpaint-ldm-vq-4", 387, 1),       # big inpainting model: 387M
    ("semantic-ldm-vq-4", 215, 1),      # matches the 215M inpainting/semantic size class
])
def test_paper_unet_sizes(name, millions, tolerance):
    with torch.device("meta"):
        unet = UNet(get_preset(name).unet)
    assert abs(n_params(unet) / 1e6 - millions) < tolerance


def test_sr_model_size_matches_paper_169m():
    # The paper's 169M for LDM-SR counts the UNet and its VQ-f4 first stage together.
    cfg = get_preset("sr-ldm-vq-4")
    with torch.device("meta"):
        total = n_params(UNet(cfg.unet)) + n_params(build_first_stage(cfg.autoencoder))
    assert abs(total / 1e6 - 169) < 1


def test_sd_sized_vae_matches_known_size():
    with torch.device("meta"):
        vae = build_first_stage(get_preset("kl-f8").autoencoder)
    assert abs(n_params(vae) / 1e6 - 83.65) < 0.1  # the widely used KL-f8 VAE


def test_yaml_round_trip(tmp_path):
    cfg = get_preset("cin256-ldm-vq-4")
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override, field", [
    ("autoencoder.base_channels=-4", "autoencoder.base_channels"),
    ("autoencoder.channel_mult=[1,2,2,2,2,2,2]", "autoencoder.channel_mult"),
    ("unet.attention_resolutions=[16]", "unet.attention_resolutions"),
    ("unet.num_head_channels=48", "unet.num_head_channels"),
    ("unet.model_channels=-1", "unet.model_channels"),
    ("diffusion.schedule=quadratic", "diffusion.schedule"),
    ("data.resolution=30", "data.resolution"),
    ("train_ldm.batch_size=0", "train_ldm.batch_size"),
    ("kernels=fast", "kernels"),
    ("conditioning.layout_grid=1", "conditioning.layout_grid"),
    ("train_autoencoder.strategy=fsdp", "train_autoencoder.strategy"),
    ("train_ldm.lr_decay=linear", "train_ldm.lr_decay"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(apply_override(get_preset("tiny"), override))


def test_unknown_field_and_wrong_type_are_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("unet:\n  model_chanels: 64\n")
    with pytest.raises(ConfigError, match=r"unet\.model_chanels: unknown field"):
        load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("unet:\n  model_channels: wide\n")
    with pytest.raises(ConfigError, match=r"unet\.model_channels: expected int"):
        load_yaml(tmp_path / "bad2.yaml")


def test_exponent_notation_without_a_dot_is_a_float():
    # YAML 1.1 reads "1e-4" as a string; a float field takes it, a non-number is still refused.
    assert apply_override(get_preset("tiny"), "autoencoder.kl_weight=1e-4").autoencoder.kl_weight == 1e-4
    with pytest.raises(ConfigError, match=r"autoencoder\.kl_weight: expected float"):
        apply_override(get_preset("tiny"), "autoencoder.kl_weight=small")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset"):
        get_preset("nope")


def test_cached_latents_of_streamed_sr_pairs_are_refused_up_front():
    from ldm_fast.tasks import tiny_task_config

    cfg = tiny_task_config("sr")
    for override in ("train_ldm.cached_latents=x", "data.dataset=shards", "data.root=d-{0..3}.tar"):
        cfg = apply_override(cfg, override)
    with pytest.raises(ConfigError, match=r"train_ldm\.cached_latents"):
        validate(cfg)
