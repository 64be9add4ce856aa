"""Training from tar shards: an endless, shuffled, resumable stream (`data.dataset=shards`).

`ShardDataset` (shards.py) reads shards once, in order. Training needs more:

- endless: epoch after epoch, so every rank and DataLoader worker always has a next batch
  and no rank runs out before the others (DDP would hang);
- shuffled without loading everything: the shard order is permuted per epoch (the same on
  every rank, seeded by (seed, epoch)), each consumer (rank × worker) takes every n-th shard,
  and the samples of one shard are permuted in memory (one shard's encoded bytes at a time);
- resumable exactly: a consumer's place is (epoch, shard ordinal, sample ordinal), each
  sample carries it in '__pos__', the training loop keeps the last one consumed per consumer
  and stores them in the checkpoint; a resumed stream starts right after them. Per-sample
  randomness (SR degradations, inpainting masks) is seeded by the same coordinates;
- sized for the model: images are centre-cropped and resized to `resolution` as image
  folders are (shards written at another size still train), only the fields the task needs
  are kept so every sample collates, and a sample without them is skipped and counted.

Ordinals count the shard's samples before decoding, so a sample that fails to decode does not
shift the positions of the others and resuming stays exact.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .folder import load_image
from .shards import IMAGE_SUFFIXES, ShardDataset, decode_field

log = logging.getLogger(__name__)

Transform = Callable[[dict, np.random.Generator], dict]


class ShardStream(IterableDataset):
    """Endless training samples {'image': (3, r, r) in [-1, 1], <fields>…, '__pos__'} from shards.

    urls: a brace spec ('data/train-{000000..000099}.tar') or a list of paths.
    fields: annotations to keep besides the image (e.g. ('caption',) for text-to-image).
    positions: {'consumers': n, 'rotation': r, 'positions': {consumer: [epoch, shard, sample]}}
    from a checkpoint (see `resume`), None to start at the beginning.

    DataLoader workers hand out batches round-robin starting with worker 0; a resumed run
    must go on with the worker whose turn it was, so worker w plays consumer (w + rotation) mod
    workers, the rotation advancing with each batch consumed (PositionTracker keeps it)."""

    def __init__(self, urls: str | Sequence[str], resolution: int, fields: Sequence[str] = (), seed: int = 0,
                 transforms: Sequence[Transform] = (), positions: dict | None = None):
        self.reader = ShardDataset(urls, decode=False)  # its shard list checks, tar reading and stats
        self.urls, self.resolution, self.fields, self.seed = self.reader.urls, resolution, tuple(fields), seed
        self.transforms, self.positions = tuple(transforms), positions

    def with_transform(self, transform: Transform) -> ShardStream:
        """The same stream with `transform(item, rng)` applied to every sample (rng seeded by its position)."""
        return ShardStream(self.urls, self.resolution, self.fields, self.seed, (*self.transforms, transform),
                           self.positions)

    def resume(self, state: dict | None) -> ShardStream:
        """The same stream starting after the positions in `state` (see `PositionTracker.state`)."""
        return ShardStream(self.urls, self.resolution, self.fields, self.seed, self.transforms, state)

    # ------------------------------------------------------------------------- reading

    def _decode(self, url: str, key: str, raw: dict[str, bytes]) -> dict | None:
        """The sample sized and reduced to image + fields; None (counted, reported) when it cannot be."""
        try:
            images = [raw[s] for s in raw if s.lower() in IMAGE_SUFFIXES]
            if not images:
                raise KeyError("no image member")
            by_name = dict(decode_field(s, d) for s, d in raw.items() if s.lower() not in IMAGE_SUFFIXES)
            if missing := [name for name in self.fields if name not in by_name]:
                raise KeyError(f"missing field(s) {missing}")
            out = {"image": load_image(io.BytesIO(images[0]), self.resolution, self.resolution)}
            out.update({name: by_name[name] for name in self.fields})
        except Exception as e:
            self.reader.stats["skipped_samples"] += 1
            self.reader.report(f"skipped sample {key!r} in {url}: {type(e).__name__}: {e}")
            return None
        return out

    def _epoch_shards(self, epoch: int) -> list[int]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        return [int(i) for i in order]

    def _start(self, consumer: int, consumers: int) -> tuple[int, int, int]:
        state = self.positions
        if not state:
            return 0, 0, 0
        if state["consumers"] != consumers:
            epoch = min(p[0] for p in state["positions"].values())
            log.warning("shards: the checkpoint's data position was recorded with %d consumers (ranks x "
                        "workers), this run has %d; the data order cannot continue exactly, so every "
                        "consumer restarts epoch %d", state["consumers"], consumers, epoch)
            return epoch, 0, 0
        epoch, shard, sample = state["positions"].get(str(consumer), (0, 0, 0))
        return int(epoch), int(shard), int(sample)

    def _role(self) -> tuple[int, int]:
        consumer, consumers = self.reader.consumer()  # rank * workers + worker id, world * workers
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        state = self.positions or {}
        rotation = state.get("rotation", 0) % workers if state.get("consumers") == consumers else 0
        rank_base = consumer - consumer % workers
        return rank_base + (consumer % workers + rotation) % workers, consumers

    def __iter__(self) -> Iterator[dict]:
        consumer, consumers = self._role()
        if len(self.urls) < consumers:
            raise ValueError(f"{len(self.urls)} shards cannot be split among {consumers} consumers (ranks x "
                             "DataLoader workers): write more, smaller shards or use fewer workers")
        epoch, first_shard, first_sample = self._start(consumer, consumers)
        while True:
            mine = self._epoch_shards(epoch)[consumer::consumers]
            yielded = False
            for k in range(first_shard, len(mine)):
                shard_id = mine[k]
                url = self.urls[shard_id]
                groups = list(self.reader.read_groups(url))  # one shard's encoded bytes in memory
                order = np.random.default_rng([self.seed, epoch, shard_id]).permutation(len(groups))
                for j in range(first_sample if k == first_shard else 0, len(groups)):
                    key, raw = groups[order[j]]
                    sample = self._decode(url, key, raw)
                    if sample is None:
                        continue
                    rng = np.random.default_rng([self.seed, epoch, shard_id, int(order[j])])
                    for transform in self.transforms:
                        sample = transform(sample, rng)
                    sample["__pos__"] = torch.tensor([consumer, epoch, k, j + 1])
                    self.reader.stats["samples"] += 1
                    yielded = True
                    yield sample
            if not yielded and first_shard == 0 and first_sample == 0:
                raise RuntimeError(f"shards: consumer {consumer} read a whole epoch of {mine} without one "
                                   "usable sample (see the warnings above)")
            epoch, first_shard, first_sample = epoch + 1, 0, 0

    def first_samples(self, n: int) -> list[dict]:
        """The first `n` usable samples in the listed shard order, the same on every rank and
        worker (e.g. the captions a tokenizer is trained on); no transforms."""
        out = []
        for url in self.urls:
            for key, raw in self.reader.read_groups(url):
                if len(out) == n:
                    return out
                if (sample := self._decode(url, key, raw)) is not None:
                    out.append(sample)
        return out

    def one_pass(self) -> ShardPass:
        """Every usable sample of the listed shards once, in listed order (shard by shard,
        samples as stored): what a latent cache encodes (latent_cache.build_latent_cache).
        Like `first_samples`: only the stream's fields, no transforms, no '__pos__'; finite."""
        return ShardPass(self, self.urls)


