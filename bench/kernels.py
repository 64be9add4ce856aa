"""Kernel benchmark: the Triton kernels against eager PyTorch and torch.compile.

    python bench/kernels.py [--out bench/results/kernels.json] [--only groupnorm|attention]
                            [--sizes sd,tiny] [--dtype fp16,bf16]

For every case it times forward and backward of three implementations on the same inputs —
`triton` (ldm_fast.kernels), `eager` (what a PyTorch user writes: F.group_norm + F.silu in
the input dtype; F.scaled_dot_product_attention, which picks FlashAttention-2 or
memory-efficient kernels on its own) and `compile` (torch.compile of the eager function); for
GroupNorm also `ops_eager`, this project's own eager path (fp32 maths, LDM_KERNELS=eager) —
with triton.testing.do_bench (CUDA-synchronised, cache flushed, median of repeats), and
reports:
  GroupNorm: effective GB/s = the bytes the op must move at least (read x, write y forward;
             read x and dy, write dx backward) / time, and the fraction of the GPU's memory
             bandwidth, both of its data-sheet peak and of a measured device-to-device copy;
  attention: TFLOP/s counting 4·B·H·Lq·Lk·D forward and 2.5× that backward (the FlashAttention
             convention, no padding counted), and the fraction of the data-sheet dense
             fp16/bf16 tensor-core peak;
  plus speedups of triton over eager and over compile, and the largest deviation of each
  output from eager's, so a fast but wrong kernel shows up here too.
Shapes: `sd` is an SD1.5 UNet at 512² (64×64 latent, batch 2 for classifier-free guidance,
8 heads) plus the VAE decoder's GroupNorms at 512²; `tiny` is the tiny preset's training
batch. Results go to JSON (with GPU name and software versions) and a Markdown table.

Without CUDA nothing is timed: the Triton interpreter measures numpy, not the kernels, and
CPU timings of the baselines would compare with nothing. The script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

# Data-sheet peaks: memory bandwidth (bytes/s) and dense fp16/bf16 tensor-core FLOP/s.
# Matched on torch.cuda.get_device_name() substrings, most specific first. Unknown GPUs get
# no fraction of peak (never a guessed one).
PEAKS = [
    ("H200", 4.8e12, 989e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),          # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", 2.039e12, 312e12),
    ("A100 80GB PCIe", 1.935e12, 312e12),
    ("A100", 1.555e12, 312e12),         # 40 GB
    ("L40S", 0.864e12, 362e12),
    ("L4", 0.3e12, 121e12),
    ("A10", 0.6e12, 125e12),
]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEV = "cuda"            # "cpu" only for --smoke
COMPILE_BACKEND = "inductor"


def device_peaks(name: str):
    for key, bw, flops in PEAKS:
        if key in name:
            return {"match": key, "bandwidth_Bps": bw, "tensor_flops": flops}
    return None


def measured_copy_bandwidth(do_bench) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write): what memory-bound kernels
    can realistically reach on this GPU."""
    n = 1 << 28
    src = torch.empty(n, dtype=torch.float32, device=DEV)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * n * 4 / (ms * 1e-3)


# ----------------------------------------------------------------------------- cases

def groupnorm_cases(sizes):
    """(label, shape, groups, eps, act, scale_shift)."""
    cases = []
    if "sd" in sizes:
        # SD1.5 UNet at 512² (CFG batch 2): ResBlock GN→SiLU at each level, and the
        # scale-shift variant (LDM churches/inpainting ResBlocks) at the largest level.
        for shape in [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)]:
            cases.append(("sd-unet gn+silu", shape, 32, 1e-5, True, False))
        cases.append(("sd-unet gn+scaleshift+silu", (2, 320, 64, 64), 32, 1e-5, True, True))
        cases.append(("sd-unet gn (pre-attn)", (2, 320, 64, 64), 32, 1e-6, False, False))
        # VAE decoder at 512² (batch 1): the biggest GroupNorms of the pipeline.
        for shape in [(1, 512, 64, 64), (1, 256, 256, 256), (1, 128, 512, 512)]:
            cases.append(("sd-vae gn+silu", shape, 32, 1e-6, True, False))
    if "tiny" in sizes:
        for shape, g in [((32, 64, 8, 8), 16), ((32, 128, 4, 4), 16), ((16, 32, 32, 32), 8)]:
            cases.append(("tiny gn+silu", shape, g, 1e-5, True, False))
    if "smoke" in sizes:
        cases.append(("smoke", (2, 8, 5, 7), 4, 1e-5, True, True))
    return cases


