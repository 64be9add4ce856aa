"""The inpainting conditioner's input conventions: the CompVis recipe built by hand (its
scripts/inpaint.py steps, restated) must equal the conditioner with inputs="original"."""

import pytest
import torch
import torch.nn.functional as F

from ldm_fast.config import AutoencoderConfig
from ldm_fast.autoencoder import build_first_stage
from ldm_fast.conditioning import InpaintingConcat

RES, FACTOR = 16, 4


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(0)
    cfg = AutoencoderConfig(kind="vq", base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                            z_channels=3, n_embed=64, resolution=RES, groups=8)
    return build_first_stage(cfg).eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    image01 = torch.rand(2, 3, RES, RES, generator=g)
    mask = torch.rand(2, 1, RES, RES, generator=g)  # soft values: the original binarises at 0.5
    mask[:, :, 4:11, 3:9] = 1.0
    return image01, mask


def original_recipe(first_stage, image01, mask):
    """scripts/inpaint.py: mask ≥ 0.5 → 1 else 0; masked = (1 − mask)·image in [0, 1]; image,
    mask and masked image through ×2 − 1; cond_stage_model.encode (the VQ encoder and
    quant_conv, unquantised, unscaled) of the masked image; the mask resized by
    F.interpolate's default (nearest) to the latent grid; concatenated."""
    m = mask.clone()
    m[m < 0.5] = 0
    m[m >= 0.5] = 1
    masked = (1 - m) * image01
    masked, m = masked * 2.0 - 1.0, m * 2.0 - 1.0
    c = first_stage.quant_conv(first_stage.encoder(masked))
    cc = F.interpolate(m, size=c.shape[-2:])
    return torch.cat([c, cc], dim=1)


@torch.no_grad()
def test_original_convention_matches_hand_recipe(vq):
    from ldm_fast.data.masks import apply_mask

    image01, mask = _inputs()
    expected = original_recipe(vq, image01, mask)
    concat = InpaintingConcat(vq, FACTOR, scale=1.0, inputs="original")
    image = image01 * 2 - 1
    binary = (mask >= 0.5).float()  # what the data pipeline hands over: a {0, 1} mask
    for m in (mask, binary):
        got = concat(apply_mask(image, binary), m)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert set(expected[:, -1].unique().tolist()) == {-1.0, 1.0}


@torch.no_grad()
def test_native_convention_differs(vq):
    """The native convention (holes at 0, mask in {0, 1} averaged per latent cell) is another
    input: released inpainting weights need "original"."""
    from ldm_fast.data.masks import apply_mask

    image01, mask = _inputs(1)
    binary = (mask >= 0.5).float()
    native = InpaintingConcat(vq, FACTOR, scale=1.0)(apply_mask(image01 * 2 - 1, binary), binary)
    expected = original_recipe(vq, image01, mask)
    assert (native - expected).abs().max() > 0.5
    assert native[:, -1].min() >= 0  # {0, 1} fractions, no −1


def test_convention_from_config_and_conversion():
    from ldm_fast.convert import config_from_original
    from ldm_fast.config import ConditioningConfig, Config, validate

    assert ConditioningConfig().inpaint_inputs == "native"
    with pytest.raises(ValueError, match="inpaint_inputs"):
        validate(Config(conditioning=ConditioningConfig(inpaint_inputs="sideways")))
    raw = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0205, "image_size": 4, "channels": 3,
        "concat_mode": True, "cond_stage_config": "__is_first_stage__",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 4, "in_channels": 7, "out_channels": 3, "model_channels": 32,
            "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "embed_dim": 3, "n_embed": 64, "ddconfig": {
                "double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "attn_resolutions": [],
                "dropout": 0.0, "attn_type": "none"}}}}}}
    cfg, _ = config_from_original(raw)
    assert cfg.conditioning.task == "inpaint" and cfg.conditioning.inpaint_inputs == "original"
    assert (cfg.diffusion.timestep_spacing, cfg.diffusion.steps_offset, cfg.diffusion.set_alpha_to_one) == \
        ("uniform", 1, False)



def test_preset_conversion_uses_the_original_convention():
    """`convert --preset inpaint-ldm-vq-4` converts an original checkpoint: the original's inputs."""
    from ldm_fast.config import get_preset
    from ldm_fast.convert import preset_config

    assert get_preset("inpaint-ldm-vq-4").conditioning.inpaint_inputs == "native"
    cfg = preset_config("inpaint-ldm-vq-4")
    assert cfg.conditioning.inpaint_inputs == "original" and cfg.diffusion.timestep_spacing == "uniform"
