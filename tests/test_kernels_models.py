"""The kernel switch changes nothing but the implementation: the UNet and the autoencoder give
the same outputs and parameter gradients with LDM_KERNELS=triton (Triton's interpreter on CPU
here) as with eager ops, and a short training run follows the same loss curve."""

import pytest
import torch

from ldm_fast import ops
from ldm_fast.autoencoder import build_first_stage
from ldm_fast.config import AutoencoderConfig, UNetConfig
from ldm_fast.unet import UNet


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    ops.set_backend(None)


def run(model, backend, *inputs, **kw):
    ops.set_backend(backend)
    model.zero_grad(set_to_none=True)
    out = model(*inputs, **kw)
    out = out[0] if isinstance(out, tuple) else out
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_match(model, *inputs, atol=2e-4, **kw):
    out_e, grads_e = run(model, "eager", *inputs, **kw)
    out_t, grads_t = run(model, "triton", *inputs, **kw)
    torch.testing.assert_close(out_t, out_e, atol=atol, rtol=1e-3)
    assert grads_e.keys() == grads_t.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_t[name], grads_e[name], atol=atol, rtol=2e-3, msg=name)


# Batch 2 and few channels throughout: the interpreter runs every Triton program in Python, so
# its cost grows with batch × groups.


def randomise(model):
    """Zero-initialised output layers would hide most of the network from the gradients."""
    torch.manual_seed(0)
    for p in model.parameters():
        if p.dim() > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)


@pytest.mark.parametrize("kw", [
    {},
    {"use_scale_shift_norm": True, "use_spatial_transformer": True, "context_dim": 16},
])
def test_unet_triton_matches_eager(kw):
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(2,), num_head_channels=16, groups=8, **kw)
    model = UNet(cfg)
    randomise(model)
    extra = {"context": torch.randn(2, 7, 16)} if kw else {}
    assert_match(model, torch.randn(2, 3, 6, 6), torch.tensor([3.0, 700.0]), **extra)


def test_autoencoder_triton_matches_eager():
    torch.manual_seed(0)
    cfg = AutoencoderConfig(kind="kl", base_channels=16, channel_mult=(1, 2), num_res_blocks=1, z_channels=3,
                            groups=8, resolution=12)
    model = build_first_stage(cfg)
    assert_match(model, torch.rand(2, 3, 12, 12) * 2 - 1, sample=False)


def test_short_training_run_follows_the_same_loss_curve():
    from ldm_fast.diffusion import diffusion_loss, make_schedule

    curves = {}
    for backend in ("eager", "triton"):
        ops.set_backend(backend)
        torch.manual_seed(0)
        cfg = UNetConfig(in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                         attention_resolutions=(2,), num_head_channels=16, groups=8)
        model = UNet(cfg)
        schedule = make_schedule()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        data = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        gen = torch.Generator().manual_seed(2)
        losses = []
        for _ in range(3):
            loss = diffusion_loss(lambda x, t, c: model(x, t), data, schedule, generator=gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[backend] = torch.tensor(losses)
    assert torch.isfinite(curves["eager"]).all()
    torch.testing.assert_close(curves["triton"], curves["eager"], atol=1e-4, rtol=1e-3)
