"""`python -m ldm_fast.make_shards FOLDER 'shards/train-%06d.tar'`: an image folder to tar shards.

Images (recursively, with optional caption side files `name.txt`) become WebDataset-style
shards that `data.dataset=shards` trains from (see ldm_fast/data/shards.py for the format).
Unreadable files are skipped and counted. Prints the brace pattern to pass as `data.root`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ldm_fast.data.shards import folder_to_shards


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ldm_fast.make_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="image folder (searched recursively)")
    p.add_argument("pattern", help="printf-style output path, e.g. 'shards/train-%%06d.tar'")
    p.add_argument("--resolution", type=int,
                   help="centre-crop and resize to this side, stored as PNG (default: copy the files' bytes)")
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--max-mb", type=int, default=512, help="megabytes per shard (default 512)")
    p.add_argument("--no-captions", action="store_true", help="ignore caption side files")
    return p.parse_args(argv)


def brace_pattern(paths: list[str]) -> str:
    """'d/train-{000000..000041}.tar' for the numbered paths a ShardWriter wrote."""
    first, last = Path(paths[0]), Path(paths[-1])
    stem_a, stem_b = first.stem, last.stem
    digits = len(stem_a) - len(stem_a.rstrip("0123456789"))
    if len(paths) == 1 or digits == 0:
        return paths[0] if len(paths) == 1 else ",".join(paths)
    head = stem_a[:-digits]
    return str(first.with_name(f"{head}{{{stem_a[-digits:]}..{stem_b[-digits:]}}}{first.suffix}"))


def main(argv=None) -> int:
    args = parse_args(argv)
    if "%" not in args.pattern:
        print("error: the output pattern needs a printf field for the shard number, e.g. train-%06d.tar",
              file=sys.stderr)
        return 2
    if args.max_count < 1 or args.max_mb < 1:
        print("error: --max-count and --max-mb must be positive", file=sys.stderr)
        return 2
    Path(args.pattern).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            paths = folder_to_shards(args.folder, args.pattern, args.resolution, captions=not args.no_captions,
                                     max_count=args.max_count, max_bytes=args.max_mb << 20)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if not paths:
        print("error: no readable images: no shards written", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} shard(s); train with --set data.dataset=shards "
          f"--set \"data.root={brace_pattern(paths)}\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
