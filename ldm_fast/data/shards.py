"""WebDataset-style tar shards: write them from any dataset of dicts or an image folder, stream them back.

Format (readable by the `webdataset` library too): a plain tar whose members are grouped
into samples by key, the member name up to the first dot of its basename; the rest of the
name says what the bytes are:

    000042.png                 'image'     the image (also .jpg/.jpeg/.webp from folders)
    000042.txt                 'caption'   UTF-8 text
    000042.cls                 'label'     an integer as decimal text
    000042.json                'json'      any JSON value
    000042.boxes.npy           'boxes'     any other array/tensor field, numpy .npy (no pickle)
    000042.name.txt/.cls/.json/.png        other fields by type

Reading streams each tar (tarfile stream mode: one pass, constant memory), splits the
shard list across ranks and DataLoader workers, and survives bad data: a sample that does
not decode (or lacks a required field) and the rest of a truncated shard are skipped,
counted in `stats` and reported with a warning naming the shard, never raised.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import tarfile
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .folder import caption_path, find_images, load_image, report_skipped, validate_images

IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp")
SPLITS = ("shard", "sample")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Brace-expand shard names: 'data-{000..009}.tar' (zero padding kept), '{a,b}', several
    braces (cartesian product); a list of specs is expanded element by element."""
    if not isinstance(spec, str):
        return [u for s in spec for u in expand_urls(s)]
    m = _BRACE.search(spec)
    if m is None:
        return [spec]
    body = m.group(1)
    r = _RANGE.match(body)
    if r:
        a, b = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).lstrip("-").startswith("0") else 0
        step = 1 if b >= a else -1
        options = [str(i).zfill(width) for i in range(a, b + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"shard spec {spec!r}: cannot expand {{{body}}} (use {{000..009}} or {{a,b}})")
    head, tail = spec[:m.start()], spec[m.end():]
    return [u for o in options for u in expand_urls(head + o + tail)]


# ----------------------------------------------------------------------------- encoding

def _image_bytes(value, fmt: str = "png") -> bytes:
    if isinstance(value, Image.Image):
        im = value
    else:
        arr = value.detach().cpu().float().numpy() if torch.is_tensor(value) else np.asarray(value)
        if arr.dtype != np.uint8:  # float images are (3, H, W) in [-1, 1], the project's convention
            arr = np.round((np.clip(arr, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)
        im = Image.fromarray(arr)
    buf = io.BytesIO()
    im.save(buf, format=fmt.upper())
    return buf.getvalue()


def _npy_bytes(value) -> bytes:
    arr = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
    if arr.dtype.kind in "iu" and arr.size:
        # Store integers (class maps, box labels) in the smallest type that holds them:
        # a 256x256 int64 map is 512 KiB, as uint8 64 KiB. Decoding gives int64 back.
        for t in (np.uint8, np.int8, np.int16, np.int32):
            info = np.iinfo(t)
            if info.min <= arr.min() and arr.max() <= info.max:
                arr = arr.astype(t)
                break
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: dict) -> dict[str, bytes]:
    """Map a sample dict to {member suffix: bytes} (see the module docstring for the rules).

    A `bytes` value is taken as already encoded, its field name being the suffix (e.g. 'jpg')."""
    out: dict[str, bytes] = {}
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        if isinstance(value, bytes):
            suffix, data = name, value
        elif name == "image":
            suffix, data = "png", _image_bytes(value)
        elif isinstance(value, Image.Image):
            suffix, data = f"{name}.png", _image_bytes(value)
        elif isinstance(value, str):
            suffix, data = ("txt" if name == "caption" else f"{name}.txt"), value.encode("utf-8")
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool) or (
                torch.is_tensor(value) and value.dim() == 0 and not value.is_floating_point()
                and value.dtype != torch.bool):
            suffix, data = ("cls" if name == "label" else f"{name}.cls"), str(int(value)).encode()
        elif torch.is_tensor(value) or isinstance(value, np.ndarray):
            suffix, data = f"{name}.npy", _npy_bytes(value)
        else:
            suffix = "json" if name == "json" else f"{name}.json"
            data = json.dumps(value).encode("utf-8")
        if suffix in out:
            raise ValueError(f"sample fields collide on member suffix {suffix!r}")
        out[suffix] = data
    return out


def decode_field(suffix: str, data: bytes) -> tuple[str, object]:
    """(field name, value) of one tar member from its suffix (see the module docstring)."""
    *stem, ext = suffix.split(".")
    name = ".".join(stem)
    ext = ext.lower()
    if ext in IMAGE_SUFFIXES:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
        return name or "image", torch.from_numpy(arr.transpose(2, 0, 1) / 127.5 - 1.0)
    if ext == "txt":
        return name or "caption", data.decode("utf-8")
    if ext == "cls":
        return name or "label", torch.tensor(int(data.decode().strip()), dtype=torch.int64)
    if ext == "json":
        return name or "json", json.loads(data.decode("utf-8"))
    if ext == "npy":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        t = torch.from_numpy(np.ascontiguousarray(arr))
        return name or "npy", (t.long() if arr.dtype.kind in "iu" else t)
    return suffix, data  # unknown: raw bytes, for the caller to interpret


def decode_sample(fields: dict[str, bytes]) -> dict:
    """Inverse of `encode_sample` (images come back as float32 (3, H, W) in [-1, 1])."""
    return dict(decode_field(s, d) for s, d in fields.items())


# ----------------------------------------------------------------------------- writing

class ShardWriter:
    """Write samples into numbered tar shards, starting a new one after `max_count` samples or
    `max_bytes` bytes. `pattern` is printf-style: 'out/data-%06d.tar'.

    Each shard is written under a temporary name and renamed when complete, so an
    interrupted conversion never leaves a half-written shard under a real shard name.
    Member timestamps are fixed, so the same samples give byte-identical shards.
    """

    def __init__(self, pattern: str, max_count: int = 1000, max_bytes: int = 512 << 20,
                 start_index: int = 0):
        try:
            pattern % 0
        except TypeError as e:
            raise ValueError(f"pattern {pattern!r} needs one printf placeholder, e.g. 'data-%06d.tar'") from e
        if max_count < 1 or max_bytes < 1:
            raise ValueError(f"max_count and max_bytes must be positive, got {max_count}, {max_bytes}")
        self.pattern, self.max_count, self.max_bytes = pattern, max_count, max_bytes
        self.index = start_index
        self.paths: list[str] = []
        self.total = 0
        self._tar = self._file = None
        self._count = self._bytes = 0
        self._keys: set[str] = set()

    def write(self, sample: dict, key: str | None = None) -> None:
        """Add one sample; key defaults to sample['__key__'] or a running number."""
        key = str(key or sample.get("__key__") or f"{self.total:09d}")
        if "." in key.rsplit("/", 1)[-1] or not key or key in self._keys:
            raise ValueError(f"sample key {key!r}: must be non-empty, unique and without '.' in its basename")
        members = encode_sample(sample)
        if not members:
            raise ValueError(f"sample {key!r} has no fields to write")
        if self._tar is None:
            self._open()
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
            self._bytes += len(data) + 512
        self._keys.add(key)
        self._count += 1
        self.total += 1
        if self._count >= self.max_count or self._bytes >= self.max_bytes:
            self._finish()

    def _open(self) -> None:
        path = self.pattern % self.index
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._tmp = f"{path}.tmp-{os.getpid()}"
        self._path = path
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)

    def _finish(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self._path)
        self.paths.append(self._path)
        self._tar = self._file = None
        self._count = self._bytes = 0
        self.index += 1

    def close(self) -> list[str]:
        """Finish the open shard; returns every shard path written."""
        if self._tar is not None:
            self._finish()
        return self.paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None and self._tar is not None:
            # Failed mid-shard: drop the partial file rather than publish it.
            self._tar.close()
            self._file.close()
            os.remove(self._tmp)
            self._tar = self._file = None
        else:
            self.close()


