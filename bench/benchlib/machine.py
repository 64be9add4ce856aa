"""The machine a benchmark runs on: CPU/GPU names, library versions, commit, threads."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "bench" / "results"

def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - absent or broken: either way not usable here
        return None
    return getattr(mod, "__version__", "unknown")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def machine(device: torch.device | str) -> dict:
    """Everything a number must be read against: device name, date, library versions."""
    device = torch.device(device)
    info = {
        "device_type": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "onnxruntime": _version("onnxruntime"),
        "tensorrt": _version("tensorrt"),
        "numpy": _version("numpy"),
        "git_commit": _git_commit(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), capability=f"{p.major}.{p.minor}",
                    sm_count=p.multi_processor_count, gpu_memory_GiB=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        info["name"] = info["gpu"]
    else:
        info["name"] = f"CPU {info['cpu']} ({info['cpu_count']} cores)"
    return info


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def machine_slug(info: dict) -> str:
    return slug(info["gpu"]) if info["device_type"] == "cuda" else "cpu-" + slug(info["cpu"])


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def add_threads_arg(ap) -> None:
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU intra-op threads (default 1, or $OMP_NUM_THREADS if set)")


def set_threads(threads: int | None = None) -> int:
    """CPU intra-op threads for the run: `threads`, else $OMP_NUM_THREADS, else 1.

    One by default because the development machines share two cores between several jobs:
    there, two OpenMP threads spin-wait on each other whenever one is descheduled, and a
    tiny-model UNet call measured 67 ms with one thread but 3.1 s with two (same minute,
    interleaved). One thread is slower on an idle machine, but its ratios are reproducible.
    The count is recorded with every result (machine.torch_threads)."""
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS")
        threads = int(env) if env and env.isdigit() else 1
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()
