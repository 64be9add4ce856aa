"""Datasets from a DataConfig: the (train, held-out) pair the training CLIs and evaluation use."""

from __future__ import annotations

from torch.utils.data import Dataset, Subset

from ldm_fast.config import DataConfig


def build_datasets(cfg: DataConfig, fields: tuple[str, ...] = ()) -> tuple[Dataset, Dataset]:
    """Procedural: disjoint index ranges of the same stream. Folder: the last
    `heldout_samples` files (sorted order) are held out, the rest trains. Shards: an endless
    resumable stream (ldm_fast.data.stream) keeping the image and `fields` (the task's
    annotations, see tasks.task_fields); held out: the first samples of data.heldout_root, or
    of the last shard."""
    if cfg.dataset == "procedural":
        from ldm_fast.data.procedural import procedural_split

        return procedural_split(cfg.resolution, cfg.num_samples, cfg.heldout_samples, seed=cfg.seed)
    if cfg.dataset == "folder":
        from ldm_fast.data.folder import ImageFolderDataset

        full = ImageFolderDataset(cfg.root, cfg.resolution)
        n_held = min(cfg.heldout_samples, len(full) // 10)
        if len(full) - n_held < 1:
            raise ValueError(f"data.root: {cfg.root} has {len(full)} usable images, too few to train on")
        return Subset(full, range(len(full) - n_held)), Subset(full, range(len(full) - n_held, len(full)))
    if cfg.dataset == "shards":
        from ldm_fast.data.stream import shard_datasets

        return shard_datasets(cfg.root, cfg.heldout_root, cfg.resolution, cfg.heldout_samples, fields, cfg.seed)
    raise ValueError(f"data.dataset: expected procedural|folder|shards, got {cfg.dataset!r}")
