"""Every kernel configuration the launchers can choose, compiled for Hopper (sm_90) on a
machine without a GPU, and what its machine code says about speed.

Triton compiles for a target that is not there: `triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))` returns PTX and a cubin. This module makes the inputs of
that call exactly what a GPU launch would make them:

1. Record. The real launchers (`attention._attn_forward`, `groupnorm._gn_forward`, …) run on
   meta tensors (shapes, strides and storage offsets, no data) with the GPU path forced
   (`_on_gpu`), and every `kernel[grid](...)` they issue is recorded instead of launched.
2. Expand. An autotuned launch becomes one launch per candidate config (after the tuner's
   own pruning); heuristics (EVEN_N, …) are evaluated on the bound arguments, as at run time.
3. Specialise. The JIT's own binder turns the arguments into the signature, constexprs and
   divisibility attributes it would compile with: integers equal to 1 become constants,
   multiples of 16 and 16-byte-aligned pointers get `tt.divisibility` hints.
4. Compile and read: registers, local memory (spills/stack), shared memory (cuobjdump), and in
   the PTX the global-load widths, cp.async / TMA bulk copies, wgmma and mma.sync counts.

`check(rows)` turns the rules below into failures; tests/test_ptx_audit.py runs it in CI.
    * no kernel touches local memory (no spills, no stack);
    * attention's 16-bit paths load q/k/v/dO only as 128-bit vectors (no 16-bit loads) and
      stage them through cp.async or TMA;
    * attention tiles whose MMA row block is ≥ 64 at ≥ 4 warps use wgmma;
    * element-wise and GroupNorm kernels load 128-bit vectors where the layout allows it
      (a case says when it does not, and why).

    python -m ldm_fast.kernels.ptx_audit [--quick] [--json out.json]

prints the table and exits 1 if a rule fails. Compiles run in parallel processes; Triton's
cache makes a second run fast, and never stale (its key includes the source).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

TARGET_ARCH = 90
WARP_SIZE = 32


# ----------------------------------------------------------------------------- 1. record

@contextlib.contextmanager
def _recording(modules):
    """Intercept kernel[grid](...) (KernelInterface.__getitem__ is how JITFunction,
    Heuristics and Autotuner are launched) and force the launchers' GPU path."""
    from triton.runtime.jit import KernelInterface
    calls = []
    saved = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda self, grid: (
        lambda *a, **kw: calls.append((self, a, kw)))
    patched = [(m, m._on_gpu) for m in modules if hasattr(m, "_on_gpu")]
    for m, _ in patched:
        m._on_gpu = lambda x: True
    try:
        yield calls
    finally:
        KernelInterface.__getitem__ = saved
        for m, fn in patched:
            m._on_gpu = fn


def _expand(kernel, args, kwargs, label="fixed"):
    """(JITFunction, arguments by name, config label) for every config the launch can run."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    if isinstance(kernel, Autotuner):
        configs = kernel.configs
        named = {**dict(zip(kernel.arg_names, args)), **kwargs}
        if getattr(kernel, "early_config_prune", None):
            configs = kernel.early_config_prune(configs, named)
        out = []
        for cfg in configs:
            meta = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            tag = ",".join(f"{k}={v}" for k, v in meta.items())
            out += _expand(kernel.fn, args, {**kwargs, **meta}, tag)
        return out
    if isinstance(kernel, Heuristics):
        named = {**dict(zip(kernel.arg_names, args)), **kwargs}
        extra = {name: fn(named) for name, fn in kernel.values.items()}
        return _expand(kernel.fn, args, {**kwargs, **extra}, label)
    named = {**dict(zip(kernel.arg_names, args)), **kwargs}
    if label == "fixed":
        label = ",".join(f"{k}={v}" for k, v in named.items()
                         if k.startswith("BLOCK") or k in ("num_warps", "num_stages"))
    return [(kernel, named, label)]


def record(fn, *modules, first_only: bool = False) -> list[tuple]:
    """Run `fn()` (which calls launchers on meta tensors) and return its expanded launches;
    with first_only, only each autotuned launch's default (first) config."""
    with _recording(modules) as calls:
        fn()
    out = []
    for kernel, a, kw in calls:
        out += _expand(kernel, a, kw)[:1] if first_only else _expand(kernel, a, kw)
    return out


