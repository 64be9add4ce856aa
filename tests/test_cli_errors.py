"""Every CLI reports the project's own errors (bad files, checkpoints, flags) as one line on
stderr and exit status 2, without a traceback."""

import shutil

import pytest

from export_helpers import class_export_dir, class_run_dir


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_train_with_a_missing_data_folder(tmp_path, capsys):
    from ldm_fast.train import main

    assert main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--no-progress"]) == 2
    assert "nope" in _one_error_line(capsys)


def test_sample_from_a_corrupt_checkpoint(tmp_path, capsys):
    from ldm_fast.sample import main

    run = tmp_path / "run"
    shutil.copytree(class_run_dir(), run)
    data = (run / "ldm.safetensors").read_bytes()
    (run / "ldm.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["--ckpt", str(run), "--class", "1", "--steps", "1", "--out", str(tmp_path / "g.png")]) == 2
    assert "ldm.safetensors" in _one_error_line(capsys)


@pytest.mark.parametrize("flags,message", [
    (["--boxes", "0.1,0.1,0.5"], "5 numbers"),
    (["--class", "one"], "integers"),
    (["--class", "1", "--steps", "0"], "--steps must be positive"),
    (["--class", "1", "--height", "9"], "multiples"),
    (["--class", "1", "--image", "missing.png", "--mask", "missing.png"], "no such image"),
])
def test_deploy_and_sample_reject_bad_flags(tmp_path, capsys, flags, message):
    from ldm_fast import deploy, sample

    out = ["--out", str(tmp_path / "g.png"), "--no-progress"]
    assert sample.main(["--ckpt", str(class_run_dir()), *flags, *out]) == 2
    assert message in _one_error_line(capsys)
    assert deploy.main(["--engine-dir", str(class_export_dir()), *flags, *out]) == 2
    assert message in _one_error_line(capsys)


def test_evaluate_outside_a_run_directory(tmp_path, capsys):
    from ldm_fast.evaluate import main

    assert main(["--ckpt", str(tmp_path)]) == 2
    assert "not a run directory" in _one_error_line(capsys)


def test_export_from_a_corrupt_checkpoint(tmp_path, capsys):
    from ldm_fast.export.__main__ import main

    run = tmp_path / "run"
    shutil.copytree(class_run_dir(), run)
    (run / "autoencoder.safetensors").write_bytes(b"\0" * 64)
    assert main(["--ckpt", str(run), "--out", str(tmp_path / "export")]) == 2
    assert "autoencoder.safetensors" in _one_error_line(capsys)
