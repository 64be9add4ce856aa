"""Result files and the report built from them: each benchmark's JSON, plot and Markdown table
(write_report), the table and number formatting they share, and the README results section
rendered from every bench/results/**/*.json (render, splice; `python bench/report.py`)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import torch

from benchlib.machine import REPO, RESULTS_DIR, machine_slug

def write_report(payload: dict, out: Path, markdown: str, plot=None, extra: str = "") -> None:
    """The JSON, the plot (`plot(payload, png_path)`, when given) and the Markdown table beside
    it; prints the table and what was written."""
    write_json(payload, out)
    written = [out]
    if plot is not None:
        try:
            plot(payload, out.with_suffix(".png"))
            written.append(out.with_suffix(".png"))
        except ModuleNotFoundError as exc:
            if exc.name != "matplotlib":
                raise
            log("no plot: matplotlib is not installed (pip install 'ldm_fast[bench]')")
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


def command_line(script: str, argv=None) -> str:
    """The command that made a result, as a user would type it (argv None: this process's)."""
    import shlex

    return f"python bench/{script} " + shlex.join(sys.argv[1:] if argv is None else argv)


def provenance(payload: dict) -> str:
    """One line for a figure: machine, date, versions and the command (when recorded)."""
    m = payload.get("machine") or {}
    line = (f"{m.get('name', '?')}, {str(m.get('date', '?'))[:16]}, torch {m.get('torch')}, triton {m.get('triton')}"
            + (f", CUDA {m['cuda']}" if m.get("cuda") else "")
            + (f", {m['torch_threads']} CPU thread(s)" if m.get("device_type") == "cpu" else "")
            + (f", commit {m['git_commit']}" if m.get("git_commit") else ""))
    if not payload.get("command"):
        return line
    import textwrap

    return line + "\n" + "\n".join(textwrap.wrap(payload["command"], 130, break_on_hyphens=False))


def log(*args) -> None:
    print(*args, flush=True, file=sys.stderr)


# ----------------------------------------------------------------------------- the README report

START, END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"
ORDER = ("throughput", "train_throughput", "fid_vs_throughput", "compression", "kernels", "sampler_steps")
TITLES = {
    "throughput": "Sampling throughput (bench/throughput.py)",
    "train_throughput": "Training throughput (bench/train_throughput.py)",
    "fid_vs_throughput": "Quality vs throughput (bench/fid_vs_throughput.py)",
    "compression": "Compression factor f (bench/compression.py)",
    "kernels": "Kernels (bench/kernels.py)",
    "sampler_steps": "Fused sampler steps (bench/sampler_steps.py)",
}


def _load_script(name: str):
    """A bench script as a module under a private name (bench/kernels.py would otherwise
    shadow, or be shadowed by, the kernels package)."""
    path = REPO / "bench" / f"{name}.py"
    key = f"_bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module   # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def classify(path: Path, data: dict) -> tuple[str, dict, str] | None:
    """(benchmark, machine info, variant) of a result file, or None if it is not one."""
    if not isinstance(data, dict) or data.get("smoke"):
        return None
    if "benchmark" in data and "machine" in data:
        variant = ""
        if data["benchmark"] == "throughput":
            variant = ",".join(sorted(data.get("models", {})))
        return data["benchmark"], data["machine"], variant
    env = data.get("environment")
    if isinstance(env, dict) and "results" in data:   # bench/kernels.py, bench/sampler_steps.py
        kind = "sampler_steps" if "sampler" in path.stem else "kernels"
        machine = {"name": env.get("gpu") or "unknown device", "date": env.get("time", ""),
                   "device_type": "cuda" if env.get("gpu") else "cpu", "torch": env.get("torch"),
                   "triton": env.get("triton")}
        return kind, machine, ""
    return None


def collect(results_dir: Path) -> dict:
    """{benchmark: {(machine, variant): (path, data)}} keeping the latest date per key."""
    found = {}
    for path in sorted(results_dir.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        c = classify(path, data)
        if c is None:
            continue
        bench, machine, variant = c
        key = (machine.get("name", "?"), variant)
        best = found.setdefault(bench, {}).get(key)
        if best is None or machine.get("date", "") > best[2].get("date", ""):
            found[bench][key] = (path, data, machine)
    return found


def render_one(bench: str, path: Path, data: dict, repo: Path) -> str:
    rel = path.relative_to(repo) if path.is_relative_to(repo) else path
    if bench in ("throughput", "train_throughput", "fid_vs_throughput", "compression"):
        md = _load_script(bench).markdown(data)
        md = md.split("\n", 1)[1] if md.startswith("###") else md  # the report writes its own heading
    else:
        script = _load_script(bench)
        md = script.markdown(data["results"])
    m = data.get("machine") or {}
    head = f"**{m.get('name') or data.get('environment', {}).get('gpu', '?')}** — `{rel}`"
    extra = []
    if m:
        extra.append(f"date {m.get('date')}, torch {m.get('torch')}, triton {m.get('triton')}, "
                     f"python {m.get('python')}" + (f", CUDA {m['cuda']}" if m.get("cuda") else "")
                     + (f", {m['torch_threads']} CPU thread(s)" if m.get("device_type") == "cpu" else "")
                     + (f", commit {m['git_commit']}" if m.get("git_commit") else "")
                     + ("" if data.get("command") and data["command"] in md  # the table names it
                        else f"; command `{data['command']}`" if data.get("command")
                        else "; command not recorded (measured before results carried it)"))
    png = path.with_suffix(".png")
    out = [head, ""] + ([f"<sub>{extra[0]}</sub>", ""] if extra else []) + [md.strip()]
    if png.is_file():
        prel = png.relative_to(repo) if png.is_relative_to(repo) else png
        out += ["", f"![{bench} plot]({prel})"]
    return "\n".join(out)


def render(results_dir: Path, repo: Path) -> str:
    found = collect(results_dir)
    lines = [START, "", "## Benchmark results", "",
             "_Generated by `python bench/report.py` from `bench/results/`; do not edit by hand. "
             "Each block names the machine, date and versions it was measured with. CPU runs quote "
             "ratios (their absolute times are CPU times on shared cores, labelled as such); "
             "absolute times come from GPU runs only._", ""]
    if not found:
        lines += ["No results yet: run the scripts in bench/ (see bench/README.md).", ""]
    machines = sorted({key[0] for per in found.values() for key in per})
    if machines:
        lines += ["Machines: " + "; ".join(machines) + ".", ""]
    for bench in ORDER:
        if bench not in found:
            continue
        lines += [f"### {TITLES[bench]}", ""]
        for (machine, variant), (path, data, _) in sorted(found[bench].items()):
            try:
                lines += [render_one(bench, path, data, repo), ""]
            except Exception as e:  # noqa: BLE001 - one malformed file must not hide the rest
                lines += [f"`{path.name}`: could not be rendered ({type(e).__name__}: {e})", ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def splice(readme: str, section: str) -> str:
    if START in readme and END in readme:
        before, rest = readme.split(START, 1)
        after = rest.split(END, 1)[1]
        return before + section.rstrip("\n") + after
    return readme.rstrip("\n") + "\n\n" + section
