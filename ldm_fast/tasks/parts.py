"""Conditioner parts: each turns one kind of condition into cond-dict entries — from a data
batch (training, with label dropout), from user inputs (sampling), and as its null condition
(guidance). A task's conditioner is the list of its parts (ldm_fast.tasks.conditioner)."""

from __future__ import annotations

import torch

from ldm_fast.conditioning import (
    ClassEmbedder,
    InpaintingConcat,
    LayoutEncoder,
    SemanticEncoder,
    check_class_ids,
    sr_concat,
)


def first_stage_of(model):
    """The first stage of a LatentDiffusion, or the first stage itself (training builds the
    conditioner before the LatentDiffusion exists)."""
    fs = getattr(model, "first_stage", None)
    return fs if fs is not None else model


def _image_size(batch: dict, factor: int) -> tuple[int, int] | None:
    """The target image size of a batch: from 'image', or from 'latent' (a latent-cache batch)."""
    if "image" in batch:
        return tuple(batch["image"].shape[-2:])
    if "latent" in batch:
        return tuple(s * factor for s in batch["latent"].shape[-2:])
    return None


def _batch_size(batch: dict) -> int:
    for key in ("image", "latent"):
        if key in batch:
            return len(batch[key])
    for value in batch.values():
        if torch.is_tensor(value) or isinstance(value, (list, tuple)):
            return len(value)
    raise ValueError("empty batch")


def _need(batch: dict, key: str, task: str):
    if key not in batch:
        hint = " (wrap the dataset with tasks.task_dataset)" if key in ("lr", "mask", "masked_image") else ""
        raise ValueError(f"task {task!r}: the batch has no {key!r}{hint}")
    return batch[key]


class _ClassPart:
    guided, inputs = True, ("classes",)

    def __init__(self, num_classes: int, embedder: ClassEmbedder | None, device, null_class: bool = True):
        self.num_classes, self.embedder, self.device = num_classes, embedder, device
        self.module = embedder  # None in adm mode: the UNet's label_emb is the embedding
        self.name = "class"
        self.guided = null_class  # no null class (cin256 v1): no guidance, no label dropout

    def _out(self, labels):
        labels = labels.to(self.device)
        return {"context": self.embedder(labels)} if self.embedder is not None else {"class_labels": labels}

    def from_batch(self, batch, drop, task):
        labels = check_class_ids(_need(batch, "label", task), self.num_classes, allow_null=False)
        return self._out(torch.where(drop.cpu(), self.num_classes, labels))

    def from_inputs(self, inputs):
        return self._out(check_class_ids(inputs["classes"], self.num_classes, allow_null=False))

    def null(self, batch_size):
        return self._out(torch.full((batch_size,), self.num_classes, dtype=torch.long))


class _TextPart:
    guided, inputs, name = True, ("prompts",), "text"

    def __init__(self, encoder, trainable: bool):
        self.encoder = encoder
        self.module = encoder if trainable else None

    def from_batch(self, batch, drop, task):
        captions = list(_need(batch, "caption", task))
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]  # "" = null prompt
        return {"context": self.encoder(captions)}

    def from_inputs(self, inputs):
        prompts = inputs["prompts"]
        return {"context": self.encoder([prompts] if isinstance(prompts, str) else list(prompts))}

    def null(self, batch_size, negative=None):
        """The null condition: the empty prompt, or the user's negative prompts."""
        return {"context": self.encoder(list(negative) if negative is not None else [""] * batch_size)}


class _LayoutPart:
    guided, inputs, name = True, ("boxes",), "layout"

    def __init__(self, encoder: LayoutEncoder, device):
        self.encoder, self.module, self.device = encoder, encoder, device

    def from_batch(self, batch, drop, task):
        tokens = self.encoder.tokenize(_need(batch, "boxes", task), _need(batch, "box_labels", task))
        tokens[drop.cpu()] = self.encoder.pad_id  # the empty layout
        return {"context": self.encoder(tokens.to(self.device))}

    def from_inputs(self, inputs):
        boxes = inputs["boxes"]
        if isinstance(boxes, tuple) and len(boxes) == 2 and torch.is_tensor(boxes[0]):
            tokens = self.encoder.tokenize(*boxes)  # (boxes (B, N, 4), labels (B, N))
        else:
            tokens = self.encoder.tokenize_lists(boxes)
        return {"context": self.encoder(tokens.to(self.device))}

    def null(self, batch_size):
        return {"context": self.encoder(self.encoder.null_tokens(batch_size).to(self.device))}


class _SemanticPart:
    guided, inputs, name = False, ("semantic",), "semantic"

    def __init__(self, encoder: SemanticEncoder):
        self.encoder = self.module = encoder

    def from_batch(self, batch, drop, task):
        size = _image_size(batch, self.encoder.factor)
        return {"concat": self.encoder(_need(batch, "segmentation", task), image_size=size)}

    def from_inputs(self, inputs):
        return {"concat": self.encoder(inputs["semantic"])}


class _SRPart:
    guided, inputs, name, module = False, ("lr",), "sr", None

    def __init__(self, sr_factor: int, factor: int, device):
        self.sr_factor, self.factor, self.device = sr_factor, factor, device

    def from_batch(self, batch, drop, task):
        size = _image_size(batch, self.factor)
        return {"concat": sr_concat(_need(batch, "lr", task), self.sr_factor, self.factor, size).to(self.device)}

    def from_inputs(self, inputs):
        return {"concat": sr_concat(inputs["lr"], self.sr_factor, self.factor).to(self.device)}


@torch.no_grad()
def calibrate_over_ranks(concat: InpaintingConcat, images: torch.Tensor) -> float:
    """The inpainting latent scale 1/std of the encoded images, the std taken over the global
    batch (ldm_fast.distributed.global_std) as the diffusion latents' scale is, so every rank
    conditions on the same scale."""
    from ldm_fast import distributed

    z = concat.first_stage.encode_latent(images.to(concat.latent_scale.device), sample=False)
    concat.latent_scale.fill_(1.0 / max(distributed.global_std(z), 1e-8))
    return float(concat.latent_scale)


class _InpaintPart:
    guided, inputs, name = False, ("image", "mask"), "inpaint"

    def __init__(self, concat: InpaintingConcat):
        self.concat = self.module = concat

    def from_batch(self, batch, drop, task):
        masked = _need(batch, "masked_image", task)
        if torch.isnan(self.concat.latent_scale):
            # First training batch, like the diffusion latents' scale (on the masked images
            # when a latent-cache batch carries no full images).
            calibrate_over_ranks(self.concat, batch.get("image", masked))
        return {"concat": self.concat(masked, _need(batch, "mask", task))}

    def from_inputs(self, inputs):
        from ldm_fast.data.masks import apply_mask

        image, mask = InpaintingConcat.check(inputs["image"], inputs["mask"])
        return {"concat": self.concat(apply_mask(image, mask), mask)}

    def finish(self, images, inputs):
        n = len(images)
        return paste_known(images, inputs["image"].expand(n, -1, -1, -1), inputs["mask"].expand(n, -1, -1, -1))


def paste_known(samples: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inpainting output: generated pixels where mask = 1, the known image elsewhere."""
    image, mask = InpaintingConcat.check(image, mask)
    mask = mask.to(samples.device, samples.dtype)
    return image.to(samples.device, samples.dtype) * (1 - mask) + samples * mask
