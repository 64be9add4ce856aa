"""Synchronised timing: medians with the interquartile range, first-call times, peak memory,
Triton's do_bench, and the guard for benchmarks that need a compiled GPU."""

from __future__ import annotations

import contextlib
import os
import statistics
import time

import torch

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
