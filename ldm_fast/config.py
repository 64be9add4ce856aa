"""Typed configuration for every part of the engine, YAML I/O, validation and named presets.

A run is described by one `Config`: the first stage (`AutoencoderConfig`), the latent UNet
(`UNetConfig`), the conditioning (`ConditioningConfig`), the diffusion process
(`DiffusionConfig`), the data (`DataConfig`) and one `TrainConfig` per stage. Presets are
plain functions looked up by name in `PRESETS`; `validate()` names the offending field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """An invalid configuration value; the message starts with the field's dotted path."""


@dataclass
class AutoencoderConfig:
    kind: str = "kl"                      # "kl" (diagonal Gaussian), "vq" (codebook) or "identity" (f = 1, pixel space)
    in_channels: int = 3                  # image channels
    base_channels: int = 128              # channels at full resolution
    channel_mult: tuple = (1, 2, 4)       # one entry per level; f = 2 ** (len - 1)
    num_res_blocks: int = 2               # ResNet blocks per level
    attn_resolutions: tuple = ()          # feature-map sides that get self-attention (besides the middle block)
    mid_attention: bool = True            # self-attention in the middle block (the released VQ-f4 inpainting model drops it)
    z_channels: int = 3                   # latent channels c
    n_embed: int = 8192                   # VQ codebook size
    resolution: int = 256                 # training image side (only used for attention-resolution checks)
    dropout: float = 0.0
    groups: int = 32                      # GroupNorm groups
    kl_weight: float = 1e-6               # weight of the KL term (paper: 1e-6)
    vq_beta: float = 0.25                 # commitment weight
    perceptual_weight: float = 1.0        # LPIPS (or its documented substitute) weight
    disc_weight: float = 0.5              # adversarial weight, scaled by the adaptive factor
    disc_start: int = 50001               # the discriminator trains from this step (the original: both terms switch on here)
    # Steps after disc_start in which the discriminator trains alone; the generator's adversarial
    # weight then ramps linearly from 0 to full over as many steps. 0 = the original's switch
    # (both at full weight at once: the generator is pushed by a discriminator still at chance).
    disc_warmup: int = 0
    disc_channels: int = 64               # PatchGAN width
    disc_layers: int = 3                  # PatchGAN strided layers
    lpips_weights: str = ""               # local file with LPIPS backbone+head weights; "" = substitute

    @property
    def factor(self) -> int:
        return 1 if self.kind == "identity" else 2 ** (len(self.channel_mult) - 1)


@dataclass
class UNetConfig:
    in_channels: int = 3                  # latent channels (+ concatenated conditioning channels)
    out_channels: int = 3                 # latent channels
    model_channels: int = 224             # base width
    channel_mult: tuple = (1, 2, 3, 4)    # width multiplier per level
    num_res_blocks: int = 2               # ResBlocks per level (the decoder side has one more)
    attention_resolutions: tuple = (8, 4, 2)  # downsampling factors (ds) that get attention
    num_heads: int = -1                   # heads; -1 = derive from num_head_channels
    num_head_channels: int = 32           # channels per head; -1 = use num_heads
    transformer_depth: int = 1            # transformer blocks per SpatialTransformer
    context_dim: int = 0                  # cross-attention context width; 0 = plain self-attention blocks
    use_spatial_transformer: bool = False # SpatialTransformer (self+cross attn, GEGLU) instead of AttentionBlock
    use_scale_shift_norm: bool = False    # time embedding as GroupNorm scale/shift (else added)
    resblock_updown: bool = False         # ResBlocks with built-in resampling instead of conv up/down
    num_classes: int = 0                  # >0: learned class embedding added to the time embedding
    dropout: float = 0.0
    groups: int = 32                      # GroupNorm groups
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory


