"""Super-resolution degradations and inpainting masks: shapes, ranges, randomness, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_fast.data.degradations import (
    BSRConfig, SuperResolutionPairs, _blur, bicubic_downsample, bsr_degrade, degrade, gaussian_kernel,
)
from ldm_fast.data.masks import (
    InpaintingPairs, apply_mask, box_mask, fraction_mask, random_mask, stroke_mask,
)
from ldm_fast.data.procedural import ProceduralShapes


def _image(h=32, w=32, seed=0):
    return ProceduralShapes(1, (h, w), seed=seed)[0]["image"]


# ----------------------------------------------------------------------------- degradations

def test_bicubic_shapes_and_values():
    x = _image(32, 48)
    y = bicubic_downsample(x)
    assert y.shape == (3, 8, 12) and y.dtype == torch.float32
    assert -1 <= y.min() and y.max() <= 1
    assert abs(y.mean() - x.mean()) < 0.02  # antialiased: brightness preserved
    batch = torch.stack([x, _image(32, 48, seed=1)])
    assert torch.allclose(bicubic_downsample(batch)[0], y)
    assert bicubic_downsample(x, factor=2).shape == (3, 16, 24)
    flat = torch.full((3, 16, 16), 0.3)
    assert torch.allclose(bicubic_downsample(flat), torch.full((3, 4, 4), 0.3), atol=1e-5)


@pytest.mark.parametrize("factor", [2, 4])
def test_bsr_shapes_determinism_randomness(factor):
    x = _image(64, 64)
    outs = [bsr_degrade(x, factor, generator=s) for s in range(6)]
    for y in outs:
        assert y.shape == (3, 64 // factor, 64 // factor) and y.dtype == torch.float32
        assert -1 <= y.min() and y.max() <= 1 and torch.isfinite(y).all()
    assert torch.equal(bsr_degrade(x, factor, generator=3), outs[3])
    assert all(not torch.equal(outs[0], o) for o in outs[1:])
    # Degraded, yet still the same picture: closer to its own bicubic than to another image's.
    ref, other = bicubic_downsample(x, factor), bicubic_downsample(_image(64, 64, seed=9), factor)
    assert all((o - ref).abs().mean() < (o - other).abs().mean() for o in outs)


def test_bsr_generators_and_batch():
    x = torch.stack([_image(), _image(seed=1)])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = bsr_degrade(x, 4, g1), bsr_degrade(x, 4, g2)
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b)
    assert not torch.equal(bsr_degrade(x, 4, g1), a)  # the generator advanced
    rng = np.random.default_rng(1)
    assert degrade(x[0], "bsr", 4, rng).shape == (3, 8, 8)


def test_bsr_steps_change_the_image():
    # Each stage alone (probability 1, others 0) must do something.
    x = _image(32, 32)
    off = dict(blur_prob=0, resize_prob=0, noise_prob=0, camera_prob=0, jpeg_prob=0)
    base = bsr_degrade(x, 4, 0, BSRConfig(**off, jpeg_quality=(95, 95)))
    for stage in ("blur_prob", "noise_prob", "camera_prob"):
        cfg = BSRConfig(**{**off, stage: 1.0}, jpeg_quality=(95, 95))
        assert (bsr_degrade(x, 4, 0, cfg) - base).abs().mean() > 1e-3, stage


def test_gaussian_kernels():
    rng = np.random.default_rng(0)
    iso = gaussian_kernel(rng, BSRConfig(isotropic_prob=1.0))
    aniso = gaussian_kernel(np.random.default_rng(3), BSRConfig(isotropic_prob=0.0, blur_sigma=(0.5, 3)))
    for k in (iso, aniso):
        assert k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1 and k.shape[0] <= 21
        assert abs(k.sum() - 1) < 1e-5 and np.allclose(k, k[::-1, ::-1])
    assert np.allclose(iso, iso.T)
    assert not np.allclose(aniso, aniso.T, atol=1e-4)
    # The FFT blur equals a direct convolution with replicated edges.
    x = rng.random((10, 14, 3)).astype(np.float32)
    p = aniso.shape[0] // 2
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    ref = F.conv2d(F.pad(t, (p, p, p, p), mode="replicate"),
                   torch.from_numpy(aniso)[None, None].expand(3, 1, *aniso.shape), groups=3)
    assert np.allclose(_blur(x, aniso), ref[0].permute(1, 2, 0).numpy(), atol=1e-5)


def test_degradation_bad_input():
    with pytest.raises(ValueError, match="multiple"):
        bicubic_downsample(torch.zeros(3, 30, 32))
    with pytest.raises(ValueError, match="multiple"):
        bsr_degrade(torch.zeros(3, 32, 34), 4, 0)
    with pytest.raises(ValueError, match="NaN"):
        bsr_degrade(torch.full((3, 8, 8), float("nan")), 4, 0)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        bicubic_downsample(torch.full((3, 8, 8), 200.0))
    with pytest.raises(ValueError, match="3, H, W"):
        bicubic_downsample(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="mode"):
        degrade(torch.zeros(3, 8, 8), "nearest")
    with pytest.raises(ValueError, match="factor"):
        bicubic_downsample(torch.zeros(3, 8, 8), factor=0)


def test_super_resolution_pairs():
    base = ProceduralShapes(4, 32, seed=0)
    ds = SuperResolutionPairs(base, "bsr", 4, seed=1)
    a = ds[2]
    assert a["lr"].shape == (3, 8, 8) and torch.equal(a["image"], base[2]["image"])
    assert torch.equal(ds[2]["lr"], a["lr"])
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["lr"], a["lr"])
    assert torch.equal(SuperResolutionPairs(base, "bicubic")[0]["lr"], bicubic_downsample(base[0]["image"]))


# ----------------------------------------------------------------------------- masks

@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
@pytest.mark.parametrize("kind", ["box", "stroke", "fraction"])
def test_mask_shape_dtype_binary(kind, size):
    h, w = size
    for seed in range(5):
        m = random_mask(h, w, kind, seed)
        assert m.shape == (1, h, w) and m.dtype == torch.float32
        assert set(m.unique().tolist()) <= {0.0, 1.0} and m.sum() > 0
    assert torch.equal(random_mask(h, w, kind, 7), random_mask(h, w, kind, 7))
    assert not torch.equal(random_mask(h, w, kind, 7), random_mask(h, w, kind, 8))


@pytest.mark.parametrize("res", [32, 64])
@pytest.mark.parametrize("fraction", [(0.4, 0.5), (0.1, 0.2), (0.25, 0.26)])
def test_fraction_mask_within_range(res, fraction):
    fr = [fraction_mask(res, res, fraction, seed).mean().item() for seed in range(60)]
    assert min(fr) >= fraction[0] and max(fr) <= fraction[1]


def test_box_and_stroke_masks_vary():
    box = [box_mask(64, 64, s).mean().item() for s in range(30)]
    stroke = [stroke_mask(64, 64, s).mean().item() for s in range(30)]
    for fr in (box, stroke):
        assert 0 < min(fr) and max(fr) < 0.8 and np.std(fr) > 0.02
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(stroke_mask(32, 32, g), stroke_mask(32, 32, g))


def test_apply_mask_and_bad_masks():
    x = _image(32, 32)
    m = fraction_mask(32, 32, (0.4, 0.5), 0)
    y = apply_mask(x, m)
    assert (y[:, m[0] == 1] == 0).all() and torch.equal(y[:, m[0] == 0], x[:, m[0] == 0])
    assert apply_mask(x[None], m[None]).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="does not match"):
        apply_mask(x, torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="shape"):
        apply_mask(x, torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        apply_mask(x, torch.full((1, 32, 32), 2.0))
    with pytest.raises(ValueError, match="fraction"):
        fraction_mask(4, 4, (0.52, 0.55))  # no pixel count in [8.3, 8.8]
    with pytest.raises(ValueError, match="kind"):
        random_mask(8, 8, "ellipse")


def test_inpainting_pairs():
    ds = InpaintingPairs(ProceduralShapes(3, 32), "fraction", (0.4, 0.5), seed=0)
    item = ds[1]
    assert item["mask"].shape == (1, 32, 32) and item["masked_image"].shape == (3, 32, 32)
    assert 0.4 <= item["mask"].mean() <= 0.5
    assert torch.equal(item["masked_image"], apply_mask(item["image"], item["mask"]))
    ds.set_epoch(2)
    assert not torch.equal(ds[1]["mask"], item["mask"])
