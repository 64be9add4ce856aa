"""Tensor names: original latent-diffusion / Stable Diffusion v1 checkpoints ↔ ldm_fast, in one table.

Our modules were named after the original ones (unet.py, autoencoder.py), so the mapping is a
handful of prefix rules rather than a rename per layer. "Ours" is the namespace of a
`LatentDiffusion` state dict (`unet.*`, `first_stage.*`, `scale_factor`) plus `cond.*` for the
conditioning encoder — the same names a run directory stores (run.py): `unet.*`, `scale_factor`
and `cond.*` in ldm.safetensors, `first_stage.*` (prefix dropped) in autoencoder.safetensors.

    ours                   original                              what
    ---------------------  ------------------------------------  ---------------------------------------
    unet.X                 model.diffusion_model.X               UNet: time_embed, input_blocks.N.M,
                                                                 middle_block, output_blocks, out, label_emb
    unet.X  (EMA)          model_ema.diffusion_modelX'           X' = X without its dots (LitEma's
                                                                 buffer names); chosen with --ema
    first_stage.logvar     first_stage_model.loss.logvar         KL stage: the loss's learned scalar,
                                                                 absent from LDM checkpoints → 0
    first_stage.X          first_stage_model.X                   encoder/decoder/quant_conv/
                                                                 post_quant_conv/quantize.embedding
    text_encoder.text_model.X  cond_stage_model.transformer.text_model.X  SD v1 CLIP text tower:
                                                                 frozen, kept as a transformers
                                                                 directory (clip_text.py), not in cond.*
    cond.mapping.weight    cond_stage_model.channel_mapper.weight  semantic SpatialRescaler's 1x1 conv
                                                                 (ours has a bias: filled with 0)
    cond.X                 cond_stage_model.X                    τθ whose architecture is ours: class
                                                                 embedder `embedding.weight`, the LDM
                                                                 BERT `transformer.*` (ldm_bert.py)
    scale_factor           scale_factor                          a buffer only when scale_by_std
    —                      betas, alphas_cumprod, … (SCHEDULE)   checked against our schedule, not stored
    —                      IGNORED (below)                       bookkeeping with no inference meaning
    FILLS (below)          —                                     ours without an original tensor

The table is ordered most specific first; the first matching rule wins in both directions.
The EMA rule cannot be inverted by string surgery (the dots are gone), so `to_ours` inverts it
by mapping the candidate names forward — `ours → original → ours` is the identity either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Rule:
    ours: str              # prefix (or whole name when exact) in our namespace
    original: str          # prefix (or whole name when exact) in the original checkpoint
    what: str              # which part of the model, for error messages and the docs above
    exact: bool = False    # whole-name rule rather than a prefix rule
    flatten: bool = False  # original drops the dots of the remainder (LitEma buffer names)


RULES: tuple[Rule, ...] = (
    Rule("first_stage.logvar", "first_stage_model.loss.logvar", "first stage (KL loss log-variance)", exact=True),
    Rule("scale_factor", "scale_factor", "latent scale factor", exact=True),
    Rule("cond.mapping.weight", "cond_stage_model.channel_mapper.weight", "semantic channel mapper", exact=True),
    Rule("unet.", "model.diffusion_model.", "UNet"),
    Rule("first_stage.", "first_stage_model.", "first stage"),
    Rule("text_encoder.text_model.", "cond_stage_model.transformer.text_model.",
         "text encoder (SD v1 CLIP: pass --clip DIR)"),
    Rule("cond.", "cond_stage_model.", "conditioning encoder"),
)
EMA_RULE = Rule("unet.", "model_ema.diffusion_model", "UNet (EMA)", flatten=True)

# Diffusion-schedule buffers of the original DDPM/LatentDiffusion modules. They are derived from
# (timesteps, beta schedule, linear_start, linear_end), so they are checked, never stored.
SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
            "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
            "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")

# Tensors that carry nothing an inference model needs; each one is named with the reason.
IGNORED = {
    "model_ema.decay": "EMA decay constant (bookkeeping of the EMA copy)",
    "model_ema.num_updates": "EMA update counter (bookkeeping of the EMA copy)",
    "lvlb_weights": "per-timestep weights of the variational-bound training loss",
    "logvar": "per-timestep learned loss log-variance (training only)",
    # transformers' CLIPTextModel stores its position ids as a buffer; they are arange(77).
    "cond_stage_model.transformer.text_model.embeddings.position_ids": "CLIP position ids (arange)",
    # x-transformers' TransformerWrapper keeps a token-prediction head the embedder never calls
    # (it returns the final-norm embeddings).
    "cond_stage_model.transformer.to_logits.weight": "LDM BERT's unused token-prediction head",
    "cond_stage_model.transformer.to_logits.bias": "LDM BERT's unused token-prediction head",
}


# Our tensors that have no original counterpart (or none in LDM checkpoints): what fills them.
FILLS = {
    "scale_factor": "the config's scale_factor (the original keeps it as a plain attribute unless scale_by_std)",
    "first_stage.logvar": "0: the KL loss's log-variance; LDM checkpoints leave the loss out; unused at inference",
    "cond.mapping.bias": "0: the original SpatialRescaler's 1x1 channel mapper has no bias",
    "cond.latent_scale": ("inpainting: 1 for the original convention (its cond_stage_model.encode applies no "
                          "scale), else the latent scale (the masked image is encoded as latents are)"),
}


def is_ema_name(name: str) -> bool:
    return name.startswith("model_ema.") and name not in IGNORED


def _rule_for_ours(name: str, ema: bool) -> Rule | None:
    if ema:
        return EMA_RULE if name.startswith(EMA_RULE.ours) else None
    for rule in RULES:
        if (name == rule.ours) if rule.exact else name.startswith(rule.ours):
            return rule
    return None


def to_original(name: str, ema: bool = False) -> str:
    """Our name → the original checkpoint's name (its EMA copy when `ema`)."""
    rule = _rule_for_ours(name, ema)
    if rule is None:
        raise KeyError(f"{name}: no rule maps it to an original{' EMA' if ema else ''} name")
    if rule.exact:
        return rule.original
    rest = name[len(rule.ours):]
    return rule.original + (rest.replace(".", "") if rule.flatten else rest)


