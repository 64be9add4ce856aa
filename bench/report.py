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

and is replaced wholesale; without the markers a section with them is appended. The
rendering lives with the result writers in benchlib/results.py; this is its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--results", default=str(bl.RESULTS_DIR), help="results folder (searched recursively)")
    ap.add_argument("--out", default=None, help="Markdown file (default <results>/RESULTS.md)")
    ap.add_argument("--readme", default=None, help="also splice the section into this README")
    ap.add_argument("--stdout", action="store_true", help="print instead of writing --out")
    args = ap.parse_args(argv)
    results = Path(args.results).resolve()
    section = bl.render(results, bl.REPO)
    if args.stdout:
        print(section)
    else:
        out = Path(args.out) if args.out else results / "RESULTS.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(section)
        print(f"wrote {out}")
    if args.readme:
        readme = Path(args.readme)
        readme.write_text(bl.splice(readme.read_text() if readme.is_file() else "", section))
        print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