def attention_cases(sizes):
    """(label, B, H, Lq, Lk, D)."""
    cases = []
    if "sd" in sizes:
        for L, D in [(4096, 40), (1024, 80), (256, 160), (64, 160)]:
            cases.append((f"sd self {int(math.sqrt(L))}²", 2, 8, L, L, D))
            cases.append((f"sd cross {int(math.sqrt(L))}²×77", 2, 8, L, 77, D))
    if "tiny" in sizes:
        cases.append(("tiny self 4²", 32, 4, 16, 16, 32))
        cases.append(("tiny self 8²", 32, 2, 64, 64, 32))
    if "smoke" in sizes:
        cases.append(("smoke", 1, 2, 20, 33, 40))
    return cases


# ----------------------------------------------------------------------------- timing

def _bench_fwd_bwd(do_bench, fn, inputs, dout):
    """Median ms of the forward, and of the backward alone (graph built once, kept)."""
    with torch.no_grad():
        fwd = do_bench(lambda: fn(*inputs))
    out = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    bwd = do_bench(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True))
    return fwd, bwd, out.detach()


def _time_impls(do_bench, impls, inputs, dout, work):
    """Time each implementation; `work(fwd_ms, bwd_ms)` gives its rate metrics. A failing
    implementation is recorded with its error instead of stopping the benchmark."""
    res, ref = {}, None
    for name, fn in impls:
        try:
            fwd, bwd, out = _bench_fwd_bwd(do_bench, fn, inputs, dout)
        except Exception as e:  # noqa: BLE001 — reported in the results, never hidden
            res[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"  {name}: FAILED {res[name]['error']}", flush=True)
            continue
        ref = out if ref is None else ref
        res[name] = {"fwd_ms": fwd, "bwd_ms": bwd, **work(fwd, bwd),
                     "max_abs_diff_vs_eager": (out.float() - ref.float()).abs().max().item()}
    return res


def run_groupnorm(do_bench, dtype, sizes, peaks, copy_bw):
    from ldm_fast.kernels import groupnorm as gn

    rows = []
    for label, shape, G, eps, act, mod in groupnorm_cases(sizes):
        B, C = shape[:2]
        x = torch.randn(shape, device=DEV, dtype=dtype, requires_grad=True)
        w = torch.randn(C, device=DEV, dtype=dtype, requires_grad=True)
        b = torch.randn(C, device=DEV, dtype=dtype, requires_grad=True)
        sc = sh = None
        if mod:
            sc = (0.1 * torch.randn(B, C, device=DEV, dtype=dtype)).requires_grad_()
            sh = (0.1 * torch.randn(B, C, device=DEV, dtype=dtype)).requires_grad_()

        def eager(x, w, b, sc, sh):
            y = F.group_norm(x, G, w, b, eps)
            if sc is not None:
                y = y * (1 + sc[:, :, None, None]) + sh[:, :, None, None]
            return F.silu(y) if act else y

        def triton_fn(x, w, b, sc, sh):
            return gn.group_norm(x, G, w, b, eps, act=act, scale=sc, shift=sh)

        compiled = torch.compile(eager, backend=COMPILE_BACKEND)
        inputs = (x, w, b, sc, sh)
        dy = torch.randn_like(x)
        n = x.numel() * x.element_size()
        row = {"kernel": "groupnorm", "case": label, "shape": list(shape), "groups": G,
               "dtype": str(dtype).replace("torch.", ""), "act": act, "scale_shift": mod,
               "bytes_fwd": 2 * n, "bytes_bwd": 3 * n, "impl": {}}
        def work(fwd, bwd):
            r = {"fwd_GBps": 2 * n / fwd / 1e6, "bwd_GBps": 3 * n / bwd / 1e6}
            for p in ("fwd", "bwd"):
                if peaks:
                    r[f"{p}_frac_peak_bw"] = r[f"{p}_GBps"] * 1e9 / peaks["bandwidth_Bps"]
                r[f"{p}_frac_copy_bw"] = r[f"{p}_GBps"] * 1e9 / copy_bw
            return r

        def ops_eager(x, w, b, sc, sh):   # what LDM_KERNELS=eager runs: fp32 maths, cast back
            return gn.group_norm_ref(x, G, w, b, eps, act=act, scale=sc, shift=sh)

        row["impl"] = _time_impls(do_bench, (("eager", eager), ("triton", triton_fn),
                                             ("compile", compiled), ("ops_eager", ops_eager)),
                                  inputs, dy, work)
        _speedups(row)
        rows.append(row)
        print(_row_line(row, "GBps"), flush=True)
        del x, w, b, sc, sh, dy, inputs
        torch.cuda.empty_cache()
    return rows


