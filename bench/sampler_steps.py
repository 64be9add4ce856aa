"""Sampler-step benchmark: the fused Triton update against the eager chain of ops it replaces.

    python bench/sampler_steps.py [--out bench/results/sampler_steps.json] [--no-compile]
    TRITON_INTERPRET=1 python bench/sampler_steps.py --smoke     # does the script run? (CPU)

For each update (DDIM η = 0, DDIM η = 1 with noise, Euler-ancestral, DPM-Solver++(2M) with its
previous x0) under classifier-free guidance, on the same inputs, it times
  triton  — kernels/sampler_steps.py: one launch (what ops.py runs with LDM_KERNELS=triton);
  eager   — the kernel file's *_ref: CFG combine, ε/v → x0, update, noise, as a PyTorch
            sampler writes it (what ops.py runs with LDM_KERNELS=eager);
  compile — torch.compile of that eager function (Inductor fuses it too);
with triton.testing.do_bench (CUDA-synchronised, L2 flushed between repeats, median), and
reports effective GB/s = the bytes the update must move at least (read x, both CFG halves of
the model output, noise / previous x0 where used; write x_next, and x0 for DPM-Solver++) over
the time, the fraction of the data-sheet and of a measured copy bandwidth, the speedups, and
the largest deviation from eager (a fast wrong kernel shows up here).

Shapes: the SD1.5 latent at 512² (2 × 4 × 64 × 64, batch 2 with CFG, so the UNet output is
4 × 4 × 64 × 64 in fp16) and at 1024² (2 × 4 × 128 × 128), the tiny preset's sampling batch,
and one large tensor (16 × 16 × 128 × 128) where the step is bandwidth-bound rather than
launch-bound — at SD sizes a step moves well under a megabyte, so what fusion saves there is
launches, not bytes, and the GB/s figure is small by nature.

Without CUDA nothing is timed: under the interpreter the "kernel" is numpy, so any number would
be fiction. The script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

# Data-sheet HBM bandwidth (bytes/s), matched on the device name, most specific first.
PEAK_BW = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
           ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
           ("L40S", 0.864e12), ("L4", 0.3e12), ("A10", 0.6e12)]

SHAPES = {
    "sd-512": (2, 4, 64, 64),
    "sd-1024": (2, 4, 128, 128),
    "tiny": (16, 3, 16, 16),
    "large": (16, 16, 128, 128),
}
UPDATES = ("ddim", "ddim-eta1", "euler_a", "dpmpp_2m")


def _peak(name):
    return next((bw for key, bw in PEAK_BW if key in name), None)


def make_case(update, shape, out_dtype, device):
    """(fused fn, eager fn, inputs, bytes moved)."""
    from ldm_fast.diffusion import make_schedule
    from ldm_fast.kernels import sampler_steps as ss

    ac = make_schedule("linear").alphas_cumprod
    a_t, a_next, a_prev = float(ac[500]), float(ac[480]), float(ac[520])
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    out = torch.randn((2 * shape[0],) + shape[1:], generator=g).to(device, out_dtype)
    extra = torch.randn(shape, generator=g).to(device)  # noise or previous x0
    n = x.numel()
    read = x.element_size() * n + out.element_size() * out.numel()
    write = x.element_size() * n
    if update == "ddim":
        kw = dict(eta=0.0, guidance=7.5)
        fused, eager = ss.ddim_step, ss.ddim_step_ref
    elif update == "ddim-eta1":
        kw = dict(eta=1.0, noise=extra, guidance=7.5)
        fused, eager = ss.ddim_step, ss.ddim_step_ref
        read += extra.element_size() * n
    elif update == "euler_a":
        kw = dict(eta=1.0, noise=extra, guidance=7.5)
        fused, eager = ss.euler_step, ss.euler_step_ref
        read += extra.element_size() * n
    else:
        kw = dict(x0_prev=extra, a_prev=a_prev, guidance=7.5)
        fused, eager = ss.dpmpp_2m_step, ss.dpmpp_2m_step_ref
        read += extra.element_size() * n
        write += x.element_size() * n  # x0 for the next step

    def run_fused():
        return fused(x, out, a_t, a_next, **kw)

    def run_eager():
        return eager(x, out, a_t, a_next, **kw)

    return run_fused, run_eager, read + write


def first(r):
    return r[0] if isinstance(r, tuple) else r


def run(do_bench, device, out_dtype, shapes, use_compile, peak, copy_bw):
    rows = []
    for label in shapes:
        shape = SHAPES[label]
        for update in UPDATES:
            fused, eager, nbytes = make_case(update, shape, out_dtype, device)
            impls = [("triton", fused), ("eager", eager)]
            if use_compile:
                impls.append(("compile", torch.compile(eager, backend="inductor" if device == "cuda"
                                                       else "aot_eager")))
            ref = first(eager())
            row = {"update": update, "case": label, "shape": list(shape),
                   "model_out_dtype": str(out_dtype).replace("torch.", ""), "bytes": nbytes, "impl": {}}
            for name, fn in impls:
                try:
                    ms = do_bench(fn)
                    diff = (first(fn()).double() - ref.double()).abs().max().item()
                except Exception as e:  # noqa: BLE001 — recorded, never hidden
                    row["impl"][name] = {"error": f"{type(e).__name__}: {e}"[:400]}
                    continue
                r = {"ms": ms, "GBps": nbytes / ms / 1e6, "max_abs_diff_vs_eager": diff}
                if peak:
                    r["frac_peak_bw"] = r["GBps"] * 1e9 / peak
                if copy_bw:
                    r["frac_copy_bw"] = r["GBps"] * 1e9 / copy_bw
                row["impl"][name] = r
            t = row["impl"].get("triton", {})
            for base in ("eager", "compile"):
                b = row["impl"].get(base, {})
                row[f"speedup_vs_{base}"] = b["ms"] / t["ms"] if "ms" in t and "ms" in b else None
            rows.append(row)
            print(line(row), flush=True)
    return rows


def _f(v, spec):
    return "—" if v is None else format(v, spec)


def line(row):
    i = row["impl"]
    return (f"{row['update']:10s} {row['case']:8s} {str(row['shape']):18s} "
            + "  ".join(f"{n} {_f(r.get('ms'), '.4f')} ms" for n, r in i.items())
            + f"  triton {_f(i.get('triton', {}).get('GBps'), '.0f')} GB/s"
            + f"  ×eager {_f(row['speedup_vs_eager'], '.2f')}  ×compile {_f(row['speedup_vs_compile'], '.2f')}")


def markdown(rows):
    out = ["| update | case | shape | triton ms | eager ms | compile ms | triton GB/s | of peak "
           "| ×eager | ×compile | max diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, e, c = (r["impl"].get(n, {}) for n in ("triton", "eager", "compile"))
        f = t.get("frac_peak_bw")
        out.append(f"| {r['update']} | {r['case']} | {'×'.join(map(str, r['shape']))} "
                   f"| {_f(t.get('ms'), '.4f')} | {_f(e.get('ms'), '.4f')} | {_f(c.get('ms'), '.4f')} "
                   f"| {_f(t.get('GBps'), '.0f')} | {'—' if f is None else f'{100 * f:.0f}%'} "
                   f"| {_f(r['speedup_vs_eager'], '.2f')} | {_f(r['speedup_vs_compile'], '.2f')} "
                   f"| {_f(t.get('max_abs_diff_vs_eager'), '.2g')} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/sampler_steps.json",
                    help="JSON path; the Markdown table goes next to it (.md)")
    ap.add_argument("--sizes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--out-dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                    help="dtype of the UNet output (the latent stays fp32)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, TRITON_INTERPRET=1, tiny shape, wall clock: checks the script runs; "
                         "its numbers mean nothing and nothing is written")
    args = ap.parse_args(argv)
    out_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.out_dtype]

    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 in the environment (read at kernel definition)")
            return 1

        def wall(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3

        rows = run(wall, "cpu", out_dtype, ["tiny"], not args.no_compile, None, None)
        print(markdown(rows))
        print("SMOKE RUN: interpreter and CPU wall-clock timings, meaningless as speed.")
        return 1 if any("error" in i for r in rows for i in r["impl"].values()) else 0

    if (code := bl.compiled_gpu_unavailable("bench/sampler_steps.py")) is not None:
        return code
    import triton

    do_bench = bl.triton_median_ms

    gpu = torch.cuda.get_device_name(0)
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() * 4 / (do_bench(lambda: dst.copy_(src)) * 1e-3)
    del src, dst
    env = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "peak_bandwidth_Bps": _peak(gpu),
           "copy_bandwidth_GBps": copy_bw / 1e9}
    print(f"{gpu}: torch {env['torch']}, triton {env['triton']}; measured copy {copy_bw / 1e9:.0f} GB/s",
          flush=True)
    rows = run(do_bench, "cuda", out_dtype, args.sizes.split(","), not args.no_compile, _peak(gpu), copy_bw)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    table = markdown(rows)
    out.with_suffix(".md").write_text(f"# Sampler-step benchmark — {gpu}\n\ntorch {env['torch']}, "
                                      f"triton {env['triton']}, {env['time']}; copy bandwidth "
                                      f"{copy_bw / 1e9:.0f} GB/s\n\n{table}\n")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
