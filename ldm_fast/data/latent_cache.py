"""Latent cache: encode a dataset once with the frozen first stage, train the LDM on the result.

Stage 2 never changes the first stage, so encoding every image again in every epoch (as the
original training loop does) repeats the same encoder pass — and the data loading and
augmentation-free rendering in front of it — for nothing. `build_latent_cache` runs the encoder
once (batched, no grad) and stores on disk, in safetensors chunks:

    ROOT/manifest.json             written last: a cache without it is incomplete and rebuilt
    ROOT/chunk_00000.safetensors   rows [0, chunk_size): latents + tensor annotations;
    ROOT/chunk_00001.safetensors   string annotations (captions) as JSON in the chunk metadata
    …

What is stored per image depends on the first stage:
  KL ("moments")  the posterior's mean and log-variance, so `LatentCacheDataset` can draw a fresh
                  posterior sample z = mean + std·ε per access — the same distribution the
                  uncached loop sees (LatentDiffusion.encode samples the posterior), not its mode;
  VQ / identity   the deterministic latent (pre-quantisation h, or the pixels for f = 1).
Latents are stored unscaled; the dataset multiplies by the model's scale_factor, so the cache
survives a change of scale (scale_by_std measures it on the first batch, see `latent_std`).

Use (e.g. in stage-2 training, with `model` the LatentDiffusion whose first stage is frozen):

    build_latent_cache(model.first_stage, train_set, run_dir / "latents", batch_size=64, device=dev)
    data = LatentCacheDataset(run_dir / "latents", scale_factor=float(model.scale_factor))
    # scale_by_std: model.scale_factor = 1 / LatentCacheDataset(root).latent_std()
    # train_ldm: batch["latent"] replaces model.encode(batch["image"]); fresh noise each epoch

The manifest records a fingerprint of the first stage's weights and the dataset's length (for
a pass over tar shards, `ShardStream.one_pass()`, the shards' paths, sizes and mtimes):
`build_latent_cache(..., reuse=True)` returns an existing cache only when both match, and
rebuilds otherwise, so a retrained first stage never trains on stale latents.

Under torch.distributed every rank calls `build_latent_cache`: rank 0 decides reuse for all,
each rank encodes a contiguous share into chunk files of its own, and rank 0 writes the manifest
after the others are done. A map dataset is split at multiples of the chunk and batch sizes, so
N ranks write the very chunk files one process would.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .. import distributed
from .epoch import epoch_of

CACHE_VERSION = 1
MANIFEST = "manifest.json"
STORES = ("moments", "latent")


class LatentCacheError(RuntimeError):
    """A cache directory that is missing, incomplete, or does not match its manifest."""


# ----------------------------------------------------------------------------- building

def first_stage_fingerprint(first_stage: torch.nn.Module) -> str:
    """SHA-1 over the first stage's class, parameter/buffer names, shapes, dtypes and bytes."""
    h = hashlib.sha1(type(first_stage).__name__.encode())
    for name, t in sorted(first_stage.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _default_store(first_stage) -> str:
    return "moments" if getattr(first_stage, "kind", None) == "kl" else "latent"


@torch.no_grad()
def _encode(first_stage, x: torch.Tensor, store: str) -> dict[str, torch.Tensor]:
    if store == "moments":
        posterior = first_stage.encode(x)   # DiagonalGaussian (log-variance already clamped)
        return {"mean": posterior.mean, "logvar": posterior.logvar}
    return {"latent": first_stage.encode_latent(x, sample=False)}


def _split_fields(batch: dict, fields) -> tuple[dict, dict]:
    """(tensor annotations, string annotations) of a collated batch, without the image."""
    tensors, strings = {}, {}
    for key, value in batch.items():
        if key == "image" or (fields is not None and key not in fields):
            continue
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            strings[key] = list(value)
        # anything else (nested structures) is not an annotation the cache knows how to store
    return tensors, strings


def _write_chunk(root: Path, name: str, tensors: dict[str, torch.Tensor], strings: dict) -> dict:
    from safetensors.torch import save_file

    tmp = root / f".{name}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"strings": json.dumps(strings)})
    os.replace(tmp, root / name)    # a reader never sees half a chunk
    count = next(iter(tensors.values())).shape[0]
    return {"file": name, "count": count}


def read_manifest(root) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise LatentCacheError(f"{root}: no {MANIFEST} (not a latent cache, or an incomplete one)")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != CACHE_VERSION:
        raise LatentCacheError(f"{root}: cache version {manifest.get('version')} "
                               f"(this code reads {CACHE_VERSION}); rebuild it")
    return manifest


def _source(dataset) -> dict:
    """What identifies the encoded data for reuse: a map dataset's length, or, for a pass over
    shards (which has no length), each shard's path, size and mtime, so rewritten or added
    shards invalidate the cache."""
    if hasattr(dataset, "__len__"):
        return {"type": type(dataset).__name__, "len": len(dataset)}
    shards = []
    for url in dataset.urls:
        st = os.stat(url)
        shards.append([os.path.abspath(url), st.st_size, st.st_mtime_ns])
    return {"type": type(dataset).__name__, "shards": shards}


def _reusable(root: Path, fingerprint: str, source: dict, store: str) -> dict | None:
    try:
        manifest = read_manifest(root)
    except (LatentCacheError, json.JSONDecodeError):
        return None
    same_data = (manifest["num_items"] == source["len"] if "len" in source
                 else manifest["source"].get("shards") == source["shards"])
    ok = (manifest["first_stage"]["fingerprint"] == fingerprint and same_data
          and manifest["store"] == store
          and all((root / c["file"]).is_file() for c in manifest["chunks"]))
    return manifest if ok else None


def _part(dataset, ctx: distributed.DistContext, batch_size: int, chunk_size: int):
    """(this rank's contiguous share of `dataset`, name of its k-th chunk file)."""
    if hasattr(dataset, "__len__"):
        # Shares of whole chunks that are also whole batches (multiples of lcm(batch, chunk)):
        # each rank batches and chunks its rows exactly as one process would, so it writes the
        # single-process build's chunk files, names (global chunk ordinals, hence unique across
        # ranks) and bytes included. A world of one takes the dataset itself, as before.
        n, unit = len(dataset), math.lcm(batch_size, chunk_size)
        units = -(-n // unit)
        lo = min(n, ctx.rank * units // ctx.world_size * unit)
        hi = min(n, (ctx.rank + 1) * units // ctx.world_size * unit)
        first = lo // chunk_size
        part = dataset if (lo, hi) == (0, n) else Subset(dataset, range(lo, hi))
        return part, lambda k: f"chunk_{first + k:05d}.safetensors"
    # A pass over shards: how many samples a shard holds is known only once it is decoded, so
    # ranks split the shard list instead and tag their chunk names with the rank.
    n = len(dataset.urls)
    part = dataset.part(ctx.rank * n // ctx.world_size, (ctx.rank + 1) * n // ctx.world_size)
    tag = f"r{ctx.rank:03d}_" if ctx.enabled else ""
    return part, lambda k: f"chunk_{tag}{k:05d}.safetensors"


def build_latent_cache(first_stage: torch.nn.Module, dataset, root, *, batch_size: int = 64,
                       chunk_size: int = 4096, store: str | None = None, fields=None,
                       storage_dtype: torch.dtype = torch.float32, device="cpu", num_workers: int = 0,
                       reuse: bool = True, progress: bool = False) -> dict:
    """Encode every image of `dataset` (items: dicts with 'image' in [-1, 1] plus annotations)
    once with the frozen `first_stage` and store the latents and annotations under `root`.
    Returns the manifest. With `reuse`, an existing complete cache made by the same first-stage
    weights from a dataset of the same length is returned as is.

    dataset: a map-style dataset, or a finite pass over tar shards (`ShardStream.one_pass()`),
    whose identity for reuse is its shard list (paths, sizes, mtimes) instead of a length.
    Under torch.distributed every rank calls this: each encodes a contiguous share (indices,
    or shards) into its own chunk files, and rank 0 writes the manifest listing them in order,
    so the cache reads exactly as a single-process build of the same data.
    fields: annotation keys to keep (default: every tensor or string field but 'image').
    storage_dtype: float32 (default) or float16/bfloat16 to halve the disk and I/O."""
    root = Path(root)
    store = store or _default_store(first_stage)
    if store not in STORES:
        raise ValueError(f"store: expected one of {STORES}, got {store!r}")
    if store == "moments" and getattr(first_stage, "kind", None) != "kl":
        raise ValueError("store='moments' needs a KL first stage (a posterior to sample from)")
    if chunk_size < 1 or batch_size < 1:
        raise ValueError("chunk_size and batch_size must be positive")
    if not hasattr(dataset, "__len__") and not hasattr(dataset, "part"):
        raise ValueError(f"{type(dataset).__name__} has no length (an endless stream?): pass a map-style "
                         "dataset or one finite pass over shards, ShardStream.one_pass()")
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to encode")
    ctx = distributed.current()
    source = _source(dataset)
    # Rank 0 alone decides and tells the others: every rank skips or every rank encodes, and no
    # rank is still looking at the old cache while rank 0 deletes it.
    fingerprint = first_stage_fingerprint(first_stage) if ctx.is_main else None
    manifest = _reusable(root, fingerprint, source, store) if reuse and ctx.is_main else None
    if manifest := distributed.all_gather_object(manifest)[0]:
        return manifest
    if ctx.is_main:
        if root.exists():
            shutil.rmtree(root)   # stale or incomplete: never mix chunks of two encoders
        root.mkdir(parents=True)
    distributed.barrier()         # the directory is there, and empty, before any rank writes

    part, chunk_name = _part(dataset, ctx, batch_size, chunk_size)
    if not hasattr(part, "__len__"):
        num_workers = 0           # workers would each read the whole pass, and out of order
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    try:
        mine, error = _encode_part(first_stage, loader, root, chunk_name, store, fields, storage_dtype,
                                   torch.device(device), chunk_size, progress), None
    except Exception as exc:     # reported to the other ranks, which would otherwise wait forever
        mine, error = None, exc
    parts = distributed.all_gather_object((mine, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if failed := [r for r, (_, e) in enumerate(parts) if e]:
        raise LatentCacheError(f"rank {failed[0]} failed to encode its share of the cache: {parts[failed[0]][1]}")
    parts = [p for p, _ in parts]   # in rank order, which is index (or shard) order

    chunks = [c for p in parts for c in p["chunks"]]
    num_items = sum(c["count"] for c in chunks)
    if num_items == 0:
        raise LatentCacheError(f"no usable sample in {type(dataset).__name__}: nothing was encoded")
    if "len" in source and num_items != source["len"]:
        raise LatentCacheError(f"encoded {num_items} items but the dataset has {source['len']}")
    if ctx.is_main:
        field_info = {}
        for p in parts:
            field_info.update(p["fields"])
        manifest = {
            "version": CACHE_VERSION,
            "num_items": num_items,
            "chunks": chunks,
            "store": store,
            "latent_shape": next(p["latent_shape"] for p in parts if p["latent_shape"]),
            "storage_dtype": str(storage_dtype).replace("torch.", ""),
            "fields": field_info,
            "string_fields": sorted(set().union(*(p["string_fields"] for p in parts))),
            "first_stage": {"kind": getattr(first_stage, "kind", type(first_stage).__name__),
                            "fingerprint": fingerprint},
            "source": source,
            "encode_seconds": max(p["seconds"] for p in parts),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        tmp = root / f".{MANIFEST}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, root / MANIFEST)   # last: its presence means the cache is complete
    distributed.barrier()                  # no rank goes on to read the cache before it is complete
    return manifest if ctx.is_main else read_manifest(root)


def _encode_part(first_stage, loader, root: Path, chunk_name, store: str, fields, storage_dtype,
                 device: torch.device, chunk_size: int, progress: bool) -> dict:
    """Encode `loader`'s batches into chunk files `chunk_name(0)`, `chunk_name(1)`, … of
    `chunk_size` rows (the last one shorter); returns what the manifest needs from them."""
    was_training = first_stage.training
    first_stage.eval()
    t0 = time.perf_counter()
    chunks, pending, pending_strings, pending_n = [], [], {}, 0
    field_info, string_fields, latent_shape = {}, set(), None

    def flush(upto: int):
        # Write the first `upto` pending rows as one chunk, keep the rest pending.
        nonlocal pending, pending_strings, pending_n
        merged = {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
        chunks.append(_write_chunk(root, chunk_name(len(chunks)), {k: v[:upto] for k, v in merged.items()},
                                   {k: v[:upto] for k, v in pending_strings.items()}))
        rest = {k: v[upto:] for k, v in merged.items()}
        pending = [rest] if next(iter(rest.values())).shape[0] else []
        pending_strings = {k: v[upto:] for k, v in pending_strings.items()}
        pending_n -= upto

    try:
        for batch in _progress(loader, progress):
            x = batch["image"].to(device)
            encoded = {k: v.to("cpu", storage_dtype) for k, v in _encode(first_stage, x, store).items()}
            latent_shape = list(next(iter(encoded.values())).shape[1:])
            tensors, strings = _split_fields(batch, fields)
            for k, v in tensors.items():
                field_info[k] = {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape[1:])}
            string_fields.update(strings)
            pending.append({**encoded, **{f"field.{k}": v.cpu() for k, v in tensors.items()}})
            for k, v in strings.items():
                pending_strings.setdefault(k, []).extend(v)
            pending_n += x.shape[0]
            while pending_n >= chunk_size:
                flush(chunk_size)
        if pending_n:
            flush(pending_n)
    finally:
        first_stage.train(was_training)
    return {"chunks": chunks, "fields": field_info, "string_fields": sorted(string_fields),
            "latent_shape": latent_shape, "seconds": time.perf_counter() - t0}


def _progress(iterable, enabled: bool):
    """The batches with a progress bar (plain lines in a log file; ldm_fast.progress)."""
    if not enabled:
        yield from iterable
        return
    from ldm_fast.progress import progress_bar

    try:
        total = len(iterable)
    except TypeError:  # a shard stream: its length is unknown
        total = None
    bar = progress_bar(total, "encode latents")
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


# ----------------------------------------------------------------------------- serving

class LatentCacheDataset(Dataset):
    """Items {'latent': (C, h, w) float32 · scale_factor, <annotation>: …} from a cache.

    posterior: "sample" draws z = mean + std·ε for KL caches (ε from a generator seeded by
    (seed, epoch, index), so a run is reproducible and resumable; the training sampler's indices
    carry the epoch (ldm_fast.data.epoch), `set_epoch` sets it for plain ints), "mean" returns
    the posterior mean. Deterministic caches ignore it.
    Chunks are memory-mapped and read row by row; file handles are opened lazily per process,
    so DataLoader workers each open their own."""

    def __init__(self, root, scale_factor: float = 1.0, posterior: str = "sample", seed: int = 0,
                 fields=None):
        if posterior not in ("sample", "mean"):
            raise ValueError(f"posterior: expected 'sample' or 'mean', got {posterior!r}")
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        for c in self.manifest["chunks"]:
            if not (self.root / c["file"]).is_file():
                raise LatentCacheError(f"{self.root}: chunk {c['file']} listed in the manifest is missing")
        self.scale_factor = float(scale_factor)
        self.posterior, self.seed, self.epoch = posterior, seed, 0
        known = set(self.manifest["fields"]) | set(self.manifest["string_fields"])
        self.fields = known if fields is None else set(fields)
        if missing := self.fields - known:
            raise LatentCacheError(f"{self.root}: fields {sorted(missing)} are not in the cache "
                                   f"(it has {sorted(known)})")
        self._starts = [0]
        for c in self.manifest["chunks"]:
            self._starts.append(self._starts[-1] + c["count"])
        self._handles, self._strings, self._pid = {}, {}, None

    def __len__(self) -> int:
        return self.manifest["num_items"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _chunk(self, k: int):
        from safetensors import safe_open

        if self._pid != os.getpid():   # after a fork: handles of the parent are not ours
            self._handles, self._strings, self._pid = {}, {}, os.getpid()
        if k not in self._handles:
            f = safe_open(str(self.root / self.manifest["chunks"][k]["file"]), framework="pt")
            self._handles[k] = f
            self._strings[k] = json.loads((f.metadata() or {}).get("strings", "{}"))
        return self._handles[k], self._strings[k]

    def _noise_generator(self, index: int) -> torch.Generator:
        epoch = epoch_of(index, self.epoch)
        key = ((self.seed * 1_000_003 + epoch) * 1_000_000_007 + int(index)) % (2 ** 63)
        return torch.Generator().manual_seed(key)

    def raw(self, index: int) -> dict:
        """The stored tensors of one item (unscaled), without sampling."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)} items")
        k = bisect.bisect_right(self._starts, index) - 1
        f, strings = self._chunk(k)
        j = index - self._starts[k]
        out = {name: f.get_slice(name)[j:j + 1][0] for name in f.keys()}
        for name, values in strings.items():
            out[f"field.{name}"] = values[j]
        return out

    def __getitem__(self, index: int) -> dict:
        raw = self.raw(index)
        if "latent" in raw:
            z = raw["latent"].float()
        elif self.posterior == "mean":
            z = raw["mean"].float()
        else:
            mean, logvar = raw["mean"].float(), raw["logvar"].float()
            eps = torch.randn(mean.shape, generator=self._noise_generator(index))
            z = mean + torch.exp(0.5 * logvar) * eps
        item = {"latent": z * self.scale_factor}
        for name in self.fields:
            item[name] = raw[f"field.{name}"]
        return item

    def latent_std(self, num_items: int = 256) -> float:
        """Std of the (sampled, unscaled) latents of the first `num_items` items: scale_by_std
        sets scale_factor = 1 / this (the uncached loop measures it on its first batch)."""
        scale, self.scale_factor = self.scale_factor, 1.0
        try:
            z = torch.stack([self[i]["latent"] for i in range(min(num_items, len(self)))])
        finally:
            self.scale_factor = scale
        return float(z.flatten().std())
