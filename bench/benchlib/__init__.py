"""Shared pieces of the benchmark scripts, one module per concern:

  machine    what ran it: CPU/GPU, versions, commit, threads (machine, pick_device, set_threads)
  timing     synchronised timing and its summaries (measure, time_once, summarize, peak_memory)
  flops      analytic FLOP counting and the GPUs' data-sheet peaks (FlopCounter, peak_flops)
  quality    FD-shapes / FID of generated images with bootstrap noise (QualityProbe)
  results    result files (write_report, default_out), tables and number formats, and the
             README results section rendered from them (render, splice; bench/report.py)

Imported by the scripts in bench/ (which put that folder on sys.path when run as
`python bench/X.py`) and by their tests as `import benchlib as bl`. No side effects on import.
"""

from benchlib.flops import GPU_PEAKS, FlopCounter, peak_flops, torch_flop_count
from benchlib.machine import (REPO, RESULTS_DIR, add_threads_arg, cpu_model, machine, machine_slug, pick_device,
                              set_threads, slug)
from benchlib.quality import QualityProbe, fd_with_noise
from benchlib.results import (command_line, default_out, fmt, fmt_spread, log, provenance, render, splice, table,
                              write_json, write_report)
from benchlib.timing import (compiled_gpu_unavailable, measure, peak_memory, summarize, synchronize, time_once,
                             triton_median_ms)

__all__ = ["GPU_PEAKS", "REPO", "RESULTS_DIR", "FlopCounter", "QualityProbe", "add_threads_arg", "command_line",
           "compiled_gpu_unavailable", "cpu_model", "default_out", "fd_with_noise", "fmt", "fmt_spread", "log",
           "machine", "machine_slug", "measure", "peak_flops", "peak_memory", "pick_device", "provenance", "render",
           "set_threads", "slug", "splice", "summarize", "synchronize", "table", "time_once", "torch_flop_count",
           "triton_median_ms", "write_json", "write_report"]
