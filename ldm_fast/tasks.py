"""The paper's tasks in one place: tiny presets, conditioners, dataset wrappers, task metrics.

API for the CLIs (exact signatures):

    TASKS = ("unconditional", "class", "text", "layout", "semantic", "sr", "inpaint")
    MODES[task] -> allowed conditioning.mode values, the first the default

    tiny_task_config(task: str, mode: str | None = None) -> Config
    TASK_PRESETS = {"tiny-<task>": () -> Config}                   for a --preset lookup
    task_dataset(cfg: Config, dataset, seed: int | None = None) -> Dataset
        sr: adds 'lr' (SuperResolutionPairs); inpaint: adds 'mask', 'masked_image'; else as is
    dataset_captions(dataset, limit: int = 2000) -> list[str]       captions to train a tokenizer on
    build_conditioner(cfg, model=None, train_captions=None, *, run_dir=None, device=None,
                      strict: bool = False) -> Conditioner
        model: a LatentDiffusion or the first stage alone (training builds it before train_ldm);
        needed by inpainting (encodes the masked image) and to pick the device; else optional.
        run_dir: the tokenizer is loaded from RUN_DIR/tokenizer.json if there (resume), else
        loaded from conditioning.tokenizer or trained on train_captions, then saved there.
    load_conditioner(run_dir, model: LatentDiffusion, cond_state: dict, device=None) -> Conditioner
        the sampling side: `model, cond_state = run.load_model(run_dir)` then this.
    Conditioner
        __call__(batch: dict, generator) -> cond dict        for train_ldm(conditioner=...)
        .module                                              trainable τθ (nn.Module) or None
        .inputs                                              names encode_inputs needs
        .supports_guidance                                   False for concat-only tasks
        .encode_inputs(*, classes=None, prompts=None, boxes=None, semantic=None, lr=None,
                       image=None, mask=None, n=None) -> (cond, uncond or None)
        .null_cond(batch_size) -> dict                       (no concat part only)
        .latent_size(cond) -> (h, w) or None                 concat tasks fix the latent grid
        .state_dict() / .load_state_dict(state) / .save(run_dir) / .train() / .eval()
    paste_known(samples, image, mask) -> images              inpainting: keep the known pixels
    SRImageGuidance(model, lr, scale=1.0)                    SR: a model wrapper for generate()
                                                             that pulls samples toward the LR input
    evaluate_task(model, conditioner, heldout, n=64, *, guidance=3.0, sampler="ddim", steps=50,
                  seed=0, batch_size=64, net=None, photos=False, sr_guidance=0.0) -> dict
        heldout: the plain procedural held-out set; returns flat {name: number} plus task/mode/n
    box_crops(images, boxes, labels, context=0.5) -> (crops, classes)   layout metric's crops
    real_photos(resolution) -> (N, 3, r, r) or None                   scikit-image photographs

Training (the CLI's order):
    cfg = tiny_task_config("text"); train, held = procedural_split(...)
    train = task_dataset(cfg, train); first_stage = train_autoencoder(...)
    cond = build_conditioner(cfg, first_stage, dataset_captions(train), run_dir=run.path)
    model, ema = train_ldm(cfg, run, first_stage, train, conditioner=cond)
Sampling:
    model, state = load_model(run_dir); cond = load_conditioner(run_dir, model, state)
    c, u = cond.encode_inputs(prompts=["a large red circle on a plain background"], n=16)
    images = generate(model, 16, cond=c, uncond=u, guidance=3.0, latent_size=cond.latent_size(c))

Modes: "crossattn" (τθ(y) as context), "adm" (class ids added to the time embedding; the
UNet's num_classes = conditioning.num_classes + 1 for the null class), "concat", and "hybrid"
(a concat task plus a text prompt cross-attended, e.g. text-guided inpainting). Label dropout
(conditioning.label_dropout) replaces the cross-attention / class condition by its null for
classifier-free guidance; concatenated inputs are never dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate

from ldm_fast.conditioning import (
    ClassEmbedder,
    FrozenPretrainedTextEncoder,
    InpaintingConcat,
    LayoutEncoder,
    SemanticEncoder,
    TextTransformer,
    check_class_ids,
    drop_mask,
    load_tokenizer,
    sr_concat,
    train_tokenizer,
)
from ldm_fast.config import Config, tiny, validate

TASKS = ("unconditional", "class", "text", "layout", "semantic", "sr", "inpaint")
MODES = {
    "unconditional": ("",),
    "class": ("adm", "crossattn"),
    "text": ("crossattn",),
    "layout": ("crossattn",),
    "semantic": ("concat", "hybrid"),
    "sr": ("concat", "hybrid"),
    "inpaint": ("concat", "hybrid"),
}
CONCAT_TASKS = ("semantic", "sr", "inpaint")
TOKENIZER_FILE = "tokenizer.json"


def _check_task(task: str, mode: str) -> None:
    if task not in TASKS:
        raise ValueError(f"conditioning.task: expected one of {TASKS}, got {task!r}")
    if mode not in MODES[task]:
        raise ValueError(f"conditioning.mode: task {task!r} takes {MODES[task]}, got {mode!r}")


# ----------------------------------------------------------------------------- presets

def tiny_task_config(task: str, mode: str | None = None) -> Config:
    """The tiny preset (32² procedural images, KL-f4, 8×8×3 latents) set up for `task`: trains
    on 2 CPU cores in minutes. τθ: 64 wide, 2 layers, 4 heads (context_dim 64)."""
    from ldm_fast.data import procedural

    mode = MODES[task][0] if mode is None and task in MODES else mode
    _check_task(task, mode)
    cfg = tiny()
    cfg.name = f"tiny-{task}" + (f"-{mode}" if mode != MODES[task][0] else "")
    cc, un = cfg.conditioning, cfg.unet
    cc.task, cc.mode = task, mode
    cc.embed_dim, cc.n_layers, cc.n_heads = 64, 2, 4
    z = cfg.autoencoder.z_channels
    if task == "class":
        cc.num_classes = procedural.NUM_CLASSES
        if mode == "adm":
            un.num_classes = cc.num_classes + 1  # + the null class for guidance
    elif task == "layout":
        cc.num_classes, cc.max_length = procedural.NUM_CLASSES, 3 * procedural.MAX_BOXES
    elif task == "semantic":
        cc.num_classes = procedural.NUM_SEG_CLASSES  # background + 30 object classes
        un.in_channels = z + 3  # the paper maps the one-hot map to 3 channels
    elif task == "sr":
        cc.sr_factor, cc.degradation = 4, "bicubic"
        un.in_channels = z + 3  # f = 4, ×4: the LR image is on the latent grid as is
    elif task == "inpaint":
        un.in_channels = 2 * z + 1  # latent + encoded masked image + mask
        cfg.diffusion.loss = "l1"  # the paper's inpainting model
    if task == "text" or mode == "hybrid":
        # Longest procedural caption: 19 words + [CLS]/[SEP] = 21 tokens.
        cc.max_length, cc.vocab_size = 24, 256
    if task in CONCAT_TASKS and mode == "concat":
        cc.label_dropout = 0.0  # nothing to drop: no guidance for concat-only tasks
    if mode in ("crossattn", "hybrid"):
        un.use_spatial_transformer, un.context_dim, un.transformer_depth = True, cc.embed_dim, 1
    return validate(cfg)


TASK_PRESETS = {f"tiny-{t}": (lambda t=t: tiny_task_config(t)) for t in TASKS}


# ----------------------------------------------------------------------------- data

# The annotations each task's conditioner reads from a batch (besides the image).
TASK_FIELDS = {"unconditional": (), "class": ("label",), "text": ("caption",), "layout": ("boxes", "box_labels"),
               "semantic": ("segmentation",), "sr": (), "inpaint": ()}


def task_fields(cfg: Config) -> tuple[str, ...]:
    """Fields a data source must provide for cfg's task (hybrid modes add the caption)."""
    fields = TASK_FIELDS[cfg.conditioning.task]
    return (*fields, "caption") if cfg.conditioning.mode == "hybrid" else fields


