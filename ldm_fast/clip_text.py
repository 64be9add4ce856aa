"""τθ of Stable Diffusion v1: the frozen CLIP ViT-L/14 text transformer, from local files.

SD v1 conditions its UNet on the last hidden state (after the final LayerNorm) of CLIP's text
transformer for the prompt padded to 77 tokens, with *no* attention mask: the UNet
cross-attends to all 77 outputs, pads included, and CLIP's causal mask already keeps the
prompt's own tokens from seeing the pads. (An encoder that passes the padding mask changes
the pad outputs and so the images.) `transformers` supplies the architecture and tokenizer;
it is imported only when this module is used, and nothing is downloaded.

State-dict names: `transformer.text_model.*`, i.e. the original checkpoint's
`cond_stage_model.transformer.text_model.*` below the `cond_stage_model.` prefix. The encoder
is frozen and lives in its checkpoint directory, not in a run's weights: a run's config names
the directory (conditioning.pretrained_text_encoder).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ldm_fast.conditioning import PromptLengthGuard

CLIP_MODEL_TYPES = ("clip_text_model", "clip")


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("the CLIP text encoder needs the `transformers` package (pip install "
                          "'ldm_fast[clip]') and a local CLIP checkpoint directory (config.json, "
                          "vocab.json, merges.txt, weights)") from exc
    return transformers


def is_clip_dir(path) -> bool:
    """True when `path` is a local transformers checkpoint of CLIP (full or text-only)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text()).get("model_type") in CLIP_MODEL_TYPES


def text_config_from_dir(path):
    """The CLIPTextConfig of a local checkpoint: the text half of a full CLIP config, or the
    text-only config itself."""
    tf = _transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"CLIP text encoder: {path} has no config.json (expected a local "
                                "transformers CLIP checkpoint directory)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == "clip":
        return tf.CLIPConfig.from_pretrained(str(path), local_files_only=True).text_config
    if model_type == "clip_text_model":
        return tf.CLIPTextConfig.from_pretrained(str(path), local_files_only=True)
    raise ValueError(f"CLIP text encoder: {path} holds a {model_type!r} model, not CLIP")


class FrozenCLIPTextEncoder(nn.Module):
    """Prompts → (B, max_length, width) CLIP text features, frozen.

    `path`: a local transformers CLIP checkpoint directory (tokenizer files, config, and —
    unless `load_weights=False` — weights). With `config` given and no path the module has the
    architecture only (for converting checkpoint tensors; it cannot tokenize).
    """

    def __init__(self, path=None, max_length: int = 77, strict: bool = False, *, load_weights: bool = True,
                 config=None):
        super().__init__()
        tf = _transformers()
        self.path, self.max_length, self.tokenizer = path, max_length, None
        self.strict = strict
        self.length_guard = PromptLengthGuard("CLIP")  # over-long prompts: refuse (strict) or truncate
        if path is not None:
            path = Path(path)
            if not path.is_dir():
                raise FileNotFoundError(f"CLIP text encoder: {path} is not a directory")
            config = config or text_config_from_dir(path)
            self.tokenizer = tf.CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        if config is None:
            raise ValueError("CLIP text encoder: give a checkpoint directory or a CLIPTextConfig")
        if path is not None and load_weights:
            model = tf.CLIPTextModel.from_pretrained(str(path), config=config, local_files_only=True)
        else:
            model = tf.CLIPTextModel(config)
        # transformers 4.x nests the text tower as `.text_model`, 5.x flattens it into the model.
        # The SD v1 layout (transformer.text_model.*) is kept either way, so a checkpoint maps
        # onto this module with one prefix rule whichever transformers version is installed.
        self.transformer = nn.Module()
        self.transformer.text_model = getattr(model, "text_model", model)
        self._hf_model = (model,)  # a tuple: kept for save_pretrained, not registered twice
        if max_length > config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds CLIP's {config.max_position_embeddings} positions")
        self.embed_dim = int(config.hidden_size)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: never switches to training behaviour

    def save_pretrained(self, path) -> Path:
        """Write a transformers checkpoint directory (config, weights, tokenizer files) that
        `FrozenCLIPTextEncoder(path)` — or any transformers user — loads back."""
        path = Path(path)
        self._hf_model[0].save_pretrained(str(path))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(path))
        return path

    def tokenize(self, prompts) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError("CLIP text encoder built without a checkpoint directory: no tokenizer "
                               "(set conditioning.pretrained_text_encoder to a local CLIP directory)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False)["input_ids"]]
        self.length_guard.check(prompts, lengths, self.max_length, self.strict)
        batch = self.tokenizer(prompts, truncation=True, max_length=self.max_length,
                               padding="max_length", return_tensors="pt")
        return batch["input_ids"]

    @torch.no_grad()
    def forward(self, prompts) -> torch.Tensor:
        """Prompts (str or list of str), or token ids (B, max_length) from `tokenize`."""
        ids = prompts if torch.is_tensor(prompts) else self.tokenize(prompts)
        tower = self.transformer.text_model
        device = tower.embeddings.token_embedding.weight.device
        return tower(input_ids=ids.to(device)).last_hidden_state
