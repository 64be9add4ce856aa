"""diffusers folders ↔ ldm_fast run directories: Stable Diffusion v1-style folders
(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) both ways, and the LDM
text-to-image model's (unet/, vqvae/, bert/, tokenizer/, scheduler/; LDMTextToImagePipeline) in.

Reading: the folder's configs become an original-layout config (the dict an LDM YAML parses
to) and its tensors are renamed to the original checkpoint's names, so `convert.convert`
handles a folder exactly as it handles a `.ckpt` — same rule table, same strict checks. The
CLIP text encoder and tokenizer are copied into RUN_DIR/text_encoder (one transformers
directory), which the run then uses as its frozen text encoder; the LDM BERT's tensors are
renamed to the original's cond_stage_model.transformer.* and its tokenizer read from the folder.

Writing: a run of that layout (KL first stage, SpatialTransformer UNet, CLIP text encoder)
becomes a folder `diffusers.StableDiffusionPipeline.from_pretrained` loads: configs written as
JSON, weights as safetensors, the scheduler a DDIMScheduler with the run's schedule and
default timestep grid. diffusers is not needed for either direction.

The name mapping is one function, `to_diffusers_name` (original → diffusers), used forward
for writing and inverted over our model's parameter names for reading.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ldm_fast import convert_rules as rules
from ldm_fast.tasks.registry import task_of

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
SPACINGS = ("linspace", "leading", "trailing")  # the timestep_spacing values diffusers knows


class FolderError(ValueError):
    """A diffusers folder (or a run) that has no faithful counterpart on the other side."""


def is_diffusers_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


# ----------------------------------------------------------------------------- names

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _sub(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _unet_name(rest: str, n_res: int, levels: int, attn_levels: set[int]) -> str:
    """An openaimodel UNet name (after model.diffusion_model.) → UNet2DConditionModel's."""
    fixed = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    for old, new in fixed.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    m = re.match(r"(input_blocks|output_blocks|middle_block)\.(\d+)\.(?:(\d+)\.)?(.*)", rest)
    if not m:
        raise FolderError(f"UNet tensor {rest!r} has no diffusers counterpart")
    kind, k, sub, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if kind == "middle_block":
        return {0: f"mid_block.resnets.0.{_sub(tail, _RESNET)}", 1: f"mid_block.attentions.0.{tail}",
                2: f"mid_block.resnets.1.{_sub(tail, _RESNET)}"}[k]
    sub = int(sub)
    if kind == "input_blocks":
        level, j = (k - 1) // (n_res + 1), (k - 1) % (n_res + 1)
        if j == n_res:  # the level's downsampler: input_blocks.k.0.op
            return f"down_blocks.{level}.downsamplers.0.conv.{tail[len('op.'):]}"
        return (f"down_blocks.{level}.resnets.{j}.{_sub(tail, _RESNET)}" if sub == 0
                else f"down_blocks.{level}.attentions.{j}.{tail}")
    block, j = k // (n_res + 1), k % (n_res + 1)
    has_attn = levels - 1 - block in attn_levels
    if sub == 0:
        return f"up_blocks.{block}.resnets.{j}.{_sub(tail, _RESNET)}"
    if sub == 1 and has_attn:
        return f"up_blocks.{block}.attentions.{j}.{tail}"
    return f"up_blocks.{block}.upsamplers.0.{tail}"  # output_blocks.k.{1|2}.conv


def _vae_name(rest: str, levels: int) -> str:
    """An original first-stage name (after first_stage_model.) → AutoencoderKL's."""
    rest = re.sub(r"\.nin_shortcut\.", ".conv_shortcut.", rest)
    m = re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|downsample|upsample|attn)\.(.*)", rest)
    if m:
        side, _, i, part, tail = m.groups()
        i = int(i) if side == "encoder" else levels - 1 - int(i)  # the decoder's up.0 is its last block
        group = "down_blocks" if side == "encoder" else "up_blocks"
        if part == "block":
            return f"{side}.{group}.{i}.resnets.{tail}"
        if part in ("downsample", "upsample"):
            return f"{side}.{group}.{i}.{part}rs.0.{tail}"
        raise FolderError("a first stage with attention inside its levels has no AutoencoderKL counterpart")
    m = re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)", rest)
    if m:
        side, part, tail = m.groups()
        if part == "attn_1":
            return f"{side}.mid_block.attentions.0.{_sub(tail, _VAE_ATTN)}"
        return f"{side}.mid_block.resnets.{0 if part == 'block_1' else 1}.{tail}"
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", rest)


