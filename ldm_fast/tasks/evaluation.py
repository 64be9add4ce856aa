"""A task's metric on held-out data: the evaluation context its metric function receives,
and `evaluate_task`, which samples through the Pipeline and calls the Task's metric."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, default_collate

from ldm_fast.tasks.conditioner import Conditioner
from ldm_fast.tasks.registry import get_task


def _sample(model, conditioner: Conditioner, inputs: dict, n: int, guidance: float, sampler: str,
            steps: int, seed: int, batch_size: int, image_guidance: float = 0.0, kernels=None) -> torch.Tensor:
    """n samples through the Pipeline, in batches; `inputs` keyed as encode_inputs takes them;
    `image_guidance` > 0 (SR) adds image guidance toward each image's own low-res input."""
    from ldm_fast.pipeline import TASK_INPUTS, Pipeline

    by_pipeline_name = {v: k for k, v in TASK_INPUTS.items()}
    pipe = Pipeline.from_model(model, conditioner, kernels=kernels)
    out = pipe(**{by_pipeline_name[k]: v for k, v in inputs.items()}, n=n, guidance=guidance,
               sampler=sampler, steps=steps, seed=seed, batch_size=batch_size, sr_guidance=image_guidance,
               progress=False)
    return out.images


def _take(heldout: Dataset, n: int) -> dict:
    n = min(n, len(heldout))
    if n < 1:
        raise ValueError("evaluation needs at least one held-out item")
    return default_collate([heldout[i] for i in range(n)])


class _EvalContext:
    def __init__(self, model, conditioner, batch, n, guidance, sampler, steps, seed, batch_size, net, photos,
                 sr_guidance=0.0, kernels=None):
        self.kernels = kernels
        self.model, self.conditioner, self.batch, self.n = model, conditioner, batch, n
        self.guidance, self.sampler, self.steps, self.seed = guidance, sampler, steps, seed
        self.batch_size, self.net, self.photos, self.sr_guidance = batch_size, net, photos, sr_guidance

    def guidances(self):
        """('unguided', 1) — the conditional model alone — and ('guided', g) when g ≠ 1."""
        return [("unguided", 1.0)] + ([("guided", self.guidance)] if self.guidance != 1.0 else [])

    def sample(self, inputs: dict, guidance: float, n: int | None = None,
               image_guidance: float = 0.0) -> torch.Tensor:
        if "prompts" in self.conditioner.inputs and "prompts" not in inputs:
            # Hybrid: the held-out captions go with the concatenated inputs (one per image;
            # cycled over the real photos of the SR figures).
            captions = list(self.batch["caption"])
            inputs = {**inputs, "prompts": (captions * (n or self.n))[:n or self.n]}
        return _sample(self.model, self.conditioner, inputs, n or self.n, guidance, self.sampler,
                       self.steps, self.seed, self.batch_size, image_guidance, self.kernels)


def evaluate_task(model, conditioner: Conditioner, heldout: Dataset, n: int = 64, *, guidance: float = 3.0,
                  sampler: str = "ddim", steps: int = 50, seed: int = 0, batch_size: int = 64,
                  net=None, photos: bool = False, sr_guidance: float = 0.0, kernels: str | None = None) -> dict:
    """The task's metric on the first n held-out items (inputs taken from them; heldout must be
    the plain dataset — SR and inpainting degrade/mask it here, reproducibly from `seed`).
    `net`: the ShapesNet (default: `load_shapes_net` at the held-out resolution, trained and
    cached on first use). Class / text / layout report unguided and guided (scale `guidance`)
    figures; `photos` adds SR figures on scikit-image's photographs; `sr_guidance` > 0 adds SR
    figures with post-hoc image guidance (SRImageGuidance) at that scale; `kernels` the ops
    backend of the sampling (default: the process-wide selection)."""
    from ldm_fast.metrics import load_shapes_net

    task = conditioner.task
    batch = _take(heldout, n)
    if net is None:
        net = load_shapes_net(batch["image"].shape[-1], device="cpu")
    was_training = model.training
    model.eval()
    conditioner.eval()
    try:
        ctx = _EvalContext(model, conditioner, batch, len(batch["image"]), guidance, sampler, steps, seed,
                           batch_size, net, photos, sr_guidance, kernels)
        res = get_task(task).metric(ctx)
    finally:
        model.train(was_training)
    return {"task": task, "mode": conditioner.mode, "n": ctx.n, "sampler": sampler, "steps": steps,
            "guidance": guidance if conditioner.supports_guidance else 1.0, **res}
