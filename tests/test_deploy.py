"""Deployment: `python -m ldm_fast.export` on a class-conditional micro run, then the whole
sampling loop from the exported files on onnxruntime (CPU) against the PyTorch modules
(both through ldm_fast.pipeline.Pipeline) for the same seed, with classifier-free guidance; the deploy CLI; the
TensorRT engine sidecar checks with fake sidecars; the TensorRT path itself only where
TensorRT and CUDA exist."""

import functools
import json

import pytest
import torch

from export_helpers import CAPTIONS, ROOT, class_export_dir, class_run_dir, text_run_dir
from ldm_fast.export.onnx_export import unet_spec
from ldm_fast.export.runtime import read_manifest
from ldm_fast.pipeline import Pipeline
from ldm_fast.export.tensorrt_build import (TensorRTNotInstalled, make_sidecar, profile_shapes,
                                            require_tensorrt, sidecar_path)
from ldm_fast.export.trt_runtime import EngineMismatch, check_sidecar, load_engine

pytest.importorskip("ldm_fast.tasks", reason="task conditioners (ldm_fast/tasks/) not available")


@functools.lru_cache(maxsize=None)
def _reference(n, seed, guidance, classes, steps=4, sampler="ddim"):
    """The PyTorch modules on the original run directory (cached: several tests compare with it)."""
    out = Pipeline.from_run_dir(class_run_dir(), device="cpu")(
        class_labels=list(classes), n=n, sampler=sampler, steps=steps, seed=seed, guidance=guidance, progress=False)
    return out.images, out.latents


def _run(pipe, **kwargs):
    out = pipe(progress=False, **kwargs)
    return out.images, out.latents


def test_export_cli_writes_a_validated_self_describing_folder():
    out = class_export_dir()
    m = read_manifest(out)
    assert set(m["graphs"]) == {"unet", "decoder", "cond_encoder"}
    for name, checks in m["validation"].items():
        assert len(checks) == 4 if name != "cond_encoder" else len(checks) == 2
        assert all(c["passed"] for c in checks)
    assert m["conditioning"]["task"] == "class" and m["conditioning"]["exported_encoder"] == "ClassEmbedder"
    assert m["run_dir"] == str(class_run_dir().resolve())
    assert len(m["schedule"]["alphas_cumprod"]) == 1000 and m["engines"] is None
    for rec in m["graphs"].values():
        assert (out / rec["file"]).is_file() and len(rec["sha256"]) == 64


