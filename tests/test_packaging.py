"""pyproject.toml says the truth: the torch floor is the newest version-gated API the code
uses, optional packages sit in extras named for what needs them, onnxruntime and
onnxruntime-gpu never land in one environment, and `.[dev]` pulls what the tests import."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]

# API (as written in the source) → the torch release that introduced it.
TORCH_APIS = {
    "fully_shard": (2, 6),             # torch.distributed.fsdp.fully_shard (FSDP2)
    "torch.library.custom_op": (2, 4),
    "torch.library.register_fake": (2, 4),
    "torch.amp.GradScaler(": (2, 3),   # the device-generic GradScaler
}


def _names(requirements) -> set[str]:
    return {re.split(r"[<>=!~; \[]", r, maxsplit=1)[0].lower() for r in requirements}


def _torch_floor() -> tuple[int, int]:
    spec = next(r for r in PROJECT["dependencies"] if r.startswith("torch"))
    major, minor = re.search(r">=(\d+)\.(\d+)", spec).groups()
    return int(major), int(minor)


def test_torch_floor_is_the_newest_api_the_code_uses():
    source = "\n".join(p.read_text() for folder in ("ldm_fast", "kernels", "export")
                       for p in (ROOT / folder).rglob("*.py"))
    used = {api: version for api, version in TORCH_APIS.items() if api in source}
    assert "fully_shard" in used
    assert _torch_floor() == max(used.values()), f"floor {_torch_floor()}, APIs in use: {used}"


def test_optional_packages_live_in_named_extras():
    core = _names(PROJECT["dependencies"])
    assert not core & {"matplotlib", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt"}
    assert "transformers" in _names(EXTRAS["clip"]) and "matplotlib" in _names(EXTRAS["bench"])
    assert "triton" in _names(EXTRAS["gpu"]) and "triton" not in core


def test_every_package_is_installed():
    """A regular (non-editable) install ships every folder with an __init__.py."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool["package-dir"]
    found = set()
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" not in rel.parts:
                found.add(".".join((name, *rel.parts)))
    assert found == set(tool["packages"]), found ^ set(tool["packages"])


@pytest.mark.parametrize("combo", [("dev",), ("gpu",), ("dev", "gpu"), ("export",), ("export-gpu",),
                                   ("export", "gpu"), ("export-gpu", "gpu"), ("bench", "clip", "dev", "gpu")])
def test_onnxruntime_and_its_gpu_build_never_share_an_install(combo):
    names = set().union(*(_names(EXTRAS[e]) for e in combo))
    assert not {"onnxruntime", "onnxruntime-gpu"} <= names


def test_dev_extra_covers_the_test_imports():
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    dev = _names(EXTRAS["dev"]) | _names(PROJECT["dependencies"])
    for module, package in {"diffusers": "diffusers", "transformers": "transformers", "skimage": "scikit-image",
                            "onnxruntime": "onnxruntime", "onnx": "onnx", "triton": "triton",
                            "pytest_benchmark": "pytest-benchmark"}.items():
        if re.search(rf"\b(import|importorskip\(\"){module}\b", tests):
            assert package in dev, f"tests import {module}; .[dev] must pull {package}"
    assert "triton" in _names(EXTRAS["dev"])  # the interpreter tests run on the CI install
    assert (ROOT / ".ci" / "run").read_text().strip().endswith('pip install -e ".[dev]" && python -m pytest')


def test_a_checkout_on_sys_path_leaves_the_name_kernels_to_the_installed_package(tmp_path):
    # transformers >= 5.25 imports Hugging Face's `kernels`; the repository's kernels/ folder,
    # importable as `kernels` when the checkout is on sys.path, must hand the name over.
    import subprocess
    import sys

    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("HUB = True\n")
    root = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import kernels, ldm_fast.kernels.groupnorm\n"
            "assert getattr(kernels, 'HUB', False), kernels.__file__\n"
            "assert sys.modules['ldm_fast.kernels'].__name__ == 'ldm_fast.kernels'\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code, str(root), str(site)], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
