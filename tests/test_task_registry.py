"""The task registry: every paper task registered once, its held-out inputs feeding its own
conditioner, and a new task added by registering one Task (no other code changes)."""

import dataclasses

import pytest
import torch

from ldm_fast.pipeline import TASK_INPUTS
from ldm_fast.tasks import (MODES, TASKS, build_conditioner, get_task, heldout_inputs, register,
                            tiny_task_config)
from ldm_fast.tasks import registry


def test_the_paper_tasks_are_registered_in_order():
    assert TASKS == ("unconditional", "class", "text", "layout", "semantic", "sr", "inpaint")
    with pytest.raises(ValueError, match="registered twice"):
        register(get_task("class"))
    with pytest.raises(ValueError, match="expected one of"):
        get_task("colourise")


@pytest.mark.parametrize("task,mode", [(t, m) for t in TASKS for m in MODES[t]])
def test_heldout_inputs_are_what_the_conditioner_takes(task, mode):
    cfg = tiny_task_config(task, mode)
    cfg.data.heldout_samples = 2
    t = get_task(task)
    names = t.sampling_inputs(mode)
    inputs = heldout_inputs(cfg, names, 3)  # 3 > 2 held-out items: cycled
    assert set(inputs) == set(names)
    if not t.conditional:
        return
    from ldm_fast.autoencoder import build_first_stage

    cond = build_conditioner(cfg, build_first_stage(cfg.autoencoder), ["a red circle"] * 4)
    for part in cond.parts:
        if hasattr(part, "concat"):  # inpainting: the latent scale is measured on the first batch
            part.concat.calibrate(inputs["image"])
    assert cond.inputs == tuple(TASK_INPUTS[n] for n in names)
    assert cond.supports_guidance == t.guided(mode)
    c, u = cond.encode_inputs(**{TASK_INPUTS[k]: v for k, v in inputs.items()})
    assert all(v.shape[0] == 3 for v in c.values())
    assert (u is not None) == t.guided(mode)


def test_a_new_task_is_one_registration():
    """A variant of the class task under a new name: the preset, conditioner and guidance
    follow from its Task alone."""
    new = dataclasses.replace(get_task("class"), name="class-variant", order=99)
    register(new)
    try:
        cfg = tiny_task_config("class-variant")
        assert cfg.conditioning.num_classes > 0 and cfg.unet.num_classes == cfg.conditioning.num_classes + 1
        cond = build_conditioner(cfg)
        c, u = cond.encode_inputs(classes=torch.tensor([1, 2]))
        assert set(c) == {"class_labels"} and torch.equal(u["class_labels"], torch.full((2,), cfg.conditioning.num_classes))
    finally:
        registry._REGISTRY.pop("class-variant")


def test_no_task_names_are_compared_outside_the_registry():
    """Task-specific behaviour lives in ldm_fast/tasks/; elsewhere a task name is only passed
    on or checked against the run's (--task), never branched on."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"""\.task\s*(==|!=)\s*["']|["']\s*(==|!=)\s*\w*\.task\b|\.task\s+(not\s+)?in\s*\(""")
    hits = []
    for folder in ("ldm_fast", "export", "bench"):
        for path in (root / folder).rglob("*.py"):
            if "tasks" in path.relative_to(root).parts[:2]:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)
