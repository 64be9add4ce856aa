"""The models' own fast path (ops.model_fast_path) against eager: channels-last activations,
conv weights following the input layout, and the time-embedding projections of all ResBlocks
in one matmul. Same outputs and gradients as the eager layout, and each rewrite is checked to
be really in effect (a silently disabled fast path would pass an equality test)."""

import pytest
import torch
from torch import nn

from ldm_fast import ops
from ldm_fast.autoencoder import build_first_stage
from ldm_fast.config import AutoencoderConfig, UNetConfig
from ldm_fast.layers import Conv2d
from ldm_fast.unet import ResBlock, TimeEmbeddingProjections, UNet

CL = torch.channels_last


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    ops.set_backend(None)


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def conv_input_layouts(model):
    """Records, per call, whether each Conv2d saw a channels-last input."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=CL)))
             for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    return seen, hooks


def run(model, backend, *inputs, **kw):
    ops.set_backend(backend)
    model.zero_grad(set_to_none=True)
    out = model(*inputs, **kw)
    out = out[0] if isinstance(out, tuple) else out
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kw", [
    {},
    {"use_scale_shift_norm": True, "resblock_updown": True, "num_classes": 3},
    {"use_spatial_transformer": True, "context_dim": 16},
])
def test_unet_fast_path_matches_eager_with_channels_last_activations(kw):
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(2,), num_head_channels=8, groups=8, **kw)
    model = randomise(UNet(cfg))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0])
    extra = {}
    if kw.get("context_dim"):
        extra["context"] = torch.randn(2, 7, 16)
    if kw.get("num_classes"):
        extra["class_labels"] = torch.tensor([0, 2])
    out_e, grads_e = run(model, "eager", x, t, **extra)
    seen, hooks = conv_input_layouts(model)
    out_f, grads_f = run(model, "auto", x, t, **extra)   # CPU: the fast path is on under auto
    for h in hooks:
        h.remove()
    assert seen and all(seen), "a 3×3 convolution ran channels-first on the fast path"
    assert out_f.is_contiguous()   # handed back in the ordinary layout
    torch.testing.assert_close(out_f, out_e, atol=1e-5, rtol=1e-4)
    assert grads_e.keys() == grads_f.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_f[name], grads_e[name], atol=1e-5, rtol=1e-4, msg=name)
    # Parameters keep their names, shapes and values (checkpoints and the converter rely on it).
    ops.set_backend("eager")
    torch.testing.assert_close(model(x, t, **extra), out_e, atol=1e-5, rtol=1e-4)


def test_time_projections_equal_each_blocks_own_and_follow_weight_updates():
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(), groups=8, use_scale_shift_norm=True)
    model = UNet(cfg).eval()
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    proj = TimeEmbeddingProjections(blocks)
    emb = torch.randn(2, 64)
    with torch.no_grad():
        for _ in range(2):
            got = proj(emb)
            assert set(got) == set(blocks)
            for b in blocks:
                torch.testing.assert_close(got[b], b.emb_layers(emb), atol=1e-6, rtol=1e-6)
            blocks[-1].emb_layers[1].weight.add_(1.0)   # an in-place update (an optimiser step)
            blocks[0].emb_layers[1].bias.mul_(-2.0)
    # Under autograd the concatenation is rebuilt in the graph: gradients reach each block.
    out = proj(emb)
    sum(v.sum() for v in out.values()).backward()
    assert all(b.emb_layers[1].weight.grad is not None for b in blocks)


def test_conv_weight_follows_the_input_layout():
    torch.manual_seed(0)
    conv, ref = Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 6, 6)
    # While a gradient is recorded the weight is left alone (optimiser state, DDP buckets).
    torch.testing.assert_close(conv(x.contiguous(memory_format=CL)), ref(x), atol=1e-5, rtol=1e-5)
    assert conv.weight.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(conv(x.contiguous(memory_format=CL)), ref(x), atol=1e-5, rtol=1e-5)
        assert conv.weight.is_contiguous(memory_format=CL)
        torch.testing.assert_close(conv(x), ref(x), atol=1e-5, rtol=1e-5)
        assert conv.weight.is_contiguous()
        # A weight that is a view into a larger buffer (FSDP's all-gather) is never replaced.
        flat = torch.zeros(conv.weight.numel() + 8)
        flat[:conv.weight.numel()] = conv.weight.flatten()
        conv.weight.data = flat[:conv.weight.numel()].view_as(conv.weight)
        conv(x.contiguous(memory_format=CL))
        assert conv.weight.data_ptr() == flat.data_ptr()
    assert torch.equal(conv.state_dict()["weight"], ref.state_dict()["weight"])


def test_channels_last_policy():
    big, small = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 8, 8)
    ops.set_backend("eager")
    assert ops.channels_last(big) is big and not ops.model_fast_path(big)
    ops.set_backend("auto")
    assert ops.channels_last(big).is_contiguous(memory_format=CL) and not big.is_contiguous(memory_format=CL)
    assert ops.channels_last(small) is small            # small maps lose channels-last on CPU
    assert ops.channels_last(small, largest_map=32 * 32).is_contiguous(memory_format=CL)   # a decoder's latent
    assert ops.channels_last(torch.randn(2, 4, 16)).dim() == 3


def test_decoder_fast_path_matches_eager_channels_last_from_the_latent():
    torch.manual_seed(0)
    cfg = AutoencoderConfig(kind="kl", base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=3,
                            groups=8, resolution=32, attn_resolutions=(16,))
    model = randomise(build_first_stage(cfg)).eval()
    z = torch.randn(2, 3, 8, 8)   # 8×8 latent, 32×32 output: the decoder goes channels-last
    with torch.no_grad():
        ops.set_backend("eager")
        ref = model.decode(z)
        seen, hooks = conv_input_layouts(model.decoder)
        ops.set_backend("auto")
        out = model.decode(z)
    for h in hooks:
        h.remove()
    assert seen and all(seen)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # The encoder on a 32² image too, gradients included.
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out_e, grads_e = run(model, "eager", x, sample=False)
    out_f, grads_f = run(model, "auto", x, sample=False)
    torch.testing.assert_close(out_f, out_e, atol=1e-5, rtol=1e-4)
    for name in grads_e:
        torch.testing.assert_close(grads_f[name], grads_e[name], atol=1e-5, rtol=1e-3, msg=name)