def to_diffusers_name(original: str, cfg) -> tuple[str, str]:
    """(component, name) in a diffusers folder for an original checkpoint tensor name."""
    if original.startswith(UNET):
        un = cfg.unet
        levels = len(un.channel_mult)
        attn = {i for i in range(levels) if 2 ** i in un.attention_resolutions}
        return "unet", _unet_name(original[len(UNET):], un.num_res_blocks, levels, attn)
    if original.startswith(VAE):
        return "vae", _vae_name(original[len(VAE):], len(cfg.autoencoder.channel_mult))
    raise FolderError(f"{original}: no diffusers component holds it")


# ----------------------------------------------------------------------------- configs

def _json(path: Path) -> dict:
    if not path.is_file():
        raise FolderError(f"{path}: missing")
    return json.loads(path.read_text())


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise FolderError(f"diffusers folder: {message}")


def _unet_params(u: dict) -> dict:
    """UNet2DConditionModel config → the original UNetModel params (Stable Diffusion v1 layout)."""
    _need(u.get("_class_name", "UNet2DConditionModel") == "UNet2DConditionModel",
          f"unet {u.get('_class_name')!r}: only UNet2DConditionModel is supported")
    boc = [int(c) for c in u["block_out_channels"]]
    down = list(u.get("down_block_types", []))
    expected = {"flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_num_groups": 32,
                "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
                "only_cross_attention": False, "dual_cross_attention": False, "center_input_sample": False,
                "time_embedding_type": "positional", "conv_in_kernel": 3, "conv_out_kernel": 3,
                "mid_block_type": "UNetMidBlock2DCrossAttn", "resnet_time_scale_shift": "default",
                "encoder_hid_dim": None, "time_cond_proj_dim": None, "num_class_embeds": None,
                "downsample_padding": 1, "mid_block_scale_factor": 1, "time_embedding_dim": None,
                "time_embedding_act_fn": None, "timestep_post_act": None, "attention_type": "default",
                "cross_attention_norm": None, "class_embeddings_concat": False,
                "reverse_transformer_layers_per_block": None}
    for key, value in expected.items():
        if key in u and u[key] != value and not (value is False and u[key] is None):
            raise FolderError(f"diffusers folder: unet {key} = {u[key]!r} (ldm_fast reproduces {value!r})")
    _need(abs(float(u.get("norm_eps", 1e-5)) - 1e-5) < 1e-12, "unet norm_eps other than 1e-5")
    _need(all(c % boc[0] == 0 for c in boc), "unet block_out_channels not multiples of the first")
    heads = u.get("num_attention_heads") or u.get("attention_head_dim", 8)  # SD v1 stores heads in the latter
    _need(isinstance(heads, int), f"unet attention heads per level {heads!r} (one count for all levels only)")
    depth = u.get("transformer_layers_per_block", 1)
    _need(isinstance(depth, int), "unet transformer_layers_per_block per level")
    _need(list(u.get("up_block_types", [])) == [t.replace("Down", "Up") for t in reversed(down)],
          "unet up_block_types that do not mirror down_block_types")
    return {"image_size": int(u.get("sample_size", 64)), "in_channels": int(u["in_channels"]),
            "out_channels": int(u["out_channels"]), "model_channels": boc[0],
            "channel_mult": [c // boc[0] for c in boc], "num_res_blocks": int(u.get("layers_per_block", 2)),
            "attention_resolutions": [2 ** i for i, t in enumerate(down) if t.startswith("CrossAttn")],
            "num_heads": int(heads), "use_spatial_transformer": True, "transformer_depth": int(depth),
            "context_dim": int(u["cross_attention_dim"])}


def _vae_params(v: dict) -> dict:
    _need(v.get("_class_name", "AutoencoderKL") == "AutoencoderKL",
          f"vae {v.get('_class_name')!r}: only AutoencoderKL is supported")
    boc = [int(c) for c in v["block_out_channels"]]
    _need(set(v.get("down_block_types", ["DownEncoderBlock2D"])) == {"DownEncoderBlock2D"}
          and set(v.get("up_block_types", ["UpDecoderBlock2D"])) == {"UpDecoderBlock2D"},
          "vae blocks other than DownEncoderBlock2D / UpDecoderBlock2D")
    _need(v.get("norm_num_groups", 32) == 32 and v.get("act_fn", "silu") == "silu", "vae norm groups / activation")
    _need(v.get("mid_block_add_attention", True) and v.get("use_quant_conv", True)
          and v.get("use_post_quant_conv", True), "vae without mid attention or quant convs")
    _need(v.get("latents_mean") is None and v.get("shift_factor") in (None, 0, 0.0), "vae latent shift/mean")
    z = int(v.get("latent_channels", 4))
    return {"embed_dim": z, "ddconfig": {
        "double_z": True, "z_channels": z, "resolution": int(v.get("sample_size", 256)),
        "in_channels": int(v.get("in_channels", 3)), "out_ch": int(v.get("out_channels", 3)), "ch": boc[0],
        "ch_mult": [c // boc[0] for c in boc], "num_res_blocks": int(v.get("layers_per_block", 2)),
        "attn_resolutions": [], "dropout": 0.0}}


def _schedule_params(s: dict) -> tuple[dict, dict]:
    """scheduler_config.json → (original model params, ldm_fast sampling defaults)."""
    _need(s.get("trained_betas") is None, "scheduler trained_betas")
    kind = s.get("beta_schedule", "linear")
    _need(kind == "scaled_linear", f"scheduler beta_schedule {kind!r}: ldm_fast's 'linear' is diffusers' "
          "'scaled_linear' (linear in sqrt(beta)); plain linear-in-beta is not supported")
    prediction = {"epsilon": "eps", "v_prediction": "v"}.get(s.get("prediction_type", "epsilon"))
    _need(prediction is not None, f"scheduler prediction_type {s.get('prediction_type')!r}")
    spacing = s.get("timestep_spacing", "leading")
    _need(spacing in SPACINGS, f"scheduler timestep_spacing {spacing!r}")
    params = {"linear_start": float(s.get("beta_start", 0.0001)), "linear_end": float(s.get("beta_end", 0.02)),
              "timesteps": int(s.get("num_train_timesteps", 1000)), "parameterization": prediction}
    sampling = {"timestep_spacing": spacing, "steps_offset": int(s.get("steps_offset", 0)),
                "set_alpha_to_one": bool(s.get("set_alpha_to_one", True))}
    return params, sampling


# The folder layouts read: diffusers' StableDiffusionPipeline, and LDMTextToImagePipeline (the
# LDM text-to-image model, CompVis/ldm-text2im-large-256): part → accepted class names.
LAYOUTS = {
    "stable-diffusion": {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",),
                         "text_encoder": ("CLIPTextModel",), "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast")},
    "ldm-text2im": {"unet": ("UNet2DConditionModel",), "vqvae": ("AutoencoderKL",), "bert": ("LDMBertModel",),
                    "tokenizer": ("BertTokenizer", "BertTokenizerFast")},
}


def _layout(index: dict) -> str:
    for name, parts in LAYOUTS.items():
        if all((index.get(part) or [None, None])[1] in classes for part, classes in parts.items()):
            return name
    found = {k: v[1] for k, v in index.items() if isinstance(v, list) and len(v) == 2}
    raise FolderError(f"diffusers folder: components {found} match no layout ldm_fast reads "
                      f"({', '.join(f'{n}: {sorted(p)}' for n, p in LAYOUTS.items())})")


def _bert_params(b: dict) -> dict:
    """LDMBertModel config → the original BERTEmbedder params (x-transformers: 8 heads of 64,
    4× feed-forward, GELU)."""
    d = int(b["d_model"])
    _need(int(b.get("encoder_attention_heads", 8)) == 8 and int(b.get("head_dim", 64)) == 64,
          "LDM BERT attention other than 8 heads of 64 (the original BERTEmbedder's)")
    _need(int(b.get("encoder_ffn_dim", 4 * d)) == 4 * d and b.get("activation_function", "gelu") == "gelu"
          and not b.get("scale_embedding", False), "LDM BERT feed-forward / embedding variant")
    return {"n_embed": d, "n_layer": int(b["encoder_layers"]), "vocab_size": int(b["vocab_size"]),
            "max_seq_len": int(b.get("max_position_embeddings", 77))}


_BERT_LAYER = {"self_attn_layer_norm": (0, "0"), "self_attn.q_proj": (0, "1.to_q"), "self_attn.k_proj": (0, "1.to_k"),
               "self_attn.v_proj": (0, "1.to_v"), "self_attn.out_proj": (0, "1.to_out"),
               "final_layer_norm": (1, "0"), "fc1": (1, "1.net.0.0"), "fc2": (1, "1.net.2")}


def _bert_original_name(name: str) -> str:
    """An LDMBertModel tensor name → the original's (cond_stage_model.transformer.*)."""
    fixed = {"model.embed_tokens.weight": "token_emb.weight", "model.embed_positions.weight": "pos_emb.emb.weight"}
    if name in fixed:
        return TEXT + fixed[name]
    if name.startswith(("model.layer_norm.", "to_logits.")):
        return TEXT + name.replace("model.layer_norm.", "norm.")
    m = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m and m.group(2) in _BERT_LAYER:
        half, sub = _BERT_LAYER[m.group(2)]
        return f"{TEXT}attn_layers.layers.{2 * int(m.group(1)) + half}.{sub}.{m.group(3)}"
    return f"diffusers:bert:{name}"  # reported by the strict check


def read_folder(folder, text_dir) -> tuple[dict, dict[str, torch.Tensor], dict, str | None]:
    """(original-layout config dict, tensors — the UNet's and VAE's under `diffusers:` names
    that `original_names` resolves, the LDM BERT's under original names —, sampling defaults,
    the tokenizer directory for the LDM BERT or None) of a diffusers folder. A Stable Diffusion
    folder's CLIP text encoder and tokenizer are copied into `text_dir`."""
    folder = Path(folder)
    layout = _layout(_json(folder / "model_index.json"))
    vae_part = "vae" if layout == "stable-diffusion" else "vqvae"
    unet_params = _unet_params(_json(folder / "unet" / "config.json"))
    vae_cfg = _json(folder / vae_part / "config.json")
    schedule, sampling = _schedule_params(_json(folder / "scheduler" / "scheduler_config.json"))
    if layout == "stable-diffusion":
        text_cfg = _json(folder / "text_encoder" / "config.json")
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                "params": {"max_length": int(text_cfg.get("max_position_embeddings", 77))}}
    else:
        cond = {"target": "ldm.modules.encoders.modules.BERTEmbedder",
                "params": _bert_params(_json(folder / "bert" / "config.json"))}
    raw = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        **schedule, "image_size": unet_params["image_size"], "channels": unet_params["out_channels"],
        "conditioning_key": "crossattn", "cond_stage_key": "caption",
        "scale_factor": float(vae_cfg.get("scaling_factor", 0.18215)),
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": _vae_params(vae_cfg)},
        "cond_stage_config": cond}}}
    # renamed by `original_names` once the model's layout is known
    src = {f"diffusers:{part}:{name}": tensor for part, sub in (("unet", "unet"), ("vae", vae_part))
           for name, tensor in _load_weights(folder / sub).items()}
    if layout == "ldm-text2im":
        src.update({_bert_original_name(k): v for k, v in _load_weights(folder / "bert").items()})
        return raw, src, sampling, str(folder / "tokenizer")
    # The CLIP text encoder is not renamed: the run uses the copied transformers directory.
    text_dir = Path(text_dir)
    text_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("text_encoder", "tokenizer"):
        for f in (folder / sub).iterdir():
            if f.is_file():
                shutil.copy2(f, text_dir / f.name)
    return raw, src, sampling, None