@dataclass
class ConditioningConfig:
    task: str = "unconditional"           # unconditional | class | text | layout | semantic | sr | inpaint
    mode: str = ""                        # how it reaches the UNet: "" (none), "crossattn", "concat", "hybrid", "adm" (class added to time embedding)
    num_classes: int = 0                  # class / layout / semantic class count
    embed_dim: int = 512                  # τθ output width (= UNet context_dim for cross-attention)
    n_layers: int = 2                     # τθ transformer layers
    n_heads: int = 8                      # τθ heads
    max_length: int = 77                  # tokens (text) or boxes*3 (layout)
    vocab_size: int = 30522               # text tokenizer vocabulary bound
    tokenizer: str = ""                   # local tokenizer.json / vocab.txt; "" = train on the captions
    pretrained_text_encoder: str = ""     # local transformers checkpoint directory (frozen); "" = train τθ
    text_encoder: str = "native"          # trained τθ's layout: "native" (TransformerEncoder) or "ldm_bert" (the original LDM text-to-image BERTEmbedder, ldm_bert.py)
    label_dropout: float = 0.1            # probability of the null condition during training (CFG)
    null_class: bool = True               # class task: the embedding has a null class (id num_classes) for guidance; the original cin256 v1 has none
    sr_factor: int = 4                    # super-resolution upscaling factor
    degradation: str = "bicubic"          # super-resolution: "bicubic" (LDM-SR) or "bsr" (generic, LDM-BSR)
    layout_grid: int = 32                 # layout: box corners discretised on a grid × grid lattice (grid² position tokens)
    inpaint_inputs: str = "native"        # inpainting input convention: "native" (holes 0, {0,1} mask area-resized) or "original" (CompVis: holes -1, mask ±1, nearest resize)


@dataclass
class DiffusionConfig:
    timesteps: int = 1000                 # T
    schedule: str = "linear"              # "linear" (in sqrt(beta), the paper's) or "cosine"
    linear_start: float = 0.0015          # beta_1
    linear_end: float = 0.0195            # beta_T
    parameterization: str = "eps"         # "eps" or "v"
    loss: str = "l2"                      # "l2" or "l1"
    scale_by_std: bool = True             # KL latents: rescale by 1/std measured on the first stage-2 batch
    scale_factor: float = 1.0             # latent scale (set by scale_by_std, or fixed, e.g. 0.18215)
    # Default sampler timestep grid (samplers.schedule_defaults). Native runs: "linspace" from
    # T-1 to 0, ending at clean data. Converted original checkpoints: "uniform", 1, False —
    # the CompVis DDIM/PLMS grid c*k+1 and its last step to alphas_cumprod[0], so the same
    # noise gives the original scripts' images.
    timestep_spacing: str = "linspace"    # linspace | trailing | leading | uniform | quad (samplers.SPACINGS)
    steps_offset: int = 0                 # added to the leading/uniform/quad grids (the original: 1)
    set_alpha_to_one: bool = True         # DDIM/PLMS end at alpha_bar = 1; False: at alphas_cumprod[0]


@dataclass
class DataConfig:
    dataset: str = "procedural"           # "procedural", "folder" or "shards"
    root: str = ""                        # image folder, or training shards as a brace pattern ('d/train-{000..099}.tar')
    heldout_root: str = ""                # shards: held-out shard pattern; "" holds out the last training shard
    resolution: int = 256                 # image side
    num_samples: int = 50000              # procedural: training images
    heldout_samples: int = 256            # held-out images for evaluation (folder: at most a tenth)
    seed: int = 0                         # procedural: content seed; folder: seed of the held-out split
    # Text tasks (and hybrid modes), folder images without a caption side file: "null" trains
    # them as the empty prompt (the unconditional case guidance uses; counted and reported),
    # "skip" leaves them out of training and evaluation.
    missing_captions: str = "null"
    num_workers: int = 0                  # DataLoader workers


