"""bench/gpu_check.sh, checked on CPU so that a lent GPU's minutes go to measuring.

Every Python step it runs must import with only what the GPU image is stated to have (torch,
triton, numpy, safetensors, tokenizers, PyYAML, tqdm, Pillow, pytest, pytest-benchmark, onnx,
onnxruntime): each runs here with the other packages of this machine blocked. Steps that need
CUDA must say so and exit cleanly; the driver must reject bad arguments and stay within its
time budget on paper.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"

# What this machine has beyond the GPU image's stated packages (and might be imported).
NOT_ON_GPU_IMAGE = ("diffusers", "transformers", "matplotlib", "skimage", "sklearn", "scipy",
                    "onnxscript", "huggingface_hub", "torchvision", "pytorch_fid", "imageio")

BLOCKER = f"""
import importlib.abc, runpy, sys
class _NotOnGpuImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_ON_GPU_IMAGE!r}:
            raise ImportError(f"{{name}} is not on the GPU image")
        return None
sys.meta_path.insert(0, _NotOnGpuImage())
"""


def _py(code: str, *args, interpret=True):
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", BLOCKER + code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _run_script(path, *args):
    return _py(f"sys.argv = [{str(path)!r}, *sys.argv[1:]]\n"
               f"runpy.run_path({str(path)!r}, run_name='__main__')", *args)


def _step_commands():
    """The Python files gpu_check.sh runs (bench scripts and test files)."""
    text = SCRIPT.read_text()
    scripts = sorted(set(re.findall(r'"\$PY" (bench/\w+\.py)', text)))
    tests = sorted(set(re.findall(r"(tests/test_\w+\.py)", text)))
    return scripts, tests


def test_blocker_blocks():
    r = _py("import diffusers")
    assert r.returncode != 0 and "not on the GPU image" in r.stderr


def test_every_step_script_imports_and_parses_arguments():
    scripts, _ = _step_commands()
    assert {"bench/kernels.py", "bench/sampler_steps.py", "bench/throughput.py",
            "bench/train_throughput.py", "bench/kernel_defaults.py"} <= set(scripts)
    for s in scripts:
        r = _run_script(ROOT / s, "--help")
        assert r.returncode == 0, f"{s}: {r.stderr[-2000:]}"


def test_every_step_test_file_imports():
    _, tests = _step_commands()
    assert {"tests/test_kernels_sampler_steps.py", "tests/test_kernels_models.py"} <= set(tests)
    code = ("sys.path.insert(0, 'tests')\n"
            "import importlib\n"
            f"for m in {[Path(t).stem for t in tests]!r}: importlib.import_module(m)\n"
            "print('imported')")
    r = _py(code)
    assert r.returncode == 0 and "imported" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("script", ["bench/kernels.py", "bench/sampler_steps.py"])
def test_cuda_steps_say_so_and_exit_cleanly(script):
    r = _run_script(ROOT / script, "--out", "/dev/null")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "CUDA" in r.stdout + r.stderr


def test_driver_arguments_and_budget():
    listing = subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True, text=True)
    assert listing.returncode == 0
    budgets = [tuple(map(int, m)) for m in
               re.findall(r": (\d+) s \(quick: (\d+) s\)", listing.stdout)]
    assert sum(b[0] for b in budgets) <= 600 and sum(b[1] for b in budgets) <= 300
    for args, message in ((["--bogus"], "unknown option"), (["no-such-step"], "unknown step"),
                          ([], "no CUDA device")):
        r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


def test_kernel_defaults_table(tmp_path):
    """An op is on under `auto` only where it won at every SD shape, forward and backward."""
    rows = [dict(kernel="groupnorm", case="sd-unet", shape=[2, 320, 64, 64], dtype="bfloat16",
                 fwd_speedup_vs_eager=1.4, bwd_speedup_vs_eager=1.1),
            dict(kernel="groupnorm", case="sd-vae", shape=[1, 128, 512, 512], dtype="bfloat16",
                 fwd_speedup_vs_eager=1.2, bwd_speedup_vs_eager=1.0),
            dict(kernel="groupnorm", case="tiny", shape=[32, 64, 8, 8], dtype="float16",
                 fwd_speedup_vs_eager=0.5, bwd_speedup_vs_eager=0.5),   # not an SD shape
            dict(kernel="attention", case="sd self 64²", shape=[2, 8, 4096, 4096, 40],
                 dtype="bfloat16", fwd_speedup_vs_eager=1.3, bwd_speedup_vs_eager=0.7),
            dict(kernel="attention", case="sd self 64²", shape=[2, 8, 4096, 4096, 40],
                 dtype="float16", fwd_speedup_vs_eager=None, bwd_speedup_vs_eager=None)]
    (tmp_path / "kernels.json").write_text(json.dumps({"results": rows}))
    (tmp_path / "sampler_steps.json").write_text(json.dumps({"results": [
        dict(update="ddim", case="sd-512", shape=[2, 4, 64, 64], speedup_vs_eager=2.0),
        dict(update="dpmpp_2m", case="sd-512", shape=[2, 4, 64, 64], speedup_vs_eager=0.9)]}))
    out = tmp_path / "table.json"
    r = _run_script(ROOT / "bench" / "kernel_defaults.py", str(tmp_path), "--write", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["auto"] == {"group_norm": ["bfloat16"]}
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run_script(ROOT / "bench" / "kernel_defaults.py", str(empty))
    assert r.returncode == 2 and "no kernels.json" in r.stderr
