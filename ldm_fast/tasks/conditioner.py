"""The task-level conditioner: a task's parts merged into one object that training calls on
data batches and sampling on user inputs. `build_conditioner(cfg, …)` assembles the parts the
config's Task names (ldm_fast.tasks.registry); `load_conditioner(run_dir, …)` is the sampling
side of a trained run."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ldm_fast.conditioning import FrozenPretrainedTextEncoder, TextTransformer, drop_mask, load_tokenizer, train_tokenizer
from ldm_fast.config import Config
from ldm_fast.tasks.parts import _batch_size, _TextPart
from ldm_fast.tasks.registry import check_task

TOKENIZER_FILE = "tokenizer.json"
log = logging.getLogger(__name__)


def check_inputs(task: str, mode: str, needed, given: dict) -> None:
    """A clear error when sampling inputs are missing or do not belong to the task."""
    extra = [k for k, v in given.items() if v is not None and k not in needed]
    missing = [k for k in needed if given.get(k) is None]
    if extra or missing:
        raise ValueError(f"task {task!r} ({mode or 'unconditional'}) takes the inputs "
                         f"{list(needed) or 'none'}" + (f"; missing {missing}" if missing else "")
                         + (f"; unexpected {extra}" if extra else ""))


def check_negative(task: str, inputs, negative_prompts) -> None:
    if negative_prompts is not None and "prompts" not in inputs:
        raise ValueError(f"task {task!r} takes no prompt, so a negative prompt cannot apply")


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
    inputs → (cond, uncond) (sampling). See ldm_fast.tasks for the API."""

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
                      image=None, mask=None, negative_prompts=None,
                      n: int | None = None) -> tuple[dict, dict | None]:
        """cond and uncond (None when the task has no null condition) for user inputs; a single
        input (batch of 1) is repeated to `n` when n is given. negative_prompts (one per image)
        replace the empty prompt in uncond."""
        given = {"classes": classes, "prompts": prompts, "boxes": boxes, "semantic": semantic,
                 "lr": lr, "image": image, "mask": mask}
        check_inputs(self.task, self.mode, self.inputs, given)
        check_negative(self.task, self.inputs, negative_prompts)
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
                        if not part.guided:
                            uncond.update(out)
                        elif negative_prompts is not None and "prompts" in part.inputs:
                            uncond.update(part.null(target, negative_prompts))
                        else:
                            uncond.update(part.null(target))
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

    def finish(self, images: torch.Tensor, inputs: dict) -> torch.Tensor:
        """Decoded samples → the task's output (inpainting keeps the known pixels)."""
        for part in self.parts:
            finish = getattr(part, "finish", None)
            if finish is not None:
                images = finish(images, inputs)
        return images

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
    resumed = saved is not None and saved.is_file()
    if resumed:
        tokenizer = load_tokenizer(saved)
    elif cc.tokenizer:
        tokenizer = load_tokenizer(cc.tokenizer)
    elif train_captions is not None:
        tokenizer = train_tokenizer(train_captions, cc.vocab_size)
    else:
        raise ValueError("text conditioning needs a tokenizer: set conditioning.tokenizer to a local "
                         "tokenizer.json / vocab.txt, or pass train_captions to train one")
    if saved is not None and not resumed:
        tokenizer.save(saved)
    if train_captions is not None and not resumed:
        _fit_context(cc, tokenizer, train_captions)
    if cc.text_encoder == "ldm_bert":  # a converted LDM text-to-image model's τθ
        from ldm_fast.ldm_bert import LDMBertTextEncoder

        enc = LDMBertTextEncoder(tokenizer, cc.vocab_size, cc.max_length, cc.embed_dim, cc.n_layers, cc.n_heads,
                                 strict)
    else:
        enc = TextTransformer(tokenizer, cc.max_length, cc.embed_dim, cc.n_layers, cc.n_heads, strict)
    return enc, tokenizer, True


def _fit_context(cc, tokenizer, captions) -> None:
    """A τθ trained from scratch on these captions: raise conditioning.max_length to the
    longest caption's token count ([CLS] … [SEP]), so no training caption is cut. Only a new
    run does this (a saved tokenizer means the run's config already holds its length); the
    caller saves the config again."""
    lengths = [len(e.ids) for e in tokenizer.tokenizer.encode_batch([c for c in captions if c])]
    longest = max(lengths, default=0)
    if longest > cc.max_length:
        log.info("text: conditioning.max_length raised from %d to %d tokens, the longest training caption",
                 cc.max_length, longest)
        cc.max_length = longest


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
    """The conditioner of cfg's task (see ldm_fast.tasks). Trainable modules are initialised
    from cfg.seed without touching the global RNG."""
    cc = cfg.conditioning
    task = check_task(cc.task, cc.mode)
    device = _device_of(model, device)
    tokenizer = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)
        parts, concat_ch, context_dim = task.parts(cfg, model, device)
        parts = list(parts)
        if "prompt" in task.sampling_inputs(cc.mode):
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
    cc = cfg.conditioning
    if "prompt" in check_task(cc.task, cc.mode).sampling_inputs(cc.mode) and not cc.pretrained_text_encoder \
            and not (Path(run_dir) / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{Path(run_dir) / TOKENIZER_FILE}: missing; the text conditioner's "
                                "tokenizer is saved there by training")
    cond = build_conditioner(cfg, model, run_dir=run_dir, device=device)
    cond.load_state_dict(cond_state)
    return cond.eval()