def task_dataset(cfg: Config, dataset: Dataset, seed: int | None = None) -> Dataset:
    """The training / evaluation pairs a task needs on top of {'image', ...}. A shard stream
    gets the same pairing as a per-sample transform."""
    from ldm_fast.data.degradations import SuperResolutionPairs
    from ldm_fast.data.masks import InpaintingPairs
    from ldm_fast.data.stream import ShardStream

    cc = cfg.conditioning
    seed = cfg.data.seed if seed is None else seed
    if cc.task == "sr":
        pairs = SuperResolutionPairs(dataset, cc.degradation, cc.sr_factor, seed)
    elif cc.task == "inpaint":
        # Boxes and strokes covering 10–60%: a spread around the 40–50% of the evaluation.
        pairs = InpaintingPairs(dataset, kind="fraction", fraction=(0.1, 0.6), seed=seed)
    else:
        return dataset
    return dataset.with_transform(pairs.add_to) if isinstance(dataset, ShardStream) else pairs


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


# ----------------------------------------------------------------------------- conditioner parts
# A part turns one kind of condition into cond-dict entries; the Conditioner merges parts.

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

    def null(self, batch_size):
        return {"context": self.encoder([""] * batch_size)}


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


class _InpaintPart:
    guided, inputs, name = False, ("image", "mask"), "inpaint"

    def __init__(self, concat: InpaintingConcat):
        self.concat = self.module = concat

    def from_batch(self, batch, drop, task):
        masked = _need(batch, "masked_image", task)
        if torch.isnan(self.concat.latent_scale):
            # First training batch, like the diffusion latents' scale (on the masked images
            # when a latent-cache batch carries no full images).
            self.concat.calibrate(batch.get("image", masked))
        return {"concat": self.concat(masked, _need(batch, "mask", task))}

    def from_inputs(self, inputs):
        from ldm_fast.data.masks import apply_mask

        image, mask = InpaintingConcat.check(inputs["image"], inputs["mask"])
        return {"concat": self.concat(apply_mask(image, mask), mask)}


