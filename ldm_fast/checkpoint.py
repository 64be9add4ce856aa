"""Checkpoints: safetensors files written atomically and verified by checksum at load.

A checkpoint is one `.safetensors` file holding named tensors (model weights, optimizer
moments, RNG states) and string metadata (config YAML, step, JSON extras). It is written to a
temporary file in the same folder, fsynced, renamed over the target and the folder fsynced, so
a crash leaves either the old or the new file, never half of one. The SHA-256 of the tensor
payload is stored in the metadata and checked on load, so a truncated or corrupted file is
detected; `latest_valid()` then falls back to the previous checkpoint. No pickle is involved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

log = logging.getLogger(__name__)
CHECKSUM_KEY = "ldm_fast.sha256"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: unreadable, truncated or failing its checksum."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Atomically write `tensors` (+ string metadata) to `path` as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta[CHECKSUM_KEY] = _digest(tensors)
    payload = save(tensors, metadata=meta)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path, device: str = "cpu", verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata; raise CheckpointError when the file cannot be trusted."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for truncated/garbled files
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from exc
    if verify:
        expected = meta.get(CHECKSUM_KEY)
        if expected is None:
            raise CheckpointError(f"{path}: no checksum in metadata (not written by ldm_fast?)")
        if _digest(tensors) != expected:
            raise CheckpointError(f"{path}: checksum mismatch, the file is corrupted")
    return tensors, meta


_STEP = re.compile(r"step_(\d+)\.safetensors$")


def checkpoint_path(folder, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.safetensors"


def list_checkpoints(folder) -> list[Path]:
    """Step checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP.search(p.name)]
    return sorted(found, key=lambda p: int(_STEP.search(p.name).group(1)))


def latest_valid(folder, device: str = "cpu"):
    """The newest checkpoint that loads and verifies, as (path, tensors, metadata), or None.
    Corrupt newer files are reported and skipped, never deleted."""
    for path in reversed(list_checkpoints(folder)):
        try:
            tensors, meta = load_checkpoint(path, device)
            return path, tensors, meta
        except CheckpointError as exc:
            log.error("%s — falling back to the previous checkpoint", exc)
    return None


def prune(folder, keep_last: int) -> None:
    for path in list_checkpoints(folder)[:-keep_last]:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- flatteners

def flatten_state(prefix: str, state: dict) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)}


def unflatten_state(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_to_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict, str]:
    """Optimizer state as flat tensors plus a JSON string for the non-tensor parts."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, json.dumps({"param_groups": state["param_groups"], "scalars": scalars})


def optimizer_from_tensors(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict, meta_json: str) -> None:
    extra = json.loads(meta_json)
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            idx, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for name, value in extra["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": extra["param_groups"]})
