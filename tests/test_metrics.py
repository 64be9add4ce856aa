"""Metrics checked on cases with known answers, the FID network's architecture against the
published layer table, and the project's feature network on held-out procedural images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm_fast import metrics
from ldm_fast.metrics import inception as inc

# ------------------------------------------------------------------------------------------
# PSNR / SSIM
# ------------------------------------------------------------------------------------------


def test_psnr_of_known_noise():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16) - 0.5  # stays inside [-1, 1] after the noise: no clipping
    sign = torch.randint(0, 2, x.shape).float() * 2 - 1
    y = x + 0.1 * sign
    # In [0, 1] the error is ±0.05 everywhere: MSE = 0.0025, PSNR = 10 log10(1 / 0.0025).
    r = metrics.psnr(x, y)
    assert r.per_image.shape == (3,)
    assert r.mean == pytest.approx(10 * math.log10(1 / 0.0025), abs=1e-6)
    assert metrics.psnr(x, x).mean == 100.0  # identical: capped, not inf


def test_ssim_identical_is_one_and_matches_skimage():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 24, 20) * 2 - 1
    assert torch.allclose(metrics.ssim(x, x).per_image, torch.ones(2, dtype=torch.float64))
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    ours = metrics.ssim(x, y)
    assert ours.mean < 0.9
    skm = pytest.importorskip("skimage.metrics")
    for i in range(2):
        a, b = ((x[i].double() + 1) / 2).numpy(), ((y[i].double() + 1) / 2).numpy()
        ref = skm.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, data_range=1.0,
                                        use_sample_covariance=False, channel_axis=0)
        assert ours.per_image[i].item() == pytest.approx(ref, abs=1e-10)


def test_quality_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        metrics.psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


# ------------------------------------------------------------------------------------------
# Fréchet distance
# ------------------------------------------------------------------------------------------


def test_grid_ratio_sees_edges_on_the_latent_grid_only():
    torch.manual_seed(0)
    # a sum of plane waves at random (non-grid) frequencies: no preferred offset
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    k = torch.rand(4, 3, 6, 2) * 0.6
    phase = torch.rand(4, 3, 6, 1, 1) * 6.3
    smooth = 0.15 * torch.sin(k[..., 0, None, None] * yy + k[..., 1, None, None] * xx + phase).sum(2)
    # 4×4 cells, each its own colour: every edge lies on the period-4 grid
    cells = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8) * 1.6 - 0.8, size=(32, 32), mode="nearest")
    assert metrics.grid_ratio(smooth, 4).mean == pytest.approx(1.0, abs=0.15)
    assert metrics.grid_ratio(cells, 4).mean > 1e6
    # the same cells shifted: edges at another phase of the grid (decoders put them anywhere)
    assert metrics.grid_ratio(cells.roll((2, 3), (-2, -1)), 4).mean > 1e6
    # cells of another size are not this grid: a 3-pixel pattern has no preferred offset mod 4
    thirds = torch.nn.functional.interpolate(torch.rand(4, 3, 11, 11) * 1.6 - 0.8, size=(33, 33), mode="nearest")
    assert metrics.grid_ratio(thirds, 4).mean < 1.5
    # a random cell pattern added to a smooth image raises it well above 1
    noisy = (smooth + 0.1 * torch.nn.functional.interpolate(torch.randn(4, 3, 8, 8), size=(32, 32))).clamp(-1, 1)
    assert metrics.grid_ratio(noisy, 4).mean > 2
    assert metrics.grid_ratio(cells, 4).per_image.shape == (4,)
    with pytest.raises(ValueError, match="period"):
        metrics.grid_ratio(cells, 1)
    with pytest.raises(ValueError, match="period"):
        metrics.grid_ratio(cells[..., :4, :4], 4)


def test_frechet_identical_sets_is_zero():
    f = np.random.default_rng(0).normal(size=(300, 16))
    assert metrics.frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-9)


def test_frechet_closed_form_commuting_covariances():
    # Same eigenvectors: tr((S1 S2)^½) = Σ √(a_i b_i), so FD = ‖Δμ‖² + Σ (√a_i − √b_i)².
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.5, 3, 6), rng.uniform(0.5, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_general_covariances_match_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)


def test_frechet_of_samples_approaches_the_gaussians_distance():
    rng = np.random.default_rng(3)
    std1, std2 = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    x = rng.normal(size=(40000, 3)) * std1
    y = rng.normal(size=(40000, 3)) * std2 + np.array([1.0, 0.0, -1.0])
    expected = 2.0 + np.sum((std1 - std2) ** 2)  # diagonal: Σ (σ1 − σ2)²
    assert metrics.frechet_distance_features(x, y) == pytest.approx(expected, rel=0.03)


def test_frechet_singular_covariance_fewer_samples_than_dims():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 0.5
    fd = metrics.frechet_distance_features(x, y)
    assert np.isfinite(fd) and fd > 0


def test_streaming_statistics_match_numpy_and_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    f = rng.normal(size=(257, 10)) + 100.0  # large offset: one-pass formulas must stay exact
    stats = metrics.FeatureStats()
    for chunk in np.array_split(f, 7):
        stats.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(stats.mean(), f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(f, rowvar=False), atol=1e-10)
    stats.save(tmp_path / "ref.npz")
    mu, sigma = metrics.load_statistics(tmp_path / "ref.npz")
    np.testing.assert_allclose(sigma, stats.cov())


# ------------------------------------------------------------------------------------------
# KID, IS, precision/recall
# ------------------------------------------------------------------------------------------


def test_kernel_distance_same_vs_different_distribution():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(600, 32)), rng.normal(size=(600, 32))
    same_mean, same_std = metrics.kernel_distance(x, y, num_subsets=20, subset_size=300)
    ident_mean, _ = metrics.kernel_distance(x, x, num_subsets=20, subset_size=300)
    diff_mean, _ = metrics.kernel_distance(x, y + 1.0, num_subsets=20, subset_size=300)
    assert abs(same_mean) < 0.01
    assert diff_mean > 0.5 and diff_mean > 50 * max(abs(same_mean), same_std)
    # A set against itself: independent subsets share points, whose large self-similarity
    # enters the cross term only, so the unbiased estimate sits slightly *below* 0.
    assert -0.05 * diff_mean < ident_mean <= 0.0


def test_inception_score_bounds():
    k = 10
    uniform = np.full((100, k), 1.0 / k)
    assert metrics.inception_score(uniform, splits=5)[0] == pytest.approx(1.0)
    one_hot = np.eye(k)[np.arange(100) % k]  # confident and every class used equally
    mean, std = metrics.inception_score(one_hot, splits=5)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="softmax"):
        metrics.inception_score(np.ones((10, k)))


def test_precision_recall_separated_and_overlapping_clouds():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(500, 2))
    assert metrics.precision_recall(real, rng.normal(size=(500, 2)) + 20.0) == (0.0, 0.0)
    p, r = metrics.precision_recall(real, rng.normal(size=(500, 2)))
    assert p > 0.9 and r > 0.9
    # Mode dropping: real has two clusters, the generator covers one -> fidelity stays high,
    # coverage halves.
    two = np.concatenate([rng.normal(size=(400, 2)), rng.normal(size=(400, 2)) + 20.0])
    p, r = metrics.precision_recall(two, rng.normal(size=(400, 2)))
    assert p > 0.9 and 0.4 < r < 0.55
    # Blocked computation (tiny blocks) gives exactly the same answer.
    assert metrics.precision_recall(two, real[:100], max_elements=97) == \
        metrics.precision_recall(two, real[:100])


def test_mean_iou_known_confusion():
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 2])
    # class 0: 1/2, class 1: 2/3, class 2: 1; class 3 absent from both and left out.
    assert metrics.mean_iou(pred, target, 4) == pytest.approx((0.5 + 2 / 3 + 1) / 3)


# ------------------------------------------------------------------------------------------
# FID InceptionV3: architecture and weight loading
# ------------------------------------------------------------------------------------------


def _expected_inception_convs():
    """(name, in, out, kh, kw) for every conv of InceptionV3 (FID graph), from the paper's
    layer table; names as in the pt_inception-2015-12-05 state dict."""
    convs = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3),
             ("Conv2d_2b_3x3", 32, 64, 3, 3), ("Conv2d_3b_1x1", 64, 80, 1, 1),
             ("Conv2d_4a_3x3", 80, 192, 3, 3)]
    for blk, cin, pf in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs += [(f"{blk}.branch1x1", cin, 64, 1, 1), (f"{blk}.branch5x5_1", cin, 48, 1, 1),
                  (f"{blk}.branch5x5_2", 48, 64, 5, 5), (f"{blk}.branch3x3dbl_1", cin, 64, 1, 1),
                  (f"{blk}.branch3x3dbl_2", 64, 96, 3, 3), (f"{blk}.branch3x3dbl_3", 96, 96, 3, 3),
                  (f"{blk}.branch_pool", cin, pf, 1, 1)]
    convs += [("Mixed_6a.branch3x3", 288, 384, 3, 3), ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
              ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)]
    for blk, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs += [(f"{blk}.branch1x1", 768, 192, 1, 1), (f"{blk}.branch7x7_1", 768, c7, 1, 1),
                  (f"{blk}.branch7x7_2", c7, c7, 1, 7), (f"{blk}.branch7x7_3", c7, 192, 7, 1),
                  (f"{blk}.branch7x7dbl_1", 768, c7, 1, 1), (f"{blk}.branch7x7dbl_2", c7, c7, 7, 1),
                  (f"{blk}.branch7x7dbl_3", c7, c7, 1, 7), (f"{blk}.branch7x7dbl_4", c7, c7, 7, 1),
                  (f"{blk}.branch7x7dbl_5", c7, 192, 1, 7), (f"{blk}.branch_pool", 768, 192, 1, 1)]
    convs += [("Mixed_7a.branch3x3_1", 768, 192, 1, 1), ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
              ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
              ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)]
    for blk, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs += [(f"{blk}.branch1x1", cin, 320, 1, 1), (f"{blk}.branch3x3_1", cin, 384, 1, 1),
                  (f"{blk}.branch3x3_2a", 384, 384, 1, 3), (f"{blk}.branch3x3_2b", 384, 384, 3, 1),
                  (f"{blk}.branch3x3dbl_1", cin, 448, 1, 1), (f"{blk}.branch3x3dbl_2", 448, 384, 3, 3),
                  (f"{blk}.branch3x3dbl_3a", 384, 384, 1, 3), (f"{blk}.branch3x3dbl_3b", 384, 384, 3, 1),
                  (f"{blk}.branch_pool", cin, 192, 1, 1)]
    return convs


def _expected_inception_state_dict(with_counters: bool) -> dict[str, torch.Tensor]:
    # Constant values: building 24M random numbers would dominate the test's time.
    sd = {}
    for i, (name, cin, cout, kh, kw) in enumerate(_expected_inception_convs()):
        sd[f"{name}.conv.weight"] = torch.full((cout, cin, kh, kw), 1e-3 * (i + 1))
        sd[f"{name}.bn.weight"] = torch.ones(cout)
        sd[f"{name}.bn.bias"] = torch.zeros(cout)
        sd[f"{name}.bn.running_mean"] = torch.zeros(cout)
        sd[f"{name}.bn.running_var"] = torch.ones(cout)
        if with_counters:
            sd[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    sd["fc.weight"] = torch.full((1008, 2048), 1e-3)
    sd["fc.bias"] = torch.zeros(1008)
    return sd


def test_inception_architecture_keys_shapes_and_outputs():
    model = inc.FIDInceptionV3().eval()
    expected = _expected_inception_state_dict(with_counters=True)
    own = model.state_dict()
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    # InceptionV3 is 27,161,264 parameters with its auxiliary head and 1000 classes; without
    # the aux head (3,326,696) and with the FID graph's 1008 classes (+8·2049): 23,850,960.
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    with torch.no_grad():
        pool, logits = model(torch.rand(1, 3, inc.INPUT_SIZE, inc.INPUT_SIZE) * 2 - 1)
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)


def test_inception_loads_state_dict_strictly(tmp_path):
    from safetensors.torch import save_file

    sd = _expected_inception_state_dict(with_counters=True)
    torch.save(sd, tmp_path / "full.pth")
    # Files saved by older PyTorch lack BatchNorm's step counter, which evaluation never reads.
    no_counters = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(no_counters, tmp_path / "old.pth")
    save_file(no_counters, str(tmp_path / "w.safetensors"))
    for name in ("full.pth", "old.pth", "w.safetensors"):
        model = inc.load_fid_inception(tmp_path / name)
        assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, sd["Mixed_7c.branch_pool.conv.weight"])
        assert not model.training
    # Strictness: an unknown key or a missing parameter is an error, not silently ignored.
    torch.save(dict(no_counters, **{"AuxLogits.fc.weight": torch.zeros(1)}), tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match="Unexpected"):
        inc.load_fid_inception(tmp_path / "extra.pth")
    del no_counters["Mixed_6b.branch1x1.bn.running_var"]
    torch.save(no_counters, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="Missing"):
        inc.load_fid_inception(tmp_path / "missing.pth")


def test_inception_without_weights_says_how_to_provide_them(monkeypatch, tmp_path):
    monkeypatch.delenv(inc.ENV_VAR, raising=False)
    with pytest.raises(inc.InceptionWeightsUnavailable, match="LDM_FID_INCEPTION"):
        inc.load_fid_inception()
    monkeypatch.setenv(inc.ENV_VAR, str(tmp_path / "absent.pth"))
    with pytest.raises(inc.InceptionWeightsUnavailable, match="does not exist"):
        inc.load_fid_inception()


def test_inception_input_pipeline():
    # A flat grey image stays flat through the bicubic resize; the value maps as (v − 128)/128.
    img = torch.full((2, 3, 32, 40), 0.5)  # → uint8 round(1.5 * 127.5) = 191
    x = inc.resize_for_inception(inc.to_uint8(img))
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, (191 - 128) / 128), atol=1e-5)
    assert inc.to_uint8(torch.tensor([-1.0, 1.0, 3.0]).view(1, 3, 1, 1)).ravel().tolist() == [0, 255, 255]


# ------------------------------------------------------------------------------------------
# The project's own feature network (FD-shapes, class accuracy, mIoU)
# ------------------------------------------------------------------------------------------

from ldm_fast.data.procedural import ProceduralShapes  # noqa: E402
from ldm_fast.metrics import features as fmod  # noqa: E402

TINY = fmod.FeatureNetTraining(steps=3, batch_size=4, train_size=8, heldout_size=4)


@pytest.fixture(scope="module")
def shapes_net(tmp_path_factory):
    """The shipped recipe at 32², trained once through the cache (about 30 s of CPU)."""
    cache = tmp_path_factory.mktemp("feature_cache")
    return fmod.load_shapes_net(32, cache_dir=cache, log=None), cache


@pytest.fixture(scope="module")
def eval_batch():
    # The project's own data stream (seed 0), which the feature network never trained on.
    ds = ProceduralShapes(200, 32, seed=0)
    items = [ds[i] for i in range(len(ds))]
    return (torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items]),
            torch.stack([it["segmentation"] for it in items]))


def test_feature_net_is_accurate_on_heldout_images(shapes_net, eval_batch):
    net, _ = shapes_net
    assert net.report["heldout_accuracy"] >= 0.95
    images, labels, seg = eval_batch
    assert fmod.classifier_accuracy(net, images, labels) >= 0.95
    assert fmod.segmentation_miou(net, images, seg) >= 0.6
    out = fmod.extract(net, images[:5], segmentation=True)
    assert out.features.shape == (5, net.feature_dim) and out.probs.shape == (5, 30)
    np.testing.assert_allclose(out.probs.sum(1), 1.0)
    assert out.segmentation.shape == (5, 32, 32)


def test_fd_shapes_orders_degradations(shapes_net, eval_batch):
    net, _ = shapes_net
    images = eval_batch[0]
    other = torch.stack([ProceduralShapes(200, 32, seed=1)[i]["image"] for i in range(200)])
    assert fmod.fd_shapes(net, images, images) == pytest.approx(0.0, abs=1e-8)
    same = fmod.fd_shapes(net, images, other)
    blurred = torch.nn.functional.avg_pool2d(other, 3, stride=1, padding=1, count_include_pad=False)
    noise = torch.rand_like(other) * 2 - 1
    assert same < fmod.fd_shapes(net, images, blurred) < fmod.fd_shapes(net, images, noise)


def test_feature_net_cache_reuses_and_detects_stale(shapes_net, monkeypatch):
    net, cache = shapes_net
    files = list(cache.glob("*.safetensors"))
    assert [f.name for f in files] == [f"shapes_net_r32_v{fmod.FEATURE_NET_VERSION}_s0.safetensors"]

    def no_training(*args, **kwargs):
        raise AssertionError("a matching cached network must be loaded, not retrained")

    monkeypatch.setattr(fmod, "train_shapes_net", no_training)
    again = fmod.load_shapes_net(32, cache_dir=cache, log=None)
    for (k, a), b in zip(net.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert again.report["heldout_accuracy"] == pytest.approx(net.report["heldout_accuracy"])
    monkeypatch.undo()
    # A different training recipe under the same key is stale: retrained, and said so.
    messages = []
    fmod.load_shapes_net(16, cache_dir=cache, cfg=TINY, log=messages.append)
    fmod.load_shapes_net(16, cache_dir=cache, cfg=fmod.FeatureNetTraining(**{**TINY.__dict__, "steps": 4}),
                         log=messages.append)
    assert any("stale" in m for m in messages)


def test_feature_net_training_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, _ = fmod.train_shapes_net(16, seed=3, cfg=TINY, log=None)
    b, _ = fmod.train_shapes_net(16, seed=3, cfg=TINY, log=None)
    assert torch.equal(torch.get_rng_state(), state)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
