"""FSDP for the latent UNet (`train_ldm.strategy: fsdp`), on PyTorch's `fully_shard` (FSDP2).

Each rank keeps 1/N of the UNet's parameters, gradients and AdamW moments; a block's weights
are all-gathered just for its forward and backward. Sharding unit: every block of the UNet's
input_blocks / middle_block / output_blocks, then the whole UNet (the stem, time embedding
and output head). The EMA copy is sharded the same way, so its update stays a local lerp
between shards with identical placements.

Checkpoints stay the ordinary single-file format: parameters, EMA and optimizer moments are
gathered to full tensors (a collective, every rank calls it) and rank 0 writes them; loading
scatters the full tensors back into shards, so a run can switch between DDP and FSDP on resume.
The first stage is not sharded: it fits a GPU (the KL-f8 autoencoder has 84M parameters).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ldm_fast import checkpoint as ckpt


def shard_unet(unet: nn.Module) -> nn.Module:
    """Shard `unet` in place (blocks first, then the root, as fully_shard requires)."""
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        fully_shard(block)
    fully_shard(unet)
    return unet


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` or any submodule is sharded (e.g. the EMA wrapper around a sharded copy)."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


@contextmanager
def no_gradient_sync(unet: nn.Module):
    """Gradient accumulation: skip the reduce-scatter of all but the last micro-batch."""
    unet.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        unet.set_requires_gradient_sync(True)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _gather(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Full host copies of `tensors` (collective), or nothing kept where keep is False."""
    out = {}
    for k, v in tensors.items():
        full = _full(v)  # one tensor at a time: device memory holds one full tensor at most
        if keep:
            out[k] = full.detach().cpu()
    return out


def full_state_dict(module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The module's state with every shard gathered (collective: call on every rank).
    keep=False takes part in the gathering but keeps nothing (ranks that do not write the
    checkpoint), so a large model is not copied to host memory once per rank."""
    return _gather(module.state_dict(), keep)


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Full tensors (from a checkpoint, the same on every rank) into a sharded or plain module."""
    if is_sharded(module):
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        module.load_state_dict(state)


def optimizer_to_tensors(prefix: str, optimizer: torch.optim.Optimizer, keep: bool = True) -> tuple[dict, str]:
    """ckpt.optimizer_to_tensors with sharded moments gathered (collective; `keep` as in
    full_state_dict)."""
    tensors, extra = ckpt.optimizer_to_tensors(prefix, optimizer)
    return _gather(tensors, keep), extra


def optimizer_from_tensors(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict, extra: str) -> None:
    """ckpt.optimizer_from_tensors, scattering the moments of sharded parameters like the
    parameters themselves (collective when any parameter is sharded)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    local = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            p = params[int(name[len(prefix):].split(".", 1)[0])]
            if isinstance(p, DTensor) and value.shape == p.shape:
                value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        local[name] = value
    ckpt.optimizer_from_tensors(prefix, optimizer, local, extra)


def clip_grad_norm(unet_params, other_params, max_norm: float) -> torch.Tensor:
    """Clip over sharded UNet gradients and plain (e.g. τθ) gradients together: the total norm
    combines the gathered norm of the shards with the local one of the rest."""
    groups = [[p for p in ps if p.grad is not None] for ps in (unet_params, other_params)]
    norms = [_full(torch.nn.utils.get_total_norm([p.grad for p in ps])).float() for ps in groups if ps]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    for ps in groups:
        if ps:  # takes the parameters (it scales their .grad)
            torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total)
    return total
