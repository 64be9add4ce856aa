"""Shared pieces of the benchmark scripts: machine description, synchronised timing, analytic
FLOP counting, device peaks, result files and Markdown tables.

Imported by the scripts in bench/ (which put this folder on sys.path when run as
`python bench/X.py`) and by their tests. Nothing here has side effects on import.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"


# ----------------------------------------------------------------------------- the machine

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


# ----------------------------------------------------------------------------- timing

def compiled_gpu_unavailable(script: str) -> int | None:
    """None when compiled Triton kernels can be timed here; else says why and returns the exit
    code (0: no CUDA, nothing to time; 1: TRITON_INTERPRET=1 would time the interpreter)."""
    if not torch.cuda.is_available():
        print(f"{script}: no CUDA device — nothing timed. The Triton kernels run here only under the "
              "interpreter, whose speed says nothing about them; run this on a GPU "
              "(bench/gpu_check.sh does).")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(f"{script}: TRITON_INTERPRET=1 is set; unset it to time compiled kernels.")
        return 1
    return None


def triton_median_ms(fn) -> float:
    """Median milliseconds of `fn` by triton.testing.do_bench (a single quantile comes back as
    a float or a one-element list, by Triton version)."""
    from triton.testing import do_bench

    r = do_bench(fn, warmup=25, rep=100, quantiles=[0.5])
    return r[0] if isinstance(r, (list, tuple)) else r


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(samples: list[float]) -> dict:
    """Median and spread of repeated timings (seconds)."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median": statistics.median(s), "p25": q[0], "p75": q[2], "min": s[0], "max": s[-1],
            "n": len(s)}


def measure(fn, device: torch.device, warmup: int = 2, reps: int = 5) -> dict:
    """Time `fn()` `reps` times after `warmup` untimed calls. Each repetition is bracketed by
    device synchronisation, so GPU work queued by fn is inside its own timing and nothing
    else's. Returns summarize() of the per-call seconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
    return summarize(samples)


def time_once(fn, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of one synchronised call: first calls, where compilation, autotuning
    or graph capture happen, are reported separately from the steady-state timings."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Peak bytes allocated by PyTorch on a CUDA device inside the block (result in
    box['bytes']); on CPU there is no per-block allocator peak, so box['bytes'] stays None."""
    box = {"bytes": None}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield box
    finally:
        if device.type == "cuda":
            synchronize(device)
            box["bytes"] = torch.cuda.max_memory_allocated(device)


# ----------------------------------------------------------------------------- FLOP counting
# Convention (as in the papers' and vendors' "model FLOPs"): a multiply-add is 2 FLOPs;
# convolutions, linear layers and the two attention matmuls (QKᵀ and PV) are counted;
# normalisations, activations, softmax and residual adds are not (memory-bound, < 1 %).

def _conv_flops(module: nn.Module, inputs, output) -> int:
    w = module.weight
    per_output = 2 * (w.shape[1]) * math.prod(w.shape[2:])  # (C_in / groups) · k…
    return per_output * output.numel()


def _linear_flops(module: nn.Linear, inputs, output) -> int:
    return 2 * module.in_features * output.numel()