class ShardPass(IterableDataset):
    """`ShardStream.one_pass()`: a finite pass over `urls`, decoded as `stream` decodes."""

    def __init__(self, stream: ShardStream, urls: Sequence[str]):
        self.stream, self.urls = stream, list(urls)

    def part(self, start: int, stop: int) -> ShardPass:
        """The pass over shards [start, stop) of this one (a rank's contiguous share)."""
        return ShardPass(self.stream, self.urls[start:stop])

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            # Each worker would repeat the whole pass; splitting it would interleave the order.
            raise RuntimeError("ShardPass is read in order by one process: use num_workers <= 1")
        for url in self.urls:
            for key, raw in self.stream.reader.read_groups(url):
                if (sample := self.stream._decode(url, key, raw)) is not None:
                    yield sample


class PositionTracker:
    """Wraps a DataLoader over a `ShardStream`: removes '__pos__' from each batch and remembers,
    per consumer, the position after the last sample this process consumed, and whose turn
    among the DataLoader workers is next."""

    def __init__(self, loader, consumers: int, workers: int, start: dict | None = None):
        self.iterator, self.consumers, self.workers = iter(loader), consumers, max(1, workers)
        start = start if start and start.get("consumers") == consumers else {}
        self.positions = dict(start.get("positions", {}))
        self.rotation = start.get("rotation", 0)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.iterator)
        for consumer, *position in batch.pop("__pos__").tolist():
            self.positions[str(consumer)] = position  # rows of one consumer arrive in order
        self.rotation = (self.rotation + 1) % self.workers
        return batch

    def state(self, gather: Callable[[dict], list[dict]] | None = None) -> dict:
        """{'consumers', 'positions'} over every rank (`gather` collects each rank's dict)."""
        merged = {}
        for part in (gather(self.positions) if gather else [self.positions]):
            merged.update(part)
        return {"consumers": self.consumers, "rotation": self.rotation, "positions": merged}


class SampleList(Dataset):
    """A small list of prepared samples as a map-style dataset (held-out images from shards)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


def shard_datasets(urls: str, heldout_urls: str, resolution: int, heldout_samples: int, fields: Sequence[str],
                   seed: int) -> tuple[ShardStream, SampleList]:
    """(training stream, held-out samples) for `data.dataset=shards`. Held out: the first `heldout_samples` of
    `heldout_urls`, or, when that is empty, of the last training shard, which then no longer trains."""
    train = ShardStream(urls, resolution, fields, seed)
    if heldout_urls:
        held_from = ShardStream(heldout_urls, resolution, fields, seed)
    else:
        if len(train.urls) < 2:
            raise ValueError(f"data.root: {len(train.urls)} shard; hold one out needs at least 2 "
                             "(or set data.heldout_root)")
        held_from = ShardStream(train.urls[-1:], resolution, fields, seed)
        train = ShardStream(train.urls[:-1], resolution, fields, seed)
    held = held_from.first_samples(heldout_samples)
    if not held:
        raise ValueError(f"no usable held-out samples in {held_from.urls}")
    return train, SampleList(held)
