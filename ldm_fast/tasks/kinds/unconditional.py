"""Unconditional generation (the paper's CelebA-HQ, FFHQ, LSUN models): no conditioner;
metric: FD-shapes of samples against held-out images."""

from ldm_fast.tasks.registry import Task, register


def _metric(ctx) -> dict:
    from ldm_fast.metrics import FD_NAME, fd_shapes

    samples = ctx.sample({}, 1.0)
    return {FD_NAME: fd_shapes(ctx.net, samples, ctx.batch["image"])}


TASK = register(Task(name="unconditional", order=0, modes=("",), conditional=False, metric=_metric))
