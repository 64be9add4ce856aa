"""Render the README's results section from bench/results/**/*.json.

    python bench/report.py                        # writes bench/results/RESULTS.md
    python bench/report.py --readme README.md     # also replaces the README's results block
    python bench/report.py --stdout

Every result file names its machine (CPU model or GPU name), date and library versions; the
report keeps the latest file per (benchmark, machine, variant) and says where each number came
from. Smoke runs (--quick/--smoke: numbers meaningless) are never reported. CPU numbers are
labelled as CPU and quoted as ratios; absolute times are only read from GPU runs.

In the README the section lives between the markers

    <!-- bench-results:start -->
    <!-- bench-results:end -->

and is replaced wholesale; without the markers a section with them is appended.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

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
    path = Path(__file__).resolve().parent / f"{name}.py"
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
                     + (f", commit {m['git_commit']}" if m.get("git_commit") else ""))
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--results", default=str(bl.RESULTS_DIR), help="results folder (searched recursively)")
    ap.add_argument("--out", default=None, help="Markdown file (default <results>/RESULTS.md)")
    ap.add_argument("--readme", default=None, help="also splice the section into this README")
    ap.add_argument("--stdout", action="store_true", help="print instead of writing --out")
    args = ap.parse_args(argv)
    results = Path(args.results).resolve()
    section = render(results, bl.REPO)
    if args.stdout:
        print(section)
    else:
        out = Path(args.out) if args.out else results / "RESULTS.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(section)
        print(f"wrote {out}")
    if args.readme:
        readme = Path(args.readme)
        readme.write_text(splice(readme.read_text() if readme.is_file() else "", section))
        print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
