import os

import pytest
import torch

from ldm_fast import checkpoint as ckpt


def test_round_trip_with_metadata(tmp_path):
    tensors = {"a": torch.randn(3, 4), "step": torch.tensor(7), "b": torch.arange(5, dtype=torch.uint8)}
    path = ckpt.save_checkpoint(tmp_path / "x.safetensors", tensors, {"step": 7})
    loaded, meta = ckpt.load_checkpoint(path)
    assert meta["step"] == "7" and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # temporary file renamed away


def test_truncated_and_corrupted_files_are_detected_and_skipped(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, step), {"w": torch.full((64,), float(step))})
    newest = ckpt.checkpoint_path(tmp_path, 3)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) - 40])  # truncated
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(newest)
    middle = ckpt.checkpoint_path(tmp_path, 2)
    raw = bytearray(middle.read_bytes())
    raw[-3] ^= 0xFF  # one flipped payload byte: still parses, fails the checksum
    middle.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.load_checkpoint(middle)
    path, tensors, _ = ckpt.latest_valid(tmp_path)
    assert path.name == "step_00000001.safetensors" and tensors["w"][0] == 1.0
    assert newest.exists()  # a bad file is reported, never deleted


def test_prune_keeps_last(tmp_path):
    for step in range(5):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, step), {"w": torch.zeros(1)})
    ckpt.prune(tmp_path, 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003.safetensors", "step_00000004.safetensors"]


def test_failed_write_leaves_previous_file(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(tmp_path / "m.safetensors", {"w": torch.ones(2)})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(path, {"w": torch.zeros(2)})
    assert torch.equal(ckpt.load_checkpoint(path)[0]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn(3)
    opt.step()
    tensors, meta = ckpt.optimizer_to_tensors("opt.", opt)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=0.5)
    ckpt.optimizer_from_tensors("opt.", opt2, tensors, meta)
    assert opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])
