"""The Pipeline's inputs as batches: one user input (a prompt or a list of them, class ids, a
layout or a list of layouts, an image / mask / map as a tensor, array or PIL image) → a batch,
cycled to n images, sliced per sampler batch; and values made JSON for PNG metadata."""

from __future__ import annotations

import numpy as np
import torch



def image_tensor(value, name: str) -> torch.Tensor:
    """PIL / numpy / tensor → float tensor; PIL and uint8 arrays map 0…255 to [-1, 1]."""
    from PIL import Image

    if isinstance(value, Image.Image):
        if name == "mask":
            return (torch.from_numpy(np.asarray(value.convert("L"), dtype=np.float32)) > 127).float()
        if name == "semantic":
            return torch.from_numpy(np.asarray(value, dtype=np.int64))
        from ldm_fast.data.folder import pil_rgb

        # As training reads images: a plain convert("RGB") would drop alpha onto whatever
        # colour transparent pixels store, clip 16-bit greys and ignore EXIF rotation.
        value = np.asarray(pil_rgb(value), dtype=np.float32) / 127.5 - 1
        return torch.from_numpy(value).permute(2, 0, 1)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not torch.is_tensor(value):
        raise ValueError(f"{name}: expected an image tensor, array or PIL image, got {type(value).__name__}")
    return value


def as_batch(name: str, value):
    """One input as a batch: a list (prompts, layouts), a (boxes, labels) tensor pair, or a
    batch-first tensor."""
    if name in ("prompt", "negative_prompt"):
        return [value] if isinstance(value, str) else list(value)
    if name == "class_labels":
        t = torch.as_tensor(value, dtype=torch.long)
        return t.reshape(1) if t.dim() == 0 else t
    if name == "boxes":
        if isinstance(value, tuple) and len(value) == 2 and torch.is_tensor(value[0]):
            return value  # (boxes (B, N, 4), labels (B, N)), as a dataset batch holds them
        value = list(value)
        # A single layout is a list of 5-number boxes; a batch is a list of layouts.
        single = bool(value) and not isinstance(value[0][0], (list, tuple))
        return [value] if single else value
    if isinstance(value, (list, tuple)):
        return torch.stack([image_tensor(v, name) for v in value])
    t = image_tensor(value, name)
    one = {"mask": 3, "semantic": 2}.get(name, 3)  # dims of a single item (mask: (1, H, W))
    if name == "mask" and t.dim() == 2:
        t = t[None]
    return t[None] if t.dim() == one else t


def length(value) -> int:
    """Batch size of an input batch."""
    return len(value[0]) if isinstance(value, tuple) else len(value)


def take(value, index: list[int]):
    """The items `index` of an input batch, in that order."""
    if isinstance(value, tuple):
        return tuple(take(v, index) for v in value)
    if torch.is_tensor(value):
        return value[torch.tensor(index, dtype=torch.long)]
    return [value[i] for i in index]


def cycle(name: str, value, n: int):
    """Fewer inputs than images cycle (2 prompts, n = 6: a b a b a b); more is an error."""
    given = length(value)
    if given == n:
        return value
    if given == 0 or given > n:
        raise ValueError(f"{name}: {given} given for n = {n} images (give at most n; fewer are cycled)")
    return take(value, [i % given for i in range(n)])


def json_value(value):
    """Tensors and tuples as JSON-ready lists."""
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return value
