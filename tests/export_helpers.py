"""Micro models and cached exports shared by the export / deploy tests.

Exporting is the slow part (the dynamo exporter traces and decomposes every module: ~5–15 s
per graph on 2 CPU cores), so each graph is exported once per test session and the folders
are reused by test_export_onnx.py and test_deploy.py (module-level caches, one pytest process).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

from ldm_fast.config import save_yaml
from ldm_fast.model import LatentDiffusion

ROOT = Path(tempfile.mkdtemp(prefix="ldm_fast_export_tests_"))
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)


def shrink(cfg, first_stage: str = "kl"):
    """The smallest graphs that still contain every op kind: 2 UNet levels with attention,
    an f = 2 first stage with its middle attention block, 8×8 latents."""
    cfg.data.resolution = 16
    ae = cfg.autoencoder
    ae.kind, ae.base_channels, ae.channel_mult, ae.num_res_blocks = first_stage, 16, (1, 2), 1
    ae.groups, ae.resolution, ae.n_embed = 8, 16, 32
    un = cfg.unet
    un.model_channels, un.channel_mult, un.num_res_blocks = 16, (1, 2), 1
    un.attention_resolutions, un.num_head_channels, un.groups = (2,), 8, 8
    return cfg


def randomize(model, seed=0):
    """Give zero-initialised output layers values, so every path shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@functools.lru_cache(maxsize=None)
def parity_model():
    """UNet with every conditioning input at once (context, class_labels, concat), VQ first
    stage (the codebook lookup is folded into the decoder graph), latent scale ≠ 1."""
    from ldm_fast.config import get_preset

    cfg = shrink(get_preset("tiny"), "vq")
    un = cfg.unet
    un.use_spatial_transformer, un.context_dim, un.num_classes, un.in_channels = True, 12, 5, 5
    torch.manual_seed(0)
    model = randomize(LatentDiffusion(cfg).eval())
    model.scale_factor.fill_(0.8)
    return model


@functools.lru_cache(maxsize=None)
def parity_export(graph: str, precision: str) -> Path:
    from ldm_fast.export.onnx_export import export_one

    path = ROOT / "parity" / f"{graph}_{precision}.onnx"
    export_one(graph, parity_model(), path, precision=precision)
    return path


@functools.lru_cache(maxsize=None)
def class_run_dir() -> Path:
    """A run directory of a class-conditional (cross-attention) micro model with random
    weights, written the way training writes one."""
    from ldm_fast.run import RunDir
    from ldm_fast.tasks import build_conditioner, tiny_task_config

    cfg = tiny_task_config("class", "crossattn")
    cfg.conditioning.embed_dim = cfg.unet.context_dim = 16
    cfg = shrink(cfg, "kl")
    torch.manual_seed(1)
    model = randomize(LatentDiffusion(cfg).eval(), seed=1)
    model.scale_factor.fill_(1.3)
    cond = build_conditioner(cfg, model)
    path = ROOT / "run_class"
    run = RunDir(path)
    save_yaml(cfg, path / "config.yaml")
    run.save_first_stage(model.first_stage, cfg)
    run.save_ldm(model, None, cond.module, cfg)
    return path


@functools.lru_cache(maxsize=None)
def class_export_dir() -> Path:
    """`python -m ldm_fast.export` on class_run_dir (fp32, validated, no encoder graph)."""
    from ldm_fast.export.__main__ import main

    out = ROOT / "export_class"
    shutil.rmtree(out, ignore_errors=True)
    rc = main(["--ckpt", str(class_run_dir()), "--out", str(out), "--graphs", "unet,decoder,cond_encoder"])
    assert rc == 0, f"export CLI exited with {rc}"
    return out


CAPTIONS = ["a large red circle on a plain background", "a small blue square", "two green triangles",
            "a yellow star above a purple circle"]


@functools.lru_cache(maxsize=None)
def text_run_dir() -> Path:
    """A text-conditional micro run: trained WordPiece tokenizer (saved as tokenizer.json, as
    training does) and a 1-layer τθ transformer with random weights."""
    from ldm_fast.run import RunDir
    from ldm_fast.tasks import build_conditioner, tiny_task_config

    cfg = tiny_task_config("text")
    cc = cfg.conditioning
    cc.embed_dim = cfg.unet.context_dim = 16
    cc.n_layers, cc.n_heads, cc.max_length = 1, 2, 12
    cfg = shrink(cfg, "kl")
    torch.manual_seed(2)
    model = LatentDiffusion(cfg).eval()
    path = ROOT / "run_text"
    run = RunDir(path)
    cond = build_conditioner(cfg, model, CAPTIONS, run_dir=path)
    save_yaml(cfg, path / "config.yaml")
    run.save_first_stage(model.first_stage, cfg)
    run.save_ldm(model, None, cond.module, cfg)
    return path