def run_attention(do_bench, dtype, sizes, peaks):
    from ldm_fast.kernels import attention as at

    rows = []
    compiled = torch.compile(F.scaled_dot_product_attention, backend=COMPILE_BACKEND)
    for label, B, H, LQ, LK, D in attention_cases(sizes):
        q = torch.randn(B, H, LQ, D, device=DEV, dtype=dtype, requires_grad=True)
        k = torch.randn(B, H, LK, D, device=DEV, dtype=dtype, requires_grad=True)
        v = torch.randn(B, H, LK, D, device=DEV, dtype=dtype, requires_grad=True)
        do = torch.randn_like(q)
        flops = 4 * B * H * LQ * LK * D
        row = {"kernel": "attention", "case": label, "shape": [B, H, LQ, LK, D],
               "dtype": str(dtype).replace("torch.", ""), "flops_fwd": flops,
               "flops_bwd": 2.5 * flops, "impl": {}}
        def work(fwd, bwd):
            r = {"fwd_TFLOPs": flops / fwd / 1e9, "bwd_TFLOPs": 2.5 * flops / bwd / 1e9}
            if peaks and dtype != torch.float32:   # fp32 has no tensor-core peak to compare
                r["fwd_frac_peak"] = r["fwd_TFLOPs"] * 1e12 / peaks["tensor_flops"]
                r["bwd_frac_peak"] = r["bwd_TFLOPs"] * 1e12 / peaks["tensor_flops"]
            return r

        row["impl"] = _time_impls(do_bench, (("eager", F.scaled_dot_product_attention),
                                             ("triton", at.attention), ("compile", compiled)),
                                  (q, k, v), do, work)
        _speedups(row)
        rows.append(row)
        print(_row_line(row, "TFLOPs"), flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()
    return rows


def transformer_cases(sizes):
    """(label, tokens (B, L), width C): the SpatialTransformer's fused ops at each SD level —
    GEGLU on the (B, L, 2·4C) projection, residual add + LayerNorm on (B, L, C)."""
    cases = []
    if "sd" in sizes:
        for L, C in [(4096, 320), (1024, 640), (256, 1280)]:
            cases.append((f"sd {int(math.sqrt(L))}²", (2, L), C))
    if "tiny" in sizes:
        cases.append(("tiny 8²", (32, 64), 64))
    if "smoke" in sizes:
        cases.append(("smoke", (1, 20), 24))
    return cases


def run_transformer_ops(do_bench, dtype, sizes, peaks, copy_bw):
    """GEGLU and residual add + LayerNorm against their eager chains and torch.compile, as
    effective GB/s of the bytes each must move (memory-bound, like GroupNorm)."""
    from ldm_fast.kernels import add_layernorm as aln
    from ldm_fast.kernels import geglu as gg

    rows = []
    for label, (B, L), C in transformer_cases(sizes):
        h = torch.randn(B, L, 8 * C, device=DEV, dtype=dtype, requires_grad=True)
        x = torch.randn(B, L, C, device=DEV, dtype=dtype, requires_grad=True)
        r = torch.randn(B, L, C, device=DEV, dtype=dtype, requires_grad=True)
        w = torch.randn(C, device=DEV, dtype=dtype, requires_grad=True)
        b = torch.randn(C, device=DEV, dtype=dtype, requires_grad=True)
        for kernel, impls, inputs, dout, n_fwd, n_bwd in (
                ("geglu", (("eager", gg.geglu_ref), ("triton", gg.geglu),
                           ("compile", torch.compile(gg.geglu_ref, backend=COMPILE_BACKEND))),
                 (h,), torch.randn(B, L, 4 * C, device=DEV, dtype=dtype),
                 h.numel() * 1.5, h.numel() * 2.5),
                ("add_layernorm",
                 (("eager", lambda *a: aln.add_layer_norm_ref(*a)[1]),
                  ("triton", lambda *a: aln.add_layer_norm(*a)[1]),
                  ("compile", torch.compile(lambda *a: aln.add_layer_norm_ref(*a)[1],
                                            backend=COMPILE_BACKEND))),
                 (x, r, w, b), torch.randn_like(x), x.numel() * 4, x.numel() * 4)):
            nbytes = (n_fwd * h.element_size(), n_bwd * h.element_size())
            row = {"kernel": kernel, "case": label, "shape": [B, L, C],
                   "dtype": str(dtype).replace("torch.", ""), "bytes_fwd": nbytes[0],
                   "bytes_bwd": nbytes[1], "impl": {}}

            def work(fwd, bwd, nbytes=nbytes):
                out = {"fwd_GBps": nbytes[0] / fwd / 1e6, "bwd_GBps": nbytes[1] / bwd / 1e6}
                for p in ("fwd", "bwd"):
                    if peaks:
                        out[f"{p}_frac_peak_bw"] = out[f"{p}_GBps"] * 1e9 / peaks["bandwidth_Bps"]
                    out[f"{p}_frac_copy_bw"] = out[f"{p}_GBps"] * 1e9 / copy_bw
                return out

            row["impl"] = _time_impls(do_bench, impls, inputs, dout, work)
            _speedups(row)
            rows.append(row)
            print(_row_line(row, "GBps"), flush=True)
    return rows


def _speedups(row):
    t = row["impl"].get("triton", {})
    for base in ("eager", "compile"):
        b = row["impl"].get(base, {})
        for p in ("fwd", "bwd"):
            ok = f"{p}_ms" in t and f"{p}_ms" in b
            row[f"{p}_speedup_vs_{base}"] = b[f"{p}_ms"] / t[f"{p}_ms"] if ok else None


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def _row_line(row, unit):
    i = row["impl"]
    return (f"{row['kernel']:9s} {row['case']:28s} {str(row['shape']):24s} {row['dtype']:8s} "
            + " ".join(f"{n}: {_fmt(r.get('fwd_ms'), '.4f')}/{_fmt(r.get('bwd_ms'), '.4f')} ms"
                       for n, r in i.items())
            + f"  triton {_fmt(i['triton'].get('fwd_' + unit), '.0f')}/"
              f"{_fmt(i['triton'].get('bwd_' + unit), '.0f')} {unit}")


def markdown(rows):
    out = ["| kernel | case | shape | dtype | pass | triton ms | eager ms | compile ms | "
           "ops-eager ms | triton GB/s or TFLOP/s | of peak | ×eager | ×compile | max diff |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        unit = "TFLOPs" if r["kernel"] == "attention" else "GBps"
        frac = "frac_peak" if r["kernel"] == "attention" else "frac_peak_bw"
        for p in ("fwd", "bwd"):
            t, e, c, o = (r["impl"].get(n, {})
                          for n in ("triton", "eager", "compile", "ops_eager"))
            f = t.get(f"{p}_{frac}")
            out.append(
                f"| {r['kernel']} | {r['case']} | {'×'.join(map(str, r['shape']))} | {r['dtype']} "
                f"| {p} | {_fmt(t.get(p + '_ms'), '.4f')} | {_fmt(e.get(p + '_ms'), '.4f')} "
                f"| {_fmt(c.get(p + '_ms'), '.4f')} | {_fmt(o.get(p + '_ms'), '.4f')} "
                f"| {_fmt(t.get(p + '_' + unit), '.1f')} "
                f"| {'—' if f is None else f'{100 * f:.0f}%'} "
                f"| {_fmt(r[p + '_speedup_vs_eager'], '.2f')} "
                f"| {_fmt(r[p + '_speedup_vs_compile'], '.2f')} "
                f"| {_fmt(t.get('max_abs_diff_vs_eager'), '.2g')} |")
    return "\n".join(out)


def environment():
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "cuda": torch.version.cuda,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
           "LDM_ATTN_AUTOTUNE": os.environ.get("LDM_ATTN_AUTOTUNE", "1")}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), sm_count=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", memory_GiB=round(p.total_memory / 2**30, 1))
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None,
                    help="JSON path (default bench/results/kernels.json); the Markdown table "
                         "goes next to it (.md)")
    ap.add_argument("--only", choices=["groupnorm", "attention", "transformer"], default=None)
    ap.add_argument("--sizes", default="sd,tiny", help="comma list of sd, tiny")
    ap.add_argument("--dtype", default="fp16,bf16", help="comma list of fp16, bf16, fp32")
    ap.add_argument("--smoke", action="store_true",
                    help="check that this script runs, on CPU under the Triton interpreter with "
                         "toy shapes and a wall-clock timer; its numbers mean nothing and it "
                         "writes a file only if --out is given explicitly")
    args = ap.parse_args(argv)
    if args.smoke:
        return smoke(args)

    if (code := bl.compiled_gpu_unavailable("bench/kernels.py")) is not None:
        return code
    do_bench = bl.triton_median_ms

    env = environment()
    peaks = device_peaks(env["gpu"])
    env["peaks"] = peaks
    env["copy_bandwidth_GBps"] = measured_copy_bandwidth(do_bench) / 1e9
    print(f"{env['gpu']}: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
          f"peaks {peaks}; measured copy {env['copy_bandwidth_GBps']:.0f} GB/s", flush=True)
    sizes = set(args.sizes.split(","))
    rows = []
    out = Path(args.out or "bench/results/kernels.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for dname in args.dtype.split(","):
        dtype = DTYPES[dname]
        if args.only in (None, "groupnorm"):
            rows += run_groupnorm(do_bench, dtype, sizes, peaks,
                                  env["copy_bandwidth_GBps"] * 1e9)
        if args.only in (None, "attention"):
            rows += run_attention(do_bench, dtype, sizes, peaks)
        if args.only in (None, "transformer"):
            rows += run_transformer_ops(do_bench, dtype, sizes, peaks,
                                        env["copy_bandwidth_GBps"] * 1e9)
        # Written after every dtype: a run stopped by its time budget keeps what it measured.
        out.write_text(json.dumps({"environment": env, "results": rows, "partial": True},
                                  indent=1))

    out.write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    table = markdown(rows)
    out.with_suffix(".md").write_text(
        f"# Kernel benchmark — {env['gpu']}\n\ntorch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}, {env['time']}; measured copy bandwidth "
        f"{env['copy_bandwidth_GBps']:.0f} GB/s; peaks {peaks}\n\n{table}\n")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def smoke(args):
    global DEV, COMPILE_BACKEND
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke needs TRITON_INTERPRET=1 in the environment (read at kernel definition)")
        return 1
    DEV, COMPILE_BACKEND = "cpu", "aot_eager"

    def do_bench(fn):
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    rows = run_groupnorm(do_bench, torch.float32, {"smoke"}, None, 1e9)
    rows += run_attention(do_bench, torch.float32, {"smoke"}, None)
    rows += run_transformer_ops(do_bench, torch.float32, {"smoke"}, None, 1e9)
    failed = [(r["case"], n) for r in rows for n, i in r["impl"].items() if "error" in i]
    print(markdown(rows))
    print("SMOKE RUN: interpreter timings, meaningless as speed.", "failed:" if failed else "",
          failed or "")
    if args.out:
        Path(args.out).write_text(json.dumps({"smoke": True, "results": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
