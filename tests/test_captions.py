"""Real captions for text tasks: the context length follows the captions a tokenizer is
trained on, and a prompt cut at a fixed context names the setting that keeps it whole."""

import warnings

import pytest

from ldm_fast.tasks import build_conditioner
from ldm_fast.tasks.presets import tiny_task_config

LONG = ("a close photograph of a tabby cat lying on a red woollen blanket next to a window with "
        "white curtains and a small green plant in a terracotta pot on the wooden sill")


def test_context_grows_to_the_longest_training_caption(tmp_path):
    cfg = tiny_task_config("text")
    assert cfg.conditioning.max_length == 24
    captions = ["a cat", LONG, ""]
    cond = build_conditioner(cfg, train_captions=captions, run_dir=tmp_path)
    tokens = len(cond.tokenizer.tokenizer.encode(LONG).ids)
    assert tokens > 24 and cfg.conditioning.max_length == tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the longest caption is no longer truncated
        ids = cond.tokenizer.encode([LONG], cfg.conditioning.max_length)
    assert ids.shape == (1, tokens)
    # The sampling side (tokenizer saved in the run, config as saved) keeps that length.
    again = build_conditioner(cfg, run_dir=tmp_path)
    assert cfg.conditioning.max_length == tokens and again.tokenizer is not None


def test_short_captions_keep_the_configured_context():
    cfg = tiny_task_config("text")
    build_conditioner(cfg, train_captions=["a cat", "a dog on grass"])
    assert cfg.conditioning.max_length == 24  # never shrunk: prompts at sampling may be longer


def test_truncation_warning_names_the_remedy():
    cfg = tiny_task_config("text")
    cond = build_conditioner(cfg, train_captions=["a cat"])
    with pytest.warns(UserWarning, match=r"--set conditioning.max_length=\d+"):
        cond.tokenizer.encode([LONG], cfg.conditioning.max_length)


def test_prompt_agreement_on_captions_it_cannot_score_is_a_note_not_nan():
    from types import SimpleNamespace

    from ldm_fast.tasks import get_task

    def no_sampling(*args, **kwargs):
        raise AssertionError("nothing to score: no samples should be drawn")

    ctx = SimpleNamespace(batch={"caption": ["a photograph of a tabby cat", ""]}, guidances=lambda: [],
                          sample=no_sampling)
    res = get_task("text").metric(ctx)
    assert list(res) == ["note"] and "none of the 2 held-out captions" in res["note"]


def test_an_image_folder_cannot_feed_an_annotation_task(tmp_path):
    import numpy as np
    from PIL import Image

    from ldm_fast.config import DataConfig
    from ldm_fast.data.build import build_datasets

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"needs \['label'\] per image: use tar shards"):
        build_datasets(DataConfig(dataset="folder", root=str(tmp_path), resolution=8), ("label",))
