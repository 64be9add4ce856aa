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