def check_inputs(task: str, mode: str, needed, given: dict) -> None:
    """A clear error when sampling inputs are missing or do not belong to the task."""
    extra = [k for k, v in given.items() if v is not None and k not in needed]
    missing = [k for k in needed if given.get(k) is None]
    if extra or missing:
        raise ValueError(f"task {task!r} ({mode or 'unconditional'}) takes the inputs "
                         f"{list(needed) or 'none'}" + (f"; missing {missing}" if missing else "")
                         + (f"; unexpected {extra}" if extra else ""))


def repeat_to_batch(outs: list[dict], n: int | None) -> tuple[list[dict], int]:
    """Encoded inputs brought to one batch size: `n` when given, else the largest; a batch of
    1 is repeated, any other mismatch is an error."""
    sizes = {v.shape[0] for out in outs for v in out.values()}
    target = n if n is not None else max(sizes)
    if any(s not in (1, target) for s in sizes):
        raise ValueError(f"inputs give batch sizes {sorted(sizes)}" + (f" for n = {n}" if n is not None else "")
                         + "; they must agree (or be a single input to repeat)")
    return [{k: v.expand(target, *v.shape[1:]).contiguous() for k, v in out.items()} for out in outs], target


class Conditioner:
    """Task-level conditioning: data batch → cond dict (training, with label dropout), user
    inputs → (cond, uncond) (sampling). See the module docstring for the API."""

    def __init__(self, cfg: Config, parts: list, device, tokenizer=None):
        self.cfg, self.parts, self.device, self.tokenizer = cfg, parts, torch.device(device), tokenizer
        self.task, self.mode = cfg.conditioning.task, cfg.conditioning.mode
        self.label_dropout = cfg.conditioning.label_dropout
        self.inputs = tuple(name for p in parts for name in p.inputs)
        self.supports_guidance = any(p.guided for p in parts)
        modules = {p.name: p.module for p in parts if p.module is not None}
        # One module: its own state keys (e.g. `embedding.weight`, the original class embedder's);
        # several (hybrid): one ModuleDict, keys prefixed by the part's name.
        self.module = None if not modules else (next(iter(modules.values())) if len(modules) == 1
                                                else nn.ModuleDict(modules))

    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        if not self.parts:
            return {}
        batch_size = _batch_size(batch)
        drop = drop_mask(batch_size, self.label_dropout if self.supports_guidance else 0.0,
                         generator, self.device)
        cond = {}
        for part in self.parts:
            cond.update(part.from_batch(batch, drop, self.task))
        return cond

    def encode_inputs(self, *, classes=None, prompts=None, boxes=None, semantic=None, lr=None,
                      image=None, mask=None, n: int | None = None) -> tuple[dict, dict | None]:
        """cond and uncond (None when the task has no null condition) for user inputs; a single
        input (batch of 1) is repeated to `n` when n is given."""
        given = {"classes": classes, "prompts": prompts, "boxes": boxes, "semantic": semantic,
                 "lr": lr, "image": image, "mask": mask}
        check_inputs(self.task, self.mode, self.inputs, given)
        if not self.parts:
            return {}, None
        was_training = self.module.training if self.module is not None else False
        self.eval()
        try:
            with torch.no_grad():
                outs, target = repeat_to_batch([part.from_inputs(given) for part in self.parts], n)
                cond = {k: v for out in outs for k, v in out.items()}
                uncond = None
                if self.supports_guidance:
                    # Guidance contrasts the cross-attention / class condition only: the
                    # concatenated inputs are the same in both halves.
                    uncond = {}
                    for part, out in zip(self.parts, outs):
                        uncond.update(part.null(target) if part.guided else out)
        finally:
            if was_training:
                self.train()
        return cond, uncond

    def null_cond(self, batch_size: int) -> dict:
        """The null condition (for guidance) of a task without concatenated inputs."""
        if not self.supports_guidance:
            raise ValueError(f"task {self.task!r} ({self.mode}) has no null condition (no guidance)")
        if any(not p.guided for p in self.parts):
            raise ValueError(f"task {self.task!r} ({self.mode}): the null condition keeps the "
                             "concatenated inputs; use encode_inputs(...)[1]")
        with torch.no_grad():
            out = {}
            for part in self.parts:
                out.update(part.null(batch_size))
        return out

    @staticmethod
    def latent_size(cond: dict | None) -> tuple[int, int] | None:
        """Concat tasks fix the latent grid (and so the output size) by their inputs."""
        return tuple(cond["concat"].shape[-2:]) if cond and "concat" in cond else None

    def state_dict(self) -> dict:
        return dict(self.module.state_dict()) if self.module is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.module is None:
            if state:
                raise ValueError(f"task {self.task!r} has no trainable conditioning, but the state "
                                 f"has {len(state)} tensors (e.g. {next(iter(state))!r})")
            return
        self.module.load_state_dict(state, strict=True)

    def save(self, run_dir) -> Path | None:
        """Write the trained tokenizer as RUN_DIR/tokenizer.json (weights go with the UNet's)."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.save(Path(run_dir) / TOKENIZER_FILE)

    def train(self, mode: bool = True) -> "Conditioner":
        if self.module is not None:
            self.module.train(mode)
        return self

    def eval(self) -> "Conditioner":
        return self.train(False)


# ----------------------------------------------------------------------------- building

def _first_stage_of(model):
    fs = getattr(model, "first_stage", None)
    return fs if fs is not None else model


def _device_of(model, device):
    if device is not None:
        return torch.device(device)
    if model is not None:
        for t in (*model.parameters(), *model.buffers()):
            return t.device
    return torch.device("cpu")


def _build_text_encoder(cfg: Config, train_captions, run_dir, strict: bool):
    cc = cfg.conditioning
    if cc.pretrained_text_encoder:
        from ldm_fast.clip_text import FrozenCLIPTextEncoder, is_clip_dir

        # CLIP (Stable Diffusion v1) attends to every position, pads included, with no mask;
        # BERT-style encoders use their attention mask. Each needs its own wrapper.
        cls = FrozenCLIPTextEncoder if is_clip_dir(cc.pretrained_text_encoder) else FrozenPretrainedTextEncoder
        return cls(cc.pretrained_text_encoder, cc.max_length, strict), None, False
    saved = Path(run_dir) / TOKENIZER_FILE if run_dir is not None else None
    if saved is not None and saved.is_file():
        tokenizer = load_tokenizer(saved)
    elif cc.tokenizer:
        tokenizer = load_tokenizer(cc.tokenizer)
    elif train_captions is not None:
        tokenizer = train_tokenizer(train_captions, cc.vocab_size)
    else:
        raise ValueError("text conditioning needs a tokenizer: set conditioning.tokenizer to a local "
                         "tokenizer.json / vocab.txt, or pass train_captions to train one")
    if saved is not None and not saved.is_file():
        tokenizer.save(saved)
    if cc.text_encoder == "ldm_bert":  # a converted LDM text-to-image model's τθ
        from ldm_fast.ldm_bert import LDMBertTextEncoder

        enc = LDMBertTextEncoder(tokenizer, cc.vocab_size, cc.max_length, cc.embed_dim, cc.n_layers, cc.n_heads,
                                 strict)
    else:
        enc = TextTransformer(tokenizer, cc.max_length, cc.embed_dim, cc.n_layers, cc.n_heads, strict)
    return enc, tokenizer, True


def _check_unet(cfg: Config, concat_channels: int, context_dim: int | None, adm_classes: int) -> None:
    """The UNet config must fit the conditioning; otherwise it would fail deep in a forward."""
    un, z, task = cfg.unet, cfg.unet.out_channels, cfg.conditioning.task
    if un.in_channels != z + concat_channels:
        raise ValueError(f"unet.in_channels = {un.in_channels}, but task {task!r} feeds the {z} latent "
                         f"channels + {concat_channels} concatenated ones (expected {z + concat_channels})")
    if context_dim is not None:
        if not un.use_spatial_transformer or un.context_dim != context_dim:
            raise ValueError(f"task {task!r} cross-attends a context of width {context_dim}: set "
                             f"unet.use_spatial_transformer = true and unet.context_dim = {context_dim} "
                             f"(got {un.use_spatial_transformer}, {un.context_dim})")
    if un.num_classes != adm_classes:
        what = (f"{adm_classes} (conditioning.num_classes + 1 for the null class)" if adm_classes
                else "0 (the class embedding is only used in 'adm' mode)")
        raise ValueError(f"unet.num_classes = {un.num_classes}; task {task!r} in mode "
                         f"{cfg.conditioning.mode!r} needs {what}")


def build_conditioner(cfg: Config, model=None, train_captions=None, *, run_dir=None, device=None,
                      strict: bool = False) -> Conditioner:
    """The conditioner of cfg's task (see the module docstring). Trainable modules are
    initialised from cfg.seed without touching the global RNG."""
    cc = cfg.conditioning
    _check_task(cc.task, cc.mode)
    device = _device_of(model, device)
    factor = cfg.autoencoder.factor
    z = cfg.unet.out_channels
    parts, tokenizer, concat_ch, context_dim = [], None, 0, None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)
        if cc.task == "class":
            embedder = ClassEmbedder(cc.num_classes, cc.embed_dim, cc.null_class) if cc.mode == "crossattn" else None
            context_dim = cc.embed_dim if embedder is not None else None
            parts.append(_ClassPart(cc.num_classes, embedder, device, cc.null_class))
        elif cc.task == "layout":
            parts.append(_LayoutPart(LayoutEncoder(cc.num_classes, cc.max_length, cc.embed_dim,
                                                   cc.n_layers, cc.n_heads, grid=cc.layout_grid), device))
            context_dim = cc.embed_dim
        elif cc.task == "semantic":
            concat_ch = cfg.unet.in_channels - z
            if concat_ch < 1:
                raise ValueError(f"unet.in_channels = {cfg.unet.in_channels}: semantic synthesis needs "
                                 f"channels beyond the {z} latent ones for the mapped map")
            parts.append(_SemanticPart(SemanticEncoder(cc.num_classes, concat_ch, factor)))
        elif cc.task == "sr":
            concat_ch = 3
            parts.append(_SRPart(cc.sr_factor, factor, device))
        elif cc.task == "inpaint":
            if model is None:
                raise ValueError("inpainting conditioning encodes the masked image: pass the model "
                                 "or its first stage")
            concat_ch = z + 1
            known = not (cfg.diffusion.scale_by_std and cfg.autoencoder.kind == "kl")
            parts.append(_InpaintPart(InpaintingConcat(_first_stage_of(model), factor,
                                                       cfg.diffusion.scale_factor if known else None,
                                                       inputs=cc.inpaint_inputs)))
        if cc.task == "text" or cc.mode == "hybrid":
            enc, tokenizer, trainable = _build_text_encoder(cfg, train_captions, run_dir, strict)
            context_dim = enc.embed_dim
            parts.append(_TextPart(enc, trainable))
    _check_unet(cfg, concat_ch, context_dim, cc.num_classes + int(cc.null_class) if cc.mode == "adm" else 0)
    for part in parts:
        for m in (getattr(part, "module", None), getattr(part, "encoder", None)):
            if m is not None:
                m.to(device)
    return Conditioner(cfg, parts, device, tokenizer)


def load_conditioner(run_dir, model, cond_state: dict, device=None) -> Conditioner:
    """The trained conditioner of a run (tokenizer from RUN_DIR/tokenizer.json), in eval mode."""
    cfg = model.cfg
    if (cfg.conditioning.task == "text" or cfg.conditioning.mode == "hybrid") \
            and not cfg.conditioning.pretrained_text_encoder \
            and not (Path(run_dir) / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{Path(run_dir) / TOKENIZER_FILE}: missing; the text conditioner's "
                                "tokenizer is saved there by training")
    cond = build_conditioner(cfg, model, run_dir=run_dir, device=device)
    cond.load_state_dict(cond_state)
    return cond.eval()


# ----------------------------------------------------------------------------- sampling helpers

def paste_known(samples: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inpainting output: generated pixels where mask = 1, the known image elsewhere."""
    image, mask = InpaintingConcat.check(image, mask)
    mask = mask.to(samples.device, samples.dtype)
    return image.to(samples.device, samples.dtype) * (1 - mask) + samples * mask


