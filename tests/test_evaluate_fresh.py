"""`python -m ldm_fast.evaluate` on a fresh machine: the FD-shapes feature network is trained
on first use (inside the no-grad sampling code) into an empty cache; `--fid PATH` adds FID; on an
image-folder run only what is valid for photographs is reported."""

import functools
import json

import torch

from micro import micro_config
from test_fid_tools import random_inception_state

from ldm_fast import evaluate
from ldm_fast.config import save_yaml
from ldm_fast.metrics import features as fmod
from ldm_fast.model import LatentDiffusion
from ldm_fast.run import RunDir

TINY = fmod.FeatureNetTraining(steps=3, batch_size=4, train_size=8, heldout_size=4)


def _run_dir(path):
    cfg = micro_config()
    torch.manual_seed(0)
    model = LatentDiffusion(cfg).eval()
    run = RunDir(path)
    save_yaml(cfg, run.path / "config.yaml")
    run.save_first_stage(model.first_stage, cfg)
    run.save_ldm(model, None, None, cfg)
    return run.path


def test_evaluate_from_empty_cache_with_fid(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv(fmod.CACHE_ENV, str(cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # The real first-use path (load_shapes_net → train_shapes_net under no_grad), at a size
    # that trains in a second.
    monkeypatch.setattr(evaluate, "load_shapes_net", functools.partial(fmod.load_shapes_net, cfg=TINY, log=None))
    weights = tmp_path / "inception.pth"
    torch.save(random_inception_state(), weights)
    run = _run_dir(tmp_path / "run")
    assert not cache.exists()
    code = evaluate.main(["--ckpt", str(run), "--n", "4", "--steps", "2", "--batch-size", "4", "--device", "cpu",
                          "--fid", str(weights)])
    assert code == 0, capsys.readouterr().err
    assert list(cache.glob("shapes_net_*.safetensors"))  # trained and cached
    ldm = json.loads((run / "eval.json").read_text())["ldm"]
    assert ldm[fmod.FD_NAME] >= 0 and ldm["fid_torch-fidelity"] >= 0


def test_evaluate_missing_fid_weights(tmp_path, capsys):
    run = _run_dir(tmp_path / "run")
    assert evaluate.main(["--ckpt", str(run), "--fid", str(tmp_path / "absent.pth")]) == 2
    err = capsys.readouterr().err
    assert "absent.pth" in err and "Traceback" not in err


def _photo_folder(path, n=40, size=24):
    """n crops of the photographs that ship with scikit-image (real images, not shapes)."""
    from PIL import Image
    from skimage import data

    path.mkdir()
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    for i in range(n):
        img = photos[i % len(photos)]
        y, x = 37 * i % (img.shape[0] - 96), 53 * i % (img.shape[1] - 96)
        Image.fromarray(img[y:y + 96, x:x + 96]).resize((size, size)).save(path / f"{i:03d}.png")
    return path


def _folder_run_dir(path, folder, lpips_weights=""):
    cfg = micro_config()
    cfg.data.dataset, cfg.data.root = "folder", str(folder)
    cfg.autoencoder.lpips_weights = lpips_weights
    torch.manual_seed(0)
    model = LatentDiffusion(cfg).eval()
    run = RunDir(path)
    save_yaml(cfg, run.path / "config.yaml")
    run.save_first_stage(model.first_stage, cfg)
    run.save_ldm(model, None, None, cfg)
    return run.path


def test_evaluate_folder_run_reports_what_is_valid_there(tmp_path, monkeypatch, capsys):
    """On photographs: PSNR/SSIM, FID with --fid, and FD-shapes left out with one line saying
    why — its feature network is never trained (the cache stays empty)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(fmod.CACHE_ENV, str(cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run = _folder_run_dir(tmp_path / "run", _photo_folder(tmp_path / "photos"))
    args = ["--ckpt", str(run), "--n", "4", "--steps", "2", "--batch-size", "4", "--device", "cpu"]

    assert evaluate.main(args) == 0
    out = capsys.readouterr().out
    assert sum("FD-shapes left out" in line and "--fid" in line for line in out.splitlines()) == 1
    results = json.loads((run / "eval.json").read_text())
    assert results["n"] == 4 and "ldm" not in results
    assert 0 < results["autoencoder"]["ssim"] <= 1 and results["autoencoder"]["psnr_db"] > 0

    weights = tmp_path / "inception.pth"
    torch.save(random_inception_state(), weights)
    assert evaluate.main(args + ["--fid", str(weights)]) == 0
    ldm = json.loads((run / "eval.json").read_text())["ldm"]
    assert ldm["fid_torch-fidelity"] >= 0 and fmod.FD_NAME not in ldm and "precision" not in ldm
    assert not cache.exists() and not (tmp_path / "home" / ".cache").exists()


def test_evaluate_folder_run_lpips_from_the_runs_weights(tmp_path, monkeypatch):
    """LPIPS joins the reconstruction metrics when the run names its weights file
    (autoencoder.lpips_weights): the value is the loss module's LPIPS of the held-out images."""
    from safetensors.torch import save_file

    from ldm_fast.data.build import build_datasets
    from ldm_fast.losses import LPIPS
    from ldm_fast.run import load_first_stage

    monkeypatch.setenv(fmod.CACHE_ENV, str(tmp_path / "cache"))
    torch.manual_seed(1)
    weights = tmp_path / "lpips.safetensors"
    # Random backbone; non-negative heads, as trained LPIPS heads are.
    save_file({k.replace("lins.", "lin", 1): (v.abs() if k.startswith("lins.") else v).contiguous()
               for k, v in LPIPS().state_dict().items()}, str(weights))
    run = _folder_run_dir(tmp_path / "run", _photo_folder(tmp_path / "photos"), lpips_weights=str(weights))
    assert evaluate.main(["--ckpt", str(run), "--skip-samples", "--device", "cpu"]) == 0
    got = json.loads((run / "eval.json").read_text())["autoencoder"]["lpips"]

    cfg = evaluate.load_config(run)
    _, heldout = build_datasets(cfg.data)
    images = torch.stack([heldout[i]["image"] for i in range(len(heldout))])
    with torch.no_grad():
        recon = load_first_stage(run, "cpu", cfg)(images, sample=False)[0].clamp(-1, 1)
        want = float(LPIPS.from_file(str(weights))(recon, images).mean())
    assert got > 0 and abs(got - want) < 1e-5 * max(1.0, want)
