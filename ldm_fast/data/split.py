"""The held-out split of an image folder, and the summary a run prints about its data.

Folders are usually sorted by class or source (one subfolder each), so "the last files in
sorted order" would hold out one or two classes. The split is instead a seeded random sample,
stratified by top-level subfolder: each subfolder gives its share of the held-out set
(largest remainders rounded up), so the held-out images are a sample of the whole folder.

A run stores its split (RUN_DIR/heldout.txt, one path relative to data.root per line), so
`evaluate` and `sample` score and draw from exactly the images training never saw, even if
files were added to the folder since.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np

HELDOUT_FILE = "heldout.txt"


def group_of(path: Path, root: Path) -> str:
    """The top-level subfolder of `path` under `root` ('' for files directly in root)."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else ""


def stratified_heldout(paths: list[Path], root: Path, n_held: int, seed: int) -> list[int]:
    """Indices of `n_held` of `paths`, drawn at random with `seed`, each top-level subfolder
    contributing in proportion to its size; in a random order, so that the first k (what
    `evaluate --n k` and the sample grids take) are a sample of every subfolder too."""
    if n_held <= 0:
        return []
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        groups.setdefault(group_of(p, root), []).append(i)
    names = sorted(groups)
    exact = np.array([n_held * len(groups[g]) / len(paths) for g in names])
    quota = np.floor(exact).astype(int)
    # The remaining places go to the largest remainders (ties: the larger group, then name order).
    order = sorted(range(len(names)), key=lambda k: (-(exact[k] - quota[k]), -len(groups[names[k]]), k))
    for k in order[:n_held - int(quota.sum())]:
        quota[k] += 1
    rng = np.random.default_rng(seed)
    held = []
    for k, g in enumerate(names):
        members = groups[g]
        held += [members[j] for j in rng.permutation(len(members))[:quota[k]]]
    return [held[j] for j in rng.permutation(len(held))]


def save_heldout(run_dir, paths: list[Path], root: Path) -> Path:
    out = Path(run_dir) / HELDOUT_FILE
    tmp = out.with_suffix(".tmp")  # renamed into place: another rank never reads half a list
    tmp.write_text("".join(f"{p.relative_to(root).as_posix()}\n" for p in paths))
    tmp.replace(out)
    return out


def load_heldout(run_dir, paths: list[Path], root: Path) -> list[int] | None:
    """Indices into `paths` of the run's stored held-out files (in the stored order), or None
    when the run has no stored split. Stored files that are gone or no longer readable are
    reported and dropped."""
    stored = Path(run_dir) / HELDOUT_FILE if run_dir is not None else None
    if stored is None or not stored.is_file():
        return None
    names = [line for line in stored.read_text().splitlines() if line.strip()]
    index = {p.relative_to(root).as_posix(): i for i, p in enumerate(paths)}
    missing = [n for n in names if n not in index]
    if missing:
        warnings.warn(f"{stored}: {len(missing)} of {len(names)} held-out files are missing or unreadable now "
                      f"(e.g. {missing[0]}); evaluating on the other {len(names) - len(missing)}", stacklevel=3)
    return [index[n] for n in names if n in index]


def folder_summary(dataset, held: list[int], train_size: int, *, caption_rule: str | None, stored: bool,
                   seed: int) -> list[str]:
    """The lines a run prints about an image folder before training: images found, skipped
    (with reasons), held out (and how), captions present/missing, resolution handling."""
    root, paths = dataset.root, dataset.paths
    lines = [f"data: {dataset.num_found} image files found under {root}, {len(paths)} usable"]
    if dataset.skipped:
        reasons = Counter(r.split(":")[0] for _, r in dataset.skipped)
        lines.append(f"  skipped {len(dataset.skipped)} unreadable: "
                     + ", ".join(f"{n} × {r}" for r, n in reasons.most_common())
                     + f" (first: {dataset.skipped[0][0]})")
    groups = Counter(group_of(p, root) for p in paths)
    how = ("the run's stored split" if stored else
           f"seeded random (data.seed={seed})" + (f", stratified over {len(groups)} subfolders" if len(groups) > 1
                                                  else ""))
    lines.append(f"  held out {len(held)} ({how}), training on {train_size}")
    if len(groups) > 1:
        held_groups = Counter(group_of(paths[i], root) for i in held)
        shown = ", ".join(f"{g or '.'} {held_groups[g]}/{groups[g]}" for g in sorted(groups)[:12])
        lines.append(f"  held out per subfolder: {shown}" + (" …" if len(groups) > 12 else ""))
    with_caption = sum(dataset.has_caption(i) for i in range(len(paths)))
    missing = len(paths) - with_caption
    caption_line = f"  captions (.txt side files): {with_caption} present, {missing} missing"
    if caption_rule and missing:
        caption_line += (" — left out of training and evaluation (data.missing_captions=skip)"
                         if caption_rule == "skip" else
                         " — trained as the empty (unconditional) prompt (data.missing_captions=null)")
    lines.append(caption_line)
    sizes = [s for s in dataset.sizes if s is not None]
    if sizes:
        target = (dataset.width, dataset.height)
        exact = sum(s == target for s in sizes)
        cropped = sum(s[0] * target[1] != s[1] * target[0] for s in sizes)
        smaller = sum(s[0] < target[0] or s[1] < target[1] for s in sizes)
        small, large = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
        lines.append(f"  resolution: sizes {small[0]}×{small[1]} … {large[0]}×{large[1]}; every image is centre-cropped to "
                     f"{target[0]}:{target[1]} and resized to {target[0]}×{target[1]} (LANCZOS down, BICUBIC up): "
                     f"{exact} already that size, {cropped} cropped, {smaller} upscaled")
    return lines
