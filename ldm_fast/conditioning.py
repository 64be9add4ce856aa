"""Conditioning: the domain encoders τθ(y) of cross-attention and the builders of concatenated inputs.

The paper's general conditioning mechanism (Rombach et al. 2022, Sec. 3.3) reaches the UNet in
two ways, which `LatentDiffusion.forward` takes as one dict (model.py):

  cross-attention  'context' (B, L, D) = τθ(y)       ClassEmbedder, TextTransformer,
                                                      FrozenPretrainedTextEncoder, LayoutEncoder
  time embedding   'class_labels' (B,)               class ids for the UNet's own label_emb ("adm")
  concatenation    'concat' (B, C, h, w) on z's grid SemanticEncoder, sr_concat, InpaintingConcat

Hybrid conditioning is the union of the keys (e.g. a masked image concatenated and a prompt
cross-attended). Every encoder validates its input and raises ValueError naming the problem:
a wrong answer from a malformed box, map or mask is worse than no answer.

Null conditions for classifier-free guidance (Ho & Salimans 2022): the class id `num_classes`
(the last embedding row, as in the released ImageNet LDM's 1001-entry table), the empty
prompt, and the empty layout (all pad tokens). Concatenated inputs have no null: they are
never dropped, and guidance applies to the cross-attention part only.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm_fast import ops

__all__ = [
    "ClassEmbedder", "check_class_ids", "drop_mask",
    "TextTokenizer", "train_tokenizer", "load_tokenizer", "SPECIAL_TOKENS", "PromptLengthGuard",
    "TransformerEncoder", "TextTransformer", "FrozenPretrainedTextEncoder",
    "LayoutEncoder", "LAYOUT_GRID",
    "SemanticEncoder", "sr_concat", "InpaintingConcat", "resize_mask",
]


# ----------------------------------------------------------------------------- shared helpers

def drop_mask(batch_size: int, p: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """(B,) bool: which items get the null condition during training (probability p)."""
    if p <= 0:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    gen_device = generator.device if generator is not None else device
    return (torch.rand(batch_size, generator=generator, device=gen_device) < p).to(device)


def _as_long(values, what: str) -> torch.Tensor:
    """A 1-D int64 tensor from a list / array / tensor of integers; floats are refused
    (1.7 is not a class id, and rounding it silently would hide a caller's bug)."""
    t = values if torch.is_tensor(values) else torch.as_tensor(np.asarray(values))
    if t.dim() == 0:
        t = t[None]
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{what}: expected integer ids, got dtype {t.dtype}")
    return t.long()


def check_class_ids(labels, num_classes: int, allow_null: bool = True, what: str = "class id") -> torch.Tensor:
    """(B,) int64 class ids in [0, num_classes) — or = num_classes (the null class) when allowed."""
    t = _as_long(labels, what)
    if t.dim() != 1:
        raise ValueError(f"{what}: expected a 1-D batch of ids, got shape {tuple(t.shape)}")
    hi = num_classes + (1 if allow_null else 0)
    bad = (t < 0) | (t >= hi)
    if bad.any():
        value = int(t[bad][0])
        null = f", and {num_classes} = the null class for guidance" if allow_null else ""
        raise ValueError(f"unknown {what} {value} (valid: 0..{num_classes - 1}{null})")
    return t


# ----------------------------------------------------------------------------- class labels

class ClassEmbedder(nn.Module):
    """τθ for class labels: one learned vector per class plus a null class (the last row).

    Cross-attention mode (the released ImageNet LDM): `forward(labels)` is a one-token context
    (B, 1, D); the state key `embedding.weight` is the original `cond_stage_model.embedding.weight`.

    "adm" mode (the paper's description, as in ADM): the UNet's own `label_emb` is the embedding
    and is added to the time embedding, so this module is not used; the class ids go to the UNet
    as 'class_labels'. The null class is then id `num_classes`, hence that UNet needs
    `unet.num_classes = conditioning.num_classes + 1`.
    """

    def __init__(self, num_classes: int, embed_dim: int, null_class: bool = True):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes: must be positive, got {num_classes}")
        self.num_classes, self.null_class = num_classes, null_class
        # null_class=False: the original cin256 v1 table, one row per class and no null row.
        self.embedding = nn.Embedding(num_classes + int(null_class), embed_dim)

    @property
    def null_id(self) -> int:
        if not self.null_class:
            raise ValueError(f"this class embedding has {self.num_classes} rows and no null class: "
                             "classifier-free guidance is not available for it")
        return self.num_classes

    def forward(self, labels) -> torch.Tensor:
        labels = check_class_ids(labels, self.num_classes).to(self.embedding.weight.device)
        return self.embedding(labels)[:, None]


# ----------------------------------------------------------------------------- text tokenizer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _bert_pipeline(model):
    """A `tokenizers.Tokenizer` around a WordPiece model with BERT's (uncased) pre-processing:
    lowercase + accent stripping, split on whitespace and punctuation. The [CLS] … [SEP]
    template is added by TextTokenizer, once the special tokens have ids."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers

    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def _with_template(tok):
    from tokenizers import processors

    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return tok


class TextTokenizer:
    """BERT-style WordPiece tokenizer (the `tokenizers` library) that turns prompts into fixed
    length id rows: [CLS] tokens [SEP] [PAD] … . The empty prompt gives [CLS] [SEP] + pads, the
    null condition for guidance.

    A prompt longer than `max_length` tokens is truncated (keeping [SEP] last) with a warning,
    once per tokenizer — or refused with ValueError when `strict=True`.
    """

    def __init__(self, tokenizer):
        missing = [t for t in SPECIAL_TOKENS[:4] if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer: vocabulary lacks the special tokens {missing} "
                             f"(a BERT-style WordPiece vocabulary needs {list(SPECIAL_TOKENS[:4])})")
        if tokenizer.post_processor is None:  # a bare WordPiece vocabulary: BERT's template
            _with_template(tokenizer)
        # Padding and truncation are done here, where truncation can be announced.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.token_to_id("[PAD]")
        self.sep_id = tokenizer.token_to_id("[SEP]")
        self.length_guard = PromptLengthGuard()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def save(self, path) -> Path:
        """Write tokenizer.json (the whole pipeline, loadable with `load_tokenizer`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    def encode(self, prompts, max_length: int, strict: bool = False) -> torch.Tensor:
        """(B, max_length) int64 ids for a prompt or a list of prompts."""
        prompts = _as_prompts(prompts)
        rows = [e.ids for e in self.tokenizer.encode_batch(prompts)]
        self.length_guard.check(prompts, [len(r) for r in rows], max_length, strict)
        rows = [r if len(r) <= max_length else r[:max_length - 1] + [self.sep_id] for r in rows]
        ids = torch.full((len(rows), max_length), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return ids


def _as_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts: expected strings, got {bad[0]}")
    if not prompts:
        raise ValueError("prompts: empty list")
    return prompts


class PromptLengthGuard:
    """Over-long prompts, the same way for every text encoder: refused in strict mode, else
    truncated (by the caller) with one warning per encoder, so a long run does not flood the log."""

    def __init__(self, what: str = "the text encoder"):
        self.what, self.warned = what, False

    def check(self, prompts: list[str], lengths: list[int], max_length: int, strict: bool) -> None:
        too_long = [i for i, n in enumerate(lengths) if n > max_length]
        if not too_long:
            return
        i = too_long[0]
        message = (f"prompt {i} ({prompts[i][:60]!r}…) is {lengths[i]} tokens long, more than "
                   f"{self.what}'s context of {max_length} tokens (conditioning.max_length)")
        if strict:
            raise ValueError(message)
        if not self.warned:
            warnings.warn(message + f"; truncated to {max_length} tokens (warned once; "
                          f"{len(too_long)} prompt(s) in this batch). To keep whole prompts, train with "
                          f"--set conditioning.max_length={lengths[i]} or more", stacklevel=3)
            self.warned = True


def train_tokenizer(captions, vocab_size: int = 30522, min_frequency: int = 1) -> TextTokenizer:
    """Train a WordPiece vocabulary of at most `vocab_size` entries on the captions (the
    dataset's own words become whole tokens; rarer ones split into ## pieces)."""
    from tokenizers import models, trainers

    captions = [c for c in _as_prompts(captions) if c.strip()]
    if not captions:
        raise ValueError("train_tokenizer: no non-empty captions to learn a vocabulary from")
    tok = _bert_pipeline(models.WordPiece(unk_token="[UNK]"))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(captions, trainer)
    return TextTokenizer(tok)


def load_tokenizer(path) -> TextTokenizer:
    """A tokenizer from a local tokenizer.json (full pipeline) or a BERT vocab.txt (one
    WordPiece token per line; uncased BERT processing), or a directory holding either."""
    from tokenizers import Tokenizer, models

    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "vocab.txt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"tokenizer: {path} holds neither tokenizer.json nor vocab.txt")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer: {path} does not exist")
    if path.suffix == ".json":
        return TextTokenizer(Tokenizer.from_file(str(path)))
    return TextTokenizer(_bert_pipeline(models.WordPiece.from_file(str(path), unk_token="[UNK]")))


# ----------------------------------------------------------------------------- transformer τθ

class _Block(nn.Module):
    """Pre-norm transformer layer: x + MHSA(LN(x)), then x + MLP(LN(x)) (GELU, 4× width)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by n_heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Pads are attended like other tokens (no mask), as in the original BERT embedder of
        # LDM: the pad run encodes the prompt's length, and the empty prompt stays well defined.
        x = x + self.proj(ops.attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """Token + learned position embeddings → pre-norm layers → final LayerNorm: (B, L) → (B, L, D)."""

    def __init__(self, vocab_size: int, max_length: int, dim: int, n_layers: int, n_heads: int):
        super().__init__()
        self.vocab_size, self.max_length = vocab_size, max_length
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, max_length, dim))
        self.layers = nn.ModuleList(_Block(dim, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] > self.max_length:
            raise ValueError(f"token ids: expected (B, L <= {self.max_length}), got {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        x = self.token_emb(ids.to(self.pos_emb.device)) + self.pos_emb[:, :ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class TextTransformer(nn.Module):
    """τθ for text, trained jointly with the UNet: prompts → tokenizer → TransformerEncoder →
    (B, max_length, embed_dim). The tokenizer is not part of the state dict: it is saved
    beside the weights as tokenizer.json."""

    def __init__(self, tokenizer: TextTokenizer, max_length: int, embed_dim: int, n_layers: int,
                 n_heads: int, strict: bool = False):
        super().__init__()
        self.tokenizer, self.max_length, self.strict = tokenizer, max_length, strict
        self.embed_dim = embed_dim
        self.transformer = TransformerEncoder(tokenizer.vocab_size, max_length, embed_dim, n_layers, n_heads)

    def tokenize(self, prompts) -> torch.Tensor:
        return self.tokenizer.encode(prompts, self.max_length, self.strict)

    def forward(self, prompts) -> torch.Tensor:
        """Prompts (str or list of str), or ids from `tokenize`."""
        ids = prompts if torch.is_tensor(prompts) else self.tokenize(prompts)
        return self.transformer(ids)


def _transformers_dir(path: Path) -> Path:
    """The directory holding the Hugging Face model: the root of a BERT checkpoint, or the
    Transformer module's folder of a sentence-transformers one (modules.json names it; most
    put it at the root, older ones in 0_Transformer/)."""
    if (path / "config.json").is_file():
        return path
    modules = path / "modules.json"
    if modules.is_file():
        for entry in json.loads(modules.read_text()):
            if str(entry.get("type", "")).endswith("Transformer") and (path / entry.get("path", "")).is_dir():
                return path / entry["path"]
    raise FileNotFoundError(f"pretrained text encoder: {path} has no config.json (nor a sentence-"
                            "transformers modules.json pointing at one); expected a local BERT / "
                            "sentence-transformers checkpoint directory")


class FrozenPretrainedTextEncoder(nn.Module):
    """A frozen pretrained text encoder from a LOCAL checkpoint directory (any BERT or
    sentence-transformers model) through `transformers` (AutoTokenizer / AutoModel,
    local_files_only=True: nothing is downloaded). Output: the last hidden state,
    (B, max_length, hidden_size), padded to max_length with the checkpoint's own pad token.
    Its weights are not trained and not saved with the run (the config keeps the path)."""

    def __init__(self, path, max_length: int = 77, strict: bool = False):
        super().__init__()
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"pretrained text encoder: {path} is not a directory (set "
                                    "conditioning.pretrained_text_encoder to a local BERT / "
                                    "sentence-transformers checkpoint, or leave it empty to train τθ)")
        model_dir = _transformers_dir(path)
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise ImportError("pretrained text encoder: the `transformers` package is not installed "
                              "(pip install transformers), or leave conditioning.pretrained_text_encoder "
                              "empty to train a text transformer with the UNet") from exc
        tok_dir = model_dir if (model_dir / "tokenizer_config.json").is_file() or \
            (model_dir / "vocab.txt").is_file() or (model_dir / "tokenizer.json").is_file() else path
        self.hf_tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        self.model.eval().requires_grad_(False)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(f"conditioning.max_length {max_length} exceeds the pretrained encoder's "
                             f"{limit} positions")
        self.max_length, self.strict = max_length, strict
        self.length_guard = PromptLengthGuard()
        self.embed_dim = int(self.model.config.hidden_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen: dropout never switches on
        return self

    @torch.no_grad()
    def forward(self, prompts) -> torch.Tensor:
        prompts = _as_prompts(prompts)
        lengths = [len(ids) for ids in self.hf_tokenizer(prompts, truncation=False)["input_ids"]]
        self.length_guard.check(prompts, lengths, self.max_length, self.strict)
        batch = self.hf_tokenizer(prompts, padding="max_length", truncation=True,
                                  max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        out = self.model(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device))
        return out.last_hidden_state


# ----------------------------------------------------------------------------- layouts

LAYOUT_GRID = 32  # positions are discretised on a 32×32 grid: 1024 position tokens


class LayoutEncoder(nn.Module):
    """τθ for layouts (paper App. D.3): each box becomes three tokens (l, b, c) — the grid
    index of its top-left corner, of its bottom-right corner, and its class (offset by the
    grid² position tokens) — the sequence is padded to `max_length` with a pad token and a
    transformer turns it into the cross-attention context. The empty layout (all pads) is
    the null condition.

    Boxes are normalised (x0, y0, x1, y1) in [0, 1], top-left origin. Vocabulary:
    [0, grid²) positions, [grid², grid² + num_classes) classes, then the pad token.
    """

    def __init__(self, num_classes: int, max_length: int, embed_dim: int, n_layers: int, n_heads: int,
                 grid: int = LAYOUT_GRID):
        super().__init__()
        if max_length < 3:
            raise ValueError(f"layout max_length must hold at least one box (3 tokens), got {max_length}")
        if num_classes < 1:
            raise ValueError(f"layout num_classes: must be positive, got {num_classes}")
        self.num_classes, self.max_length, self.grid = num_classes, max_length, grid
        self.max_boxes = max_length // 3
        self.pad_id = grid * grid + num_classes
        self.transformer = TransformerEncoder(self.pad_id + 1, max_length, embed_dim, n_layers, n_heads)

    def null_tokens(self, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size, self.max_length), self.pad_id, dtype=torch.long)

    def tokenize(self, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """boxes (B, N, 4) float, labels (B, N) int with -1 marking unused rows (the procedural
        data's padding) → (B, max_length) tokens. Invalid boxes raise ValueError."""
        boxes = torch.as_tensor(boxes, dtype=torch.float64).cpu()
        labels = _as_long(labels, "box class").cpu()
        if labels.dim() == 1 and boxes.dim() == 2:  # one layout
            boxes, labels = boxes[None], labels[None]
        if boxes.dim() != 3 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:2]:
            raise ValueError(f"layout: expected boxes (B, N, 4) and labels (B, N), got "
                             f"{tuple(boxes.shape)} and {tuple(labels.shape)}")
        valid = labels >= 0
        if (labels < -1).any():
            raise ValueError(f"unknown box class id {int(labels[labels < -1][0])} "
                             f"(valid: 0..{self.num_classes - 1}; -1 marks an unused row)")
        for b, n in zip(*torch.nonzero(valid, as_tuple=True)):
            self._check_box(int(b), int(n), boxes[b, n], int(labels[b, n]))
        counts = valid.sum(1)
        if counts.numel() and counts.max() > self.max_boxes:
            b = int(counts.argmax())
            raise ValueError(f"layout {b} has {int(counts[b])} boxes; the layout encoder holds at most "
                             f"{self.max_boxes} (conditioning.max_length {self.max_length} // 3)")
        q = (boxes.clamp(0, 1) * (self.grid - 1)).round().long()  # (B, N, 4) grid coordinates
        tokens = torch.stack([q[..., 1] * self.grid + q[..., 0],           # l: top-left
                              q[..., 3] * self.grid + q[..., 2],           # b: bottom-right
                              self.grid * self.grid + labels.clamp(min=0)], -1)
        # Valid boxes first, in their given order; everything after them is padding.
        order = torch.sort((~valid).long(), dim=1, stable=True).indices
        tokens = torch.gather(tokens, 1, order[..., None].expand_as(tokens)).flatten(1)
        keep = torch.gather(valid, 1, order).repeat_interleave(3, dim=1)
        tokens = torch.where(keep, tokens, torch.full_like(tokens, self.pad_id))
        out = self.null_tokens(tokens.shape[0])
        width = min(tokens.shape[1], self.max_length)
        out[:, :width] = tokens[:, :width]
        return out

    def _check_box(self, b: int, n: int, box: torch.Tensor, label: int) -> None:
        x0, y0, x1, y1 = (float(v) for v in box)
        where = f"layout {b}, box {n} {(round(x0, 4), round(y0, 4), round(x1, 4), round(y1, 4))}"
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise ValueError(f"{where}: coordinates must be finite")
        if min(x0, y0, x1, y1) < 0 or max(x0, y0, x1, y1) > 1:
            raise ValueError(f"{where}: lies outside the image; coordinates are normalised "
                             "(x0, y0, x1, y1) in [0, 1]")
        if x0 >= x1 or y0 >= y1:
            raise ValueError(f"{where}: the top-left corner must lie above and left of the "
                             "bottom-right one (x0 < x1 and y0 < y1; l > b is not a box)")
        if label >= self.num_classes:
            raise ValueError(f"{where}: unknown class id {label} (valid: 0..{self.num_classes - 1})")

    def tokenize_lists(self, layouts: Sequence) -> torch.Tensor:
        """User input: a list of layouts, each a list of (x0, y0, x1, y1, class_id); a single
        layout (a list of 5-tuples) is accepted too; an empty layout is the null condition."""
        layouts = list(layouts)
        if layouts and _is_box(layouts[0]):
            layouts = [layouts]
        if not layouts:
            raise ValueError("layout: expected at least one layout (a list of (x0, y0, x1, y1, class) boxes)")
        n = max(1, max(len(lay) for lay in layouts))
        boxes = torch.zeros(len(layouts), n, 4, dtype=torch.float64)
        labels = torch.full((len(layouts), n), -1, dtype=torch.long)
        for b, layout in enumerate(layouts):
            for i, box in enumerate(layout):
                if not _is_box(box):
                    raise ValueError(f"layout {b}, box {i}: expected (x0, y0, x1, y1, class_id), got {box!r}")
                cls = box[4]
                if isinstance(cls, float) and not float(cls).is_integer() or isinstance(cls, bool):
                    raise ValueError(f"layout {b}, box {i}: class id must be an integer, got {cls!r}")
                if int(cls) < 0:
                    raise ValueError(f"layout {b}, box {i}: unknown class id {int(cls)} "
                                     f"(valid: 0..{self.num_classes - 1})")
                boxes[b, i] = torch.tensor([float(v) for v in box[:4]], dtype=torch.float64)
                labels[b, i] = int(cls)
        return self.tokenize(boxes, labels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.transformer(tokens)


def _is_box(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) == 5 and all(
        isinstance(v, (int, float, np.integer, np.floating)) for v in x)


# ----------------------------------------------------------------------------- concatenation

def _check_batch_image(x, what: str, channels: int = 3) -> torch.Tensor:
    """(B, C, H, W) float tensor, finite, in [-1, 1] (small overshoot allowed); (C, H, W) → batch of 1."""
    if not torch.is_tensor(x):
        raise ValueError(f"{what}: expected a tensor, got {type(x).__name__}")
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{what}: expected ({channels}, H, W) or (B, {channels}, H, W), got {tuple(x.shape)}")
    x = x.float()
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{what}: contains NaN or infinite values")
    if lo < -1.01 or hi > 1.01:  # [0, 255] or [0, 1]-shifted data would pass silently otherwise
        raise ValueError(f"{what}: values must lie in [-1, 1], got [{lo:.3g}, {hi:.3g}]")
    return x


def _latent_grid(h: int, w: int, factor: int, what: str) -> tuple[int, int]:
    if h % factor or w % factor:
        raise ValueError(f"{what}: size {h}x{w} is not a multiple of the first stage's factor {factor}")
    return h // factor, w // factor


class SemanticEncoder(nn.Module):
    """Semantic map (B, H, W) of class ids → one-hot → latent grid → learned 1×1 channel mapping
    → (B, out_channels, H/f, W/f), concatenated to z (the paper's semantic synthesis: 182
    classes mapped to 3 channels).

    To the latent grid by area averaging over each f×f cell: for a one-hot map that is the
    fraction of each class in the cell, so a class thinner than a cell is still seen (nearest
    sampling would keep or lose it by chance). `num_classes` counts every id in the map,
    background included (procedural data: 1 + 30).
    """

    def __init__(self, num_classes: int, out_channels: int, factor: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"semantic num_classes: need at least 2 ids, got {num_classes}")
        self.num_classes, self.factor = num_classes, factor
        self.mapping = nn.Conv2d(num_classes, out_channels, 1)

    def check(self, seg, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, H, W) int64; (H, W) and (B, 1, H, W) are accepted."""
        t = seg if torch.is_tensor(seg) else torch.as_tensor(np.asarray(seg))
        if t.dim() == 2:
            t = t[None]
        if t.dim() == 4 and t.shape[1] == 1:
            t = t[:, 0]
        if t.dim() != 3:
            raise ValueError(f"semantic map: expected (H, W) or (B, H, W) class ids, got {tuple(t.shape)}")
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"semantic map: expected integer class ids, got dtype {t.dtype}")
        t = t.long()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_classes):
            bad = int(t[(t < 0) | (t >= self.num_classes)][0])
            raise ValueError(f"semantic map: class id {bad} outside the configured range "
                             f"0..{self.num_classes - 1} (conditioning.num_classes = {self.num_classes})")
        if image_size is not None and tuple(t.shape[-2:]) != tuple(image_size):
            raise ValueError(f"semantic map size {tuple(t.shape[-2:])} does not match the image size "
                             f"{tuple(image_size)}")
        _latent_grid(*t.shape[-2:], self.factor, "semantic map")
        return t

    def forward(self, seg, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        t = self.check(seg, image_size).to(self.mapping.weight.device)
        one_hot = F.one_hot(t, self.num_classes).permute(0, 3, 1, 2).to(self.mapping.weight.dtype)
        if self.factor > 1:
            one_hot = F.avg_pool2d(one_hot, self.factor)
        return self.mapping(one_hot)


def sr_concat(lr, sr_factor: int, latent_factor: int, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """The LDM-SR concat input: the low-resolution image on the latent grid.

    The output image is sr_factor × the LR size and must be a multiple of the latent factor f;
    the latent grid is then (H·sr/f, W·sr/f). For f = 4 and ×4 (the paper's LDM-SR) that is
    the LR size itself and the LR image is concatenated as is; otherwise it is resized
    (bicubic, antialiased when shrinking) to the latent grid. `image_size` (training): the HR
    target, which must be exactly sr_factor × the LR size.
    """
    x = _check_batch_image(lr, "super-resolution input")
    h, w = x.shape[-2:]
    H, W = h * sr_factor, w * sr_factor
    if image_size is not None and (H, W) != tuple(image_size):
        raise ValueError(f"super-resolution input {h}x{w} × {sr_factor} = {H}x{W} does not match the "
                         f"target image size {tuple(image_size)[0]}x{tuple(image_size)[1]}")
    if H % latent_factor or W % latent_factor:
        raise ValueError(f"super-resolution input {h}x{w}: the ×{sr_factor} output {H}x{W} is not a "
                         f"multiple of the latent factor {latent_factor} (the input side must be a "
                         f"multiple of {latent_factor // math.gcd(latent_factor, sr_factor)})")
    size = (H // latent_factor, W // latent_factor)
    if size == (h, w):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False,
                         antialias=size[0] < h).clamp(-1, 1)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) mask → latent grid by area averaging: the masked fraction of each cell
    (the original code samples the nearest pixel; the fraction tells the UNet about cells the
    mask's border cuts)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.adaptive_avg_pool2d(mask, size)


INPAINT_INPUTS = ("native", "original")


class InpaintingConcat(nn.Module):
    """The LDM inpainting concat input: [E(masked image) · scale, mask on the latent grid],
    z_channels + 1 channels. Two input conventions (`inputs`), fixed by what the UNet was
    trained on:
    - "native" (models trained here): the masked image has the pixels to fill at 0 (mid-grey,
      data/masks.py), the mask is {0, 1} resized by area averaging (`resize_mask`);
    - "original" (the CompVis inpainting model, scripts/inpaint.py): mask binarised at 0.5,
      masked image and mask both taken through ×2 − 1 from [0, 1] — holes at −1, the mask as
      ±1 — and the mask resized to the latent grid by nearest-neighbour sampling.

    No trainable parameters; the buffer `latent_scale` (saved with the conditioner) scales the
    encoded masked image like the UNet's latents: the configured scale factor, or — for KL
    stages scaled by std — 1/std measured once on the first training batch's images, as the
    diffusion latents are. The first stage is held by reference, not registered, so its
    weights stay out of the conditioner's state.
    """

    def __init__(self, first_stage: nn.Module, factor: int, scale: float | None = None, inputs: str = "native"):
        super().__init__()
        if inputs not in INPAINT_INPUTS:
            raise ValueError(f"inpainting inputs: expected one of {INPAINT_INPUTS}, got {inputs!r}")
        self._first_stage = (first_stage,)
        self.factor, self.inputs = factor, inputs
        self.register_buffer("latent_scale", torch.tensor(float("nan") if scale is None else float(scale)))

    @property
    def first_stage(self) -> nn.Module:
        return self._first_stage[0]

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor) -> float:
        z = self.first_stage.encode_latent(images.to(self.latent_scale.device), sample=False)
        self.latent_scale.fill_(1.0 / float(z.float().std().clamp_min(1e-8)))
        return float(self.latent_scale)

    @staticmethod
    def check(image, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) image in [-1, 1] and (B, 1, H, W) mask in [0, 1] (1 = fill); a (H, W)
        or (1, H, W) mask, or one of batch 1, is broadcast over the images."""
        from ldm_fast.data.masks import check_mask

        image = _check_batch_image(image, "inpainting image")
        if not torch.is_tensor(mask):
            mask = torch.as_tensor(np.asarray(mask))
        mask = mask.float()
        if mask.dim() == 2:
            mask = mask[None, None]
        elif mask.dim() == 3:
            mask = mask[None] if mask.shape[0] == 1 else mask[:, None]
        if mask.dim() == 4 and mask.shape[0] == 1 and image.shape[0] > 1:
            mask = mask.expand(image.shape[0], *mask.shape[1:])
        check_mask(image, mask.to(image.device))  # size mismatch, channels, values → ValueError
        return image, mask.to(image.device)

    @torch.no_grad()
    def forward(self, masked_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if torch.isnan(self.latent_scale):
            raise RuntimeError("inpainting conditioner: latent scale unknown — calibrate() on training "
                               "images, or load the conditioner state saved with the run")
        size = _latent_grid(*masked_image.shape[-2:], self.factor, "inpainting image")
        device = self.latent_scale.device
        masked_image, mask = masked_image.to(device), mask.to(device, masked_image.dtype)
        if self.inputs == "original":
            # From the native masked image (1 − m)·x: with m binary, holes → −1 is the original's
            # ((1 − m)·(x + 1)/2)·2 − 1, and the kept pixels are x either way.
            mask = (mask >= 0.5).to(masked_image.dtype)
            masked_image = torch.where(mask.bool(), -1.0, masked_image)
        z = self.first_stage.encode_latent(masked_image, sample=False) * self.latent_scale
        if self.inputs == "original":
            return torch.cat([z, F.interpolate(mask * 2 - 1, size=size, mode="nearest").to(z.dtype)], dim=1)
        return torch.cat([z, resize_mask(mask.to(z.dtype), size)], dim=1)
