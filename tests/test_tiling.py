import pytest
import torch

from ldm_fast.autoencoder import build_first_stage
from ldm_fast.config import AutoencoderConfig
from ldm_fast.tiling import decode_tiled


def test_tiled_equals_whole_for_a_pointwise_decoder():
    def decode(z):  # position-independent: tiling must be exact
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=4, mode="nearest") * 2

    z = torch.randn(2, 4, 20, 27)
    torch.testing.assert_close(decode_tiled(decode, z, 4, tile=8, overlap=3), decode(z))


def test_tiled_real_decoder_is_close_and_covers_everything():
    torch.manual_seed(0)
    model = build_first_stage(AutoencoderConfig(kind="kl", base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                                z_channels=3, groups=8, resolution=32)).eval()
    z = torch.randn(1, 3, 24, 24)
    whole = model.decode(z)
    tiled = decode_tiled(model.decode, z, 2, tile=12, overlap=4)
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    # GroupNorm statistics differ per tile (most with random weights and random latents, the
    # worst case), so not identical — but far closer than the decode of another latent.
    other = model.decode(torch.randn(1, 3, 24, 24))
    assert (tiled - whole).abs().mean() < 0.5 * (other - whole).abs().mean()


def test_overlap_must_be_smaller_than_tile():
    with pytest.raises(ValueError, match="overlap"):
        decode_tiled(lambda z: z, torch.zeros(1, 3, 40, 40), 1, tile=8, overlap=8)
