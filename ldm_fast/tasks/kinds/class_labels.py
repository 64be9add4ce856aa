"""Class-conditional generation (the paper's ImageNet models): class ids as an embedding added
to the time embedding ("adm") or as a one-token cross-attention context ("crossattn"), with a
null class for classifier-free guidance; metric: a classifier's accuracy on the samples."""

import torch

from ldm_fast.tasks.registry import Task, register


def _configure(cfg, mode):
    from ldm_fast.data import procedural

    cfg.conditioning.num_classes = procedural.NUM_CLASSES
    if mode == "adm":
        cfg.unet.num_classes = cfg.conditioning.num_classes + 1  # + the null class for guidance


def _parts(cfg, model, device):
    from ldm_fast.conditioning import ClassEmbedder
    from ldm_fast.tasks.parts import _ClassPart

    cc = cfg.conditioning
    embedder = ClassEmbedder(cc.num_classes, cc.embed_dim, cc.null_class) if cc.mode == "crossattn" else None
    part = _ClassPart(cc.num_classes, embedder, device, cc.null_class)
    return [part], 0, cc.embed_dim if embedder is not None else None


def _metric(ctx) -> dict:
    from ldm_fast.metrics import classifier_accuracy

    labels = ctx.batch["label"]
    res = {"reference_accuracy": classifier_accuracy(ctx.net, ctx.batch["image"], labels),
           "chance": 1.0 / ctx.conditioner.cfg.conditioning.num_classes}
    for name, g in ctx.guidances():
        res[f"accuracy_{name}"] = classifier_accuracy(ctx.net, ctx.sample({"classes": labels}, g), labels)
    return res


# The released class-conditional ImageNet model (cin256-v2) has 1001 embedding rows: 1000 classes
# and the null class for guidance; cin256 v1 has 1000 and no null class. The checkpoint's row
# count is the only record of it.
IMAGENET_WITH_NULL = 1001
CLASS_TABLE = "cond_stage_model.embedding.weight"


def _original_state(cfg, state, notes) -> None:
    """conditioning.num_classes / null_class from the rows of the checkpoint's class
    embedding: 1001 rows = 1000 classes + the null class (last row); any other count = that
    many classes and no null class (guidance then refuses with a clear error)."""
    c = cfg.conditioning
    if CLASS_TABLE not in state:
        return
    rows = int(state[CLASS_TABLE].shape[0])
    c.null_class = rows == IMAGENET_WITH_NULL
    c.num_classes = rows - int(c.null_class)
    if c.null_class:
        notes.append(f"class embedder: {rows} rows = {c.num_classes} classes + the null class (last row)")
    else:
        c.label_dropout = 0.0
        notes.append(f"class embedder: {rows} rows = {rows} classes and no null class: classifier-free "
                     "guidance is not available for this model")


def _cond_module(cfg, first_stage):
    from ldm_fast.conditioning import ClassEmbedder

    c = cfg.conditioning
    return ClassEmbedder(c.num_classes, c.embed_dim, c.null_class) if c.mode in ("crossattn", "hybrid") else None


def _context_tokens(cfg) -> int:
    return 1 if cfg.conditioning.mode == "crossattn" else cfg.conditioning.max_length


TASK = register(Task(
    name="class", order=1, modes=("adm", "crossattn"), fields=("label",), inputs=("class_labels",),
    configure=_configure, parts=_parts, metric=_metric, export_part="class", context_tokens=_context_tokens,
    heldout=lambda items: {"class_labels": torch.stack([it["label"] for it in items])},
    original_state=_original_state, cond_module=_cond_module))