@pytest.mark.parametrize("sampler,guidance", [("ddim", 3.0), ("dpmpp_2m", 1.0)])
def test_onnxruntime_loop_matches_the_pytorch_loop(sampler, guidance):
    pipe = Pipeline.from_export_dir(class_export_dir(), "onnxruntime")
    images, z = _run(pipe, n=2, sampler=sampler, steps=4, seed=7, guidance=guidance, class_labels=[1, 2])
    ref_images, ref_z = _reference(2, 7, guidance, (1, 2), sampler=sampler)
    # fp32 graphs: per-call differences ~1e-6 (validation), a few steps compound them mildly.
    torch.testing.assert_close(z, ref_z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(images, ref_images, atol=1e-4, rtol=0)
    assert images.shape == (2, 3, 16, 16)
    other, _ = _run(pipe, n=2, sampler=sampler, steps=4, seed=8, guidance=guidance, class_labels=[1, 2])
    assert not torch.allclose(other, images)  # the seed matters


def test_torch_backend_reproduces_the_run_directory_exactly():
    pipe = Pipeline.from_export_dir(class_export_dir(), "torch", device="cpu")
    images, z = _run(pipe, n=2, steps=4, seed=7, guidance=3.0, class_labels=[1, 2])
    ref_images, ref_z = _reference(2, 7, 3.0, (1, 2))
    assert torch.equal(z, ref_z) and torch.equal(images, ref_images)


def test_conditioning_inputs_are_checked():
    pipe = Pipeline.from_export_dir(class_export_dir(), "onnxruntime")
    with pytest.raises(ValueError, match="unknown class id 30"):
        pipe(n=1, steps=2, class_labels=[30])  # 30 classes: 30 is the null id, not a user class
    with pytest.raises(ValueError, match="missing"):
        pipe(n=1, steps=2)
    with pytest.raises(ValueError, match="unexpected"):
        pipe(n=1, steps=2, class_labels=[1], prompt=["a red circle"])
    with pytest.raises(ValueError, match="negative prompt"):
        pipe(n=1, steps=2, class_labels=[1], negative_prompt="a red circle")


def test_text_conditioning_from_the_exported_encoder_and_tokenizer():
    """Prompts → tokenizer.json copied into the export → cond_encoder graph, against the torch
    conditioner; the empty prompt is the null condition."""
    from ldm_fast.export.__main__ import main
    from ldm_fast.export.runtime import ExportedConditioner, OrtGraph
    from ldm_fast.export.onnx_export import GraphSpec
    from ldm_fast.run import load_model
    from ldm_fast.tasks import load_conditioner

    out = ROOT / "export_text"
    assert main(["--ckpt", str(text_run_dir()), "--out", str(out), "--graphs", "cond_encoder"]) == 0
    m = read_manifest(out)
    assert m["conditioning"]["tokenizer"] == "tokenizer.json" and (out / "tokenizer.json").is_file()
    assert all(c["passed"] for c in m["validation"]["cond_encoder"])
    rec = m["graphs"]["cond_encoder"]
    graph = OrtGraph(out / rec["file"], GraphSpec.from_json(rec["spec"]))
    exported = ExportedConditioner(m["conditioning"], graph, out, "cpu")
    model, state = load_model(text_run_dir())
    reference = load_conditioner(text_run_dir(), model, state)
    prompts = [CAPTIONS[1], "a blue zebra"]  # an unseen word: WordPiece pieces or [UNK]
    (c, u), (rc, ru) = exported.encode_inputs(prompts=prompts), reference.encode_inputs(prompts=prompts)
    torch.testing.assert_close(c["context"], rc["context"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u["context"], ru["context"], atol=1e-5, rtol=1e-5)
    assert exported.inputs == ("prompts",) and exported.supports_guidance
    negative = [CAPTIONS[2], CAPTIONS[3]]  # the null condition becomes the negative prompts
    _, nu = exported.encode_inputs(prompts=prompts, negative_prompts=negative)
    _, rnu = reference.encode_inputs(prompts=prompts, negative_prompts=negative)
    torch.testing.assert_close(nu["context"], rnu["context"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(nu["context"], u["context"])


def test_deploy_cli_writes_the_grid(tmp_path):
    from PIL import Image

    from ldm_fast.deploy import main

    out = tmp_path / "grid.png"
    rc = main(["--engine-dir", str(class_export_dir()), "--backend", "onnxruntime", "--n", "3", "--steps", "3",
               "--seed", "0", "--guidance", "2.0", "--class", "4", "--out", str(out)])
    assert rc == 0
    img = Image.open(out)
    # 3 images of 16² in a 2×2 grid with 2 px padding, upscaled 4× for small images.
    assert img.size == (4 * (2 * 18 + 2), 4 * (2 * 18 + 2))
    assert main(["--engine-dir", str(tmp_path), "--out", str(out)]) == 2  # not an export folder


def test_sample_and_deploy_torch_write_the_same_pngs_with_metadata(tmp_path, capsys):
    """One Pipeline behind both CLIs: the same flags and seed give byte-identical pixels and
    the same PNG text chunks; a second class is cycled over --n 3."""
    import numpy as np
    from PIL import Image

    from ldm_fast import deploy, sample
    from ldm_fast.cli import png_text

    flags = ["--class", "1", "2", "--n", "3", "--steps", "3", "--seed", "5", "--guidance", "2",
             "--device", "cpu", "--no-progress"]
    assert sample.main(["--ckpt", str(class_run_dir()), *flags, "--outdir", str(tmp_path / "s")]) == 0
    assert deploy.main(["--engine-dir", str(class_export_dir()), "--backend", "torch", *flags,
                        "--outdir", str(tmp_path / "d")]) == 0
    for i in range(3):
        a, b = tmp_path / "s" / f"{i:05d}.png", tmp_path / "d" / f"{i:05d}.png"
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        meta = png_text(a)
        assert meta == png_text(b)
        assert meta["seed"] == str(5 + i) and meta["class_label"] == str((1, 2, 1)[i])
        assert (meta["sampler"], meta["steps"], meta["guidance"]) == ("ddim", "3", "2.0")
        assert meta["model"] == class_run_dir().name
    assert (tmp_path / "s" / "grid.png").is_file() and (tmp_path / "d" / "grid.png").is_file()
    first = np.asarray(Image.open(tmp_path / "s" / "00000.png"))
    third = np.asarray(Image.open(tmp_path / "s" / "00002.png"))
    assert not np.array_equal(first, third)  # same class, different seed


# ----------------------------------------------------------------------------- TensorRT sidecars

def _fake_engine(tmp_path, version="10.13.0.35", gpu=None):
    gpu = gpu or {"name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}
    from ldm_fast.config import get_preset

    spec = unet_spec(get_preset("tiny"))
    engine = tmp_path / "unet.plan"
    engine.write_bytes(b"not a real engine")
    side = make_sidecar(spec, version, gpu, tmp_path / "unet.onnx",
                        profile_shapes(spec, (1, 2, 4), (4, 8, 16), (4, 8, 16)), 1 << 30, None, {})
    sidecar_path(engine).write_text(json.dumps(side))
    return engine


H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}


@pytest.mark.parametrize("env,expected", [
    ({"tensorrt_version": "11.0.0.1", "gpu": H100}, ["TensorRT version: engine built with 10.13.0.35, installed 11.0.0.1"]),
    ({"tensorrt_version": "10.13.0.35", "gpu": {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": [8, 0]}},
     ["compute capability: engine built for sm_90, this GPU is sm_80", "GPU: engine built on 'NVIDIA H100"]),
    ({"tensorrt_version": "10.14.1.48", "gpu": {"name": "NVIDIA H200", "compute_capability": [9, 0]}},
     ["TensorRT version", "running on 'NVIDIA H200'"]),
])
def test_engine_sidecar_mismatch_is_refused_before_deserialising(tmp_path, env, expected):
    engine = _fake_engine(tmp_path)
    with pytest.raises(EngineMismatch) as err:
        load_engine(engine, environment=env)
    for text in expected:
        assert text in str(err.value)
    assert "rebuild" in str(err.value)


def test_matching_sidecar_passes_the_check(tmp_path):
    engine = _fake_engine(tmp_path)
    side = json.loads(sidecar_path(engine).read_text())
    check_sidecar(side, "10.13.0.35", H100)  # no error
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        # The check passed; only then is TensorRT needed, and its absence is said plainly.
        with pytest.raises(TensorRTNotInstalled, match="TensorRT not installed"):
            load_engine(engine, environment={"tensorrt_version": "10.13.0.35", "gpu": H100})


def test_missing_or_foreign_sidecar(tmp_path):
    engine = tmp_path / "e.plan"
    engine.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="sidecar is missing"):
        load_engine(engine, environment={"tensorrt_version": "1", "gpu": H100})
    sidecar_path(engine).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(EngineMismatch, match="unknown sidecar format"):
        load_engine(engine, environment={"tensorrt_version": "1", "gpu": H100})


def test_profiles_and_schedule_records():
    from ldm_fast.config import get_preset
    from ldm_fast.diffusion import make_schedule
    from ldm_fast.export.onnx_export import decoder_spec, encoder_spec
    from ldm_fast.export.runtime import schedule_from_record

    cfg = get_preset("cin256-ldm-vq-4")
    prof = profile_shapes(unet_spec(cfg, "fp16"), (1, 2, 8), (32, 64, 96), (32, 64, 128), 4, (1, 1, 1))
    assert prof["latent"] == [[1, 3, 32, 32], [2, 3, 64, 64], [8, 3, 96, 128]]
    assert prof["timestep"] == [[1], [2], [8]] and prof["context"][2] == [8, 1, 512]
    assert profile_shapes(decoder_spec(cfg), (1, 1, 1), (8, 8, 8), (16, 16, 16), 4)["latent"][1] == [1, 3, 8, 16]
    assert profile_shapes(encoder_spec(cfg), (1, 1, 1), (8, 8, 8), (16, 16, 16), 4)["image"][1] == [1, 3, 32, 64]
    sched = make_schedule("cosine", 1000, parameterization="v")
    rec = {"alphas_cumprod": sched.alphas_cumprod.tolist(), "parameterization": "v"}
    back = schedule_from_record(json.loads(json.dumps(rec)))
    assert torch.equal(back.alphas_cumprod, sched.alphas_cumprod) and back.parameterization == "v"
    torch.testing.assert_close(back.betas, sched.betas, atol=1e-12, rtol=0)


def _tensorrt_missing() -> str | None:
    try:
        require_tensorrt()
    except TensorRTNotInstalled:
        return "TensorRT is not installed (import tensorrt fails)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def test_export_cli_without_tensorrt_says_so(capsys):
    if _tensorrt_missing() is None:
        pytest.skip("TensorRT and CUDA are present: the engine build is tested below")
    from ldm_fast.export.__main__ import main

    rc = main(["--ckpt", str(class_run_dir()), "--out", str(ROOT / "trt_missing"), "--graphs", "cond_encoder",
               "--no-validate", "--tensorrt"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "TensorRT not installed" in err or "CUDA" in err
    assert (ROOT / "trt_missing" / "cond_encoder.onnx").is_file()  # the ONNX part was still written


@pytest.mark.gpu
@pytest.mark.skipif(_tensorrt_missing() is not None, reason=str(_tensorrt_missing()))
def test_tensorrt_backend_matches_onnxruntime(tmp_path):
    import shutil

    from ldm_fast.export.__main__ import build_engines, parse_args
    from ldm_fast.run import load_model

    out = tmp_path / "export"
    shutil.copytree(class_export_dir(), out)
    m = read_manifest(out)
    args = parse_args(["--ckpt", str(class_run_dir()), "--out", str(out), "--min-shape", "1,4,4",
                       "--opt-shape", "4,8,8", "--max-shape", "8,8,8"])
    model, _ = load_model(class_run_dir())
    m["engines"] = build_engines(args, model, out, m["graphs"])
    (out / "manifest.json").write_text(json.dumps(m))
    for name in m["engines"].values():
        assert json.loads(sidecar_path(out / name).read_text())["tensorrt_version"]
    trt = Pipeline.from_export_dir(out, "tensorrt")
    z_trt = _run(trt, n=2, steps=4, seed=7, guidance=3.0, class_labels=[1, 2])[1]
    z_ref = _reference(2, 7, 3.0, (1, 2))[1]
    torch.testing.assert_close(z_trt.cpu(), z_ref, atol=2e-3, rtol=2e-3)  # TF32 convolutions on GPU