def write_shards(samples: Iterable[dict], pattern: str, max_count: int = 1000,
                 max_bytes: int = 512 << 20) -> list[str]:
    """Write any iterable of sample dicts (e.g. a map-style Dataset) to shards; returns their paths."""
    with ShardWriter(pattern, max_count, max_bytes) as w:
        for sample in samples:
            w.write(sample)
    return w.paths


def folder_to_shards(root: str | os.PathLike, pattern: str, resolution: int | tuple[int, int] | None = None,
                     captions: bool = True, max_count: int = 1000, max_bytes: int = 512 << 20,
                     validate: str = "full") -> list[str]:
    """Convert an image folder (recursive, caption side files) to shards.

    resolution=None copies each file's bytes unchanged (member .jpg/.png/.webp); otherwise
    images are centre-cropped and resized as `ImageFolderDataset` does and stored as PNG.
    Unreadable files are skipped and reported in one warning. Keys are the relative paths
    without extension ('.' in names becomes '_'; a clash gets the extension appended).
    """
    root = Path(root)
    candidates = find_images(root)
    paths, skipped = validate_images(candidates, validate)
    if resolution is not None:
        h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    used: set[str] = set()
    with ShardWriter(pattern, max_count, max_bytes) as writer:
        for p in paths:
            rel = p.relative_to(root)
            key = "/".join([*rel.parts[:-1], rel.stem]).replace(".", "_")
            if key in used:
                key = f"{key}_{p.suffix[1:].lower()}"
            ext = p.suffix[1:].lower().replace("jpeg", "jpg")
            try:
                if resolution is None:
                    sample = {ext: p.read_bytes()}
                else:
                    sample = {"image": load_image(p, h, w)}
            except Exception as e:  # changed or broken since validation: skip, don't abort
                skipped.append((str(p), f"{type(e).__name__}: {e}"))
                continue
            side = caption_path(p)
            if captions:
                sample["caption"] = side.read_text("utf-8", errors="replace").strip() if side.is_file() else ""
            used.add(key)
            writer.write(sample, key=key)
    report_skipped(f"folder_to_shards({root})", skipped, len(candidates))
    return writer.paths


