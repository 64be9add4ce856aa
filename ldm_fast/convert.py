"""`python -m ldm_fast.convert`: original latent-diffusion / Stable Diffusion v1 checkpoints → a run dir.

    python -m ldm_fast.convert --ckpt model.ckpt --config original.yaml --out runs/celebahq
    python -m ldm_fast.convert --ckpt sd-v1-5.safetensors --config v1-inference.yaml \
        --clip ~/models/clip-vit-large-patch14 --out runs/sd15 --ema
    python -m ldm_fast.convert --ckpt stable-diffusion-v1-5/ --out runs/sd15      # a diffusers folder
    python -m ldm_fast.convert --to-diffusers --ckpt runs/sd15 --out sd15-diffusers/

Reads `.safetensors`, or a `.ckpt` through `torch.load(weights_only=True)` (nothing in the file
is executed; see `load_original`), parses the ORIGINAL YAML (read as plain dicts; nothing of
the original code is imported) into our `Config`, maps every tensor through the rule table of
`convert_rules.py`, checks the diffusion-schedule buffers against our schedule, and writes an
ordinary run directory (config.yaml, autoencoder.safetensors, ldm.safetensors) that
`ldm_fast.sample`, `export` and the benchmarks load like a model trained here.

Strict by default: every source tensor is used (or named as bookkeeping in the rule table) and
every parameter of our model is filled, else the error lists the missing, unexpected and
mis-shaped keys. `--no-strict` only lets unexpected source tensors be left out (listed); a
model with unfilled parameters is never written.

A diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; or
the LDM text-to-image pipeline's unet/, vqvae/, bert/, tokenizer/) is read through
`diffusers_folder.py`: its configs become an original-layout config and its
tensors get the original names, so it goes through the same rules and checks.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ldm_fast import checkpoint as ckpt
from ldm_fast import convert_rules as rules
from ldm_fast.tasks.kinds.class_labels import IMAGENET_WITH_NULL
from ldm_fast.tasks.registry import task_of
from ldm_fast.config import (AutoencoderConfig, Config, ConditioningConfig, DataConfig, DiffusionConfig,
                             UNetConfig, get_preset, save_yaml, to_dict, validate)


class ConvertError(ValueError):
    """A checkpoint or config that cannot be converted faithfully; the message says why."""


# ----------------------------------------------------------------------------- reading checkpoints

# Globals that Lightning checkpoints pickle next to the weights (callback state keyed by the
# callback's class, numpy scalars in monitor scores). They are replaced by inert stand-ins that
# run no code of theirs; whatever they decode to is discarded, only 'state_dict' is read.
BOOKKEEPING_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
)


class _Inert:
    """Stand-in for a bookkeeping global: accepts any construction and state, does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _stand_in(name: str):
    # A fresh subclass per name so each stand-in is its own allow-listed global.
    return type(name.rsplit(".", 1)[-1], (_Inert,), {})


def load_original(path) -> dict[str, torch.Tensor]:
    """The flat tensor dict of an original checkpoint; a nested 'state_dict' is unwrapped.

    `.ckpt`/`.pt`/`.pth` files are pickles: they are read with torch.load(weights_only=True),
    which builds tensors and plain containers only. A file that needs anything else (a class
    of the training code, an argparse.Namespace of hyperparameters, …) is refused — except the
    Lightning bookkeeping named in BOOKKEEPING_GLOBALS, decoded to inert stand-ins."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        data = load_file(str(path))
    else:
        data = _torch_load_weights_only(path)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data:
        raise ConvertError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(data).__name__}")
    bad = [k for k, v in data.items() if not torch.is_tensor(v)]
    if bad:
        raise ConvertError(f"{path}: state dict entries that are not tensors: {bad[:5]}")
    return data


def _torch_load_weights_only(path: Path):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_error = exc
    unsafe = _unsafe_globals(path)
    if unsafe is None or not unsafe or any(g not in BOOKKEEPING_GLOBALS for g in unsafe):
        others = [g for g in (unsafe or []) if g not in BOOKKEEPING_GLOBALS]
        raise ConvertError(
            f"{path}: refused — unpickling it needs more than tensors and plain containers "
            f"({', '.join(others) if others else first_error}). Loading it anyway would execute "
            "code named by the file. If you trust the file, re-save its weights once, e.g. "
            "`sd = torch.load(f, weights_only=False); sd = sd.get('state_dict', sd); "
            "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')`, "
            "and convert the .safetensors file.") from first_error
    try:
        with torch.serialization.safe_globals([(_stand_in(g), g) for g in unsafe]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except (TypeError, AttributeError, pickle.UnpicklingError) as exc:  # torch without named stand-ins
        raise ConvertError(f"{path}: refused — it pickles {', '.join(unsafe)} (Lightning bookkeeping), which "
                           f"this torch {torch.__version__} cannot skip safely ({exc}); re-save its state_dict "
                           "as .safetensors once, or use torch >= 2.6") from exc


def _unsafe_globals(path: Path) -> list[str] | None:
    """The globals a pickle checkpoint names beyond weights_only's allow-list (torch >= 2.5)."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return None
    try:
        return list(finder(str(path)))
    except Exception:  # not a zip checkpoint (legacy format): no way to inspect without running it
        return None


