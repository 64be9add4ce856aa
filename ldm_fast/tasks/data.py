"""What a task needs from the data: the annotations it reads, the pairs it trains on (SR
degradations, inpainting masks), captions to train a tokenizer, and held-out sampling inputs."""

from __future__ import annotations

from torch.utils.data import Dataset

from ldm_fast.config import Config
from ldm_fast.tasks.registry import task_of


def task_fields(cfg: Config) -> tuple[str, ...]:
    """Fields a data source must provide for cfg's task (hybrid modes add the caption)."""
    return task_of(cfg).data_fields(cfg.conditioning.mode)


def task_dataset(cfg: Config, dataset: Dataset, seed: int | None = None) -> Dataset:
    """The training / evaluation pairs a task needs on top of {'image', ...}. A shard stream
    gets the same pairing as a per-sample transform."""
    from ldm_fast.data.stream import ShardStream

    task = task_of(cfg)
    if task.pair is None:
        return dataset
    pairs = task.pair(cfg, dataset, cfg.data.seed if seed is None else seed)
    return dataset.with_transform(pairs.add_to) if isinstance(dataset, ShardStream) else pairs


def heldout_inputs(cfg: Config, names, n: int, run_dir=None) -> dict:
    """Pipeline inputs (keywords in `names`, e.g. Pipeline.inputs) taken from the first n
    held-out items, cycled when the held-out set is smaller than n: the grid training ends
    with, and what `sample` uses when no inputs are given. `run_dir`: the run whose stored
    held-out split of an image folder to use."""
    from ldm_fast.data.build import build_datasets

    _, heldout = build_datasets(cfg.data, task_fields(cfg), run_dir=run_dir)
    paired = task_dataset(cfg, heldout)
    items = [paired[i % len(heldout)] for i in range(n)]
    inputs = dict(task_of(cfg).heldout(items))
    if "prompt" in names:
        inputs["prompt"] = [it["caption"] for it in items]
    return {name: inputs[name] for name in names}


def dataset_captions(dataset: Dataset, limit: int = 2000) -> list[str]:
    """Captions of the first `limit` items (enough to cover the procedural vocabulary)."""
    from ldm_fast.data.degradations import SuperResolutionPairs
    from ldm_fast.data.masks import InpaintingPairs

    from ldm_fast.data.stream import ShardStream

    if isinstance(dataset, (SuperResolutionPairs, InpaintingPairs)):
        dataset = dataset.dataset  # the captions are the wrapped items'; skip degrading/masking
    if isinstance(dataset, ShardStream):  # the same first samples on every rank and worker
        dataset = dataset.first_samples(limit)
    out = []
    for i in range(min(limit, len(dataset))):
        item = dataset[i]
        if "caption" not in item:
            raise ValueError("dataset items have no 'caption': text conditioning needs captions "
                             "(or a tokenizer file in conditioning.tokenizer)")
        out.append(item["caption"])
    return out
