"""Small building blocks shared by the autoencoder and the UNet, routed through `ops`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_fast import ops


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state-dict keys) with an optional fused SiLU,
    scale/shift and pre-norm channel bias, computed by `ops.group_norm` so the kernel switch
    reaches it."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, act: bool = False):
        super().__init__(num_groups, num_channels, eps=eps)
        self.act = act

    def forward(self, x, scale=None, shift=None, add=None):
        """add: (B, C), added to x before the statistics (the ResBlock's h + emb)."""
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                              act=self.act, scale=scale, shift=shift, add=add)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state-dict keys) that keeps its weight in the memory
    layout of its input. Given a channels-last input (ops.channels_last) and a channels-first
    weight, oneDNN and cuDNN copy the weight into channels-last on every call — measured at a
    fifth of the tiny UNet's CPU step — and the other way round for the opposite mix; so the
    weight follows the input's layout, re-laid out in place once per change: same values and
    shape, `state_dict()` unchanged apart from strides (checkpoints are saved contiguous).
    Only where that cannot disturb anything else: no gradient being recorded for the weight
    (optimiser state and DDP buckets keep their layout), the weight owning its whole storage
    (not a view into an FSDP all-gather buffer), and not inside torch.compile, which chooses
    layouts itself."""

    def _relayout(self, x) -> None:
        if x.dim() != 4:
            return
        w = self.weight.data
        fmt = next((f for f in (torch.contiguous_format, torch.channels_last) if x.is_contiguous(memory_format=f)),
                   None)
        if (fmt is None or w.is_contiguous(memory_format=fmt)
                or (torch.is_grad_enabled() and self.weight.requires_grad) or torch.compiler.is_compiling()
                or w.untyped_storage().nbytes() != w.numel() * w.element_size()):
            return
        self.weight.data = w.contiguous(memory_format=fmt)

    def forward(self, x):
        self._relayout(x)
        return super().forward(x)


class TokenConv1d(nn.Conv1d):
    """A 1×1 convolution kept as nn.Conv1d — the checkpoints' layout, weight (out, in, 1) —
    but applied to tokens (B, T, in) → (B, T, out) as one matmul: the attention projections'
    inputs are already token-major, so no transpose copy is made around a convolution."""

    def forward(self, tokens):
        return F.linear(tokens, self.weight[..., 0], self.bias)


class TokenConv2d(nn.Conv2d):
    """TokenConv1d's 2-D twin: a 1×1 nn.Conv2d (weight (out, in, 1, 1)) applied to tokens."""

    def forward(self, tokens):
        return F.linear(tokens, self.weight.flatten(1), self.bias)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: residual branches then start as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Upsample(nn.Module):
    """Nearest ×2 then 3×3 conv (the first stages' and the UNet's upsampler; key `conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