# ----------------------------------------------------------------------------- original YAML → Config

def _target(node) -> str:
    """The class name of a `target:` entry ("ldm.models.autoencoder.VQModelInterface" → the last
    component); the special strings (__is_unconditional__, __is_first_stage__) pass through."""
    if isinstance(node, str):
        return node
    if not isinstance(node, dict) or "target" not in node:
        raise ConvertError(f"expected a mapping with a 'target', got {node!r}")
    return str(node["target"]).rsplit(".", 1)[-1]


def _refuse_if(condition: bool, message: str) -> None:
    if condition:
        raise ConvertError(f"original config: {message}")


def _first_stage_from_original(node) -> AutoencoderConfig:
    target = _target(node)
    params = node.get("params", {}) or {}
    dd = params.get("ddconfig") or {}
    if target == "AutoencoderKL":
        kind = "kl"
        _refuse_if(not dd.get("double_z", True), "an AutoencoderKL with double_z: false has no variance output")
    elif target in ("VQModel", "VQModelInterface"):
        kind = "vq"
        _refuse_if(params.get("remap") is not None, "VQ index remapping (remap) is not supported")
    else:
        raise ConvertError(f"original config: first stage {target!r} is not supported "
                           "(AutoencoderKL, VQModel, VQModelInterface are)")
    z = int(dd.get("z_channels", 3))
    _refuse_if(int(params.get("embed_dim", z)) != z,
               f"first stage embed_dim {params.get('embed_dim')} differs from z_channels {z}; ldm_fast's "
               "quant_conv keeps the latent width (every released first stage does too)")
    _refuse_if(int(dd.get("out_ch", dd.get("in_channels", 3))) != int(dd.get("in_channels", 3)),
               "a first stage whose decoder output differs from its input channels")
    _refuse_if(bool(dd.get("give_pre_end")) or bool(dd.get("tanh_out")), "give_pre_end / tanh_out decoders")
    attn_type = dd.get("attn_type", "vanilla")
    _refuse_if(attn_type not in ("vanilla", "none"), f"first-stage attention type {attn_type!r}")
    no_attention = attn_type == "none"  # the original swaps every attention block for an Identity
    return AutoencoderConfig(
        kind=kind, in_channels=int(dd.get("in_channels", 3)), base_channels=int(dd["ch"]),
        channel_mult=tuple(int(m) for m in dd["ch_mult"]), num_res_blocks=int(dd["num_res_blocks"]),
        attn_resolutions=() if no_attention else tuple(int(r) for r in dd.get("attn_resolutions", ())),
        mid_attention=not no_attention, z_channels=z, n_embed=int(params.get("n_embed", 8192)),
        resolution=int(dd.get("resolution", 256)), dropout=float(dd.get("dropout", 0.0)),
        groups=32)  # the original Normalize() is GroupNorm(32 groups, eps 1e-6)


