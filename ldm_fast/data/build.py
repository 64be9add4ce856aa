"""Datasets from a DataConfig: the (train, held-out) pair the training CLIs and evaluation use."""

from __future__ import annotations

from torch.utils.data import Dataset, Subset

from ldm_fast.config import DataConfig


def build_datasets(cfg: DataConfig, fields: tuple[str, ...] = (), run_dir=None, store_split: bool = False,
                   summary: list | None = None) -> tuple[Dataset, Dataset]:
    """Procedural: disjoint index ranges of the same stream. Folder: a seeded random sample of
    `heldout_samples` files (at most a tenth), stratified by subfolder (ldm_fast.data.split),
    is held out and the rest trains; with `run_dir`, the split stored there is used when it
    exists, and written there when `store_split`. Text tasks ("caption" in `fields`) follow
    `missing_captions`. `summary`, when given, receives the lines describing the folder.
    Shards: an endless resumable stream (ldm_fast.data.stream) keeping the image and `fields`
    (the task's annotations, see tasks.task_fields); held out: the first samples of
    data.heldout_root, or of the last shard."""
    if cfg.dataset == "procedural":
        from ldm_fast.data.procedural import procedural_split

        return procedural_split(cfg.resolution, cfg.num_samples, cfg.heldout_samples, seed=cfg.seed)
    if cfg.dataset == "folder":
        return _folder(cfg, fields, run_dir, store_split, summary)
    if cfg.dataset == "shards":
        from ldm_fast.data.stream import shard_datasets

        return shard_datasets(cfg.root, cfg.heldout_root, cfg.resolution, cfg.heldout_samples, fields, cfg.seed)
    raise ValueError(f"data.dataset: expected procedural|folder|shards, got {cfg.dataset!r}")


def _folder(cfg: DataConfig, fields, run_dir, store_split: bool, summary: list | None):
    from ldm_fast.data.folder import ImageFolderDataset
    from ldm_fast.data.split import folder_summary, load_heldout, save_heldout, stratified_heldout

    annotations = [f for f in fields if f != "caption"]
    if annotations:
        raise ValueError(f"data.root: an image folder provides images and .txt captions only; this task needs "
                         f"{annotations} per image: use tar shards (ldm_fast.make_shards) that carry them")
    full = ImageFolderDataset(cfg.root, cfg.resolution)
    held = load_heldout(run_dir, full.paths, full.root)
    stored = held is not None
    if held is None:
        held = stratified_heldout(full.paths, full.root, min(cfg.heldout_samples, len(full) // 10), cfg.seed)
        if store_split and run_dir is not None:
            save_heldout(run_dir, [full.paths[i] for i in held], full.root)
    held_set = set(held)
    train = [i for i in range(len(full)) if i not in held_set]
    text = "caption" in fields
    if text and cfg.missing_captions == "skip":
        train = [i for i in train if full.has_caption(i)]
        held = [i for i in held if full.has_caption(i)]
    if len(train) < 1:
        raise ValueError(f"data.root: {cfg.root} has {len(train)} usable training images"
                         + (" with captions (data.missing_captions=skip)" if text and cfg.missing_captions == "skip"
                            else "") + ", too few to train on")
    if summary is not None:
        summary += folder_summary(full, held, len(train), caption_rule=cfg.missing_captions if text else None,
                                  stored=stored, seed=cfg.seed)
    return Subset(full, train), Subset(full, held)