class FlopCounter:
    """Counts FLOPs of conv/linear modules (forward hooks) and of `ops.attention` calls
    (wrapped for the duration), i.e. of everything the model routes through them.

        with FlopCounter(model) as fc:
            model(x, t)
        fc.total, fc.by_kind

    Run it on the meta device (`torch.device('meta')`) to count without computing."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules
        self.by_kind = {"conv": 0, "linear": 0, "attention": 0}
        self._handles = []
        self._saved_attention = None

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def __enter__(self):
        from ldm_fast import ops

        for root in self.modules:
            for m in root.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    self._handles.append(m.register_forward_hook(self._hook("conv", _conv_flops)))
                elif isinstance(m, nn.Linear):
                    self._handles.append(m.register_forward_hook(self._hook("linear", _linear_flops)))
        self._saved_attention = ops.attention

        def counted_attention(q, k, v):
            b, h, lq, d = q.shape
            lk = k.shape[-2]
            self.by_kind["attention"] += 4 * b * h * lq * lk * d   # QKᵀ and PV, 2 FLOPs per MAC
            return self._saved_attention(q, k, v)

        ops.attention = counted_attention
        return self

    def _hook(self, kind, fn):
        def hook(module, inputs, output):
            self.by_kind[kind] += int(fn(module, inputs, output))
        return hook

    def __exit__(self, *exc):
        from ldm_fast import ops

        for h in self._handles:
            h.remove()
        self._handles.clear()
        ops.attention = self._saved_attention
        return False


def torch_flop_count(fn) -> int | None:
    """The same quantity from torch.utils.flop_counter.FlopCounterMode (torch ≥ 2.1; checked
    on 2.11–2.13), as an independent cross-check; None where it is unavailable."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return int(mode.get_total_flops())


# ----------------------------------------------------------------------------- device peaks
# Data-sheet dense peaks in FLOP/s: (fp32 without tensor cores, tf32 tensor, fp16/bf16 tensor).
# Matched on torch.cuda.get_device_name() substrings, most specific first; unknown GPUs get
# no fraction of peak, never a guessed one.
GPU_PEAKS = [
    ("H200", 67e12, 495e12, 989e12),
    ("H100 NVL", 60e12, 418e12, 835e12),
    ("H100 PCIe", 51e12, 378e12, 756e12),
    ("H100", 67e12, 495e12, 989e12),          # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 19.5e12, 156e12, 312e12),
    ("L40S", 91.6e12, 183e12, 362e12),
    ("L4", 30.3e12, 60e12, 121e12),
    ("A10", 31.2e12, 62.5e12, 125e12),
]


def peak_flops(gpu_name: str | None, dtype: torch.dtype) -> tuple[float, str] | None:
    """(peak FLOP/s, what it is) for this GPU and compute dtype, or None if unknown. fp32 is
    read against the TF32 tensor-core peak when PyTorch lets convolutions use TF32 (its
    default), since that is what cuDNN then runs."""
    if not gpu_name:
        return None
    for key, fp32, tf32, half in GPU_PEAKS:
        if key in gpu_name:
            if dtype in (torch.float16, torch.bfloat16):
                return half, f"{key} dense fp16/bf16 tensor"
            if torch.backends.cudnn.allow_tf32:
                return tf32, f"{key} dense tf32 tensor (cuDNN allow_tf32)"
            return fp32, f"{key} fp32"
    return None


# ----------------------------------------------------------------------------- sample quality

