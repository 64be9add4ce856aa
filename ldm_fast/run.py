"""A run directory: where training writes and where sampling, export and evaluation read.

    RUN_DIR/config.yaml                 the full Config
    RUN_DIR/autoencoder.safetensors     first-stage weights (stage 1 result)
    RUN_DIR/ldm.safetensors             UNet weights (EMA when trained with EMA), latent scale,
                                        conditioning encoder — everything sampling needs
    RUN_DIR/autoencoder/, RUN_DIR/ldm/  resumable training checkpoints (step_*.safetensors)
    RUN_DIR/metrics.jsonl               one JSON record per logged step
    RUN_DIR/*.png                       reconstruction and sample grids
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ldm_fast import checkpoint as ckpt
from ldm_fast.autoencoder import build_first_stage
from ldm_fast.config import Config, load_yaml, to_dict


class RunDir:
    def __init__(self, path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def append_metrics(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_first_stage(self, model: torch.nn.Module, cfg: Config) -> Path:
        return ckpt.save_checkpoint(self.path / "autoencoder.safetensors", dict(model.state_dict()),
                                    {"config": json.dumps(to_dict(cfg)), "kind": cfg.autoencoder.kind})

    def save_ldm(self, model, ema, cond_module, cfg: Config) -> Path:
        unet = ema.module if ema is not None else model.unet
        tensors = {**ckpt.flatten_state("unet.", unet.state_dict()), "scale_factor": model.scale_factor}
        if cond_module is not None:
            tensors.update(ckpt.flatten_state("cond.", cond_module.state_dict()))
        return ckpt.save_checkpoint(self.path / "ldm.safetensors", tensors,
                                    {"config": json.dumps(to_dict(cfg)), "ema": str(ema is not None)})


def load_config(run_dir) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    return load_yaml(path)


def load_first_stage(run_dir, device="cpu", cfg: Config | None = None) -> torch.nn.Module:
    cfg = cfg or load_config(run_dir)
    model = build_first_stage(cfg.autoencoder)
    path = Path(run_dir) / "autoencoder.safetensors"
    if cfg.autoencoder.kind != "identity":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; train the autoencoder stage first")
        tensors, _ = ckpt.load_checkpoint(path)
        model.load_state_dict(tensors)
    return model.to(device).eval()


def load_model(run_dir, device="cpu"):
    """The trained LatentDiffusion (EMA weights) and its conditioning encoder (or None)."""
    from ldm_fast.model import LatentDiffusion

    cfg = load_config(run_dir)
    path = Path(run_dir) / "ldm.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; train the ldm stage first")
    tensors, _ = ckpt.load_checkpoint(path)
    model = LatentDiffusion(cfg, load_first_stage(run_dir, cfg=cfg))
    model.unet.load_state_dict(ckpt.unflatten_state("unet.", tensors))
    model.scale_factor.copy_(tensors["scale_factor"])
    cond_state = ckpt.unflatten_state("cond.", tensors)
    return model.to(device).eval(), cond_state
