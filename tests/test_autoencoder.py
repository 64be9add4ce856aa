import pytest
import torch

from ldm_fast.autoencoder import AttnBlock, DiagonalGaussian, VectorQuantizer, build_first_stage
from ldm_fast.config import AutoencoderConfig
from ldm_fast.losses import AutoencoderLoss, GradientPyramidLoss, LPIPS, PatchDiscriminator, adaptive_weight


def small(kind, mult=(1, 2), **kw):
    fields = dict(kind=kind, base_channels=16, channel_mult=mult, num_res_blocks=1, z_channels=3,
                  n_embed=64, groups=8, resolution=16)
    return AutoencoderConfig(**{**fields, **kw})


@pytest.mark.parametrize("mult, f", [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4), ((1, 1, 2, 2), 8),
                                     ((1, 1, 1, 2, 2), 16), ((1, 1, 1, 1, 2, 2), 32)])
def test_encoder_decoder_shapes_for_every_factor(mult, f):
    cfg = small("kl", mult, resolution=64)
    model = build_first_stage(cfg)
    x = torch.randn(2, 3, 64, 64)
    z = model.encode_latent(x)
    assert cfg.factor == f and z.shape == (2, 3, 64 // f, 64 // f)
    assert model.decode(z).shape == x.shape


def test_identity_first_stage_is_pixel_space():
    model = build_first_stage(AutoencoderConfig(kind="identity"))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model.encode_latent(x), x) and torch.equal(model.decode(x), x)


def test_attention_resolutions_insert_blocks_and_keep_shapes():
    model = build_first_stage(small("kl", attn_resolutions=(8,)))
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) > 2  # mid blocks + level blocks
    assert model(torch.randn(1, 3, 16, 16))[0].shape == (1, 3, 16, 16)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_every_parameter_gets_a_gradient(kind):
    model = build_first_stage(small(kind))
    recon, reg, _ = model(torch.randn(2, 3, 16, 16))
    (recon.pow(2).mean() + reg).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and n != "logvar"]
    assert not missing


def test_kl_posterior_sample_mode_and_kl():
    moments = torch.cat([torch.zeros(4, 2, 3, 3), torch.zeros(4, 2, 3, 3)], dim=1)
    post = DiagonalGaussian(moments)
    assert torch.allclose(post.kl(), torch.zeros(4))  # N(0, I) has zero KL to itself
    moments = torch.cat([torch.full((1, 1, 1, 1), 2.0), torch.zeros(1, 1, 1, 1)], dim=1)
    assert torch.allclose(DiagonalGaussian(moments).kl(), torch.tensor([2.0]))  # 0.5 * mean²
    z = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64)], 1)).sample(
        torch.Generator().manual_seed(0))
    assert abs(z.std().item() - 1) < 0.05


def test_vq_uses_several_codes_and_passes_gradient_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.normal_()
    z = torch.randn(2, 4, 5, 5, requires_grad=True)
    zq, loss, idx, stats = vq(z)
    assert idx.unique().numel() > 1 and stats["codes_used"] > 1 and stats["perplexity"] > 1
    # The forward value is the codebook entry...
    assert torch.allclose(zq, vq.embedding.weight[idx].permute(0, 3, 1, 2), atol=1e-6)
    # ...while d(zq)/dz is the identity (straight-through).
    zq.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))
    # Codebook loss: ‖sg(zq) − z‖² + β‖zq − sg(z)‖² = (1 + β)·mean squared distance.
    assert torch.allclose(loss, 1.25 * (zq.detach() - z.detach()).pow(2).mean(), atol=1e-6)


def test_vq_latent_is_pre_quantisation():
    model = build_first_stage(small("vq"))
    x = torch.randn(1, 3, 16, 16)
    h = model.encode_latent(x)
    assert torch.equal(h, model.encode(x))
    assert model.decode(h).shape == x.shape  # quantisation happens inside decode


def test_patch_discriminator_and_losses():
    d = PatchDiscriminator(3, 8, 2)
    logits = d(torch.randn(2, 3, 32, 32))
    assert logits.dim() == 4 and logits.shape[1] == 1 and logits.shape[-1] > 1  # one logit per patch
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert GradientPyramidLoss()(x, x).abs().max() == 0
    assert (GradientPyramidLoss()(x, x.flip(-1)) > 0).all()


def test_lpips_architecture_loads_strictly_from_file(tmp_path):
    from safetensors.torch import save_file

    ref = LPIPS()
    state = {k.replace("lins.", "lin", 1): v for k, v in ref.state_dict().items() if k not in ("shift", "scale")}
    state.update(shift=ref.shift, scale=ref.scale)
    save_file(state, tmp_path / "lpips.safetensors")
    model = LPIPS.from_file(str(tmp_path / "lpips.safetensors"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(model(x, x), torch.zeros(2)) and model(x, -x).shape == (2,)


def test_adaptive_weight_balances_gradients():
    w = torch.nn.Parameter(torch.ones(3))
    nll, g = (w * 4).sum(), (w * 2).sum()
    assert torch.allclose(adaptive_weight(nll, g, w, 1.0), torch.tensor(2.0), rtol=1e-3)


def test_autoencoder_loss_switches_on_gan_after_disc_start():
    cfg = small("kl", disc_start=5, perceptual_weight=1.0, disc_channels=8, disc_layers=2)
    model, loss_fn = build_first_stage(cfg), AutoencoderLoss(cfg)
    x = torch.randn(2, 3, 16, 16)
    recon, reg, _ = model(x)
    _, logs = loss_fn.generator(x, recon, reg, 0, model.decoder.last_layer, model.logvar)
    assert "g" not in logs and loss_fn.discriminator_loss(x, recon, 0)[0] is None
    loss, logs = loss_fn.generator(x, recon, reg, 5, model.decoder.last_layer, model.logvar)
    assert "g" in logs and torch.isfinite(loss)
    d_loss, _ = loss_fn.discriminator_loss(x, recon, 5)
    assert d_loss is not None and d_loss > 0
