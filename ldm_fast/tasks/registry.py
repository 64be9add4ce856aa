"""The task registry: one `Task` per paper task, each defined in its own file under
ldm_fast/tasks/kinds/ and found here. Adding a task is one new file there that calls
`register(Task(...))`; nothing else in the code names tasks.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

_REGISTRY: dict[str, "Task"] = {}
_loaded = False


def _nothing(*args):
    return None


@dataclass(frozen=True)
class Task:
    """What makes one of the paper's tasks: its data, its conditioner, its inputs, its metric."""
    name: str                              # conditioning.task in configs, --task on the CLI
    order: int                             # position in TASKS (help texts, test parametrisation)
    modes: tuple[str, ...]                 # conditioning.mode values it trains in; the first is the default
    fields: tuple[str, ...] = ()           # annotations its conditioner reads from a data item
    inputs: tuple[str, ...] = ()           # its Pipeline / CLI sampling inputs (hybrid modes add "prompt")
    conditional: bool = True               # False: no conditioner at all
    concat: bool = False                   # spatially aligned inputs concatenated to z_t
    per_sample_pairs: bool = False         # training inputs drawn per sample (a stream's latent cache lacks them)
    # The tiny preset set up for the task: (cfg, mode) → None, edits cfg in place.
    configure: Callable = _nothing
    # Training / evaluation pairs on top of {'image', …}: (cfg, dataset, seed) → Dataset, or None.
    pair: Callable | None = None
    # Conditioner parts: (cfg, model, device) → (parts, concatenated channels, context width or None).
    parts: Callable = lambda cfg, model, device: ([], 0, None)
    # Held-out items → this task's Pipeline inputs (without the hybrid prompt): (items) → dict.
    heldout: Callable = lambda items: {}
    # The task metric: (evaluation context) → {name: number}.
    metric: Callable | None = None
    # Export: the part the graph backends rebuild besides a prompt's ("class", "layout", "sr" or
    # None), and whether its conditioner can leave PyTorch at all.
    export_part: str | None = None
    exportable: bool = True
    # Context tokens of the exported τθ (TensorRT profiles): (cfg) → int.
    context_tokens: Callable = lambda cfg: cfg.conditioning.max_length
    # Converting an original CompVis checkpoint (ldm_fast.convert): the original code's input
    # conventions, (cfg) → None; what its tensors decide, (cfg, state dict, notes) → None; the
    # module whose state the run keeps as cond.*, (cfg, first stage) → module or None; and
    # whether the original's cond_stage_model is the first stage itself (its weights then
    # map there).
    original_config: Callable = _nothing
    original_state: Callable = lambda cfg, state, notes: None
    cond_module: Callable = lambda cfg, first_stage: None
    cond_stage_is_first_stage: bool = False

    @property
    def preset(self) -> str:
        """The name of its tiny preset."""
        return "tiny" if not self.conditional else f"tiny-{self.name}"

    def sampling_inputs(self, mode: str) -> tuple[str, ...]:
        """Pipeline inputs in `mode` (a hybrid mode adds the cross-attended prompt)."""
        return (*self.inputs, "prompt") if mode == "hybrid" else self.inputs

    def data_fields(self, mode: str) -> tuple[str, ...]:
        return (*self.fields, "caption") if mode == "hybrid" else self.fields

    def guided(self, mode: str) -> bool:
        """Whether it has a null condition (classifier-free guidance): every conditional task
        but the concat-only ones; a hybrid mode's prompt can be dropped."""
        return self.conditional and (not self.concat or mode == "hybrid")


def register(task: Task) -> Task:
    if task.name in _REGISTRY:
        raise ValueError(f"task {task.name!r} is registered twice")
    _REGISTRY[task.name] = task
    return task


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        from ldm_fast.tasks import kinds

        for info in pkgutil.iter_modules(kinds.__path__):
            importlib.import_module(f"{kinds.__name__}.{info.name}")


def all_tasks() -> list[Task]:
    _load()
    return sorted(_REGISTRY.values(), key=lambda t: t.order)


def task_names() -> tuple[str, ...]:
    return tuple(t.name for t in all_tasks())


def get_task(name: str) -> Task:
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"conditioning.task: expected one of {task_names()}, got {name!r}")
    return _REGISTRY[name]


def task_of(cfg) -> Task:
    """The Task of a Config (its conditioning.task)."""
    return get_task(cfg.conditioning.task)


def check_task(task: str, mode: str) -> Task:
    t = get_task(task)
    if mode not in t.modes:
        raise ValueError(f"conditioning.mode: task {task!r} takes {t.modes}, got {mode!r}")
    return t