@dataclass
class TrainConfig:
    steps: int = 100000                   # optimisation steps
    batch_size: int = 16                  # images per step and rank (global batch = batch_size × ranks × grad_accum)
    grad_accum: int = 1                   # micro-batches accumulated per optimisation step
    lr: float = 1e-4                      # peak learning rate (per global batch when scale_lr is off)
    scale_lr: bool = False                # lr × ranks × grad_accum (the original code's rule: base lr per batch_size images)
    strategy: str = "ddp"                 # multi-process: "ddp" (DistributedDataParallel) or "fsdp" (sharded UNet; train_ldm only)
    cached_latents: str = ""              # LDM: folder of first-stage latents encoded once (made on first use); "" = encode every step
    weight_decay: float = 0.0             # AdamW weight decay
    warmup_steps: int = 0                 # linear warm-up
    lr_decay: str = "constant"            # after warm-up: "constant" (the original's) or "cosine" to 0 at `steps`
    grad_clip: float = 1.0                # max gradient norm (0 = off)
    ema_decay: float = 0.9999             # EMA decay (LDM stage; 0 = off)
    log_every: int = 50                   # steps between metric log lines
    ckpt_every: int = 1000                # steps between checkpoints
    keep_last: int = 3                    # checkpoints kept
    max_nonfinite: int = 10               # consecutive non-finite losses before the run stops


@dataclass
class Config:
    name: str = "custom"
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train_autoencoder: TrainConfig = field(default_factory=lambda: TrainConfig(lr=4.5e-6, ema_decay=0.0))
    train_ldm: TrainConfig = field(default_factory=TrainConfig)
    kernels: str = "auto"                 # "eager", "triton" or "auto" (kernels measured to win on CUDA, see ops.py); $LDM_KERNELS overrides "auto"
    precision: str = "fp32"               # "fp32", "bf16" or "fp16" (autocast on GPU)
    seed: int = 0                         # training seed


# ----------------------------------------------------------------------------- YAML I/O

def to_dict(cfg) -> dict:
    """Nested plain dict (tuples become lists) for YAML and checkpoint metadata."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict, cls=Config, path: str = ""):
    """Build a dataclass from a nested dict; unknown keys are errors that name the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            raise ConfigError(f"{where}: unknown field (known: {', '.join(fields)})")
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = from_dict(value, type(default), where)
        else:
            kwargs[key] = _coerce(value, default, where)
    return cls(**kwargs)


def _coerce(value, default, where):
    """Match the default's type: YAML lists become tuples, ints may be given for floats."""
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
        # ints are floats here, and YAML 1.1 reads exponent notation without a dot ("1e-4") as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, type(default)) or isinstance(value, bool) != isinstance(default, bool):
        raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}")
    return value


