"""bench/peers.py (ldm_fast against diffusers on the same weights) in its smoke mode: every row
is built, checked equal to diffusers and timed; bad arguments get one line. The numbers of
this run mean nothing."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
pytest.importorskip("diffusers", reason="diffusers is the peer this bench compares against")


def load():
    key = "_bench_peers"
    if key not in sys.modules:
        if str(BENCH) not in sys.path:
            sys.path.insert(0, str(BENCH))
        spec = importlib.util.spec_from_file_location(key, BENCH / "peers.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(autouse=True)
def _restore_global_state():
    from ldm_fast import ops

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    ops.set_backend(None)


def test_peers_smoke_every_row_equal_and_timed(tmp_path):
    out = tmp_path / "peers.json"
    assert load().main(["--smoke", "--modes", "eager,bf16,compile", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["smoke"] and data["diffusers"] and data["machine"]["torch"]
    rows = {(r["part"], r["mode"]): r for r in data["rows"]}
    parts = load().PARTS
    assert {p for p, _ in rows} == set(parts)
    for (part, mode), r in rows.items():
        assert "failed" not in r, (part, mode, r.get("failed"))
        assert r["check"]["equal"] and r["check"]["max_abs_diff"] <= r["check"]["tolerance"]
        assert r["ours"]["n"] == 2 and r["theirs"]["n"] == 2 and r["ratio"] > 0
    assert rows[("ddim-loop", "eager")]["per_step_us"]["theirs"] > 0
    assert "check_after_step" in rows[("train", "eager")]
    assert "ddim-loop bf16" in data["skipped"] and "unet-tiny compile" in data["skipped"]
    md = out.with_suffix(".md").read_text()
    assert "ldm_fast / diffusers" in md and "Command: `python bench/peers.py --smoke" in md


def test_unequal_outputs_are_caught():
    check = load().check_equal
    a = torch.ones(3)
    assert check(a, a + 1e-6, "eager")["equal"]
    assert not check(a, a + 1e-2, "eager")["equal"]
    assert check(a, a + 1e-2, "bf16")["equal"]


def test_bad_arguments_get_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, str(BENCH / "peers.py"), "--parts", "unet-tiny,nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--parts: unknown ['nope']" in proc.stderr.strip().splitlines()[-1]


def test_without_diffusers_ldm_fast_is_still_timed(tmp_path, monkeypatch):
    """The GPU image has no diffusers: every row times ldm_fast alone and says why."""
    monkeypatch.setitem(sys.modules, "diffusers", None)   # import diffusers now raises ImportError
    out = tmp_path / "peers.json"
    assert load().main(["--smoke", "--parts", "unet-tiny,ddim-loop,train", "--modes", "eager",
                        "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["diffusers"] is None and len(data["rows"]) == 3
    for r in data["rows"]:
        assert r["ours"]["n"] == 2 and "theirs" not in r and "ratio" not in r
        assert "diffusers is not installed" in r["theirs_skipped"]
