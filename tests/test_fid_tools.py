"""ldm_fast's FID Inception and its three input pipelines against the published FID tools'
own code, on random weights loaded into both (nothing is downloaded).

torch-fidelity's package __init__ imports its CLIP extractor, which needs torchvision; its
Inception extractor and resize do not, so its modules are imported with that __init__
bypassed. pytorch-fid's network subclasses torchvision's Inception blocks, so it runs only
where torchvision does (this CPU machine has no torchvision build for its torch); its input
code (resize + normalisation) is tested everywhere.
"""

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from ldm_fast.metrics import inception as inc


def random_inception_state(seed=0) -> dict[str, torch.Tensor]:
    """Random weights with the FID file's names and shapes, scaled so activations neither vanish
    nor explode through 40 conv layers (He-scaled convs, BN near identity)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in inc.FIDInceptionV3().state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = v
        elif k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("bn.weight"):
            sd[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        else:  # bn.bias, running_mean, fc
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "random-inception.pth"
    torch.save(random_inception_state(), path)
    return path


@pytest.fixture(scope="module")
def ours(weights):
    return inc.load_fid_inception(weights)


def _images(n=2, h=37, w=45, seed=1) -> torch.Tensor:
    """Smooth-plus-noise test images in [-1, 1] at an awkward size (resizing matters)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(n, 3, 5, 6, generator=g), size=(h, w), mode="bilinear")
    return (0.8 * base + 0.2 * torch.rand(n, 3, h, w, generator=g)) * 2 - 1


def _torch_fidelity_module(name):
    """torch_fidelity.<name>, imported without running the package's __init__ (see above)."""
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            pytest.skip("torch-fidelity not installed (pip install torch-fidelity)")
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = pkg
    return importlib.import_module(f"torch_fidelity.{name}")


@torch.no_grad()
def test_torch_fidelity_mode_matches_torch_fidelity(weights, ours):
    """The default mode end to end: uint8 images → torch-fidelity's own resize, normalisation
    and Inception (same weights) → the 2048-d features and unbiased logits it reports."""
    fe_mod = _torch_fidelity_module("feature_extractor_inceptionv3")
    theirs = fe_mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                feature_extractor_weights_path=str(weights))
    images = _images()
    pool_t, logits_t = theirs(torch.from_numpy(inc.to_uint8(images)).permute(0, 3, 1, 2).contiguous())
    pool, probs = inc.inception_features(ours, images, mode="torch-fidelity")
    np.testing.assert_allclose(pool, pool_t.double().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(probs, torch.softmax(logits_t.double(), 1).numpy(), rtol=1e-4, atol=1e-7)
    assert inc.DEFAULT_MODE == "torch-fidelity"


def test_torch_fidelity_resize():
    interp = _torch_fidelity_module("interpolate_compat_tensorflow")
    x = torch.from_numpy(inc.to_uint8(_images(h=64, w=48))).permute(0, 3, 1, 2).float()
    want = interp.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    torch.testing.assert_close(inc.resize_tf1_bilinear(x), want, rtol=0, atol=1e-4)


def test_clean_fid_resize():
    resize = pytest.importorskip("cleanfid.resize")
    u8 = inc.to_uint8(_images(h=40, w=33))
    fn = resize.make_resizer("PIL", False, "bicubic", (299, 299))
    want = np.stack([fn(img) for img in u8]).transpose(0, 3, 1, 2)  # float32 in [0, 255]
    got = inc.preprocess(u8, "clean-fid").numpy() * 128 + 128
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


@torch.no_grad()
def test_pytorch_fid_network_and_mode(weights, ours, monkeypatch):
    """pytorch-fid's FID Inception with the same weights (its download replaced by our file),
    resize_input and normalize_input on: the pool3 features of the "pytorch-fid" mode."""
    try:
        pf = importlib.import_module("pytorch_fid.inception")
    except (ImportError, RuntimeError) as exc:  # it imports torchvision
        pytest.skip(f"pytorch-fid cannot run here: {exc}")
    monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *a, **k: torch.load(weights))
    theirs = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                            normalize_input=True, use_fid_inception=True).eval()
    images = _images()
    want = theirs(torch.from_numpy(inc.to_uint8(images)).permute(0, 3, 1, 2).float() / 255)[0].flatten(1)
    pool, _ = inc.inception_features(ours, images, mode="pytorch-fid")
    np.testing.assert_allclose(pool, want.double().numpy(), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_pytorch_fid_preprocessing(ours, monkeypatch):
    """pytorch-fid's own input code (InceptionV3.forward's resize_input and normalize_input)
    feeding our network equals the "pytorch-fid" mode. Where torchvision cannot be imported,
    a placeholder stands in for it while pytorch_fid.inception is imported: only the module's
    class definitions touch torchvision, never the forward used here."""
    if importlib.util.find_spec("pytorch_fid") is None:
        pytest.skip("pytorch-fid not installed (pip install pytorch-fid)")
    try:
        importlib.import_module("torchvision")
    except (ImportError, RuntimeError):
        tv = types.ModuleType("torchvision")
        tv.__version__ = "0.0"
        tv.models = types.SimpleNamespace(inception=types.SimpleNamespace(
            InceptionA=torch.nn.Module, InceptionC=torch.nn.Module, InceptionE=torch.nn.Module))
        monkeypatch.setitem(sys.modules, "torchvision", tv)
        monkeypatch.delitem(sys.modules, "pytorch_fid.inception", raising=False)
    pf = importlib.import_module("pytorch_fid.inception")
    wrapper = types.SimpleNamespace(resize_input=True, normalize_input=True, output_blocks=[0],
                                    last_needed_block=0, blocks=[lambda x: ours.pool3(x)])
    images = _images()
    want = pf.InceptionV3.forward(wrapper, torch.from_numpy(inc.to_uint8(images)).permute(0, 3, 1, 2).float() / 255)
    pool, _ = inc.inception_features(ours, images, mode="pytorch-fid")
    np.testing.assert_allclose(pool, want[0].double().numpy(), rtol=1e-5, atol=1e-6)
    if "torchvision" in sys.modules and sys.modules["torchvision"].__version__ == "0.0":
        sys.modules.pop("pytorch_fid.inception", None)  # built on the placeholder: not for others


def test_modes_differ_and_bad_mode():
    u8 = inc.to_uint8(_images())
    a, b, c = (inc.preprocess(u8, m) for m in inc.RESIZE_MODES)
    assert a.shape == b.shape == c.shape == (2, 3, 299, 299)
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3
    with pytest.raises(ValueError, match="FID mode"):
        inc.preprocess(u8, "tensorflow")


def test_random_weights_give_varied_features(ours):
    """The random weights give features that vary with the input (a test that could fail)."""
    x = torch.stack([inc.preprocess(inc.to_uint8(_images(seed=s)), "clean-fid")[0] for s in (2, 3)])
    with torch.no_grad():
        pool = ours.pool3(x)
    assert pool.std() > 1e-3 and (pool[0] - pool[1]).abs().max() > 1e-3