class SRImageGuidance:
    """Post-hoc image-based guidance for super-resolution (the paper's Sec. 4.4 remark on
    raising PSNR/SSIM): at every step the predicted clean latent is pulled toward agreement
    with the low-resolution input y,  x̂0 ← x̂0 − scale · r · ∇ ½‖↓(D(x̂0)) − y‖²,  with ↓ the
    antialiased bicubic downsampling to y's size, D the decoder, and r = pixels per LR pixel
    (↓ averages about r pixels, so its gradient is ~1/r of the residual: with r, scale 1 is
    about one full correction in pixel space; through a decoder, tune it on held-out PSNR).
    The prediction is returned for that x̂0. The network output is held constant in the
    gradient (only the decoder is differentiated): one decoder forward + backward per step.

    Wraps the model for the samplers: `generate(SRImageGuidance(model, lr, 0.5), …)` works
    because it exposes the model's schedule, first stage and scale. A doubled (CFG) batch of a
    hybrid model is guided with y repeated."""

    def __init__(self, model, lr: torch.Tensor, scale: float = 1.0):
        if scale < 0:
            raise ValueError(f"image guidance scale must be >= 0, got {scale}")
        self.model, self.scale = model, float(scale)
        self.lr = lr if lr.dim() == 4 else lr[None]

    def __getattr__(self, name):  # schedule, first_stage, scale_factor, cfg, factor, decode, …
        return getattr(self.model, name)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        out = self.model(x, t, cond)
        if self.scale == 0:
            return out
        param = self.model.schedule.parameterization
        a = self.model.schedule.gather(self.model.schedule.alphas_cumprod, t.long().cpu(), x)
        sa, s1a = a.sqrt(), (1 - a).sqrt()
        eps = out if param == "eps" else sa * out + s1a * x  # v → ε
        x0 = (x - s1a * eps) / sa
        lr = self.lr.to(x.device, torch.float32)
        if x.shape[0] != lr.shape[0]:
            lr = lr.repeat(x.shape[0] // lr.shape[0], 1, 1, 1)
        with torch.enable_grad():
            z0 = x0.detach().float().requires_grad_(True)
            image = self.model.first_stage.decode(z0 / self.model.scale_factor)
            down = F.interpolate(image, size=lr.shape[-2:], mode="bicubic", antialias=True, align_corners=False)
            (grad,) = torch.autograd.grad(0.5 * (down - lr).pow(2).sum(), z0)
        ratio = image.shape[-2] * image.shape[-1] / (lr.shape[-2] * lr.shape[-1])
        x0 = x0 - self.scale * ratio * grad.to(x0.dtype)
        eps = (x - sa * x0) / s1a
        return eps if param == "eps" else sa * eps - s1a * x0


def _slice(value, start: int, stop: int):
    if isinstance(value, tuple):  # (boxes, labels)
        return tuple(v[start:stop] for v in value)
    return value[start:stop]


def _sample(model, conditioner: Conditioner, inputs: dict, n: int, guidance: float, sampler: str,
            steps: int, seed: int, batch_size: int, image_guidance: float = 0.0) -> torch.Tensor:
    """n samples in batches; `image_guidance` > 0 (SR) wraps the model in SRImageGuidance
    toward each batch's own low-resolution inputs."""
    from ldm_fast.generate import generate

    out = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        part = {k: _slice(v, start, start + m) for k, v in inputs.items()}
        cond, uncond = conditioner.encode_inputs(**part) if inputs else (None, None)
        use_guidance = uncond is not None and guidance != 1.0
        sampling_model = SRImageGuidance(model, part["lr"], image_guidance) if image_guidance > 0 else model
        out.append(generate(sampling_model, m, sampler=sampler, steps=steps, seed=seed + start, cond=cond,
                            uncond=uncond if use_guidance else None,
                            guidance=guidance if use_guidance else 1.0,
                            latent_size=conditioner.latent_size(cond)).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- task metrics

def _take(heldout: Dataset, n: int) -> dict:
    n = min(n, len(heldout))
    if n < 1:
        raise ValueError("evaluation needs at least one held-out item")
    return default_collate([heldout[i] for i in range(n)])


def _prompt_target(prompt: str) -> tuple[int | None, int | None]:
    """(shape, colour) the prompt asks for: its first shape word and first colour word (the
    main object in procedural captions)."""
    from ldm_fast.data import procedural

    words = re.findall(r"[a-z]+", prompt.lower())
    shape = next((procedural.SHAPES.index(w) for w in words if w in procedural.SHAPES), None)
    colour = next((procedural.COLORS.index(w) for w in words if w in procedural.COLORS), None)
    return shape, colour


def box_crops(images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
              context: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Square crops around each box (label ≥ 0), `context` × the box's long side added on each
    side, shifted to stay inside the image, resized to the image size: the object then fills
    about half the crop, as the main object fills a procedural image, which is what the
    classifier was trained on."""
    n, _, h, w = images.shape
    crops, classes = [], []
    for i in range(n):
        for j in range(boxes.shape[1]):
            if labels[i, j] < 0:
                continue
            x0, y0, x1, y1 = (float(v) for v in boxes[i, j])
            side = min(max((x1 - x0) * w, (y1 - y0) * h) * (1 + 2 * context), min(h, w))
            s = max(1, int(round(side)))
            left = int(round(min(max((x0 + x1) / 2 * w - s / 2, 0), w - s)))
            top = int(round(min(max((y0 + y1) / 2 * h - s / 2, 0), h - s)))
            crop = images[i:i + 1, :, top:top + s, left:left + s].float()
            crops.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False,
                                       antialias=s > h))
            classes.append(int(labels[i, j]))
    return torch.cat(crops), torch.tensor(classes, dtype=torch.long)


def real_photos(resolution: int) -> torch.Tensor | None:
    """Real photographs that ship with scikit-image (astronaut, coffee, chelsea, rocket) as
    (N, 3, res, res) in [-1, 1]: each centre square at res, and its four quarters at 2·res
    detail. None when scikit-image is not installed."""
    try:
        from skimage import data
    except ImportError:
        return None
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = torch.from_numpy(np.ascontiguousarray(getattr(data, name)()[..., :3])).permute(2, 0, 1).float()
        side = min(img.shape[-2:])
        top, left = (img.shape[1] - side) // 2, (img.shape[2] - side) // 2
        square = (img[None, :, top:top + side, left:left + side] / 127.5 - 1)
        for scale in (1, 2):
            x = F.interpolate(square, size=(resolution * scale,) * 2, mode="bicubic", antialias=True,
                              align_corners=False).clamp(-1, 1)
            out += [x[..., r:r + resolution, c:c + resolution] for r in range(0, resolution * scale, resolution)
                    for c in range(0, resolution * scale, resolution)]
    return torch.cat(out)


def _metric_unconditional(ctx) -> dict:
    from ldm_fast.metrics import FD_NAME, fd_shapes

    samples = ctx.sample({}, 1.0)
    return {FD_NAME: fd_shapes(ctx.net, samples, ctx.batch["image"])}


def _metric_class(ctx) -> dict:
    from ldm_fast.metrics import classifier_accuracy

    labels = ctx.batch["label"]
    res = {"reference_accuracy": classifier_accuracy(ctx.net, ctx.batch["image"], labels),
           "chance": 1.0 / ctx.conditioner.cfg.conditioning.num_classes}
    for name, g in ctx.guidances():
        res[f"accuracy_{name}"] = classifier_accuracy(ctx.net, ctx.sample({"classes": labels}, g), labels)
    return res


def _metric_text(ctx) -> dict:
    from ldm_fast.metrics import extract

    prompts = list(ctx.batch["caption"])
    targets = [_prompt_target(p) for p in prompts]
    res = {}
    for name, g in ctx.guidances():
        pred = extract(ctx.net, ctx.sample({"prompts": prompts}, g)).probs.argmax(1)
        shape, colour = pred // ctx.net.num_colors, pred % ctx.net.num_colors
        ok_s = [int(s) == t[0] for s, t in zip(shape, targets) if t[0] is not None]
        ok_c = [int(c) == t[1] for c, t in zip(colour, targets) if t[1] is not None]
        ok_b = [int(s) == t[0] and int(c) == t[1] for s, c, t in zip(shape, colour, targets)
                if None not in t]
        res[f"shape_agreement_{name}"] = float(np.mean(ok_s)) if ok_s else float("nan")
        res[f"colour_agreement_{name}"] = float(np.mean(ok_c)) if ok_c else float("nan")
        res[f"agreement_{name}"] = float(np.mean(ok_b)) if ok_b else float("nan")
    return res


def _metric_layout(ctx) -> dict:
    from ldm_fast.metrics import classifier_accuracy

    boxes, labels = ctx.batch["boxes"], ctx.batch["box_labels"]
    ref_crops, classes = box_crops(ctx.batch["image"], boxes, labels)
    res = {"reference_box_accuracy": classifier_accuracy(ctx.net, ref_crops, classes),
           "boxes": len(classes)}
    for name, g in ctx.guidances():
        crops, _ = box_crops(ctx.sample({"boxes": (boxes, labels)}, g), boxes, labels)
        res[f"box_accuracy_{name}"] = classifier_accuracy(ctx.net, crops, classes)
    return res


def _metric_semantic(ctx) -> dict:
    from ldm_fast.metrics import FD_NAME, fd_shapes, segmentation_miou

    maps = ctx.batch["segmentation"]
    samples = ctx.sample({"semantic": maps}, 1.0)
    return {"miou": segmentation_miou(ctx.net, samples, maps),
            "reference_miou": segmentation_miou(ctx.net, ctx.batch["image"], maps),
            FD_NAME: fd_shapes(ctx.net, samples, ctx.batch["image"])}


def _sr_scores(hr, sr, bicubic, prefix: str = "") -> dict:
    from ldm_fast.metrics import psnr, ssim

    res = {f"{prefix}psnr": psnr(sr, hr).mean, f"{prefix}psnr_bicubic": psnr(bicubic, hr).mean}
    if min(hr.shape[-2:]) >= 11:  # SSIM's 11×11 window
        res.update({f"{prefix}ssim": ssim(sr, hr).mean, f"{prefix}ssim_bicubic": ssim(bicubic, hr).mean})
    return res


def _metric_sr(ctx) -> dict:
    from ldm_fast.data.degradations import degrade
    from ldm_fast.metrics import FD_NAME, fd_shapes

    cc = ctx.conditioner.cfg.conditioning

    def run(hr, seed, image_guidance=0.0):
        lr = degrade(hr, cc.degradation, cc.sr_factor, generator=seed)
        bicubic = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
        return ctx.sample({"lr": lr}, 1.0, n=len(hr), image_guidance=image_guidance), bicubic

    hr = ctx.batch["image"]
    sr, bicubic = run(hr, ctx.seed)
    res = _sr_scores(hr, sr, bicubic)
    res.update({FD_NAME: fd_shapes(ctx.net, sr, hr), f"{FD_NAME}_bicubic": fd_shapes(ctx.net, bicubic, hr)})
    if ctx.sr_guidance > 0:  # the same inputs and seeds, pulled toward the LR input
        guided, _ = run(hr, ctx.seed, ctx.sr_guidance)
        scores = _sr_scores(hr, guided, bicubic)
        res.update({f"{k}_image_guided": v for k, v in scores.items() if not k.endswith("_bicubic")})
        res[f"{FD_NAME}_image_guided"] = fd_shapes(ctx.net, guided, hr)
    if ctx.photos:
        photos = real_photos(hr.shape[-1])
        if photos is None:
            res["photo_count"] = 0  # scikit-image is not installed
        else:
            sr_p, bic_p = run(photos, ctx.seed + 1)
            res.update(_sr_scores(photos, sr_p, bic_p, prefix="photo_"))
            res["photo_count"] = len(photos)
    return res


def _metric_inpaint(ctx) -> dict:
    from ldm_fast.data.masks import fraction_mask
    from ldm_fast.metrics import FD_NAME, fd_shapes

    images = ctx.batch["image"]
    h, w = images.shape[-2:]
    rng = np.random.default_rng(ctx.seed)
    masks = torch.stack([fraction_mask(h, w, (0.4, 0.5), generator=rng) for _ in range(len(images))])
    out = paste_known(ctx.sample({"image": images, "mask": masks}, 1.0), images, masks)
    # Baseline: the masked region filled with the mean colour of each image's known pixels.
    known = (images * (1 - masks)).sum((2, 3), keepdim=True) / (1 - masks).sum((2, 3), keepdim=True).clamp_min(1)
    mean_fill = images * (1 - masks) + known * masks

    def l1_inside(x):  # mean |x − original| over masked pixels, in [0, 1] intensity units
        return float(((x - images).abs() * masks).sum() / (3 * masks.sum()).clamp_min(1) / 2)

    return {"l1_masked": l1_inside(out), "l1_masked_mean_fill": l1_inside(mean_fill),
            "masked_fraction": float(masks.mean()), FD_NAME: fd_shapes(ctx.net, out, images),
            # L1 rewards the blurry mean; the Fréchet distance tells plausible fills from it.
            f"{FD_NAME}_mean_fill": fd_shapes(ctx.net, mean_fill, images)}


TASK_METRICS = {
    "unconditional": _metric_unconditional,
    "class": _metric_class,
    "text": _metric_text,
    "layout": _metric_layout,
    "semantic": _metric_semantic,
    "sr": _metric_sr,
    "inpaint": _metric_inpaint,
}


class _EvalContext:
    def __init__(self, model, conditioner, batch, n, guidance, sampler, steps, seed, batch_size, net, photos,
                 sr_guidance=0.0):
        self.model, self.conditioner, self.batch, self.n = model, conditioner, batch, n
        self.guidance, self.sampler, self.steps, self.seed = guidance, sampler, steps, seed
        self.batch_size, self.net, self.photos, self.sr_guidance = batch_size, net, photos, sr_guidance

    def guidances(self):
        """('unguided', 1) — the conditional model alone — and ('guided', g) when g ≠ 1."""
        return [("unguided", 1.0)] + ([("guided", self.guidance)] if self.guidance != 1.0 else [])

    def sample(self, inputs: dict, guidance: float, n: int | None = None,
               image_guidance: float = 0.0) -> torch.Tensor:
        if "prompts" in self.conditioner.inputs and "prompts" not in inputs:
            # Hybrid: the held-out captions go with the concatenated inputs (one per image;
            # cycled over the real photos of the SR figures).
            captions = list(self.batch["caption"])
            inputs = {**inputs, "prompts": (captions * (n or self.n))[:n or self.n]}
        return _sample(self.model, self.conditioner, inputs, n or self.n, guidance, self.sampler,
                       self.steps, self.seed, self.batch_size, image_guidance)


def evaluate_task(model, conditioner: Conditioner, heldout: Dataset, n: int = 64, *, guidance: float = 3.0,
                  sampler: str = "ddim", steps: int = 50, seed: int = 0, batch_size: int = 64,
                  net=None, photos: bool = False, sr_guidance: float = 0.0) -> dict:
    """The task's metric on the first n held-out items (inputs taken from them; heldout must be
    the plain dataset — SR and inpainting degrade/mask it here, reproducibly from `seed`).
    `net`: the ShapesNet (default: `load_shapes_net` at the held-out resolution, trained and
    cached on first use). Class / text / layout report unguided and guided (scale `guidance`)
    figures; `photos` adds SR figures on scikit-image's photographs; `sr_guidance` > 0 adds SR
    figures with post-hoc image guidance (SRImageGuidance) at that scale."""
    from ldm_fast.metrics import load_shapes_net

    task = conditioner.task
    batch = _take(heldout, n)
    if net is None:
        net = load_shapes_net(batch["image"].shape[-1], device="cpu")
    was_training = model.training
    model.eval()
    conditioner.eval()
    try:
        ctx = _EvalContext(model, conditioner, batch, len(batch["image"]), guidance, sampler, steps, seed,
                           batch_size, net, photos, sr_guidance)
        res = TASK_METRICS[task](ctx)
    finally:
        model.train(was_training)
    return {"task": task, "mode": conditioner.mode, "n": ctx.n, "sampler": sampler, "steps": steps,
            "guidance": guidance if conditioner.supports_guidance else 1.0, **res}
