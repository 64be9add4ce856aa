"""Checkpoint conversion: the name rules both ways, strictness, safe loading, EMA selection,
original YAML parsing, convert → load → sample, and numerical equivalence with diffusers'
independent implementations of the original architectures fed the same random weights.

No pretrained weights exist here: each test builds a small random-weight model, writes it in
the ORIGINAL checkpoint layout (ours → original names, plus the original's schedule buffers
computed independently with numpy below) together with an original-style YAML, converts it
back and compares."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from ldm_fast import convert_rules as rules
from ldm_fast.checkpoint import load_checkpoint
from ldm_fast.config import get_preset
from ldm_fast.convert import ConvertError, config_from_original, convert, load_original, main
from ldm_fast.model import LatentDiffusion
from ldm_fast.run import load_model

try:
    import diffusers  # noqa: F401
    from diffusers.loaders import single_file_utils as sfu
    HAVE_DIFFUSERS = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_DIFFUSERS = False
try:
    import transformers  # noqa: F401
    HAVE_TRANSFORMERS = True
except ImportError:  # pragma: no cover
    HAVE_TRANSFORMERS = False

needs_diffusers = pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers not installed (pip install diffusers): "
                                     "it is the independent reference implementation")
needs_transformers = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers not installed: the CLIP "
                                        "text encoder is built with it")


# ----------------------------------------------------------------------------- original-format fixtures

def original_schedule(T: int, start: float, end: float) -> dict[str, torch.Tensor]:
    """The original DDPM.register_schedule buffers ("linear" schedule, v_posterior 0), written
    out in numpy float64 and stored as float32, as the original does."""
    betas = np.linspace(start ** 0.5, end ** 0.5, T, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    acp = np.cumprod(alphas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    out = {
        "betas": betas, "alphas_cumprod": acp, "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": np.sqrt(acp), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - acp),
        "log_one_minus_alphas_cumprod": np.log(1.0 - acp), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / acp),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / acp - 1), "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
        "posterior_mean_coef2": (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (zero-initialised output convs included), scaled to keep
    activations O(1) so that an output comparison exercises every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
                elif p.dim() >= 2 and not isinstance(mod, torch.nn.Embedding):
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
                elif p.dim() >= 1:
                    p.copy_((1.0 if isinstance(mod, torch.nn.Embedding) else 0.1) * torch.randn(p.shape, generator=g))
    return module


def to_original_state(model: LatentDiffusion, cond=None, ema_unet=None, schedule=None,
                      scale_buffer: bool = False) -> dict[str, torch.Tensor]:
    """Our model's tensors under the original checkpoint's names (an LDM checkpoint: the
    first stage's loss is not in it, the scale is a buffer only with scale_by_std)."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "first_stage.logvar" or (k == "scale_factor" and not scale_buffer):
            continue
        sd[rules.to_original(k)] = v.detach().clone()
    if cond is not None:
        for k, v in cond.state_dict().items():
            sd[rules.to_original("cond." + k)] = v.detach().clone()
    if ema_unet is not None:
        for k, v in ema_unet.state_dict().items():
            sd[rules.to_original("unet." + k, ema=True)] = v.detach().clone()
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    sd.update(schedule or {})
    return sd


def ldm_yaml(unet: dict, first_stage: dict, cond_stage="__is_unconditional__", **params) -> dict:
    """An original latent-diffusion config (as the released YAML files are laid out)."""
    base = {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 8,
            "channels": unet["out_channels"], "first_stage_key": "image", "monitor": "val/loss_simple_ema"}
    base.update(params)
    base.update(unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
                first_stage_config=first_stage, cond_stage_config=cond_stage)
    return {"model": {"base_learning_rate": 1e-6, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": base}}


def first_stage_yaml(kind: str, ch_mult, z: int, n_embed: int = 64, ch: int = 32, resolution: int = 32,
                     num_res_blocks: int = 1) -> dict:
    dd = {"double_z": kind == "kl", "z_channels": z, "resolution": resolution, "in_channels": 3, "out_ch": 3,
          "ch": ch, "ch_mult": list(ch_mult), "num_res_blocks": num_res_blocks, "attn_resolutions": [], "dropout": 0.0}
    if kind == "kl":
        return {"target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {"embed_dim": z, "monitor": "val/rec_loss", "ddconfig": dd,
                           "lossconfig": {"target": "torch.nn.Identity"}}}
    return {"target": "ldm.models.autoencoder.VQModelInterface",
            "params": {"embed_dim": z, "n_embed": n_embed, "ddconfig": dd,
                       "lossconfig": {"target": "torch.nn.Identity"}}}


def unet_yaml(**kw) -> dict:
    p = {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
         "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 32,
         "use_checkpoint": True}
    p.update(kw)
    return p


def build(raw: dict, seed: int, clip_dir=None):
    """Our random-weight model (and cond module) for an original YAML."""
    from ldm_fast.convert import build_cond_module
    cfg, _ = config_from_original(copy.deepcopy(raw), clip_dir=clip_dir)
    torch.manual_seed(seed)
    model = randomize(LatentDiffusion(cfg), seed).eval()
    cond = build_cond_module(cfg, model.first_stage)
    if cond is not None:
        randomize(cond, seed + 1)
    return cfg, model, cond


def write(tmp_path, raw: dict, sd: dict, fmt: str = "ckpt"):
    cfg_path = tmp_path / "original.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    if fmt == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": sd, "epoch": 3, "global_step": 1234}, str(path))
    return path, cfg_path


TINY_VQ = ldm_yaml(unet_yaml(), first_stage_yaml("vq", (1, 2, 4), 3))


