"""Text-to-image (the paper's LAION / MS-COCO model): a prompt through τθ (a WordPiece
tokenizer and a transformer trained jointly, or a frozen local BERT/CLIP) as cross-attention
context; metric: agreement of a classifier's shape/colour on the samples with the prompt.
The text part itself is built (and exported) for every task that takes a prompt, this one and
the hybrid modes."""

import re

import numpy as np

from ldm_fast.tasks.registry import Task, register


def _prompt_target(prompt: str) -> tuple[int | None, int | None]:
    """(shape, colour) the prompt asks for: its first shape word and first colour word (the
    main object in procedural captions)."""
    from ldm_fast.data import procedural

    words = re.findall(r"[a-z]+", prompt.lower())
    shape = next((procedural.SHAPES.index(w) for w in words if w in procedural.SHAPES), None)
    colour = next((procedural.COLORS.index(w) for w in words if w in procedural.COLORS), None)
    return shape, colour


def _metric(ctx) -> dict:
    from ldm_fast.metrics import extract

    prompts = list(ctx.batch["caption"])
    targets = [_prompt_target(p) for p in prompts]
    scored = sum(t != (None, None) for t in targets)
    if not scored:
        # The classifier knows only the procedural shapes and colours: a caption naming
        # neither (a real folder's) has nothing it could agree with.
        return {"note": f"prompt agreement not measured: none of the {len(prompts)} held-out captions names "
                        "a procedural shape or colour, the only things its classifier recognises"}
    res = {"captions_scored": scored}  # of n: those naming a procedural shape or colour
    for name, g in ctx.guidances():
        pred = extract(ctx.net, ctx.sample({"prompts": prompts}, g)).probs.argmax(1)
        shape, colour = pred // ctx.net.num_colors, pred % ctx.net.num_colors
        ok_s = [int(s) == t[0] for s, t in zip(shape, targets) if t[0] is not None]
        ok_c = [int(c) == t[1] for c, t in zip(colour, targets) if t[1] is not None]
        ok_b = [int(s) == t[0] and int(c) == t[1] for s, c, t in zip(shape, colour, targets)
                if None not in t]
        # A figure only over the prompts that name what it checks (none: left out, not NaN).
        for key, ok in ((f"shape_agreement_{name}", ok_s), (f"colour_agreement_{name}", ok_c),
                        (f"agreement_{name}", ok_b)):
            if ok:
                res[key] = float(np.mean(ok))
    return res


def _cond_module(cfg, first_stage):
    """The LDM text-to-image model's own τθ (LDM-BERT) is converted into the run; a frozen
    CLIP encoder stays in its own directory."""
    c = cfg.conditioning
    if c.text_encoder != "ldm_bert" or c.pretrained_text_encoder:
        return None
    from ldm_fast.ldm_bert import LDMBertTextEncoder

    return LDMBertTextEncoder(None, c.vocab_size, c.max_length, c.embed_dim, c.n_layers, c.n_heads)


TASK = register(Task(name="text", order=2, modes=("crossattn",), fields=("caption",), inputs=("prompt",),
                     metric=_metric, cond_module=_cond_module))