class QualityProbe:
    """Distance of generated images to a fixed reference set: FD-shapes (the project's own
    feature network — never called FID), and FID when the Inception weights are on this
    machine (${LDM_FID_INCEPTION}); each with a bootstrap estimate of its sampling noise.

    quick: a feature network trained for a few seconds, cached apart from the real one
    (`cache_dir`), for smoke runs whose numbers mean nothing."""

    def __init__(self, resolution: int, reference_images: torch.Tensor, quick: bool = False,
                 cache_dir=None, inception: str | None = None, log_fn=None):
        import numpy as np  # noqa: F401 - numpy is a hard dependency of the metrics

        from ldm_fast.metrics import (FD_NAME, FeatureNetTraining, InceptionWeightsUnavailable,
                                      extract, feature_statistics, load_fid_inception,
                                      load_shapes_net)
        self.fd_name = FD_NAME
        feat_cfg = FeatureNetTraining(steps=40, train_size=256, heldout_size=64) if quick else None
        if quick and cache_dir is None:
            raise ValueError("quick feature networks need their own cache_dir (they must never "
                             "replace the real cached network)")
        self.net = load_shapes_net(resolution, cache_dir=cache_dir, cfg=feat_cfg,
                                   log=log_fn or (lambda m: log(m)))
        self._extract = extract
        self.reference_n = len(reference_images)
        self.ref_stats = feature_statistics(extract(self.net, reference_images).features)
        self.inception, self.fid_unavailable = None, None
        try:
            self.inception = load_fid_inception(inception)
        except InceptionWeightsUnavailable as e:
            self.fid_unavailable = str(e).split(". ")[0]
        if self.inception is not None:
            from ldm_fast.metrics import inception_features
            self._inception_features = inception_features
            self.ref_stats_fid = feature_statistics(inception_features(self.inception, reference_images)[0])

    def score(self, images: torch.Tensor, n_boot: int = 100, seed: int = 0) -> dict:
        """{'fd_shapes', 'fd_shapes_noise', 'n', ('fid', 'fid_noise')}: *_noise is the bootstrap
        standard deviation over resamplings (with replacement) of the generated set — how much
        the number moves from the finite sample alone."""
        feats = self._extract(self.net, images).features
        out = {"n": int(feats.shape[0])}
        out["fd_shapes"], out["fd_shapes_noise"] = fd_with_noise(feats, self.ref_stats, n_boot, seed)
        if self.inception is not None:
            pool = self._inception_features(self.inception, images)[0]
            out["fid"], out["fid_noise"] = fd_with_noise(pool, self.ref_stats_fid, n_boot, seed)
        return out


def fd_with_noise(features, ref_stats, n_boot: int = 100, seed: int = 0) -> tuple[float, float]:
    """(Fréchet distance of `features` to the reference statistics, bootstrap std)."""
    import numpy as np

    from ldm_fast.metrics import feature_statistics, frechet_distance

    fd = frechet_distance(*feature_statistics(features), *ref_stats)
    rng = np.random.default_rng(seed)
    n = features.shape[0]
    boots = [frechet_distance(*feature_statistics(features[rng.integers(0, n, n)]), *ref_stats)
             for _ in range(n_boot)]
    return fd, float(np.std(boots, ddof=1)) if n_boot > 1 else float("nan")


# ----------------------------------------------------------------------------- results

def write_report(payload: dict, out: Path, markdown: str, plot=None, extra: str = "") -> None:
    """The JSON, the plot (`plot(payload, png_path)`, when given) and the Markdown table beside
    it; prints the table and what was written."""
    write_json(payload, out)
    written = [out]
    if plot is not None:
        plot(payload, out.with_suffix(".png"))
        written.append(out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown + "\n")
    written.append(out.with_suffix(".md"))
    print(markdown)
    print(f"\nwrote {', '.join(map(str, written[:-1]))} and {written[-1]}" + (f" {extra}" if extra else ""))


def write_json(payload: dict, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable))
    os.replace(tmp, out)
    return out


def _jsonable(obj):
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if isinstance(obj, (torch.device, Path)):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def default_out(name: str, info: dict, smoke: bool = False) -> Path:
    """bench/results/<benchmark>-<machine>.json: the latest figures per machine. Smoke runs
    (numbers meaningless) go to the temp directory instead, so they never replace results."""
    if smoke:
        import tempfile
        return Path(tempfile.gettempdir()) / "ldm_fast_bench" / f"{name}-{machine_slug(info)}.json"
    return RESULTS_DIR / f"{name}-{machine_slug(info)}.json"


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (also readable as plain text)."""
    cells = [[str(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(out)


def fmt(value, spec: str = ".3g", none: str = "—") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def fmt_spread(stats: dict | None, scale: float = 1e3, spec: str = ".3g") -> str:
    """'12.3 (11.9–12.8)': median and interquartile range, scaled (default s → ms)."""
    if not stats:
        return "—"
    return (f"{format(stats['median'] * scale, spec)} "
            f"({format(stats['p25'] * scale, spec)}–{format(stats['p75'] * scale, spec)})")


def log(*args) -> None:
    print(*args, flush=True, file=sys.stderr)