# ----------------------------------------------------------------------------- 2. specialise

def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", TARGET_ARCH, WARP_SIZE)


def specialise(kernel, named: dict):
    """The JIT's own view of these arguments: (signature, constexprs, attrs, options)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(_target())
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(**named)
    options, sig, consts, attrs = kernel._pack_args(backend, named, bound, spec, opts)
    return sig, consts, attrs, {"num_warps": options.num_warps,
                                "num_stages": options.num_stages}


# ----------------------------------------------------------------------------- 3. compile


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptx_properties(ptx: str) -> dict:
    loads = re.findall(r"ld\.global(?:\.[\w:]+)*", ptx)
    wide = [ld for ld in loads if re.search(r"\.v4\.(?:b32|f32|u32)|\.v2\.(?:b64|f64|u64)", ld)]
    narrow16 = [ld for ld in loads if re.search(r"\.(?:b16|u16|f16|bf16)$", ld)]
    return dict(loads=len(loads), loads_128=len(wide), loads_16=len(narrow16),
                cp_async=len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)),
                tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
                wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                mma=len(re.findall(r"\bmma\.sync", ptx)))


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    regs, stack, shared, local = map(int, m.groups())
    return dict(regs=regs, stack=stack, local=local, shared_static=shared)


def compile_job(job: tuple) -> dict:
    """Compile one specialised kernel (picklable job: module, name, sig, consts, attrs,
    options) for sm_90 and measure it. Runs in a worker process."""
    module, name, sig, consts, attrs, options = job
    import triton
    from triton.compiler import ASTSource
    fn = getattr(importlib.import_module(module), name)
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=_target(), options=options)
    out = _ptx_properties(k.asm["ptx"])
    out.update(_resource_usage(k.asm["cubin"]))
    out["shared"] = int(getattr(k.metadata, "shared", 0))
    return out


def _job(kernel, named):
    sig, consts, attrs, options = specialise(kernel, named)
    return (kernel.fn.__module__, kernel.fn.__name__, sig, consts, attrs, options)


def _key(job):
    return repr(job)


# ----------------------------------------------------------------------------- 4. cases

def _meta(*shape, dtype=torch.float16):
    return torch.empty(shape, device="meta", dtype=dtype)


def _heads(b, L, H, D, dtype):
    """(B, H, L, D) as CrossAttention passes it: a head-split view of a (B, L, H·D) tensor."""
    return _meta(b, L, H * D, dtype=dtype).view(b, L, H, D).transpose(1, 2)


# SD1.5 at 512² with classifier-free guidance (batch 2): heads of 40/80/160 at the 64², 32²
# and 16² levels, self-attention and cross-attention to 77 text tokens.
ATTN_SHAPES = [(40, 4096), (80, 1024), (160, 256)]
TEXT_TOKENS = 77


def attention_cases(quick: bool):
    """quick: every autotune candidate only for fp16 at head dim 40 (SD's costliest level);
    the default config for the other head dims, bf16 and fp32."""
    from ldm_fast.kernels import attention as at
    out = []
    for dt in (torch.float16, torch.bfloat16):
        for D, L in ATTN_SHAPES:
            for kind, LK in (("self", L), ("cross", TEXT_TOKENS)):
                every = dt == torch.float16 and (D == 40 or not quick)
                if quick and kind == "cross" and not every:
                    continue
                q, k, v = _heads(2, L, 8, D, dt), _heads(2, LK, 8, D, dt), _heads(2, LK, 8, D, dt)

                def run(q=q, k=k, v=v):
                    o, lse = at._attn_forward(q, k, v)
                    at._attn_backward(torch.empty_like(o), q, k, v, o, lse)
                name = f"attn {str(dt)[6:]} d{D} {kind} {L}x{LK}"
                out.append((name, run, (at,), True, "", not every))
    # fp32 (IEEE dots, no tensor cores) forward: held to the no-spill rule too.
    q = _heads(2, 4096, 8, 40, torch.float32)
    out.append(("attn fp32 d40 self 4096x4096", lambda q=q: at._attn_forward(q, q, q), (at,),
                True, "", quick))
    return out


# The groups the models normalise: VAE decoder at 512² (128–512 channels, batch 1) and the
# SD1.5 UNet levels (batch 2), channels-first and channels-last.
GN_SHAPES = [(1, 512, 64), (1, 512, 128), (1, 256, 256), (1, 128, 512),
             (2, 320, 64), (2, 640, 32), (2, 1280, 16), (2, 1280, 8)]


def groupnorm_cases(quick: bool):
    from ldm_fast.kernels import groupnorm as gn
    out = []
    # quick: the VAE's widest and largest groups, SD's 64² level and its single-tile 8² level
    shapes = [GN_SHAPES[i] for i in (0, 3, 4, 7)] if quick else GN_SHAPES
    for dt in (torch.float16, torch.bfloat16):
        for B, C, S in shapes:
            for cl in (False, True):
                x = _meta(B, C, S, S, dtype=dt)
                if cl:
                    x = x.to(memory_format=torch.channels_last)
                w, b = _meta(C, dtype=torch.float32), _meta(C, dtype=torch.float32)
                emb = _meta(B, 2 * C, dtype=dt)

                def run(x=x, w=w, b=b, emb=emb):
                    y, mean, rstd = gn._gn_forward(x, w, b, None, None, emb[:, :x.shape[1]],
                                                   32, 1e-5, True)
                    gn._gn_backward(torch.empty_like(y), x, w, b, None, None,
                                    emb[:, :x.shape[1]], mean, rstd, 32, True)
                layout = "NHWC" if cl else "NCHW"
                name = f"gn {str(dt)[6:]} {B}x{C}x{S}² {layout}"
                wide, why = gn.wide_loads_expected(C, S * S, cl)
                out.append((name, run, (gn,), wide, why, False))
    return out


def sampler_cases(quick: bool):
    from ldm_fast.kernels import sampler_steps as ss
    x = _meta(2, 4, 64, 64, dtype=torch.float32)
    out16 = _meta(4, 4, 64, 64, dtype=torch.float16)    # [uncond; cond] from an fp16 UNet

    def run():   # the launcher itself: the custom ops would dispatch meta tensors to fakes
        k, d = (1.0,) * 5, (1.0,) * 3
        ss._launch(x, out16, None, None, k, d, True)                      # DDIM, guided
        ss._launch(x, out16[2:], None, torch.empty_like(x), k, d, False)  # ancestral, η > 0
        ss._launch(x, out16, torch.empty_like(x), None, k, d, True)       # DPM-Solver++(2M)
    return [("sampler steps 2x4x64² fp32 latent", run, (ss,), True, "", False)]


def transformer_cases(quick: bool):
    """The SpatialTransformer's other fused ops at SD1.5's 64² level (4096 tokens of 320
    channels, batch 2): GEGLU on the 2·1280-wide projection, residual add + LayerNorm."""
    from ldm_fast.kernels import add_layernorm as aln
    from ldm_fast.kernels import geglu as gg
    out = []
    for dt in (torch.float16, torch.bfloat16):
        h = _meta(2, 4096, 2560, dtype=dt)
        x, w = _meta(2, 4096, 320, dtype=dt), _meta(320, dtype=dt)

        def run(h=h, x=x, w=w):
            gg._geglu_backward(gg._geglu_forward(h), h)
            s, y, mean, rstd = aln._add_ln_forward(x, x, w, w, 1e-5)
            aln._add_ln_backward(y, s, s, w, mean, rstd)
        out.append((f"transformer {str(dt)[6:]} 2x4096x320", run, (gg, aln), True, "", False))
    return out


def cases(quick: bool = False):
    return (attention_cases(quick) + groupnorm_cases(quick) + sampler_cases(quick)
            + transformer_cases(quick))


# ----------------------------------------------------------------------------- 5. audit

def audit(case_list, workers: int | None = None) -> list[dict]:
    """Record, expand and specialise every case; compile each distinct kernel once."""
    rows, jobs = [], {}
    for name, run, modules, expect_wide, note, first_only in case_list:
        for kernel, named, label in record(run, *modules, first_only=first_only):
            job = _job(kernel, named)
            jobs.setdefault(_key(job), job)
            rows.append(dict(case=name, kernel=kernel.fn.__name__, config=label,
                             dtype=_dtype_of(named), key=_key(job),
                             expect_wide=expect_wide, note=note,
                             mma_rows=_mma_rows(kernel.fn.__name__, named),
                             warps=named.get("num_warps", 4)))
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with cf.ProcessPoolExecutor(max_workers=workers,
                                mp_context=_spawn_context()) as pool:
        results = dict(zip(jobs, pool.map(compile_job, jobs.values())))
    for r in rows:
        r.update(results[r.pop("key")])
    return rows


def _spawn_context():
    import multiprocessing
    # A fresh interpreter per worker: forking a process that has imported torch can deadlock.
    return multiprocessing.get_context("spawn")


def _dtype_of(named: dict) -> str:
    for v in named.values():
        if isinstance(v, torch.Tensor):
            return str(v.dtype).replace("torch.", "")
    return "?"


def _mma_rows(kernel: str, named: dict) -> int | None:
    """Rows of the MMA tiles (the M of every tl.dot): the block a program owns."""
    if not kernel.startswith("_attn") or "delta" in kernel:
        return None
    return named.get("BLOCK_N") if "dkdv" in kernel else named.get("BLOCK_M")


# Kernels that never stream an activation, exempt from the wide-load rule: they merge a few
# KB of fp32 partials per (sample, group), gathered along rows of a handful of values.
NOT_STREAMING = {"_gn_group_stats_kernel", "_gn_bwd_group_kernel"}


def check(rows: list[dict]) -> list[str]:
    """The rules of the module docstring; one line per failure."""
    bad = []
    for r in rows:
        where = f"{r['case']} / {r['kernel']} [{r['config']}]"
        half = r["dtype"] in ("float16", "bfloat16")
        if r["local"] or r["stack"]:
            bad.append(f"{where}: {r['local']} B local memory, {r['stack']} B stack (spills)")
        attn = r["kernel"].startswith("_attn") and "delta" not in r["kernel"]
        if half and attn:
            if r["loads_16"]:
                bad.append(f"{where}: {r['loads_16']} 16-bit global loads")
            if not (r["cp_async"] or r["tma"]):
                bad.append(f"{where}: no cp.async or TMA")
            if r["mma_rows"] and r["mma_rows"] >= 64 and r["warps"] >= 4 and not r["wgmma"]:
                bad.append(f"{where}: no wgmma with {r['mma_rows']}-row tiles")
        elif r["expect_wide"] and r["kernel"] not in NOT_STREAMING and not r["loads_128"]:
            bad.append(f"{where}: no 128-bit global loads")
    return bad


def table(rows: list[dict]) -> str:
    head = ("case", "kernel", "config", "regs", "local", "stack", "smem", "ld128/ld", "ld16",
            "cp.async", "tma", "wgmma", "mma")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join(str(v) for v in (
            r["case"], r["kernel"].lstrip("_"), r["config"], r["regs"], r["local"], r["stack"],
            r["shared"], f"{r['loads_128']}/{r['loads']}", r["loads_16"], r["cp_async"],
            r["tma"], r["wgmma"], r["mma"])) + (f" ({r['note']})" if r["note"] else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer GroupNorm shapes")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--md", help="write the table here, as Markdown with its provenance")
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("ptx_audit: unset TRITON_INTERPRET (it replaces compilation)", file=sys.stderr)
        return 2
    import triton
    rows = audit(cases(a.quick), a.workers)
    print(table(rows))
    bad = check(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": f"sm_{TARGET_ARCH}",
                       "rows": rows, "failures": bad}, f, indent=1)
    summary = (f"{len({(r['kernel'], r['config'], r['dtype']) for r in rows})} kernel "
               f"configs, {len(rows)} launches, triton {triton.__version__}, "
               f"sm_{TARGET_ARCH}: {len(bad)} rule failures")
    print("\n" + summary)
    if a.md:
        import datetime
        import platform
        with open(a.md, "w") as f:
            f.write(f"# sm_90 audit of every kernel config (kernels/ptx_audit.py)\n\n"
                    f"`python -m ldm_fast.kernels.ptx_audit{' --quick' if a.quick else ''}`"
                    f", {datetime.date.today()}, triton {triton.__version__}, torch "
                    f"{torch.__version__}, compiled on {platform.machine()} without a GPU. "
                    f"{summary}.\n\n{table(rows)}\n"
                    + "".join(f"\n- FAIL {b}" for b in bad) + "\n")
    for line in bad:
        print("  FAIL", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
