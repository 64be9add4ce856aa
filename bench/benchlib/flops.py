"""Analytic FLOP counting (conv + linear + attention matmuls, 2 per MAC), torch's counter as a
check, and the data-sheet peaks of the GPUs the achieved rates are compared with."""

from __future__ import annotations

import math

import torch
from torch import nn

# Convention (as in the papers' and vendors' "model FLOPs"): a multiply-add is 2 FLOPs;
# convolutions, linear layers and the two attention matmuls (QKᵀ and PV) are counted;
# normalisations, activations, softmax and residual adds are not (memory-bound, < 1 %).

def _conv_flops(module: nn.Module, inputs, output) -> int:
    w = module.weight
    per_output = 2 * (w.shape[1]) * math.prod(w.shape[2:])  # (C_in / groups) · k…
    return per_output * output.numel()


def _linear_flops(module: nn.Linear, inputs, output) -> int:
    return 2 * module.in_features * output.numel()


class FlopCounter:
    """Counts FLOPs of conv/linear modules (forward hooks) and of `ops.attention` calls
    (wrapped for the duration), i.e. of everything the model routes through them.

        with FlopCounter(model) as fc:
            model(x, t)
        fc.total, fc.by_kind

    Run it on the meta device (`torch.device('meta')`) to count without computing."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules
        self.by_kind = {"conv": 0, "linear": 0, "attention": 0}
        self._handles = []
        self._saved_attention = None

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def __enter__(self):
        from ldm_fast import ops

        for root in self.modules:
            for m in root.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    self._handles.append(m.register_forward_hook(self._hook("conv", _conv_flops)))
                elif isinstance(m, nn.Linear):
                    self._handles.append(m.register_forward_hook(self._hook("linear", _linear_flops)))
        self._saved_attention = ops.attention

        def counted_attention(q, k, v):
            b, h, lq, d = q.shape
            lk = k.shape[-2]
            self.by_kind["attention"] += 4 * b * h * lq * lk * d   # QKᵀ and PV, 2 FLOPs per MAC
            return self._saved_attention(q, k, v)

        ops.attention = counted_attention
        return self

    def _hook(self, kind, fn):
        def hook(module, inputs, output):
            self.by_kind[kind] += int(fn(module, inputs, output))
        return hook

    def __exit__(self, *exc):
        from ldm_fast import ops

        for h in self._handles:
            h.remove()
        self._handles.clear()
        ops.attention = self._saved_attention
        return False


def torch_flop_count(fn) -> int | None:
    """The same quantity from torch.utils.flop_counter.FlopCounterMode (torch ≥ 2.1; checked
    on 2.11–2.13), as an independent cross-check; None where it is unavailable."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return int(mode.get_total_flops())


# ----------------------------------------------------------------------------- device peaks
# Data-sheet dense peaks in FLOP/s: (fp32 without tensor cores, tf32 tensor, fp16/bf16 tensor).
# Matched on torch.cuda.get_device_name() substrings, most specific first; unknown GPUs get
# no fraction of peak, never a guessed one.
GPU_PEAKS = [
    ("H200", 67e12, 495e12, 989e12),
    ("H100 NVL", 60e12, 418e12, 835e12),
    ("H100 PCIe", 51e12, 378e12, 756e12),
    ("H100", 67e12, 495e12, 989e12),          # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 19.5e12, 156e12, 312e12),
    ("L40S", 91.6e12, 183e12, 362e12),
    ("L4", 30.3e12, 60e12, 121e12),
    ("A10", 31.2e12, 62.5e12, 125e12),
]


def peak_flops(gpu_name: str | None, dtype: torch.dtype) -> tuple[float, str] | None:
    """(peak FLOP/s, what it is) for this GPU and compute dtype, or None if unknown. fp32 is
    read against the TF32 tensor-core peak when PyTorch lets convolutions use TF32 (its
    default), since that is what cuDNN then runs."""
    if not gpu_name:
        return None
    for key, fp32, tf32, half in GPU_PEAKS:
        if key in gpu_name:
            if dtype in (torch.float16, torch.bfloat16):
                return half, f"{key} dense fp16/bf16 tensor"
            if torch.backends.cudnn.allow_tf32:
                return tf32, f"{key} dense tf32 tensor (cuDNN allow_tf32)"
            return fp32, f"{key} fp32"
    return None