# ----------------------------------------------------------------------------- reading

def _split_name(name: str) -> tuple[str, str] | None:
    """('dir/000042', 'boxes.npy') from 'dir/000042.boxes.npy'; None for names without a suffix."""
    head, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None  # hidden files (e.g. macOS '._*') and suffix-less members carry no field
    stem, suffix = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), suffix


class ShardDataset(IterableDataset):
    """Stream samples from tar shards; `urls` is a brace spec or a list of paths.

    Splitting: the shard list is divided among rank x DataLoader worker ('shard', default:
    each consumer reads only its shards; needs at least as many shards as consumers, and
    ranks get unequal counts when shard sizes differ) or every consumer reads every shard and
    keeps every n-th sample ('sample': balanced to within one sample, costs reading all
    bytes on every rank). rank/world_size default to torch.distributed's when it is
    initialised, else 0/1.

    `required` names fields a sample must have (e.g. ('image', 'caption')); samples without
    them are skipped and counted, so the default collate never sees ragged dicts.
    `stats` counts samples, skipped samples and truncated shards in this process (a worker
    keeps its own; each problem is also reported by a warning from the process that met it).
    """

    def __init__(self, urls: str | Sequence[str], rank: int | None = None, world_size: int | None = None,
                 split: str = "shard", shuffle: bool = False, seed: int = 0, shuffle_buffer: int = 0,
                 required: Sequence[str] = (), decode: bool = True):
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError("no shards given")
        missing = [u for u in self.urls if not os.path.isfile(u)]
        if missing:  # a typo in the spec should fail now, not hours into training
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise FileNotFoundError(f"{len(missing)} of {len(self.urls)} shards not found: "
                                    f"{', '.join(missing[:5])}{more}")
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.rank, self.world_size, self.split = rank, world_size, split
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, int(shuffle_buffer)
        self.required, self.decode, self.epoch = tuple(required), decode, 0
        self.stats = {"samples": 0, "skipped_samples": 0, "truncated_shards": 0}

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new epoch (same order on every rank: the seed is shared)."""
        self.epoch = int(epoch)

    def consumer(self) -> tuple[int, int]:
        """(this reader's index, how many read): rank x DataLoader worker."""
        if self.world_size is not None:
            rank, world = self.rank, self.world_size
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def report(self, message: str) -> None:
        """Warn about bad data (the counts go to `stats`)."""
        warnings.warn(f"ShardDataset: {message}", stacklevel=3)

    def read_groups(self, url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {suffix: bytes}) per sample, streaming; a truncated tail is reported and dropped."""
        key, fields = None, {}
        try:
            with tarfile.open(url, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    parts = _split_name(member.name)
                    if parts is None:
                        continue
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} cut short")
                    if parts[0] != key:
                        if key is not None:
                            yield key, fields
                        key, fields = parts[0], {}
                    fields[parts[1]] = data
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            self.stats["truncated_shards"] += 1
            # The sample being assembled may have lost fields: drop it rather than guess.
            lost = f"; dropped incomplete sample {key!r}" if key is not None else ""
            if key is not None:
                self.stats["skipped_samples"] += 1
            self.report(f"shard {url} is truncated or corrupt ({type(e).__name__}: {e}); "
                         f"kept the samples before the damage{lost}")
            return
        if key is not None:
            yield key, fields

    def _sample(self, url: str, key: str, fields: dict[str, bytes]) -> dict | None:
        try:
            sample = decode_sample(fields) if self.decode else dict(fields)
        except Exception as e:
            self.stats["skipped_samples"] += 1
            self.report(f"skipped sample {key!r} in {url}: {type(e).__name__}: {e}")
            return None
        missing = [r for r in self.required if r not in sample]
        if missing:
            self.stats["skipped_samples"] += 1
            self.report(f"skipped sample {key!r} in {url}: missing field(s) {missing}")
            return None
        sample["__key__"], sample["__url__"] = key, url
        return sample

    def _stream(self) -> Iterator[dict]:
        consumer, consumers = self.consumer()
        shards = list(self.urls)
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch]).shuffle(shards)
        if self.split == "shard":
            if len(shards) < consumers:
                raise ValueError(f"{len(shards)} shards cannot be split among {consumers} consumers "
                                 f"(ranks x DataLoader workers): write more shards, use fewer "
                                 f"workers, or split='sample'")
            mine = shards[consumer::consumers]
            groups = ((u, k, f) for u in mine for k, f in self.read_groups(u))
        else:
            everything = ((u, k, f) for u in shards for k, f in self.read_groups(u))
            # Assign by position before decoding, so each consumer decodes only its own samples.
            groups = itertools.islice(everything, consumer, None, consumers)
        for url, key, fields in groups:
            sample = self._sample(url, key, fields)
            if sample is not None:
                self.stats["samples"] += 1
                yield sample

    def __iter__(self) -> Iterator[dict]:
        stream = self._stream()
        if self.shuffle_buffer <= 1:
            yield from stream
            return
        # Bounded-memory shuffle: keep a buffer, emit a random element as each new one arrives.
        consumer, _ = self.consumer()
        rng = np.random.default_rng([self.seed, self.epoch, consumer])
        buf: list[dict] = []
        for sample in stream:
            if len(buf) < self.shuffle_buffer:
                buf.append(sample)
                continue
            i = int(rng.integers(len(buf)))
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)
        yield from buf
