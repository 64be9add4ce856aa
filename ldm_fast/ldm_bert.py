"""The text encoder τθ of the original LDM text-to-image model (LDM-KL-8-G, "BERTEmbedder").

A BERT-tokenised transformer encoder built from the x-transformers layers the original code
vendors: token embedding + learned absolute position embedding, `depth` pre-norm layers of
self-attention (heads × 64 wide, q/k/v without bias) and a 4× GELU feed-forward, each added
to its input, and a final LayerNorm; no attention mask (pads are attended, like every other
token). The released model: 1280 wide, 32 layers, 8 heads, 77 tokens, bert-base-uncased's
30522-entry WordPiece vocabulary (read here from a local vocab.txt through `tokenizers`).

Module names follow the original's state dict under `cond_stage_model.transformer.`
(`token_emb`, `pos_emb.emb`, `attn_layers.layers.{2i}` = [norm, attention],
`attn_layers.layers.{2i+1}` = [norm, feed-forward], `norm`), so a checkpoint converts with a
prefix rule. diffusers ships the same network as `LDMBertModel` (tests/test_ldm_bert.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ldm_fast import ops

HEAD_DIM = 64  # x-transformers' default dim_head, which the released model uses


class _PositionEmbedding(nn.Module):
    def __init__(self, max_length: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(max_length, dim)

    def forward(self, n: int, device) -> torch.Tensor:
        return self.emb(torch.arange(n, device=device))[None]


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int = HEAD_DIM):
        super().__init__()
        inner = heads * head_dim  # not tied to dim: 8 × 64 = 512 inside a 1280-wide model
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.to_q, self.to_k, self.to_v))
        return self.to_out(ops.attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Sequential(Sequential(Linear, GELU), Dropout, Linear): the original's nesting, so the
        # weights are named net.0.0 and net.2 as in the checkpoint.
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU()), nn.Dropout(0.0),
                                 nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class _Layers(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int):
        super().__init__()
        blocks = []
        for _ in range(depth):
            blocks.append(nn.ModuleList([nn.LayerNorm(dim), _SelfAttention(dim, heads)]))
            blocks.append(nn.ModuleList([nn.LayerNorm(dim), _FeedForward(dim)]))
        self.layers = nn.ModuleList(blocks)

    def forward(self, x):
        for norm, block in self.layers:
            x = x + block(norm(x))  # pre-norm residual
        return x


class LDMBertTransformer(nn.Module):
    """Token ids (B, L) → embeddings (B, L, dim)."""

    def __init__(self, vocab_size: int, max_length: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.vocab_size, self.max_length = vocab_size, max_length
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = _PositionEmbedding(max_length, dim)
        self.attn_layers = _Layers(dim, depth, heads)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.emb.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] > self.max_length:
            raise ValueError(f"token ids: expected (B, L <= {self.max_length}), got {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        ids = ids.to(self.token_emb.weight.device)
        x = self.token_emb(ids) + self.pos_emb(ids.shape[1], ids.device)
        return self.norm(self.attn_layers(x))


class LDMBertTextEncoder(nn.Module):
    """τθ of the LDM text-to-image model: prompts → BERT WordPiece ids ([CLS] … [SEP], padded
    with [PAD] to max_length) → LDMBertTransformer → (B, max_length, embed_dim). The same
    interface as conditioning.TextTransformer; the tokenizer (a conditioning.TextTokenizer) is
    saved beside the weights, not in the state dict, and may be None for a weights-only
    instance (conversion)."""

    def __init__(self, tokenizer, vocab_size: int, max_length: int, embed_dim: int, n_layers: int,
                 n_heads: int, strict: bool = False):
        super().__init__()
        if tokenizer is not None and tokenizer.vocab_size > vocab_size:
            raise ValueError(f"tokenizer: {tokenizer.vocab_size} tokens, more than the text encoder's "
                             f"{vocab_size}-row embedding (conditioning.vocab_size)")
        self.tokenizer, self.max_length, self.strict, self.embed_dim = tokenizer, max_length, strict, embed_dim
        self.transformer = LDMBertTransformer(vocab_size, max_length, embed_dim, n_layers, n_heads)

    def tokenize(self, prompts) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("LDM BERT text encoder: no tokenizer (give a local BERT vocab.txt)")
        return self.tokenizer.encode(prompts, self.max_length, self.strict)

    def forward(self, prompts) -> torch.Tensor:
        """Prompts (str or list of str), or ids from `tokenize`."""
        ids = prompts if torch.is_tensor(prompts) else self.tokenize(prompts)
        return self.transformer(ids)