def save_yaml(cfg: Config, path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(path) -> Config:
    cfg = from_dict(yaml.safe_load(Path(path).read_text()) or {})
    validate(cfg)
    return cfg


def apply_override(cfg: Config, assignment: str) -> Config:
    """Apply one `section.field=value` override (value parsed as YAML), e.g. unet.model_channels=64."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected section.field=value")
    key, raw = assignment.split("=", 1)
    data = to_dict(cfg)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"{key}: unknown section {part!r}")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"{key}: unknown field")
    node[parts[-1]] = yaml.safe_load(raw)
    return from_dict(data)


# ----------------------------------------------------------------------------- validation

def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{where}: {message}")


def validate(cfg: Config) -> Config:
    """Check every field that would otherwise fail deep inside a model; return cfg."""
    ae, un, df, cond = cfg.autoencoder, cfg.unet, cfg.diffusion, cfg.conditioning
    _require(ae.kind in ("kl", "vq", "identity"), "autoencoder.kind", f"expected kl|vq|identity, got {ae.kind!r}")
    if ae.kind != "identity":
        _require(len(ae.channel_mult) >= 1 and all(m > 0 for m in ae.channel_mult),
                 "autoencoder.channel_mult", f"expected positive multipliers, got {ae.channel_mult}")
        _require(ae.factor in (1, 2, 4, 8, 16, 32), "autoencoder.channel_mult",
                 f"downsampling factor f = {ae.factor} must be one of 1, 2, 4, 8, 16, 32")
        _require(ae.base_channels > 0, "autoencoder.base_channels", f"must be positive, got {ae.base_channels}")
        _require(ae.z_channels > 0, "autoencoder.z_channels", f"must be positive, got {ae.z_channels}")
        _require(ae.num_res_blocks > 0, "autoencoder.num_res_blocks", "must be positive")
        _require(ae.disc_warmup >= 0, "autoencoder.disc_warmup", f"must be >= 0, got {ae.disc_warmup}")
        for m in ae.channel_mult:
            _require(ae.base_channels * m % ae.groups == 0, "autoencoder.groups",
                     f"{ae.groups} groups do not divide {ae.base_channels * m} channels")
        sides = {ae.resolution // 2 ** i for i in range(len(ae.channel_mult))}
        for r in ae.attn_resolutions:
            _require(r in sides, "autoencoder.attn_resolutions",
                     f"{r} never occurs (feature sides at resolution {ae.resolution}: {sorted(sides)})")
        if ae.kind == "vq":
            _require(ae.n_embed > 1, "autoencoder.n_embed", "codebook needs at least 2 entries")
    _require(un.model_channels > 0, "unet.model_channels", f"must be positive, got {un.model_channels}")
    _require(un.in_channels > 0 and un.out_channels > 0, "unet.in_channels",
             "input and output channels must be positive")
    _require(all(m > 0 for m in un.channel_mult) and un.channel_mult, "unet.channel_mult", "expected positive multipliers")
    _require(un.num_res_blocks > 0, "unet.num_res_blocks", "must be positive")
    levels = {2 ** i for i in range(len(un.channel_mult))}
    for ds in un.attention_resolutions:
        _require(ds in levels, "unet.attention_resolutions",
                 f"ds {ds} never occurs (the UNet's downsampling factors are {sorted(levels)})")
    for m in un.channel_mult:
        ch = un.model_channels * m
        _require(ch % un.groups == 0, "unet.groups", f"{un.groups} groups do not divide {ch} channels")
        if un.attention_resolutions:
            if un.num_head_channels > 0:
                _require(ch % un.num_head_channels == 0, "unet.num_head_channels",
                         f"{un.num_head_channels} channels per head do not divide {ch} channels")
            else:
                _require(un.num_heads > 0, "unet.num_heads", "set num_heads or num_head_channels")
                _require(ch % un.num_heads == 0, "unet.num_heads", f"{un.num_heads} heads do not divide {ch} channels")
    if un.use_spatial_transformer:
        _require(un.context_dim > 0 or cond.mode not in ("crossattn", "hybrid"), "unet.context_dim",
                 "cross-attention conditioning needs a positive context_dim")
    _require(df.timesteps > 1, "diffusion.timesteps", "must be > 1")
    _require(df.schedule in ("linear", "cosine"), "diffusion.schedule", f"expected linear|cosine, got {df.schedule!r}")
    _require(0 < df.linear_start < df.linear_end < 1, "diffusion.linear_start",
             f"need 0 < linear_start < linear_end < 1, got {df.linear_start}, {df.linear_end}")
    _require(df.parameterization in ("eps", "v"), "diffusion.parameterization", f"expected eps|v, got {df.parameterization!r}")
    _require(cfg.conditioning.null_class or cfg.conditioning.label_dropout == 0, "conditioning.label_dropout",
             "must be 0 without a null class (conditioning.null_class: false)")
    _require(cfg.conditioning.text_encoder in ("native", "ldm_bert"), "conditioning.text_encoder",
             f"expected native|ldm_bert, got {cfg.conditioning.text_encoder!r}")
    _require(cfg.conditioning.inpaint_inputs in ("native", "original"), "conditioning.inpaint_inputs",
             f"expected native|original, got {cfg.conditioning.inpaint_inputs!r}")
    spacings = ("linspace", "trailing", "leading", "uniform", "quad")
    _require(df.timestep_spacing in spacings, "diffusion.timestep_spacing",
             f"expected one of {'|'.join(spacings)}, got {df.timestep_spacing!r}")
    _require(df.steps_offset >= 0, "diffusion.steps_offset", f"must be ≥ 0, got {df.steps_offset}")
    _require(df.loss in ("l1", "l2"), "diffusion.loss", f"expected l1|l2, got {df.loss!r}")
    _require(df.scale_factor > 0, "diffusion.scale_factor", "must be positive")
    _require(cond.layout_grid >= 2, "conditioning.layout_grid", f"must be >= 2, got {cond.layout_grid}")
    _require(cfg.kernels in ("eager", "triton", "auto"), "kernels", f"expected eager|triton|auto, got {cfg.kernels!r}")
    _require(cfg.precision in ("fp32", "bf16", "fp16"), "precision", f"expected fp32|bf16|fp16, got {cfg.precision!r}")
    _require(cfg.data.resolution > 0, "data.resolution", "must be positive")
    if ae.kind != "identity":
        _require(cfg.data.resolution % ae.factor == 0, "data.resolution",
                 f"{cfg.data.resolution} is not a multiple of the first stage's factor {ae.factor}")
    _require(cfg.data.dataset in ("procedural", "folder", "shards"), "data.dataset",
             f"expected procedural|folder|shards, got {cfg.data.dataset!r}")
    _require(cfg.data.dataset == "procedural" or bool(cfg.data.root), "data.root", "required for folder/shards data")
    _require(cfg.data.missing_captions in ("null", "skip"), "data.missing_captions",
             f"expected null|skip, got {cfg.data.missing_captions!r}")
    for name in ("train_autoencoder", "train_ldm"):
        tc = getattr(cfg, name)
        _require(tc.steps >= 0, f"{name}.steps", "must be >= 0")
        _require(tc.batch_size > 0, f"{name}.batch_size", f"must be positive, got {tc.batch_size}")
        _require(tc.lr > 0, f"{name}.lr", "must be positive")
        _require(0 <= tc.ema_decay < 1, f"{name}.ema_decay", "must be in [0, 1)")
        _require(tc.ckpt_every > 0, f"{name}.ckpt_every", "must be positive")
        _require(tc.keep_last > 0, f"{name}.keep_last", "must be positive")
        _require(tc.grad_accum > 0, f"{name}.grad_accum", "must be positive")
        _require(tc.strategy in ("ddp", "fsdp"), f"{name}.strategy", f"expected ddp|fsdp, got {tc.strategy!r}")
        _require(tc.lr_decay in ("constant", "cosine"), f"{name}.lr_decay",
                 f"expected constant|cosine, got {tc.lr_decay!r}")
    from ldm_fast.tasks.registry import get_task  # lazy: the task files import this module

    _require(not (cfg.train_ldm.cached_latents and cfg.data.dataset == "shards"
                  and get_task(cond.task).per_sample_pairs),
             "train_ldm.cached_latents", f"the {cond.task!r} task draws its inputs per streamed shard sample, "
             "which a latent cache does not store; unset it or train from an image folder")
    _require(cfg.train_autoencoder.strategy == "ddp", "train_autoencoder.strategy",
             "fsdp shards the LDM's UNet only; first stages fit one device, train them with ddp")
    return cfg


# ----------------------------------------------------------------------------- presets
# First stages (REFERENCE.md): 128 base channels, 2 res blocks.

def _first_stage(kind: str, f: int) -> AutoencoderConfig:
    table = {  # name: (channel_mult, z_channels, n_embed, attn_resolutions)
        ("kl", 4): ((1, 2, 4), 3, 0, ()),
        ("kl", 8): ((1, 2, 4, 4), 4, 0, ()),
        ("kl", 16): ((1, 1, 2, 2, 4), 16, 0, (16,)),
        ("kl", 32): ((1, 1, 2, 2, 4, 4), 64, 0, (16, 8)),
        ("vq", 4): ((1, 2, 4), 3, 8192, ()),
        ("vq", 8): ((1, 2, 2, 4), 4, 16384, (32,)),
        ("vq", 16): ((1, 1, 2, 2, 4), 8, 16384, (16,)),
    }
    mult, z, n_embed, attn = table[(kind, f)]
    return AutoencoderConfig(kind=kind, channel_mult=mult, z_channels=z, n_embed=n_embed or 8192,
                             attn_resolutions=attn, resolution=256)


def _first_stage_preset(kind: str, f: int):
    def build() -> Config:
        ae = _first_stage(kind, f)
        return Config(name=f"{kind}-f{f}", autoencoder=ae,
                      unet=UNetConfig(in_channels=ae.z_channels, out_channels=ae.z_channels),
                      diffusion=DiffusionConfig(scale_by_std=kind == "kl"),
                      data=DataConfig(resolution=256))
    return build


def tiny() -> Config:
    """The default demo: 32² procedural images, KL-f4 first stage, a small UNet; ~10 min on 2 CPU cores."""
    ae = AutoencoderConfig(kind="kl", base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                           z_channels=3, resolution=32, groups=8, kl_weight=1e-6,
                           perceptual_weight=0.0, disc_weight=0.5, disc_start=50001, disc_warmup=100,
                           disc_channels=32, disc_layers=2)
    # The adversarial term starts where the original's does (step 50001, a fine-tuning stage on a
    # converged autoencoder), so no run of a CPU budget gets it unless asked for. Measured on
    # held-out 32² photographs (README, "Real images"): switched on at step 1200 of 1500 it cost
    # 0.7 dB PSNR (with a discriminator warm-up as well), from step 1500 of 4500 2.4 dB, with
    # hallucinated speckle on flat regions, though it did flatten the latent-grid edges.
    unet = UNetConfig(in_channels=3, out_channels=3, model_channels=64, channel_mult=(1, 2, 2),
                      num_res_blocks=1, attention_resolutions=(2,), num_head_channels=32,
                      groups=16)
    return Config(
        name="tiny", autoencoder=ae, unet=unet,
        diffusion=DiffusionConfig(schedule="linear", linear_start=0.0015, linear_end=0.0195),
        data=DataConfig(resolution=32, num_samples=20000, heldout_samples=256),
        train_autoencoder=TrainConfig(steps=1500, batch_size=16, lr=1e-3, ema_decay=0.0,
                                      log_every=50, ckpt_every=500, warmup_steps=50),
        train_ldm=TrainConfig(steps=3000, batch_size=32, lr=5e-4, ema_decay=0.999,
                              log_every=50, ckpt_every=500, warmup_steps=100),
    )


def _ldm(name, first_stage, unet, diffusion, conditioning=None, resolution=256) -> Config:
    return Config(name=name, autoencoder=first_stage, unet=unet,
                  conditioning=conditioning or ConditioningConfig(),
                  diffusion=diffusion, data=DataConfig(resolution=resolution),
                  train_ldm=TrainConfig(batch_size=48, lr=1e-6 * 48))


def celebahq_ldm_vq_4() -> Config:
    return _ldm("celebahq-ldm-vq-4", _first_stage("vq", 4),
                UNetConfig(in_channels=3, out_channels=3, model_channels=224, channel_mult=(1, 2, 3, 4),
                           attention_resolutions=(8, 4, 2), num_head_channels=32),
                DiffusionConfig(linear_start=0.0015, linear_end=0.0195, scale_by_std=False))


def cin256_ldm_vq_4() -> Config:
    return _ldm("cin256-ldm-vq-4", _first_stage("vq", 4),
                UNetConfig(in_channels=3, out_channels=3, model_channels=192, channel_mult=(1, 2, 3, 5),
                           attention_resolutions=(8, 4, 2), num_heads=1, num_head_channels=-1,
                           use_spatial_transformer=True, transformer_depth=1, context_dim=512),
                DiffusionConfig(linear_start=0.0015, linear_end=0.0195, scale_by_std=False),
                ConditioningConfig(task="class", mode="crossattn", num_classes=1000, embed_dim=512))


def txt2img_ldm_kl_8() -> Config:
    return _ldm("txt2img-ldm-kl-8", _first_stage("kl", 8),
                UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                           attention_resolutions=(4, 2, 1), num_heads=8, num_head_channels=-1,
                           use_spatial_transformer=True, transformer_depth=1, context_dim=1280),
                DiffusionConfig(linear_start=0.00085, linear_end=0.012, scale_by_std=False, scale_factor=0.18215),
                ConditioningConfig(task="text", mode="crossattn", embed_dim=1280, n_layers=32, n_heads=8,
                                   max_length=77),
                resolution=256)


def churches_ldm_kl_8() -> Config:
    return _ldm("churches-ldm-kl-8", _first_stage("kl", 8),
                UNetConfig(in_channels=4, out_channels=4, model_channels=192, channel_mult=(1, 2, 2, 4, 4),
                           attention_resolutions=(1, 2, 4, 8), num_heads=8, num_head_channels=-1,
                           use_scale_shift_norm=True, resblock_updown=True),
                DiffusionConfig(linear_start=0.0015, linear_end=0.0155, loss="l1", scale_by_std=True))


def sr_ldm_vq_4() -> Config:
    return _ldm("sr-ldm-vq-4", _first_stage("vq", 4),
                # The released config lists attention at 16 and 8; only ds 8 occurs in a 4-level UNet.
                UNetConfig(in_channels=6, out_channels=3, model_channels=160, channel_mult=(1, 2, 2, 4),
                           attention_resolutions=(8,), num_head_channels=32),
                DiffusionConfig(linear_start=0.0015, linear_end=0.0155, scale_by_std=False),
                ConditioningConfig(task="sr", mode="concat", sr_factor=4, degradation="bsr"))


def inpaint_ldm_vq_4() -> Config:
    ae = _first_stage("vq", 4)
    ae.mid_attention = False
    return _ldm("inpaint-ldm-vq-4", ae,
                UNetConfig(in_channels=7, out_channels=3, model_channels=256, channel_mult=(1, 2, 3, 4),
                           attention_resolutions=(8, 4, 2), num_heads=8, num_head_channels=-1,
                           resblock_updown=True),
                DiffusionConfig(linear_start=0.0015, linear_end=0.0205, loss="l1", scale_by_std=False),
                ConditioningConfig(task="inpaint", mode="concat"))


def layout2img_ldm_vq_4() -> Config:
    return _ldm("layout2img-ldm-vq-4", _first_stage("vq", 4),
                UNetConfig(in_channels=3, out_channels=3, model_channels=128, channel_mult=(1, 2, 3, 4),
                           attention_resolutions=(8, 4, 2), num_head_channels=32,
                           use_spatial_transformer=True, transformer_depth=3, context_dim=512),
                DiffusionConfig(linear_start=0.0015, linear_end=0.0205, scale_by_std=False),
                ConditioningConfig(task="layout", mode="crossattn", embed_dim=512, n_layers=16,
                                   vocab_size=8192, max_length=92, num_classes=601))


def semantic_ldm_vq_4() -> Config:
    return _ldm("semantic-ldm-vq-4", _first_stage("vq", 4),
                # The released config lists attention at 32, 16, 8, none of which occurs in a 3-level
                # UNet (ds 1, 2, 4): only the middle block attends.
                UNetConfig(in_channels=6, out_channels=3, model_channels=128, channel_mult=(1, 4, 8),
                           attention_resolutions=(), num_heads=8, num_head_channels=-1),
                DiffusionConfig(linear_start=0.0015, linear_end=0.0205, scale_by_std=False),
                ConditioningConfig(task="semantic", mode="concat", num_classes=182))


PRESETS = {
    "tiny": tiny,
    "celebahq-ldm-vq-4": celebahq_ldm_vq_4,
    "cin256-ldm-vq-4": cin256_ldm_vq_4,
    "txt2img-ldm-kl-8": txt2img_ldm_kl_8,
    "churches-ldm-kl-8": churches_ldm_kl_8,
    "sr-ldm-vq-4": sr_ldm_vq_4,
    "inpaint-ldm-vq-4": inpaint_ldm_vq_4,
    "layout2img-ldm-vq-4": layout2img_ldm_vq_4,
    "semantic-ldm-vq-4": semantic_ldm_vq_4,
    **{f"{k}-f{f}": _first_stage_preset(k, f)
       for k, f in [("kl", 4), ("kl", 8), ("kl", 16), ("kl", 32), ("vq", 4), ("vq", 8), ("vq", 16)]},
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown name {name!r} (known: {', '.join(PRESETS)})")
    return validate(PRESETS[name]())
