"""`python -m ldm_fast.evaluate` on a fresh machine: the FD-shapes feature network is trained
on first use (inside the no-grad sampling code) into an empty cache; `--fid PATH` adds FID."""

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
