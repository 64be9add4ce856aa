"""Tiny presets per task: 32² procedural images, KL-f4, 8×8×3 latents, set up for one task;
they train on 2 CPU cores in minutes."""

from __future__ import annotations

from ldm_fast.config import Config, tiny, validate
from ldm_fast.tasks.registry import all_tasks, check_task, get_task


def tiny_task_config(task: str, mode: str | None = None) -> Config:
    """The tiny preset set up for `task` (and `mode`, default the task's first). τθ: 64 wide,
    2 layers, 4 heads (context_dim 64)."""
    t = get_task(task)
    mode = t.modes[0] if mode is None else mode
    check_task(task, mode)
    cfg = tiny()
    cfg.name = f"tiny-{task}" + (f"-{mode}" if mode != t.modes[0] else "")
    cc, un = cfg.conditioning, cfg.unet
    cc.task, cc.mode = task, mode
    cc.embed_dim, cc.n_layers, cc.n_heads = 64, 2, 4
    t.configure(cfg, mode)
    if "prompt" in t.sampling_inputs(mode):
        # Longest procedural caption: 19 words + [CLS]/[SEP] = 21 tokens.
        cc.max_length, cc.vocab_size = 24, 256
    if t.concat and not t.guided(mode):
        cc.label_dropout = 0.0  # nothing to drop: no guidance for concat-only tasks
    if mode in ("crossattn", "hybrid"):
        un.use_spatial_transformer, un.context_dim, un.transformer_depth = True, cc.embed_dim, 1
    return validate(cfg)


class _Presets(dict):
    """{"tiny-<task>": () → Config} for a --preset lookup, filled from the registry."""

    def __init__(self):
        super().__init__({f"tiny-{t.name}": (lambda name=t.name: tiny_task_config(name)) for t in all_tasks()})


TASK_PRESETS = _Presets()


def preset_for(task: str, preset: str = "tiny") -> str:
    """The preset `--task task` trains with when the preset is the default "tiny"."""
    return get_task(task).preset if preset == "tiny" else preset
