"""The portable native part (CMakeLists.txt, export/native/): configure, build and ctest it in a
temporary folder, check the PNG it writes with Pillow, and check that the committed fixture
still matches what the Python implementation produces."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "export" / "native"


def _compiler() -> str | None:
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return name
    return None


needs_toolchain = pytest.mark.skipif(shutil.which("cmake") is None or _compiler() is None,
                                     reason="cmake or a C++ compiler is not installed")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    build = tmp_path_factory.mktemp("native_build")
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2", "--target", "ldm_native_test"],
                   check=True, capture_output=True, text=True)
    return build


@needs_toolchain
def test_ctest_passes_against_python_reference_values(build_dir):
    res = subprocess.run(["ctest", "--test-dir", str(build_dir), "--output-on-failure"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "100% tests passed" in res.stdout


@needs_toolchain
def test_native_png_decodes_to_the_python_grid(build_dir):
    from PIL import Image

    subprocess.run(["ctest", "--test-dir", str(build_dir)], check=True, capture_output=True)
    png = build_dir / "native_grid.png"
    grid = json.loads((NATIVE / "fixture.json").read_text())["grid"]
    want = np.array(grid["expected"], dtype=np.uint8).reshape(grid["grid_h"], grid["grid_w"], 3)
    img = Image.open(png)
    assert img.mode == "RGB" and img.size == (grid["grid_w"], grid["grid_h"])
    np.testing.assert_array_equal(np.asarray(img), want)


def test_committed_fixture_matches_the_python_implementation(tmp_path):
    """If a schedule, the sampler grid, the DDIM step, the image grid or the sidecar schema
    changes in Python, the fixture (and so the native code's reference) must be regenerated."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixture", NATIVE / "make_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(tmp_path / "fixture.json")
    for name in ("fixture.json", "sidecar_example.json"):
        fresh, committed = (json.loads(p.read_text()) for p in (tmp_path / name, NATIVE / name))
        # Floats to 1e-12: another torch build may differ in the last bit of a float64 schedule.
        assert _same(fresh, committed), f"export/native/{name} is stale: run python export/native/make_fixture.py"


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= 1e-12 * max(1.0, abs(b))
    return a == b