def _unet_from_original(p: dict, notes: list[str]) -> UNetConfig:
    mult = tuple(int(m) for m in p.get("channel_mult", (1, 2, 4, 8)))
    for key, bad in (("use_new_attention_order", True), ("use_linear_in_transformer", True),
                     ("conv_resample", False), ("n_embed", "*"), ("disable_self_attentions", "*"),
                     ("num_attention_blocks", "*"), ("adm_in_channels", "*")):
        if key in p and p[key] is not None and (bad == "*" or p[key] == bad):
            raise ConvertError(f"original config: unet {key}: {p[key]!r} is not supported by ldm_fast's UNet")
    _refuse_if(int(p.get("dims", 2)) != 2, "only 2-D UNets")
    heads, head_ch = int(p.get("num_heads", -1)), int(p.get("num_head_channels", -1))
    _refuse_if(int(p.get("num_heads_upsample", -1)) not in (-1, heads),
               "num_heads_upsample different from num_heads")
    context = p.get("context_dim")
    _refuse_if(isinstance(context, (list, tuple)), "a per-level context_dim list")
    num_classes = p.get("num_classes")
    _refuse_if(num_classes is not None and not isinstance(num_classes, int), f"num_classes {num_classes!r}")
    # The original silently skips attention factors its UNet never reaches (the released SR
    # and semantic configs list some); validate() would reject them, so they are dropped here.
    levels = {2 ** i for i in range(len(mult))}
    listed = tuple(int(r) for r in p.get("attention_resolutions", ()))
    kept = tuple(r for r in listed if r in levels)
    if kept != listed:
        notes.append(f"unet attention_resolutions {list(listed)}: {sorted(set(listed) - set(kept))} never "
                     f"occur in a {len(mult)}-level UNet (as in the original, no attention there)")
    return UNetConfig(
        in_channels=int(p["in_channels"]), out_channels=int(p["out_channels"]),
        model_channels=int(p["model_channels"]), channel_mult=mult, num_res_blocks=int(p["num_res_blocks"]),
        attention_resolutions=kept, num_heads=heads, num_head_channels=head_ch,
        transformer_depth=int(p.get("transformer_depth", 1)), context_dim=int(context or 0),
        use_spatial_transformer=bool(p.get("use_spatial_transformer", False)),
        use_scale_shift_norm=bool(p.get("use_scale_shift_norm", False)),
        resblock_updown=bool(p.get("resblock_updown", False)), num_classes=int(num_classes or 0),
        dropout=float(p.get("dropout", 0.0)), groups=32)  # original normalization(): GroupNorm32


def _conditioning_from_original(params: dict, unet: UNetConfig, ae: AutoencoderConfig,
                                clip_dir: str | None, notes: list[str]) -> ConditioningConfig:
    node = params.get("cond_stage_config")
    target = _target(node) if node is not None else "__is_unconditional__"
    cparams = (node.get("params") or {}) if isinstance(node, dict) else {}
    key = params.get("conditioning_key")
    if key is None:  # the original's default: concat_mode (True) decides
        key = "concat" if params.get("concat_mode", True) else "crossattn"
    cond_key = str(params.get("cond_stage_key", ""))
    if target == "__is_unconditional__":
        return ConditioningConfig(task="unconditional", mode="")
    _refuse_if(key not in ("crossattn", "concat", "hybrid", "adm"), f"conditioning_key {key!r}")
    if target == "ClassEmbedder":
        # The class count and the null row are settled from the checkpoint's table by
        # the class task's original_state (the YAML's n_classes defaults to 1000 in the original code).
        n = int(cparams.get("n_classes", 1000))
        null = n == IMAGENET_WITH_NULL  # until the checkpoint's table says otherwise
        notes.append(f"class embedder: n_classes {n} = {n - int(null)} classes"
                     + (" + the null class (last row)" if null else ", no null class") + " (checked against the "
                     "checkpoint's table)")
        return ConditioningConfig(task="class", mode=key, num_classes=n - int(null), null_class=null,
                                  embed_dim=int(cparams.get("embed_dim", unet.context_dim or 512)), label_dropout=0.0)
    if target == "FrozenCLIPEmbedder":
        # The CLIP directory is filled in by convert() once the weights are placed.
        return ConditioningConfig(task="text", mode=key, embed_dim=unet.context_dim or 768,
                                  max_length=int(cparams.get("max_length", 77)),
                                  pretrained_text_encoder=str(Path(clip_dir).resolve()) if clip_dir else "",
                                  label_dropout=0.0)
    if target == "BERTEmbedder":
        layout = "bbox" in cond_key or "object" in cond_key or not cparams.get("use_tokenizer", True)
        if layout:
            notes.append("cond stage BERTEmbedder on layout tokens has no ldm_fast counterpart: its weights "
                         "are not converted (needs --no-strict); the run gets the UNet and first stage")
        else:  # the text-to-image model: ldm_bert.py is its transformer, BERT's WordPiece its tokenizer
            notes.append("text encoder: the original BERTEmbedder (ldm_bert.py), tokenised with --tokenizer")
        _refuse_if(not layout and float(cparams.get("embedding_dropout", 0.0)) != 0.0,
                   "BERTEmbedder embedding_dropout (training only) other than 0 is not supported")
        return ConditioningConfig(task="layout" if layout else "text", mode=key,
                                  embed_dim=int(cparams.get("n_embed", unet.context_dim or 512)),
                                  n_layers=int(cparams.get("n_layer", 2)), n_heads=8,  # x-transformers' default
                                  max_length=int(cparams.get("max_seq_len", 77)),
                                  vocab_size=int(cparams.get("vocab_size", 30522)), label_dropout=0.0,
                                  text_encoder="native" if layout else "ldm_bert")
    if target == "Identity" and key == "concat":
        return ConditioningConfig(task="sr", mode="concat", sr_factor=ae.factor, degradation="bsr")
    if target == "SpatialRescaler":
        _refuse_if(cparams.get("method", "bilinear") != "bilinear" or float(cparams.get("multiplier", 0.5)) != 0.5
                   or 2 ** int(cparams.get("n_stages", 1)) != ae.factor,
                   "a SpatialRescaler other than bilinear halving down to the latent grid")
        return ConditioningConfig(task="semantic", mode="concat", num_classes=int(cparams["in_channels"]))
    if target == "__is_first_stage__":
        # The original feeds holes at −1 and a ±1 mask resized by nearest (scripts/inpaint.py).
        return ConditioningConfig(task="inpaint", mode="concat", inpaint_inputs="original")
    raise ConvertError(f"original config: cond stage {target!r} (conditioning_key {key}) is not supported")