# ----------------------------------------------------------------------------- the rule table

@pytest.mark.parametrize("preset", ["tiny", "cin256-ldm-vq-4", "churches-ldm-kl-8", "inpaint-ldm-vq-4", "kl-f16"])
def test_rules_ours_original_ours_is_identity(preset):
    cfg = get_preset(preset)
    with torch.device("meta"):
        names = list(LatentDiffusion(cfg).state_dict()) + ["cond.embedding.weight"]
    unet_names = [n for n in names if n.startswith("unet.")]
    for name in names:
        assert rules.to_ours(rules.to_original(name)) == name
    for name in unet_names:
        ema = rules.to_original(name, ema=True)
        assert ema.startswith("model_ema.diffusion_model") and "." not in ema[len("model_ema."):]
        assert rules.to_ours(ema, unet_names) == name


# Original names as they appear in released checkpoints (SD v1, LDM VQ/KL, ImageNet), written
# out by hand from the original layout (REFERENCE.md), not generated by our rules.
ORIGINAL_NAMES = [
    "model.diffusion_model.time_embed.0.weight", "model.diffusion_model.time_embed.2.bias",
    "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
    "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight",
    "model.diffusion_model.input_blocks.1.0.out_layers.3.bias",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.input_blocks.1.1.norm.weight", "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.norm3.bias",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.middle_block.1.proj_out.weight", "model.diffusion_model.middle_block.2.out_layers.0.bias",
    "model.diffusion_model.output_blocks.2.1.conv.weight", "model.diffusion_model.output_blocks.5.2.conv.bias",
    "model.diffusion_model.out.0.weight", "model.diffusion_model.out.2.bias",
    "first_stage_model.encoder.conv_in.weight", "first_stage_model.encoder.down.0.block.1.norm1.weight",
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
    "first_stage_model.encoder.down.2.downsample.conv.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.encoder.mid.block_2.conv2.bias",
    "first_stage_model.encoder.norm_out.weight", "first_stage_model.decoder.up.3.upsample.conv.weight",
    "first_stage_model.decoder.up.0.block.2.conv1.weight", "first_stage_model.decoder.mid.attn_1.proj_out.bias",
    "first_stage_model.quant_conv.weight", "first_stage_model.post_quant_conv.bias",
    "first_stage_model.quantize.embedding.weight", "first_stage_model.loss.logvar", "scale_factor",
    "cond_stage_model.embedding.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight",
]


def test_rules_original_ours_original_is_identity():
    for name in ORIGINAL_NAMES:
        ours = rules.to_ours(name)
        assert ours is not None, name
        assert rules.to_original(ours) == name
    assert rules.to_ours("first_stage_model.loss.logvar") == "first_stage.logvar"
    assert rules.to_ours("model.diffusion_model.out.2.bias") == "unet.out.2.bias"
    # EMA: the released names lose every dot after "model_ema."
    unet = ["unet.input_blocks.0.0.weight", "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"]
    for ema, ours in [("model_ema.diffusion_modelinput_blocks00weight", unet[0]),
                      ("model_ema.diffusion_modelinput_blocks11transformer_blocks0attn1to_qweight", unet[1])]:
        assert rules.to_ours(ema, unet) == ours and rules.to_original(ours, ema=True) == ema
    with pytest.raises(ValueError):
        rules.to_ours("model_ema.diffusion_modelout0weight")  # cannot invert without candidates
    assert rules.to_ours("some.other.tensor") is None
    assert rules.to_ours("model_ema.decay") is None and "model_ema.decay" in rules.IGNORED


def test_sd_v1_original_names_land_on_our_model():
    """The hand-written SD v1 names above exist in our SD-shaped model (built on meta)."""
    raw = ldm_yaml(unet_yaml(in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4],
                             attention_resolutions=[4, 2, 1], num_res_blocks=2, num_heads=8, num_head_channels=-1,
                             use_spatial_transformer=True, transformer_depth=1, context_dim=768, legacy=False),
                   first_stage_yaml("kl", (1, 2, 4, 4), 4, ch=128, resolution=256, num_res_blocks=2),
                   {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
                   linear_start=0.00085, linear_end=0.012, scale_factor=0.18215, image_size=64,
                   conditioning_key="crossattn", cond_stage_key="txt")
    cfg, _ = config_from_original(raw)
    with torch.device("meta"):
        names = set(LatentDiffusion(cfg).state_dict())
    for name in ORIGINAL_NAMES:
        ours = rules.to_ours(name)
        if ours.startswith(("unet.", "first_stage.")) and "quantize" not in ours:  # (a KL model)
            assert ours in names, name


# ----------------------------------------------------------------------------- original YAML parsing