def to_ours(name: str, candidates: Iterable[str] | None = None) -> str | None:
    """The original name → ours, or None when no rule covers it. EMA names need `candidates`
    (our UNet names) because the dots they lost cannot be put back by string rules alone."""
    if is_ema_name(name):
        if candidates is None:
            raise ValueError(f"{name}: an EMA name can only be inverted against a list of our names")
        return ema_lookup(candidates).get(name)
    for rule in RULES:
        if rule.exact:
            if name == rule.original:
                return rule.ours
        elif name.startswith(rule.original):
            return rule.ours + name[len(rule.original):]
    return None


def ema_lookup(candidates: Iterable[str]) -> dict[str, str]:
    """{original EMA name: our name} for the UNet names among `candidates`; refuses collisions
    (two of our names that differ only in dots would make the EMA layout ambiguous)."""
    table: dict[str, str] = {}
    for ours in candidates:
        if _rule_for_ours(ours, ema=True) is None:
            continue
        original = to_original(ours, ema=True)
        if original in table and table[original] != ours:
            raise ValueError(f"EMA names collide: {table[original]} and {ours} both flatten to {original}")
        table[original] = ours
    return table


def rule_of(name: str) -> str:
    """Which part of the model an original name belongs to (for grouping error messages)."""
    if is_ema_name(name):
        return EMA_RULE.what
    if name in SCHEDULE:
        return "diffusion schedule"
    for rule in RULES:
        if (name == rule.original) if rule.exact else name.startswith(rule.original):
            return rule.what
    return "no rule"
