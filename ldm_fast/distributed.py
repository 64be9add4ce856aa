"""torch.distributed plumbing for `torchrun -m ldm_fast.train`: process group, rank slices,
gradient averaging, and the one rule that makes N ranks equal to one: every rank draws the
random numbers of the *global* batch from the same seeded generator and keeps its own slice, and
reads its own slice of the same global data order. So 2 ranks × batch B step for step match
1 rank × batch 2B (tests/test_distributed.py).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device: str) -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR…):
    NCCL for CUDA, gloo for CPU. A plain `python -m ldm_fast.train` is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return current()


def current() -> DistContext:
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(device: str, ctx: DistContext) -> str:
    """One GPU per process: cuda → cuda:LOCAL_RANK."""
    if device == "cuda" and ctx.enabled:
        torch.cuda.set_device(ctx.local_rank)
        return f"cuda:{ctx.local_rank}"
    return device


def rank_slice(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's share of a global-batch tensor (batch dimension first)."""
    if not ctx.enabled:
        return tensor
    per_rank = tensor.shape[0] // ctx.world_size
    return tensor[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]


def randn_global(shape_local, generator: torch.Generator, ctx: DistContext, device) -> torch.Tensor:
    """N(0, I) noise for this rank's batch, drawn as part of the global batch's noise."""
    shape = (shape_local[0] * ctx.world_size, *shape_local[1:])
    return rank_slice(torch.randn(shape, generator=generator, device=generator.device), ctx).to(device)


def randint_global(high: int, n_local: int, generator: torch.Generator, ctx: DistContext, device) -> torch.Tensor:
    values = torch.randint(0, high, (n_local * ctx.world_size,), generator=generator, device=generator.device)
    return rank_slice(values, ctx).to(device)


def average_gradients(params) -> None:
    """All-reduce-average .grad of modules that are not wrapped in DDP (the discriminator,
    which is called several times per step)."""
    ctx = current()
    if not ctx.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(ctx.world_size)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (differentiable is not needed: used on detached gradients and logs)."""
    ctx = current()
    if not ctx.enabled:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world_size


def global_std(x: torch.Tensor) -> float:
    """The standard deviation of x over the global batch (ranks hold equal shares): its first
    two moments averaged over ranks, so every rank gets the value one rank with the whole
    batch would compute."""
    x = x.float()
    moments = all_reduce_mean(torch.stack([x.mean(), x.pow(2).mean()]))
    return float((moments[1] - moments[0] ** 2).clamp_min(0).sqrt())


def all_gather_object(obj) -> list:
    """Every rank's `obj` (small, picklable: e.g. data positions for a checkpoint), in rank order."""
    if not current().enabled:
        return [obj]
    out = [None] * current().world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