SD_V1_YAML = """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    scheduler_config:
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params: {warm_up_steps: [10000], cycle_lengths: [10000000000000], f_start: [1.e-6], f_max: [1.], f_min: [1.]}
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


def test_parse_sd_v1_yaml(tmp_path):
    cfg, _ = config_from_original(yaml.safe_load(SD_V1_YAML), clip_dir=str(tmp_path))
    u, a, d, c = cfg.unet, cfg.autoencoder, cfg.diffusion, cfg.conditioning
    assert (u.in_channels, u.model_channels, u.channel_mult) == (4, 320, (1, 2, 4, 4))
    assert u.attention_resolutions == (4, 2, 1)
    assert (u.num_heads, u.num_head_channels, u.context_dim, u.use_spatial_transformer) == (8, -1, 768, True)
    assert (u.groups, a.groups) == (32, 32)
    assert (a.kind, a.factor, a.z_channels, a.base_channels, a.num_res_blocks) == ("kl", 8, 4, 128, 2)
    assert (d.timesteps, d.linear_start, d.linear_end, d.scale_factor, d.parameterization) == \
        (1000, 0.00085, 0.012, 0.18215, "eps")
    assert (c.task, c.mode, c.max_length, c.embed_dim) == ("text", "crossattn", 77, 768)
    assert c.pretrained_text_encoder == str(tmp_path.resolve())
    assert cfg.data.resolution == 512


def test_parse_ldm_yamls():
    cin = ldm_yaml(unet_yaml(model_channels=192, channel_mult=[1, 2, 3, 5], attention_resolutions=[8, 4, 2],
                             num_heads=1, num_head_channels=-1, use_spatial_transformer=True, context_dim=512,
                             num_res_blocks=2, image_size=64),
                   first_stage_yaml("vq", (1, 2, 4), 3, n_embed=8192, ch=128, resolution=256),
                   {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                    "params": {"embed_dim": 512, "key": "class_label", "n_classes": 1001}},
                   conditioning_key="crossattn", cond_stage_key="class_label", image_size=64)
    cfg, notes = config_from_original(cin)
    assert (cfg.conditioning.task, cfg.conditioning.num_classes, cfg.conditioning.embed_dim) == ("class", 1000, 512)
    assert cfg.autoencoder.kind == "vq" and cfg.autoencoder.n_embed == 8192 and cfg.data.resolution == 256
    assert any("null class" in n for n in notes)

    sr = ldm_yaml(unet_yaml(in_channels=6, model_channels=160, channel_mult=[1, 2, 2, 4],
                            attention_resolutions=[16, 8]),
                  first_stage_yaml("vq", (1, 2, 4), 3, n_embed=8192, ch=128, resolution=256),
                  {"target": "torch.nn.Identity"}, linear_end=0.0155, concat_mode=True, cond_stage_key="LR_image",
                  image_size=64)
    cfg, notes = config_from_original(sr)
    assert (cfg.conditioning.task, cfg.conditioning.mode, cfg.unet.attention_resolutions) == ("sr", "concat", (8,))
    assert any("never" in n for n in notes)

    uncond = copy.deepcopy(TINY_VQ)
    uncond["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["attn_type"] = "none"
    cfg, _ = config_from_original(uncond)
    assert cfg.conditioning.task == "unconditional" and cfg.autoencoder.mid_attention is False
    assert cfg.unet.num_head_channels == 32 and cfg.diffusion.scale_by_std is False


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["unet_config"]["params"].update(use_new_attention_order=True), "use_new_attention_order"),
    (lambda p: p.update(parameterization="x0"), "parameterization"),
    (lambda p: p.update(beta_schedule="sqrt_linear"), "beta_schedule"),
    (lambda p: p["first_stage_config"].update(target="foo.Bar"), "first stage"),
    (lambda p: p["first_stage_config"]["params"].update(embed_dim=5), "embed_dim"),
    (lambda p: p.update(cond_stage_config={"target": "foo.Unknown"}, conditioning_key="crossattn"), "Unknown"),
])
def test_parse_refuses_what_it_cannot_reproduce(edit, message):
    raw = copy.deepcopy(TINY_VQ)
    edit(raw["model"]["params"])
    with pytest.raises(ConvertError, match=message):
        config_from_original(raw)


# ----------------------------------------------------------------------------- strictness, loading, EMA

def tiny_checkpoint(tmp_path, fmt="ckpt", ema=True, seed=0, **edits):
    raw = copy.deepcopy(TINY_VQ)
    _, model, _ = build(raw, seed)
    ema_unet = randomize(copy.deepcopy(model.unet), seed + 7) if ema else None
    sd = to_original_state(model, ema_unet=ema_unet, schedule=original_schedule(1000, 0.0015, 0.0195))
    path, cfg_path = write(tmp_path, raw, sd, fmt)
    return model, ema_unet, sd, path, cfg_path


def test_strict_error_lists_missing_unexpected_and_misshaped(tmp_path):
    _, _, sd, _, _ = tiny_checkpoint(tmp_path, ema=False)
    del sd["model.diffusion_model.out.2.weight"]
    sd["model.diffusion_model.input_blocks.9.9.weight"] = torch.zeros(3)
    sd["first_stage_model.quant_conv.weight"] = torch.zeros(3, 3, 3, 3)
    path, cfg_path = write(tmp_path, TINY_VQ, sd)
    with pytest.raises(ConvertError) as err:
        convert(path, tmp_path / "run", config_path=cfg_path)
    msg = str(err.value)
    assert "missing" in msg and "unet.out.2.weight" in msg and "model.diffusion_model.out.2.weight" in msg
    assert "unexpected" in msg and "model.diffusion_model.input_blocks.9.9.weight" in msg
    assert "mis-shaped" in msg and "first_stage_model.quant_conv.weight [3, 3, 3, 3]" in msg
    assert not (tmp_path / "run" / "ldm.safetensors").exists()
    # --no-strict leaves out what no rule maps, but never writes a model with holes.
    with pytest.raises(ConvertError, match="missing"):
        convert(path, tmp_path / "run", config_path=cfg_path, strict=False)


def test_no_strict_leaves_out_unexpected(tmp_path):
    _, _, sd, _, _ = tiny_checkpoint(tmp_path, ema=False)
    sd["cond_stage_model.something.weight"] = torch.zeros(2)
    path, cfg_path = write(tmp_path, TINY_VQ, sd)
    with pytest.raises(ConvertError, match="cond_stage_model.something.weight"):
        convert(path, tmp_path / "run", config_path=cfg_path)
    result = convert(path, tmp_path / "run", config_path=cfg_path, strict=False)
    assert result.mapping.unexpected == ["cond_stage_model.something.weight"]


def test_weights_only_refuses_pickles_that_need_code(tmp_path):
    _, _, sd, _, _ = tiny_checkpoint(tmp_path, ema=False)
    path = tmp_path / "hparams.ckpt"
    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(lr=1e-4)}, str(path))
    with pytest.raises(ConvertError, match="argparse.Namespace") as err:
        load_original(path)
    assert "weights_only" not in str(err.value) or "safetensors" in str(err.value)
    assert "safetensors" in str(err.value)


def test_lightning_bookkeeping_is_decoded_inert(tmp_path, monkeypatch):
    """Lightning pickles its checkpoint callback's class as a dict key; that global is
    replaced by an inert stand-in (the real class is not importable here and never runs)."""
    _, _, sd, _, _ = tiny_checkpoint(tmp_path, ema=False)
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __setstate__(self, state):  # would run on load if the loader used the real class
            raise AssertionError("bookkeeping code executed")

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    callback = ModelCheckpoint()
    callback.best_model_path = "x"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": sd, "callbacks": {ModelCheckpoint: callback}}, str(path))
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.delitem(sys.modules, name)
    loaded = load_original(path)
    assert set(loaded) == set(sd) and torch.equal(loaded["model.diffusion_model.out.2.weight"],
                                                  sd["model.diffusion_model.out.2.weight"])


def test_ema_selection(tmp_path):
    model, ema_unet, _, path, cfg_path = tiny_checkpoint(tmp_path, fmt="safetensors", ema=True)
    raw_run = convert(path, tmp_path / "raw", config_path=cfg_path)
    ema_run = convert(path, tmp_path / "ema", config_path=cfg_path, ema=True)
    raw, _ = load_checkpoint(tmp_path / "raw" / "ldm.safetensors")
    ema, meta = load_checkpoint(tmp_path / "ema" / "ldm.safetensors")
    for k, v in model.unet.state_dict().items():
        assert torch.equal(raw["unet." + k], v)
    for k, v in ema_unet.state_dict().items():
        assert torch.equal(ema["unet." + k], v)
    assert meta["ema"] == "True"
    n_unet = len(model.unet.state_dict())
    assert len(raw_run.mapping.superseded) == len(ema_run.mapping.superseded) == n_unet
    assert set(ema_run.mapping.ignored) == {"model_ema.decay", "model_ema.num_updates"}
    assert len(ema_run.mapping.schedule) == len(rules.SCHEDULE)
    _, _, _, path, cfg_path = tiny_checkpoint(tmp_path, ema=False)
    with pytest.raises(ConvertError, match="no model_ema"):
        convert(path, tmp_path / "x", config_path=cfg_path, ema=True)


def test_schedule_buffers_are_checked(tmp_path):
    _, _, sd, _, _ = tiny_checkpoint(tmp_path, ema=False)
    sd.update(original_schedule(1000, 0.0015, 0.0205))  # the inpainting model's end, not this config's
    path, cfg_path = write(tmp_path, TINY_VQ, sd)
    with pytest.raises(ConvertError, match="schedule: the checkpoint's betas differs"):
        convert(path, tmp_path / "run", config_path=cfg_path)


def test_end_to_end_cli_load_and_sample(tmp_path, capsys):
    """convert (CLI) → run dir → load_model → two DDIM steps, like a model trained here."""
    from ldm_fast.generate import generate

    model, _, _, path, cfg_path = tiny_checkpoint(tmp_path, ema=False)
    assert main(["--ckpt", str(path), "--config", str(cfg_path), "--out", str(tmp_path / "run")]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded, cond_state = load_model(tmp_path / "run")
    assert cond_state == {}
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    images = generate(loaded, n=2, steps=2, seed=0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    from ldm_fast import sample
    png = tmp_path / "grid.png"
    assert sample.main(["--ckpt", str(tmp_path / "run"), "--n", "1", "--steps", "2", "--out", str(png),
                        "--device", "cpu"]) == 0 and png.is_file()
    assert main(["--ckpt", str(path), "--preset", "nope", "--out", str(tmp_path / "r2")]) == 2


# ----------------------------------------------------------------------------- equivalence with diffusers

def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def diffusers_cross_attn_unet(raw: dict, sd: dict, image_size: int):
    """diffusers' UNet2DConditionModel configured and loaded by its own single-file utilities
    from the ORIGINAL config and state dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = sfu.create_unet_diffusers_config_from_ldm(raw, sd, image_size=image_size)
        unet = diffusers.UNet2DConditionModel(**config)
        unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, config), strict=True)
    return unet.eval()