# The original DDIM/PLMS samplers' timestep grid (make_ddim_timesteps "uniform": c·k + 1, one
# extra step when the step count does not divide T) and last step (to alphas_cumprod[0]): a
# converted checkpoint samples as its original scripts did unless the user asks otherwise.
ORIGINAL_SAMPLING = {"timestep_spacing": "uniform", "steps_offset": 1, "set_alpha_to_one": False}


def config_from_original(raw: dict, clip_dir: str | None = None, image_size: int | None = None,
                         name: str = "converted") -> tuple[Config, list[str]]:
    """Our Config for an original latent-diffusion / SD v1 YAML (already parsed to dicts), and
    notes on what was interpreted. Raises ConvertError for anything ldm_fast cannot reproduce."""
    try:
        model = raw["model"]
        params = model["params"]
        unet_node = params["unet_config"]
    except (KeyError, TypeError) as exc:
        raise ConvertError(f"original config: expected model.params.unet_config ({exc!r} missing)") from exc
    notes: list[str] = []
    _refuse_if(_target(model) != "LatentDiffusion",
               f"model {_target(model)!r}: only LatentDiffusion (latent-diffusion, SD v1) is supported")
    _refuse_if(_target(unet_node) != "UNetModel", f"unet {_target(unet_node)!r}: expected openaimodel.UNetModel")
    ae = _first_stage_from_original(params["first_stage_config"])
    unet = _unet_from_original(unet_node.get("params") or {}, notes)
    cond = _conditioning_from_original(params, unet, ae, clip_dir, notes)
    schedule = params.get("beta_schedule", "linear")
    _refuse_if(schedule not in ("linear", "cosine"), f"beta_schedule {schedule!r} (ldm_fast has linear, cosine)")
    _refuse_if(params.get("given_betas") is not None, "given_betas")
    param = params.get("parameterization", "eps")
    _refuse_if(param not in ("eps", "v"), f"parameterization {param!r} (ldm_fast has eps, v)")
    loss = params.get("loss_type", "l2")
    latent = int(image_size if image_size is not None else params.get("image_size", ae.resolution // ae.factor))
    diffusion = DiffusionConfig(
        timesteps=int(params.get("timesteps", 1000)), schedule=schedule,
        # the original DDPM defaults, used when a config leaves them out
        linear_start=float(params.get("linear_start", 1e-4)), linear_end=float(params.get("linear_end", 2e-2)),
        parameterization=param, loss=loss if loss in ("l1", "l2") else "l2",
        # The scale is known (the YAML's, or the checkpoint's buffer when scale_by_std): a
        # fine-tune of the converted run must keep it rather than re-measure it.
        scale_by_std=False, scale_factor=float(params.get("scale_factor", 1.0)), **ORIGINAL_SAMPLING)
    cfg = Config(name=name, autoencoder=ae, unet=unet, conditioning=cond, diffusion=diffusion,
                 data=DataConfig(resolution=latent * ae.factor))
    if bool(params.get("scale_by_std", False)):
        notes.append("scale_by_std: the scale factor is read from the checkpoint's buffer")
    try:
        validate(cfg)
    except ValueError as exc:
        raise ConvertError(f"original config maps to an invalid ldm_fast config: {exc}") from exc
    return cfg, notes


def preset_config(preset: str, image_size: int | None = None, clip_dir: str | None = None) -> Config:
    """An ldm_fast preset describing an original checkpoint's architecture, set up as that
    checkpoint was trained and sampled: its fixed scale, the original's timestep grid and, for
    inpainting, the original's input convention."""
    cfg = get_preset(preset)
    if image_size is not None:
        cfg.data.resolution = image_size * cfg.autoencoder.factor
    cfg.diffusion.scale_by_std = False
    for key, value in ORIGINAL_SAMPLING.items():
        setattr(cfg.diffusion, key, value)
    task_of(cfg).original_config(cfg)
    if clip_dir:
        cfg.conditioning.pretrained_text_encoder = str(Path(clip_dir).resolve())
    return cfg


def load_original_config(path, clip_dir=None, image_size=None) -> tuple[Config, list[str]]:
    raw = yaml.safe_load(Path(path).read_text())
    return config_from_original(raw, clip_dir=clip_dir, image_size=image_size, name=Path(path).stem)


# ----------------------------------------------------------------------------- the target model

def build_cond_module(cfg: Config, first_stage):
    """Our conditioning module whose state goes to the run's `cond.*` tensors, or None
    (unconditional, SR concat, a frozen text encoder kept in its own directory, or a τθ that is
    not ours): the task's own choice (ldm_fast.tasks, Task.cond_module)."""
    return task_of(cfg).cond_module(cfg, first_stage)


def _fills(cfg: Config) -> dict[str, tuple[torch.Tensor | None, str]]:
    """Values for our tensors without an original counterpart (reasons: rules.FILLS); None = zeros."""
    scale = float(cfg.diffusion.scale_factor)
    values = {"scale_factor": torch.tensor(scale), "first_stage.logvar": torch.tensor(0.0), "cond.mapping.bias": None,
              # the original encodes the masked image with cond_stage_model.encode: unscaled
              "cond.latent_scale": torch.tensor(1.0 if cfg.conditioning.inpaint_inputs == "original" else scale)}
    # (separate tensors above: safetensors refuses shared ones)
    return {k: (values[k], reason) for k, reason in rules.FILLS.items()}


# ----------------------------------------------------------------------------- mapping

CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD v1's FrozenCLIPEmbedder tensors


@dataclass
class Mapping:
    """The outcome of mapping an original state dict onto our names (every source key lands in
    exactly one of used / superseded / ignored / schedule / duplicates / unexpected)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # ours → tensor
    used: dict[str, str] = field(default_factory=dict)              # original → ours
    superseded: list[str] = field(default_factory=list)             # the EMA / raw copy not chosen
    ignored: dict[str, str] = field(default_factory=dict)           # original → reason
    schedule: list[str] = field(default_factory=list)               # checked against our schedule
    duplicates: list[str] = field(default_factory=list)             # cond stage = first stage copies
    filled: dict[str, str] = field(default_factory=dict)            # ours → reason
    missing: list[str] = field(default_factory=list)                # ours with no source
    unexpected: list[str] = field(default_factory=list)             # original with no target
    mismatched: list[tuple[str, str, tuple, tuple]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.used)} tensors mapped, {len(self.filled)} filled, {len(self.superseded)} "
                f"superseded, {len(self.ignored)} ignored, {len(self.schedule)} schedule buffers checked, "
                f"{len(self.duplicates)} duplicates checked, {len(self.unexpected)} unexpected")

    def problems(self, strict: bool = True) -> str | None:
        lines = []
        if self.missing:
            lines.append(_listing("missing (our parameters with no source tensor)", self.missing,
                                  lambda k: _original_hint(k)))
        if self.unexpected and strict:
            lines.append(_listing("unexpected (source tensors no rule maps onto our model)", self.unexpected,
                                  lambda k: rules.rule_of(k)))
            if any(k.startswith(CLIP_PREFIX) for k in self.unexpected):
                lines.append("hint: these are SD v1's CLIP text encoder; pass --clip DIR (a local transformers "
                             "CLIP checkpoint: config, tokenizer, weights) to convert it")
        if self.mismatched:
            lines.append(_listing("mis-shaped (source → ours)", [
                f"{o} {list(so)} → {u} {list(su)}" for o, u, so, su in self.mismatched], None))
        return "\n".join(lines) or None


def _original_hint(ours: str) -> str:
    try:
        return f"expected {rules.to_original(ours)}"
    except KeyError:
        return "no rule"


def _listing(title: str, keys: list[str], annotate, limit: int = 40) -> str:
    shown = [f"  {k}" + (f"  ({annotate(k)})" if annotate else "") for k in keys[:limit]]
    more = [f"  … and {len(keys) - limit} more"] if len(keys) > limit else []
    return "\n".join([f"{title}: {len(keys)}", *shown, *more])


def map_state_dict(src: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], ema: bool = False,
                   cond_is_first_stage: bool = False,
                   fills: dict[str, tuple[torch.Tensor | None, str]] | None = None) -> Mapping:
    """Map an original state dict onto `targets` (our name → a tensor giving shape and dtype).
    Nothing is raised here; `Mapping.problems()` reports what did not fit."""
    m = Mapping()
    ema_table = rules.ema_lookup(k for k in targets if k.startswith(rules.EMA_RULE.ours))
    if ema and not any(rules.is_ema_name(k) for k in src):
        raise ConvertError("--ema: the checkpoint holds no model_ema.* weights (it was saved without EMA, "
                           "or pruned to the EMA weights already under model.diffusion_model.*)")
    unet_prefix = rules.to_original("unet.")

    def assign(name: str, ours: str | None, tensor: torch.Tensor) -> None:
        if ours is None or ours not in targets:
            m.unexpected.append(name)
            return
        want = targets[ours]
        if tuple(tensor.shape) != tuple(want.shape):
            m.mismatched.append((name, ours, tuple(tensor.shape), tuple(want.shape)))
            return
        m.tensors[ours] = tensor.to(want.dtype) if tensor.is_floating_point() else tensor
        m.used[name] = ours

    for name, tensor in src.items():
        if name in rules.IGNORED:
            m.ignored[name] = rules.IGNORED[name]
        elif name in rules.SCHEDULE:
            m.schedule.append(name)
        elif rules.is_ema_name(name):
            if ema:
                assign(name, ema_table.get(name), tensor)
            else:
                m.superseded.append(name)
        elif ema and name.startswith(unet_prefix):
            m.superseded.append(name)
        elif cond_is_first_stage and name.startswith("cond_stage_model."):
            # `__is_first_stage__`: the original registers the first stage twice, so its
            # weights appear under both prefixes; the copies must agree.
            twin = "first_stage_model." + name[len("cond_stage_model."):]
            if twin in src and torch.equal(src[twin], tensor):
                m.duplicates.append(name)
            else:
                m.unexpected.append(name)
        else:
            assign(name, rules.to_ours(name), tensor)

    for ours, spec in targets.items():
        if ours in m.tensors:
            continue
        if fills and ours in fills:
            value, reason = fills[ours]
            m.tensors[ours] = (torch.zeros_like(spec, device="cpu") if value is None else value).to(spec.dtype)
            m.filled[ours] = reason
        else:
            m.missing.append(ours)
    return m


# ----------------------------------------------------------------------------- schedule

def check_schedule(src: dict[str, torch.Tensor], cfg: Config) -> list[str]:
    """Compare the checkpoint's schedule buffers with the schedule our config builds; raise
    ConvertError naming the first buffer that differs. Returns the names checked."""
    d = cfg.diffusion
    from ldm_fast.diffusion import make_schedule
    s = make_schedule(d.schedule, d.timesteps, d.linear_start, d.linear_end, d.parameterization)
    betas = s.betas.double()
    acp = s.alphas_cumprod.double()
    acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    post_var = betas * (1 - acp_prev) / (1 - acp)
    ours = {  # the original's DDPM.register_schedule, in float64, with v_posterior = 0
        "betas": betas, "alphas_cumprod": acp, "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": acp.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - acp).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - acp).log(), "sqrt_recip_alphas_cumprod": (1 / acp).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / acp - 1).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp_min(1e-20).log(),
        "posterior_mean_coef1": betas * acp_prev.sqrt() / (1 - acp),
        "posterior_mean_coef2": (1 - acp_prev) * (1 - betas).sqrt() / (1 - acp),
    }
    checked = []
    for name in rules.SCHEDULE:
        if name not in src:
            continue
        theirs = src[name].double().flatten()
        if theirs.shape != ours[name].shape:
            raise ConvertError(f"schedule: the checkpoint's {name} has {theirs.numel()} steps, the config "
                               f"{d.timesteps} (diffusion.timesteps)")
        if not torch.allclose(theirs, ours[name], rtol=1e-4, atol=1e-6):
            i = int((theirs - ours[name]).abs().argmax())
            raise ConvertError(
                f"schedule: the checkpoint's {name} differs from ours ({d.schedule}, {d.linear_start} → "
                f"{d.linear_end}, T = {d.timesteps}, v_posterior 0) at t = {i}: {float(theirs[i]):.6g} vs "
                f"{float(ours[name][i]):.6g}; pass the model's original YAML (--config)")
        checked.append(name)
    return checked


# ----------------------------------------------------------------------------- conversion

@dataclass
class Result:
    run_dir: Path
    config: Config
    mapping: Mapping
    notes: list[str]


def convert(ckpt_path, out, config_path=None, preset: str | None = None, ema: bool = False,
            clip_dir: str | None = None, strict: bool = True, image_size: int | None = None,
            tokenizer: str | None = None) -> Result:
    """Convert an original checkpoint into the run directory `out`; see the module docstring.
    `tokenizer`: a local BERT vocab.txt (or tokenizer.json) for the LDM text-to-image model."""
    from ldm_fast import diffusers_folder as dfolder

    folder = dfolder.is_diffusers_folder(ckpt_path)
    if folder:
        if config_path is not None or preset is not None or clip_dir:
            raise ConvertError(f"{ckpt_path} is a diffusers folder: it carries its own configs and text "
                               "encoder; leave out --config / --preset / --clip")
        text_dir = Path(out) / "text_encoder"
        raw, src, sampling, folder_tokenizer = dfolder.read_folder(ckpt_path, text_dir)
        cfg, notes = config_from_original(raw, clip_dir=None if folder_tokenizer else str(text_dir),
                                          image_size=image_size, name=Path(ckpt_path).name)
        tokenizer = tokenizer or folder_tokenizer
        for key, value in sampling.items():  # the folder's scheduler settings are its default grid
            setattr(cfg.diffusion, key, value)
        notes.append("diffusers folder: " + (f"tokenizer from {folder_tokenizer}" if folder_tokenizer else
                                             f"text encoder and tokenizer copied to {text_dir}")
                     + f"; sampler grid from its scheduler ({sampling})")
    elif (config_path is None) == (preset is None):
        raise ConvertError("give exactly one of an original YAML config or a preset name")
    elif config_path is not None:
        cfg, notes = load_original_config(config_path, clip_dir=clip_dir, image_size=image_size)
    else:
        cfg, notes = preset_config(preset, image_size, clip_dir), [f"config from preset {preset!r}"]
    if not folder:
        src = load_original(ckpt_path)

    if "scale_factor" in src:  # scale_by_std: the measured value was saved as a buffer
        cfg.diffusion.scale_factor = float(src["scale_factor"])
    task_of(cfg).original_state(cfg, src, notes)
    validate(cfg)
    schedule_checked = check_schedule(src, cfg)
    text_tokenizer = _text_tokenizer(cfg, tokenizer)

    from ldm_fast.model import LatentDiffusion
    with torch.device("meta"):  # names, shapes and dtypes only: no memory for an SD-sized model
        model = LatentDiffusion(cfg)
        cond = build_cond_module(cfg, model.first_stage)
    targets = dict(model.state_dict())
    if cond is not None:
        targets.update(ckpt.flatten_state("cond.", cond.state_dict()))
    if cfg.autoencoder.kind == "identity":
        targets = {k: v for k, v in targets.items() if not k.startswith("first_stage.")}
    if folder:
        src = dfolder.original_names(src, cfg, targets)
    clip = None
    if clip_dir and any(k.startswith(CLIP_PREFIX) for k in src):
        from ldm_fast.clip_text import FrozenCLIPTextEncoder
        clip = FrozenCLIPTextEncoder(clip_dir, cfg.conditioning.max_length, load_weights=True)
        targets.update(ckpt.flatten_state("text_encoder.", clip.transformer.state_dict()))

    mapping = map_state_dict(src, targets, ema=ema, cond_is_first_stage=task_of(cfg).cond_stage_is_first_stage,
                             fills=_fills(cfg))
    mapping.schedule = schedule_checked + [k for k in mapping.schedule if k not in schedule_checked]
    problems = mapping.problems(strict)
    if problems:
        raise ConvertError(f"{ckpt_path}: does not match the config"
                           f"{' (strict; --no-strict leaves unexpected tensors out)' if strict else ''}:\n{problems}")
    if mapping.unexpected:
        notes.append(f"--no-strict: left out {len(mapping.unexpected)} tensors no rule maps: "
                     f"{mapping.unexpected[:8]}{' …' if len(mapping.unexpected) > 8 else ''}")
    if clip is not None:
        notes.append(_place_text_encoder(clip, clip_dir, src, mapping, cfg, Path(out)))
    has_cond = any(k.startswith("cond_stage_model.") for k in src)
    _write_run(Path(out), cfg, mapping, ema=ema, source=str(ckpt_path),
               cond_converted=cond is not None or clip is not None or not has_cond)
    if text_tokenizer is not None:
        from ldm_fast.tasks import TOKENIZER_FILE
        text_tokenizer.save(Path(out) / TOKENIZER_FILE)
    return Result(Path(out), cfg, mapping, notes)


def _text_tokenizer(cfg: Config, path: str | None):
    """The LDM BERT model's tokenizer (bert-base-uncased's WordPiece vocabulary, which the
    original downloads at run time; here a local file), checked against the embedding size."""
    c = cfg.conditioning
    if not (c.text_encoder == "ldm_bert" and not c.pretrained_text_encoder):
        if path:
            raise ConvertError("--tokenizer applies to the LDM text-to-image (BERT) model only")
        return None
    if not path:
        raise ConvertError("the LDM text-to-image model tokenises with bert-base-uncased's WordPiece "
                           "vocabulary: pass --tokenizer PATH/vocab.txt (a local copy; nothing is downloaded)")
    from ldm_fast.conditioning import load_tokenizer
    tok = load_tokenizer(path)
    if tok.vocab_size > c.vocab_size:
        raise ConvertError(f"--tokenizer {path}: {tok.vocab_size} tokens, more than the text encoder's "
                           f"{c.vocab_size}-row embedding")
    c.tokenizer = str(Path(path).resolve())
    return tok


def _place_text_encoder(clip, clip_dir, src, m: Mapping, cfg: Config, out: Path) -> str:
    """SD v1's text encoder is frozen and lives in a transformers directory, not in cond.*:
    the checkpoint's copy is compared with --clip's weights; when they agree (up to the
    checkpoint's precision) the run points at --clip, otherwise (a fine-tuned text encoder) the
    checkpoint's weights are written with --clip's config and tokenizer to RUN_DIR/text_encoder."""
    ours = {u: o for o, u in m.used.items() if u.startswith("text_encoder.")}
    tensors = {u: m.tensors.pop(u) for u in list(m.tensors) if u.startswith("text_encoder.")}
    reference = ckpt.flatten_state("text_encoder.", clip.transformer.state_dict())
    same = all(torch.equal(src[ours[u]], reference[u].to(src[ours[u]].dtype)) for u in tensors)
    if same:
        cfg.conditioning.pretrained_text_encoder = str(Path(clip_dir).resolve())
        return f"text encoder: the checkpoint's {len(tensors)} CLIP tensors equal {clip_dir}'s; the run uses it"
    clip.transformer.load_state_dict({u[len("text_encoder."):]: t for u, t in tensors.items()}, strict=True)
    target = clip.save_pretrained(out / "text_encoder")
    cfg.conditioning.pretrained_text_encoder = str(target.resolve())
    return (f"text encoder: the checkpoint's CLIP weights differ from {clip_dir}'s (fine-tuned?): written "
            f"with its config and tokenizer to {target}")


def _write_run(out: Path, cfg: Config, m: Mapping, ema: bool, source: str, cond_converted: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    meta = {"config": json.dumps(to_dict(cfg)), "converted_from": source}
    first = {k[len("first_stage."):]: v for k, v in m.tensors.items() if k.startswith("first_stage.")}
    if cfg.autoencoder.kind != "identity":
        ckpt.save_checkpoint(out / "autoencoder.safetensors", first, {**meta, "kind": cfg.autoencoder.kind})
    ldm = {k: v for k, v in m.tensors.items() if not k.startswith("first_stage.")}
    ckpt.save_checkpoint(out / "ldm.safetensors", ldm,
                         {**meta, "ema": str(ema), "cond_converted": str(cond_converted)})


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ldm_fast.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="original checkpoint (.ckpt / .safetensors), a diffusers folder (model_index.json), or "
                        "with --to-diffusers a run directory")
    p.add_argument("--to-diffusers", action="store_true",
                   help="write the run directory --ckpt as a diffusers StableDiffusionPipeline folder --out")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="the model's ORIGINAL YAML config (latent-diffusion / SD v1)")
    src.add_argument("--preset", help="an ldm_fast preset describing the same architecture")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--ema", action="store_true", help="take the UNet from the EMA weights (model_ema.*)")
    p.add_argument("--clip", help="local transformers CLIP checkpoint directory (SD v1 text encoder)")
    p.add_argument("--tokenizer", help="local BERT vocab.txt (the LDM text-to-image model's tokenizer)")
    p.add_argument("--image-size", type=int, help="latent side (overrides the config's image_size)")
    p.add_argument("--no-strict", action="store_true",
                   help="leave out (and list) source tensors no rule maps, instead of failing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.to_diffusers:
        from ldm_fast.diffusers_folder import write_folder
        try:
            path = write_folder(args.ckpt, args.out)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {path.resolve()} (diffusers StableDiffusionPipeline folder)")
        return 0
    try:
        result = convert(args.ckpt, args.out, config_path=args.config, preset=args.preset, ema=args.ema,
                         clip_dir=args.clip, strict=not args.no_strict, image_size=args.image_size,
                         tokenizer=args.tokenizer)
    except (ConvertError, FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"note: {note}")
    print(result.mapping.summary())
    print(f"wrote {result.run_dir.resolve()} ({'EMA' if args.ema else 'raw'} UNet weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
