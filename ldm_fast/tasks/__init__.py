"""The paper's tasks: one `Task` per task (ldm_fast/tasks/kinds/<task>.py) in one registry
(registry.py), and what is built from them — presets (presets.py), data pairing (data.py),
conditioner parts (parts.py) and the conditioner (conditioner.py), the task metrics
(evaluation.py), SR image guidance (sr_guidance.py). Adding a task is one new file in kinds/.

API (exact signatures):

    TASKS = ("unconditional", "class", "text", "layout", "semantic", "sr", "inpaint")  (registry order)
    MODES[task] -> allowed conditioning.mode values, the first the default
    get_task(name) / task_of(cfg) -> Task                           the registry

    tiny_task_config(task: str, mode: str | None = None) -> Config
    TASK_PRESETS = {"tiny-<task>": () -> Config}                   for a --preset lookup
    task_dataset(cfg: Config, dataset, seed: int | None = None) -> Dataset
        sr: adds 'lr' (SuperResolutionPairs); inpaint: adds 'mask', 'masked_image'; else as is
    dataset_captions(dataset, limit: int = 2000) -> list[str]       captions to train a tokenizer on
    build_conditioner(cfg, model=None, train_captions=None, *, run_dir=None, device=None,
                      strict: bool = False) -> Conditioner
        model: a LatentDiffusion or the first stage alone (training builds it before train_ldm);
        needed by inpainting (encodes the masked image) and to pick the device; else optional.
        run_dir: the tokenizer is loaded from RUN_DIR/tokenizer.json if there (resume), else
        loaded from conditioning.tokenizer or trained on train_captions, then saved there.
    load_conditioner(run_dir, model: LatentDiffusion, cond_state: dict, device=None) -> Conditioner
        the sampling side: `model, cond_state = run.load_model(run_dir)` then this.
    Conditioner
        __call__(batch: dict, generator) -> cond dict        for train_ldm(conditioner=...)
        .module                                              trainable τθ (nn.Module) or None
        .inputs                                              names encode_inputs needs
        .supports_guidance                                   False for concat-only tasks
        .encode_inputs(*, classes=None, prompts=None, boxes=None, semantic=None, lr=None,
                       image=None, mask=None, negative_prompts=None, n=None) -> (cond, uncond or None)
        .finish(images, inputs) -> images                    the task's output (inpainting pastes)
        .null_cond(batch_size) -> dict                       (no concat part only)
        .latent_size(cond) -> (h, w) or None                 concat tasks fix the latent grid
        .state_dict() / .load_state_dict(state) / .save(run_dir) / .train() / .eval()
    paste_known(samples, image, mask) -> images              inpainting: keep the known pixels
    SRImageGuidance(model, lr, scale=1.0)                    SR: a denoiser wrapper (Pipeline's
                                                             sr_guidance=) pulling samples toward the LR input
    evaluate_task(model, conditioner, heldout, n=64, *, guidance=3.0, sampler="ddim", steps=50,
                  seed=0, batch_size=64, net=None, photos=False, sr_guidance=0.0, kernels=None) -> dict
        heldout: the plain procedural held-out set; returns flat {name: number} plus task/mode/n
    heldout_inputs(cfg, names, n) -> dict                   Pipeline inputs from held-out items
    box_crops(images, boxes, labels, context=0.5) -> (crops, classes)   layout metric's crops
    real_photos(resolution) -> (N, 3, r, r) or None                   scikit-image photographs

Training (the CLI's order):
    cfg = tiny_task_config("text"); train, held = procedural_split(...)
    train = task_dataset(cfg, train); first_stage = train_autoencoder(...)
    cond = build_conditioner(cfg, first_stage, dataset_captions(train), run_dir=run.path)
    model, ema = train_ldm(cfg, run, first_stage, train, conditioner=cond)
Sampling (ldm_fast.pipeline.Pipeline does this):
    model, state = load_model(run_dir); cond = load_conditioner(run_dir, model, state)
    c, u = cond.encode_inputs(prompts=["a large red circle on a plain background"], n=16)

Modes: "crossattn" (τθ(y) as context), "adm" (class ids added to the time embedding; the
UNet's num_classes = conditioning.num_classes + 1 for the null class), "concat", and "hybrid"
(a concat task plus a text prompt cross-attended, e.g. text-guided inpainting). Label dropout
(conditioning.label_dropout) replaces the cross-attention / class condition by its null for
classifier-free guidance; concatenated inputs are never dropped.
"""

from ldm_fast.tasks.conditioner import (
    TOKENIZER_FILE,
    Conditioner,
    build_conditioner,
    check_inputs,
    check_negative,
    load_conditioner,
    repeat_to_batch,
)
from ldm_fast.tasks.data import dataset_captions, heldout_inputs, task_dataset, task_fields
from ldm_fast.tasks.evaluation import evaluate_task
from ldm_fast.tasks.kinds.layout import box_crops
from ldm_fast.tasks.kinds.sr import real_photos
from ldm_fast.tasks.parts import paste_known
from ldm_fast.tasks.presets import TASK_PRESETS, preset_for, tiny_task_config
from ldm_fast.tasks.registry import Task, all_tasks, check_task, get_task, register, task_names, task_of
from ldm_fast.tasks.sr_guidance import SRImageGuidance

TASKS = task_names()
MODES = {t.name: t.modes for t in all_tasks()}

__all__ = ["TASKS", "MODES", "TOKENIZER_FILE", "TASK_PRESETS", "Task", "Conditioner", "SRImageGuidance",
           "all_tasks", "box_crops", "build_conditioner", "check_inputs", "check_negative", "check_task",
           "dataset_captions", "evaluate_task", "get_task", "heldout_inputs", "load_conditioner", "paste_known",
           "preset_for", "real_photos", "register", "repeat_to_batch", "task_dataset", "task_fields",
           "task_names", "task_of", "tiny_task_config"]