def diffusers_legacy_unet(raw: dict, sd: dict):
    """diffusers' UNet2DModel for an original UNet with legacy AttentionBlocks. diffusers ships no
    converter for this layout, so: its own converter maps the ResBlocks/resamplers, and the
    attention tensors are translated here by hand — including the legacy qkv order (per head:
    q, k, v), an independent reading of the original's QKVAttentionLegacy."""
    p = raw["model"]["params"]["unet_config"]["params"]
    mc, mult, ds_attn = p["model_channels"], p["channel_mult"], set(p["attention_resolutions"])
    head_ch = p.get("num_head_channels", -1)
    attn = [2 ** i in ds_attn for i in range(len(mult))]
    config = dict(in_channels=p["in_channels"], out_channels=p["out_channels"],
                  block_out_channels=[mc * m for m in mult], layers_per_block=p["num_res_blocks"],
                  down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                  up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
                  attention_head_dim=head_ch, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
                  downsample_padding=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mapped = sfu.convert_ldm_unet_checkpoint(sd, {"layers_per_block": p["num_res_blocks"]})
    out = {}
    for k, v in mapped.items():
        if ".attentions." not in k:
            out[k] = v
            continue
        stem, leaf = k.rsplit(".", 2)[0], ".".join(k.rsplit(".", 2)[1:])
        if leaf.startswith("norm."):
            out[f"{stem}.group_norm.{leaf[5:]}"] = v
        elif leaf.startswith("proj_out."):
            out[f"{stem}.to_out.0.{leaf[9:]}"] = v.reshape(v.shape[0], -1) if v.dim() > 1 else v
        elif leaf.startswith("qkv."):
            c = v.shape[0] // 3
            heads = c // head_ch
            w = v.reshape(heads, 3, head_ch, -1)  # (heads, q|k|v, head_ch, C or 1)
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                part = w[:, i].reshape(c, -1)
                out[f"{stem}.{name}.{leaf[4:]}"] = part if v.dim() > 1 else part.reshape(c)
        else:
            raise AssertionError(k)
    unet = diffusers.UNet2DModel(**config)
    unet.load_state_dict(out, strict=True)
    return unet.eval()


def diffusers_first_stage(raw: dict, sd: dict):
    fs = raw["model"]["params"]["first_stage_config"]
    dd = fs["params"]["ddconfig"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = sfu.create_vae_diffusers_config_from_ldm(raw, sd, image_size=dd["resolution"])
        state = sfu.convert_ldm_vae_checkpoint(sd, config)
        if fs["target"].endswith("AutoencoderKL"):
            model = diffusers.AutoencoderKL(**config)
        else:
            config.pop("scaling_factor")
            model = diffusers.VQModel(**config, num_vq_embeddings=fs["params"]["n_embed"],
                                      mid_block_add_attention=dd.get("attn_type", "vanilla") != "none")
            state["quantize.embedding.weight"] = sd["first_stage_model.quantize.embedding.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def assert_close(ours, theirs, what):
    scale = theirs.abs().max().item()
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4 * max(1.0, scale), f"{what}: max |ours - diffusers| = {err:.3g} (output scale {scale:.3g})"


def compare(tmp_path, raw, run_dir, sd, *, context_dim=None, legacy=False, fmt="ckpt", no_strict=False, clip_dir=None):
    path, cfg_path = write(tmp_path, raw, sd, fmt)
    result = convert(path, run_dir, config_path=cfg_path, strict=not no_strict, clip_dir=clip_dir)
    model, cond_state = load_model(run_dir)
    cfg = model.cfg
    side = cfg.data.resolution // cfg.autoencoder.factor
    x = _rand((2, cfg.unet.in_channels, side, side), 1)
    t = torch.tensor([3, 917])
    context = _rand((2, 5, context_dim), 2) if context_dim else None
    with torch.no_grad():
        ours = model.unet(x, t, context=context)
        if legacy:
            theirs = diffusers_legacy_unet(raw, sd)(x, t).sample
        else:
            theirs = diffusers_cross_attn_unet(raw, sd, cfg.data.resolution)(x, t, encoder_hidden_states=context).sample
        assert_close(ours, theirs, "UNet")
        ref = diffusers_first_stage(raw, sd)
        z = _rand((2, cfg.autoencoder.z_channels, side, side), 3)
        images = _rand((1, 3, cfg.data.resolution, cfg.data.resolution), 4).clamp(-1, 1)
        if cfg.autoencoder.kind == "kl":
            assert_close(model.first_stage.decode(z), ref.decode(z).sample, "KL decoder")
            assert_close(model.first_stage.encode(images).mean, ref.encode(images).latent_dist.mean, "KL encoder")
        else:
            assert_close(model.first_stage.decode(z), ref.decode(z).sample, "VQ decoder")
            assert_close(model.first_stage.encode(images), ref.encode(images).latents, "VQ encoder")
    return result, model, cond_state


@needs_diffusers
def test_equivalence_celebahq_vq4_legacy_attention(tmp_path):
    raw = ldm_yaml(unet_yaml(model_channels=32, channel_mult=[1, 2, 2], attention_resolutions=[4, 2],
                             num_head_channels=16, num_res_blocks=2),
                   first_stage_yaml("vq", (1, 2, 4), 3, n_embed=64))
    _, model, _ = build(raw, 10)
    sd = to_original_state(model, schedule=original_schedule(1000, 0.0015, 0.0195))
    compare(tmp_path, raw, tmp_path / "run", sd, legacy=True)


@needs_diffusers
def test_equivalence_super_resolution_concat(tmp_path):
    raw = ldm_yaml(unet_yaml(in_channels=6, model_channels=32, channel_mult=[1, 2, 2], attention_resolutions=[8, 4],
                             num_head_channels=32),
                   first_stage_yaml("vq", (1, 2, 4), 3, n_embed=64), {"target": "torch.nn.Identity"},
                   linear_end=0.0155, concat_mode=True, cond_stage_key="LR_image")
    _, model, _ = build(raw, 20)
    sd = to_original_state(model, schedule=original_schedule(1000, 0.0015, 0.0155))
    result, loaded, _ = compare(tmp_path, raw, tmp_path / "run", sd, legacy=True, fmt="safetensors")
    assert loaded.cfg.conditioning.task == "sr" and loaded.cfg.unet.in_channels == 6
    assert any("never" in n for n in result.notes)


@needs_diffusers
def test_equivalence_imagenet_class_conditional(tmp_path):
    from ldm_fast.conditioning import ClassEmbedder

    raw = ldm_yaml(unet_yaml(model_channels=32, channel_mult=[1, 2], attention_resolutions=[2, 1], num_heads=1,
                             num_head_channels=-1, use_spatial_transformer=True, transformer_depth=1, context_dim=48),
                   first_stage_yaml("vq", (1, 2, 4), 3, n_embed=64),
                   {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                    "params": {"embed_dim": 48, "key": "class_label", "n_classes": 1001}},
                   conditioning_key="crossattn", cond_stage_key="class_label")
    _, model, cond = build(raw, 30)
    assert isinstance(cond, ClassEmbedder)
    ema_unet = randomize(copy.deepcopy(model.unet), 31)
    sd = to_original_state(model, cond, ema_unet=ema_unet, schedule=original_schedule(1000, 0.0015, 0.0195))
    _, loaded, cond_state = compare(tmp_path, raw, tmp_path / "run", sd, context_dim=48)
    assert torch.equal(cond_state["embedding.weight"], sd["cond_stage_model.embedding.weight"])
    embedder = ClassEmbedder(loaded.cfg.conditioning.num_classes, 48)
    embedder.load_state_dict(cond_state)
    labels = torch.tensor([3, 1000])  # 1000 = the null class (last row) of cin256-v2's 1001-row table
    assert torch.equal(embedder(labels), sd["cond_stage_model.embedding.weight"][labels][:, None])
    assert loaded.cfg.conditioning.null_class and loaded.cfg.conditioning.num_classes == 1000


def test_cin256_v1_class_table_without_null(tmp_path, capsys):
    """cin256 v1: 1000 rows, no null class (the original ClassEmbedder's default n_classes).
    Every class converts, class 999 included; guidance refuses with one clear line."""
    from ldm_fast import sample
    from ldm_fast.tasks import load_conditioner

    raw = ldm_yaml(unet_yaml(model_channels=32, channel_mult=[1, 2], attention_resolutions=[2], num_heads=1,
                             num_head_channels=-1, use_spatial_transformer=True, context_dim=16),
                   first_stage_yaml("vq", (1, 2), 3, n_embed=16, ch=32, resolution=8),
                   {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                    "params": {"embed_dim": 16, "key": "class_label"}},
                   conditioning_key="crossattn", cond_stage_key="class_label", image_size=4)
    _, model, cond = build(raw, 50)
    assert cond.embedding.weight.shape[0] == 1000
    sd = to_original_state(model, cond, schedule=original_schedule(1000, 0.0015, 0.0195))
    path, cfg_path = write(tmp_path, raw, sd)
    result = convert(path, tmp_path / "run", config_path=cfg_path)
    c = result.config.conditioning
    assert (c.num_classes, c.null_class) == (1000, False)
    assert any("no null class" in n for n in result.notes)
    loaded, cond_state = load_model(tmp_path / "run")
    conditioner = load_conditioner(tmp_path / "run", loaded, cond_state)
    got, uncond = conditioner.encode_inputs(classes=[0, 999])
    assert uncond is None and not conditioner.supports_guidance
    assert torch.equal(got["context"][:, 0], sd["cond_stage_model.embedding.weight"][[0, 999]])
    with pytest.raises(ValueError, match="no null class"):
        conditioner.parts[0].embedder.null_id
    from ldm_fast.export.onnx_export import cond_encoder_graph
    assert cond_encoder_graph(conditioner.module, loaded.cfg)[1].info["null_id"] is None  # exportable
    code = sample.main(["--ckpt", str(tmp_path / "run"), "--class", "999", "--guidance", "3", "--n", "1",
                        "--steps", "1", "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "guidance" in err and "Traceback" not in err


@needs_diffusers
def test_equivalence_text_to_image_kl8(tmp_path):
    """The LDM text-to-image model (KL-f8, SpatialTransformer, 8 heads) converts completely:
    its BERT τθ (x-transformers layers) becomes ldm_bert.py's, tokenised from a local vocab.txt;
    the prompt embedding equals diffusers' LDMBertModel on BertTokenizerFast's ids."""
    import transformers

    from test_ldm_bert import diffusers_ldm_bert, write_vocab

    from ldm_fast.tasks import load_conditioner

    raw = ldm_yaml(unet_yaml(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2],
                             attention_resolutions=[2, 1], num_heads=8, num_head_channels=-1,
                             use_spatial_transformer=True, transformer_depth=1, context_dim=64),
                   first_stage_yaml("kl", (1, 2, 4, 4), 4, resolution=64),
                   {"target": "ldm.modules.encoders.modules.BERTEmbedder",
                    "params": {"n_embed": 64, "n_layer": 2, "vocab_size": 24, "max_seq_len": 9}},
                   linear_start=0.00085, linear_end=0.012, scale_factor=0.18215, conditioning_key="crossattn",
                   cond_stage_key="caption")
    _, model, cond = build(raw, 40)
    sd = to_original_state(model, cond, schedule=original_schedule(1000, 0.00085, 0.012))
    assert "cond_stage_model.transformer.attn_layers.layers.1.1.net.0.0.weight" in sd
    sd["cond_stage_model.transformer.to_logits.weight"] = torch.zeros(24, 64)  # unused head: ignored
    sd["cond_stage_model.transformer.to_logits.bias"] = torch.zeros(24)
    vocab = write_vocab(tmp_path / "vocab.txt")
    path, cfg_path = write(tmp_path, raw, sd)
    with pytest.raises(ConvertError, match="--tokenizer"):
        convert(path, tmp_path / "no-tok", config_path=cfg_path)
    result = convert(path, tmp_path / "run", config_path=cfg_path, tokenizer=str(vocab))
    assert not result.mapping.unexpected and len(result.mapping.ignored) == 2
    loaded, cond_state = load_model(tmp_path / "run")
    assert float(loaded.scale_factor) == pytest.approx(0.18215)
    conditioner = load_conditioner(tmp_path / "run", loaded, cond_state)
    prompts = ["a photo of a cat", ""]
    with torch.no_grad():
        ours, uncond = conditioner.encode_inputs(prompts=prompts)
        ids = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))(
            prompts, truncation=True, max_length=9, padding="max_length", return_tensors="pt")["input_ids"]
        theirs = diffusers_ldm_bert(cond.transformer, heads=8)(ids).last_hidden_state
    assert_close(ours["context"], theirs, "LDM BERT text encoder")
    assert_close(uncond["context"][:1], theirs[1:], "null prompt")


def make_clip_dir(path, seed: int, width: int = 768):
    """A tiny local CLIP text checkpoint: BPE tokenizer files + a 1-layer 768-wide text model."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3, "c": 4, "a": 5,
             "t</w>": 6, "ca": 7, "dog</w>": 8, "photo</w>": 9}
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tok = transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    tok.save_pretrained(str(path))
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=width // 64,
                                         max_position_embeddings=77, hidden_act="quick_gelu",
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(config)
    model.save_pretrained(str(path))
    return model


@needs_diffusers
@needs_transformers
def test_equivalence_stable_diffusion_v1(tmp_path):
    """SD v1 layout: KL-f8 (scale 0.18215), SpatialTransformers with context 768 and 8 heads,
    CLIP text encoder weights carried from the checkpoint (cond_stage_model.transformer.*)."""
    from ldm_fast.clip_text import FrozenCLIPTextEncoder
    from ldm_fast.generate import generate

    clip_dir = tmp_path / "clip"
    make_clip_dir(clip_dir, seed=0)
    ckpt_clip = transformers.CLIPTextModel.from_pretrained(str(clip_dir))
    randomize(ckpt_clip, 50)  # the checkpoint's text weights differ from the directory's
    raw = yaml.safe_load(SD_V1_YAML)
    p = raw["model"]["params"]
    p["image_size"] = 8
    p["unet_config"]["params"].update(model_channels=64, channel_mult=[1, 2], attention_resolutions=[2, 1],
                                      num_res_blocks=1)
    p["first_stage_config"]["params"]["ddconfig"].update(ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=1, resolution=64)
    _, model, _ = build(raw, 51)
    sd = to_original_state(model, schedule=original_schedule(1000, 0.00085, 0.012))
    tower = getattr(ckpt_clip, "text_model", ckpt_clip)  # transformers 4.x nests it, 5.x does not
    for k, v in tower.state_dict().items():  # the SD v1 layout, whichever transformers is installed
        sd["cond_stage_model.transformer.text_model." + k] = v.detach().clone()
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    # A checkpoint whose text weights differ from the directory's (a fine-tuned text encoder):
    # they are written with the directory's config and tokenizer into RUN_DIR/text_encoder.
    result, loaded, cond_state = compare(tmp_path, raw, tmp_path / "run", sd, context_dim=768, fmt="safetensors",
                                         clip_dir=str(clip_dir))
    assert cond_state == {}  # the frozen text encoder lives in its directory, not in cond.*
    text_dir = tmp_path / "run" / "text_encoder"
    assert loaded.cfg.conditioning.pretrained_text_encoder == str(text_dir.resolve())
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in result.mapping.ignored
    assert sum(u.startswith("text_encoder.") for u in result.mapping.used.values()) == len(tower.state_dict())

    encoder = FrozenCLIPTextEncoder(loaded.cfg.conditioning.pretrained_text_encoder)
    prompts = ["a photo of a cat", ""]
    ids = encoder.tokenize(prompts)
    assert ids.shape == (2, 77)
    with torch.no_grad():
        reference = ckpt_clip(input_ids=ids).last_hidden_state  # no attention mask, as SD v1
        context = encoder(prompts)
    assert torch.equal(context, reference) and context.shape == (2, 77, 768)
    with pytest.raises(ValueError, match="more than CLIP's context"):
        FrozenCLIPTextEncoder(str(text_dir), 4, strict=True)(["a photo of a cat"])
    images = generate(loaded, n=2, steps=2, seed=0, cond={"context": context})
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()

    # The sampling side of an ordinary run: the task conditioner loads and encodes prompts.
    from ldm_fast.tasks import load_conditioner
    conditioner = load_conditioner(tmp_path / "run", loaded, cond_state)
    cond, uncond = conditioner.encode_inputs(prompts=["a cat"], n=2)
    assert cond["context"].shape == uncond["context"].shape == (2, 77, 768)

    # Text weights equal to the directory's (SD v1 froze CLIP): the run points at the directory.
    dir_tower = getattr(transformers.CLIPTextModel.from_pretrained(str(clip_dir)), "text_model", None)
    dir_tower = dir_tower or transformers.CLIPTextModel.from_pretrained(str(clip_dir))
    for k, v in dir_tower.state_dict().items():
        sd["cond_stage_model.transformer.text_model." + k] = v.detach().half()  # an fp16 checkpoint
    path, cfg_path = write(tmp_path, raw, sd, "safetensors")
    same = convert(path, tmp_path / "same", config_path=cfg_path, clip_dir=str(clip_dir))
    assert same.config.conditioning.pretrained_text_encoder == str(clip_dir.resolve())
    assert not (tmp_path / "same" / "text_encoder").exists()

    # Without a CLIP directory there is no tokenizer to run it with: strict says how to fix it.
    with pytest.raises(ConvertError, match="--clip DIR"):
        convert(path, tmp_path / "bare", config_path=cfg_path)


# ----------------------------------------------------------------------------- concat tasks' conditioning

def test_semantic_spatial_rescaler(tmp_path):
    """The semantic model's SpatialRescaler (bilinear halving to the latent grid, then a 1x1 conv
    without bias, `channel_mapper`) maps onto our SemanticEncoder (area average + 1x1 conv whose
    bias is filled with 0); its output equals an independent reading of the original."""
    import torch.nn.functional as F
    from ldm_fast.conditioning import SemanticEncoder
    from ldm_fast.tasks import load_conditioner

    raw = ldm_yaml(unet_yaml(in_channels=6, attention_resolutions=[], num_heads=8, num_head_channels=-1),
                   first_stage_yaml("vq", (1, 2, 4), 3),
                   {"target": "ldm.modules.encoders.modules.SpatialRescaler",
                    "params": {"n_stages": 2, "in_channels": 7, "out_channels": 3}},
                   concat_mode=True, cond_stage_key="segmentation", linear_end=0.0205)
    _, model, cond = build(raw, 60)
    assert isinstance(cond, SemanticEncoder)
    sd = to_original_state(model, schedule=original_schedule(1000, 0.0015, 0.0205))
    mapper = torch.randn(3, 7, 1, 1)
    sd["cond_stage_model.channel_mapper.weight"] = mapper
    path, cfg_path = write(tmp_path, raw, sd)
    result = convert(path, tmp_path / "run", config_path=cfg_path)
    assert "cond.mapping.bias" in result.mapping.filled
    loaded, cond_state = load_model(tmp_path / "run")
    conditioner = load_conditioner(tmp_path / "run", loaded, cond_state)
    seg = torch.randint(0, 7, (2, 32, 32))
    ours, _ = conditioner.encode_inputs(semantic=seg)
    x = F.one_hot(seg, 7).permute(0, 3, 1, 2).float()
    for _ in range(2):
        x = F.interpolate(x, scale_factor=0.5, mode="bilinear")
    torch.testing.assert_close(ours["concat"], F.conv2d(x, mapper), rtol=1e-5, atol=1e-5)


def test_inpainting_first_stage_as_cond_stage(tmp_path):
    """`__is_first_stage__`: the original registers the first stage twice, so the checkpoint
    holds cond_stage_model.* copies of first_stage_model.*; they are checked equal and used once."""
    from ldm_fast.tasks import load_conditioner

    fs = first_stage_yaml("vq", (1, 2, 4), 3)
    fs["params"]["ddconfig"]["attn_type"] = "none"
    raw = ldm_yaml(unet_yaml(in_channels=7, num_heads=8, num_head_channels=-1, resblock_updown=True), fs,
                   "__is_first_stage__", concat_mode=True, cond_stage_key="masked_image", linear_end=0.0205)
    _, model, _ = build(raw, 70)
    sd = to_original_state(model, schedule=original_schedule(1000, 0.0015, 0.0205))
    copies = {"cond_stage_model." + k[len("first_stage_model."):]: v.clone()
              for k, v in sd.items() if k.startswith("first_stage_model.")}
    path, cfg_path = write(tmp_path, raw, {**sd, **copies})
    result = convert(path, tmp_path / "run", config_path=cfg_path)
    assert len(result.mapping.duplicates) == len(copies) and result.mapping.filled["cond.latent_scale"]
    loaded, cond_state = load_model(tmp_path / "run")
    conditioner = load_conditioner(tmp_path / "run", loaded, cond_state)
    image, mask = torch.rand(1, 3, 32, 32) * 2 - 1, (torch.rand(1, 1, 32, 32) > 0.5).float()
    cond, _ = conditioner.encode_inputs(image=image, mask=mask)
    assert cond["concat"].shape == (1, 4, 8, 8)
    bad = dict(copies)
    key = next(iter(bad))
    bad[key] = bad[key] + 1
    path, cfg_path = write(tmp_path, raw, {**sd, **bad})
    with pytest.raises(ConvertError, match=key):
        convert(path, tmp_path / "bad", config_path=cfg_path)


def test_preset_instead_of_original_yaml(tmp_path):
    """--preset: our own description of the architecture; the schedule buffers still decide."""
    cfg = get_preset("tiny")
    torch.manual_seed(80)
    model = randomize(LatentDiffusion(cfg), 80)
    sd = to_original_state(model, schedule=original_schedule(1000, cfg.diffusion.linear_start,
                                                            cfg.diffusion.linear_end))
    sd["scale_factor"] = torch.tensor(0.75)  # a scale_by_std checkpoint keeps its measured scale
    path = tmp_path / "tiny.safetensors"
    save_file(sd, str(path))
    result = convert(path, tmp_path / "run", preset="tiny")
    loaded, _ = load_model(tmp_path / "run")
    assert float(loaded.scale_factor) == 0.75 and loaded.cfg.diffusion.scale_by_std is False
    assert result.mapping.used["scale_factor"] == "scale_factor"
    with pytest.raises(ConvertError, match="schedule"):
        convert(path, tmp_path / "run2", preset="sr-ldm-vq-4")  # another schedule (β_T 0.0155)
    with pytest.raises(ConvertError, match="mis-shaped"):
        convert(path, tmp_path / "run2", preset="celebahq-ldm-vq-4")  # same schedule, other architecture