def original_names(src: dict[str, torch.Tensor], cfg, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `read_folder`'s tensors to the original checkpoint's names, inverting
    `to_diffusers_name` over the original names of our model's tensors (`targets`, in our
    namespace). The VAE attention's linear weights become the original's 1×1 convolutions.
    Tensors no name maps onto keep a `diffusers:` name, which the strict check reports."""
    inverse, shapes = {}, {}
    for ours, spec in targets.items():
        try:
            original = rules.to_original(ours)
        except KeyError:
            continue
        if original.startswith((UNET, VAE)):
            part, name = to_diffusers_name(original, cfg)
            inverse[f"diffusers:{part}:{name}"] = original
            shapes[original] = tuple(spec.shape)
    out = {}
    for key, tensor in src.items():
        original = inverse.get(key)
        if original is None:
            out[key] = tensor
            continue
        want = shapes[original]
        # Only linear ↔ 1×1 convolution (the VAE attention): any other shape difference stays
        # and is reported as mis-shaped by the strict check.
        squeezed = tuple(want[:2]) if len(want) == 4 and tuple(want[2:]) == (1, 1) else None
        out[original] = tensor.reshape(want) if tuple(tensor.shape) == squeezed else tensor
    return out


def _load_weights(part_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for name in WEIGHTS:
        if (part_dir / name).is_file():
            return load_file(str(part_dir / name))
    bins = [part_dir / n for n in ("diffusion_pytorch_model.bin", "pytorch_model.bin")]
    for b in bins:
        if b.is_file():
            return torch.load(str(b), map_location="cpu", weights_only=True)
    raise FolderError(f"{part_dir}: no weights ({', '.join(WEIGHTS)} or .bin)")


# ----------------------------------------------------------------------------- writing

def _unet_config(cfg) -> dict:
    un = cfg.unet
    levels = len(un.channel_mult)
    attn = [2 ** i in un.attention_resolutions for i in range(levels)]
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    heads = un.num_heads if un.num_heads > 0 else None
    return {"_class_name": "UNet2DConditionModel", "sample_size": cfg.data.resolution // cfg.autoencoder.factor,
            "in_channels": un.in_channels, "out_channels": un.out_channels,
            "block_out_channels": [un.model_channels * m for m in un.channel_mult],
            "layers_per_block": un.num_res_blocks, "down_block_types": down,
            "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "cross_attention_dim": un.context_dim,
            "attention_head_dim": heads, "transformer_layers_per_block": un.transformer_depth,
            "norm_num_groups": un.groups, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
            "act_fn": "silu", "use_linear_projection": False}


def _check_writable(cfg) -> None:
    un, ae, c = cfg.unet, cfg.autoencoder, cfg.conditioning
    problems = []
    if ae.kind != "kl" or ae.attn_resolutions or not ae.mid_attention or ae.groups != 32:
        problems.append("the first stage must be a KL autoencoder with attention in its middle block only")
    if not un.use_spatial_transformer or not un.context_dim or un.num_heads <= 0 or un.use_scale_shift_norm \
            or un.resblock_updown or un.num_classes or not un.attention_resolutions:
        problems.append("the UNet must be Stable Diffusion's (SpatialTransformer cross-attention with a head "
                        "count, no scale-shift norm, no resblock up/down, no class embedding)")
    if "prompt" not in task_of(cfg).sampling_inputs(c.mode) or not c.pretrained_text_encoder:
        problems.append("the text encoder must be a CLIP directory (conditioning.pretrained_text_encoder)")
    if cfg.diffusion.schedule != "linear":
        problems.append(f"the schedule must be 'linear' (diffusers' scaled_linear), not {cfg.diffusion.schedule!r}")
    if problems:
        raise FolderError("this run has no Stable Diffusion pipeline counterpart: " + "; ".join(problems))


def write_folder(run_dir, out) -> Path:
    """Write the run `run_dir` as a diffusers StableDiffusionPipeline folder `out`."""
    from safetensors.torch import save_file

    from ldm_fast.clip_text import is_clip_dir
    from ldm_fast.run import load_model
    from ldm_fast.samplers import schedule_defaults

    model, _ = load_model(run_dir)
    cfg = model.cfg
    _check_writable(cfg)
    clip_dir = Path(cfg.conditioning.pretrained_text_encoder)
    if not is_clip_dir(clip_dir):
        raise FolderError(f"{clip_dir}: not a CLIP text encoder directory")
    out = Path(out)
    parts = {"unet": {}, "vae": {}}
    for ours, tensor in model.state_dict().items():
        if ours in ("scale_factor", "first_stage.logvar") or ours.startswith("first_stage.quantize"):
            continue
        part, name = to_diffusers_name(rules.to_original(ours), cfg)
        if part == "vae" and "mid_block.attentions" in name and tensor.dim() == 4:
            tensor = tensor[:, :, 0, 0]  # the original's 1×1 convolutions are diffusers' linears
        parts[part][name] = tensor.detach().cpu().contiguous()
    for part, tensors in parts.items():
        (out / part).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / part / WEIGHTS[0]))
    ae = cfg.autoencoder
    vae = {"_class_name": "AutoencoderKL", "in_channels": ae.in_channels, "out_channels": ae.in_channels,
           "down_block_types": ["DownEncoderBlock2D"] * len(ae.channel_mult),
           "up_block_types": ["UpDecoderBlock2D"] * len(ae.channel_mult),
           "block_out_channels": [ae.base_channels * m for m in ae.channel_mult],
           "layers_per_block": ae.num_res_blocks, "act_fn": "silu", "latent_channels": ae.z_channels,
           "norm_num_groups": 32, "sample_size": cfg.data.resolution, "scaling_factor": float(model.scale_factor)}
    (out / "unet" / "config.json").write_text(json.dumps(_unet_config(cfg), indent=2))
    (out / "vae" / "config.json").write_text(json.dumps(vae, indent=2))
    _copy_clip(clip_dir, out)
    d = cfg.diffusion
    grid = schedule_defaults(cfg, "ddim")
    spacing = grid.get("spacing", "linspace")
    scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps": d.timesteps, "beta_start": d.linear_start,
                 "beta_end": d.linear_end, "beta_schedule": "scaled_linear", "clip_sample": False,
                 "prediction_type": {"eps": "epsilon", "v": "v_prediction"}[d.parameterization],
                 # diffusers has no "uniform" grid (the original's, with its extra step): "leading"
                 # is the same grid whenever the step count divides T.
                 "timestep_spacing": spacing if spacing in SPACINGS else "leading",
                 "steps_offset": grid.get("steps_offset", 0), "set_alpha_to_one": grid.get("set_alpha_to_one", True)}
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def _copy_clip(clip_dir: Path, out: Path) -> None:
    """The run's CLIP directory (config + weights + tokenizer files) split into diffusers'
    text_encoder/ (config, weights) and tokenizer/ (everything the tokenizer reads)."""
    (out / "text_encoder").mkdir(parents=True, exist_ok=True)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    for f in clip_dir.iterdir():
        if not f.is_file():
            continue
        model_file = f.name in ("config.json", "model.safetensors", "pytorch_model.bin", "generation_config.json")
        shutil.copy2(f, out / ("text_encoder" if model_file else "tokenizer") / f.name)
