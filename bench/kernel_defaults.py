"""The `auto` kernel backend's table, from measurements: which Triton kernel beat eager PyTorch.

    python bench/kernel_defaults.py RESULTS_DIR [--write kernels/measured_defaults.json]

RESULTS_DIR is a bench/gpu_check.sh results folder (kernels.json from bench/kernels.py,
sampler_steps.json from bench/sampler_steps.py, env.json). An op is switched on under `auto`
for a dtype only if its kernel was at least as fast as eager at *every* SD1.5 shape measured
for that dtype — forward and backward for GroupNorm and attention (one switch serves sampling
and training), the update itself for the sampler step (keyed by the latent's dtype). A shape
whose kernel errored or was not timed counts as a loss. Without --write the table is only
printed (and saved as kernel_defaults.json in RESULTS_DIR); committing it into the package is
a reviewed step, not a side effect of a benchmark run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _wins_kernels(rows: list[dict]) -> dict:
    """{op: {dtype: [evidence rows]}} from bench/kernels.py's rows (SD cases only)."""
    out: dict = {}
    for r in rows:
        if not r["case"].startswith("sd"):
            continue
        op = {"groupnorm": "group_norm", "attention": "attention", "geglu": "geglu",
              "add_layernorm": "add_layer_norm"}[r["kernel"]]
        fwd, bwd = r.get("fwd_speedup_vs_eager"), r.get("bwd_speedup_vs_eager")
        won = fwd is not None and bwd is not None and fwd >= 1.0 and bwd >= 1.0
        out.setdefault(op, {}).setdefault(r["dtype"], []).append(
            dict(case=r["case"], shape=r["shape"], fwd_speedup=fwd, bwd_speedup=bwd, won=won))
    return out


def _wins_sampler(rows: list[dict]) -> dict:
    ev = [dict(case=f"{r['update']} {r['case']}", shape=r["shape"],
               speedup=r.get("speedup_vs_eager"),
               won=(r.get("speedup_vs_eager") or 0) >= 1.0)
          for r in rows if r["case"].startswith("sd")]
    return {"sampler_step": {"float32": ev}} if ev else {}


def table(results_dir: Path) -> dict:
    evidence: dict = {}
    kernels = results_dir / "kernels.json"
    if kernels.exists():
        evidence.update(_wins_kernels(json.loads(kernels.read_text())["results"]))
    steps = results_dir / "sampler_steps.json"
    if steps.exists():
        evidence.update(_wins_sampler(json.loads(steps.read_text())["results"]))
    env = results_dir / "env.json"
    measured_on = json.loads(env.read_text()) if env.exists() else None
    auto = {op: sorted(dt for dt, ev in by_dt.items() if ev and all(e["won"] for e in ev))
            for op, by_dt in evidence.items()}
    return {"about": __doc__.split("\n\n")[0], "measured_on": measured_on,
            "source": str(results_dir), "auto": {op: d for op, d in auto.items() if d},
            "evidence": evidence}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--write", type=Path, default=None,
                    help="also write the table here (kernels/measured_defaults.json)")
    a = ap.parse_args(argv)
    if not a.results_dir.is_dir():
        print(f"kernel_defaults: {a.results_dir} is not a folder", file=sys.stderr)
        return 2
    t = table(a.results_dir)
    if not t["evidence"]:
        print(f"kernel_defaults: no kernels.json or sampler_steps.json in {a.results_dir}",
              file=sys.stderr)
        return 2
    text = json.dumps(t, indent=1)
    (a.results_dir / "kernel_defaults.json").write_text(text)
    if a.write:
        a.write.write_text(text)
    for op, by_dt in t["evidence"].items():
        for dt, ev in by_dt.items():
            lost = [e["case"] for e in ev if not e["won"]]
            print(f"{op:13s} {dt:9s} {'auto ON ' if not lost else 'opt-in  '}"
                  + (f"(slower or untimed at: {', '.join(lost)})" if lost else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
