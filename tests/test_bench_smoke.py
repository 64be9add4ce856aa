"""Every benchmark script runs end to end in its smallest mode and writes what it promises:
JSON with the machine, a Markdown table, plots, and 'skipped' entries with reasons for the
backends that cannot run here. Plus the FLOP counter against torch's and the SD1.5 anchors.
The numbers of these runs mean nothing; only the plumbing is checked."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name: str):
    key = f"_bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_global_state():
    from ldm_fast import ops

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    ops.set_backend(None)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Shared by the runs that need a feature network: the seconds-trained smoke network is
    trained once into work/featnet and reused."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def throughput_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "tp.json"
    rc = load("throughput").main(["--quick", "--backends", "eager:fp32,eager:bf16,triton:fp16,tensorrt:fp16",
                                  "--out", str(out)])
    return rc, out


def test_throughput_quick(throughput_run):
    rc, out = throughput_run
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["machine"]["name"] and data["machine"]["date"] and data["machine"]["torch"]
    rows = {r["backend"]: r for r in data["results"]}
    assert set(rows) == {"eager:fp32", "eager:bf16"}
    eager = rows["eager:fp32"]
    assert eager["speedup_vs_eager_fp32"]["unet_step"] == pytest.approx(1.0)
    for key in ("unet_step_s", "decode_s", "sample_s", "first_call_s", "images_per_s"):
        assert key in eager
    assert eager["unet_step_s"]["n"] == 2 and eager["unet_step_s"]["p25"] <= eager["unet_step_s"]["p75"]
    assert rows["eager:bf16"]["max_abs_diff_vs_eager_fp32"] > 0        # real random outputs, not zeros
    reasons = {s["backend"]: s["reason"] for s in data["skipped"]}
    assert "CUDA" in reasons["triton:fp16"] and "tensorrt" in reasons["tensorrt:fp16"]
    flops = data["models"]["tiny"]["flops"]["2"]["unet_call"]
    assert flops["total"] == flops["torch_flop_counter"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| tiny | eager:bf16 |" in md and "CPU" in md


def test_flop_counter_matches_torch_and_the_sd15_anchors():
    tp = load("throughput")
    bl = importlib.import_module("benchlib")  # a package in bench/, on sys.path since load()
    size = tp.make_size("sd", None)
    flops = tp.count_flops(size, 1)
    assert flops["unet_call"]["total"] == flops["unet_call"]["torch_flop_counter"]
    # DESIGN.md anchors: an SD1.5 UNet call at 64×64 ≈ 0.8 TFLOP, the VAE decode at 512² ≈ 2.5.
    assert 0.79e12 < flops["unet_call"]["total"] < 0.82e12
    assert 2.4e12 < flops["decode_per_image"]["total"] < 2.6e12
    with torch.device("meta"):
        from ldm_fast.unet import UNet
        params = sum(p.numel() for p in UNet(size.cfg.unet).parameters())
    assert round(params / 1e6, 1) == 859.5        # SD1.5's UNet parameter count
    assert bl.peak_flops("NVIDIA H100 80GB HBM3", torch.float16)[0] == 989e12
    assert bl.peak_flops("Some Unknown GPU", torch.float16) is None


def test_train_throughput_quick(tmp_path):
    out = tmp_path / "tt.json"
    assert load("train_throughput").main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    parts = {(r["part"], r["config"]) for r in data["results"]}
    assert parts == {("autoencoder", "eager"), ("ldm", "eager"), ("cache", "encode every step"),
                     ("cache", "cached latents")}
    assert all(r["steps_per_s"] > 0 for r in data["results"])
    assert data["cache"]["items"] == 32 and data["cache"]["speedup"] > 0
    assert {s["backend"] for s in data["skipped"]} == {"triton", "compile"}


@pytest.mark.slow
def test_compression_quick(tmp_path, work):
    out = tmp_path / "c.json"
    assert load("compression").main(["--quick", "--factors", "4,8", "--resolution", "32", "--out", str(out),
                                     "--work-dir", str(work)]) == 0
    data = json.loads(out.read_text())
    assert [r["f"] for r in data["results"]] == [4, 8]
    assert data["results"][1]["latent"] == [4, 4, 4]
    budget = data["args"]["ldm_cpu_s"]
    for r in data["results"]:
        assert r["images_per_s"] > 0 and r["quality"]["fd_shapes"] >= 0 and r["quality"]["fd_shapes_noise"] >= 0
        # Trained by CPU time, scored along the way: steps grow, the last point is the budget.
        steps = [p["steps"] for p in r["progress"]]
        assert len(steps) == 2 and steps == sorted(steps) and r["ldm_cpu_s"] >= budget * 0.5
    assert data["command"].startswith("python bench/compression.py --quick")

    # An interrupted study resumes: finished factors are reused as they were, new ones trained.
    args = ["--quick", "--resolution", "32", "--out", str(out), "--work-dir", str(work)]
    assert load("compression").main(args + ["--factors", "4,8,16", "--resume"]) == 0
    again = json.loads(out.read_text())
    assert [r["f"] for r in again["results"]] == [4, 8, 16]
    assert [r["progress"] for r in again["results"][:2]] == [r["progress"] for r in data["results"]]
    with pytest.raises(SystemExit, match="other settings"):
        load("compression").main(args + ["--factors", "4", "--resume", "--unet-channels", "16"])
    assert data["fd_name"] == "FD-shapes"
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_compression_budget_lands_on_its_cpu_time_marks():
    """Equal compute: training is chunked until the stage has used its CPU seconds, and scored
    at each mark — here a fake stage that burns a known CPU time per step."""
    import time
    from types import SimpleNamespace

    comp = load("compression")
    tc, done, per_step = SimpleNamespace(steps=0), [0], 0.004

    def chunk():
        end = time.process_time() + (tc.steps - done[0]) * per_step
        while time.process_time() < end:
            pass
        done[0] = tc.steps

    marks = comp.progress_targets(0.4, 3)
    assert marks == pytest.approx([0.1, 0.2, 0.4])
    points = list(comp.train_for(chunk, tc, 0.4, marks, first_chunk=5))
    assert len(points) == 3 and [s for _, s in points] == sorted(s for _, s in points)
    for (cpu_s, steps), mark in zip(points, marks):
        assert abs(cpu_s - mark) < 4 * per_step + 0.02 and abs(steps - mark / per_step) <= 8


@pytest.mark.slow
def test_fid_vs_throughput_smoke(tmp_path, work):
    out = tmp_path / "f.json"
    rc = load("fid_vs_throughput").main(["--smoke", "--backends", "eager:fp32,eager:bf16,triton:fp16",
                                         "--out", str(out), "--work-dir", str(work)])
    data = json.loads(out.read_text())
    assert rc == (1 if data["flags"] else 0)
    assert "trained a micro model" in data["model"]["trained_micro_run"]
    points = {(r["sampler"], r["steps"], r["backend"]) for r in data["results"]}
    assert points == {(s, 2, b) for s in ("ddim", "dpmpp_2m") for b in ("eager:fp32", "eager:bf16")}
    bf16 = next(r for r in data["results"] if r["backend"] == "eager:bf16")
    assert "fd_shapes_agrees" in bf16 and "fd_shapes_diff_vs_eager" in bf16
    assert any(r["pareto"] for r in data["results"])
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_agreement_flags_a_backend_outside_the_noise():
    fvt = load("fid_vs_throughput")
    rows = [{"sampler": "ddim", "steps": 10, "backend": "eager:fp32", "fd_shapes": 10.0, "fd_shapes_noise": 0.5},
            {"sampler": "ddim", "steps": 10, "backend": "a", "fd_shapes": 10.8, "fd_shapes_noise": 0.5},
            {"sampler": "ddim", "steps": 10, "backend": "b", "fd_shapes": 12.0, "fd_shapes_noise": 0.5}]
    flags = fvt.agreement(rows)
    assert [f["backend"] for f in flags] == ["b"]          # 2.0 > 2·√0.5 ≈ 1.41 > 0.8
    assert rows[1]["fd_shapes_agrees"] and not rows[2]["fd_shapes_agrees"]


def test_report_renders_results_and_ignores_smoke_runs(throughput_run, tmp_path):
    _, out = throughput_run
    data = json.loads(out.read_text())
    (tmp_path / "smoke.json").write_text(json.dumps(data))               # smoke: never reported
    data["smoke"] = False
    (tmp_path / "throughput-x.json").write_text(json.dumps(data))
    load("report")  # the CLI; the rendering is benchlib.results'
    report = importlib.import_module("benchlib.results")
    section = report.render(tmp_path, tmp_path)
    assert section.startswith(report.START) and section.rstrip().endswith(report.END)
    assert section.count("| tiny | eager:fp32 |") == 1 and data["machine"]["name"] in section
    readme = "# Title\n\ntext\n"
    once = report.splice(readme, section)
    assert report.splice(once, section) == once                          # idempotent
    assert once.startswith("# Title")


def test_microbenchmarks_run_and_are_not_collected_by_default():
    repo = BENCH.parent
    run = subprocess.run([sys.executable, "-m", "pytest", "bench/test_microbench.py", "--benchmark-disable",
                          "-p", "no:cacheprovider", "-o", "addopts=", "-q"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert re.search(r"\d+ passed", run.stdout)
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                               cwd=repo, capture_output=True, text=True, timeout=300)
    assert "test_microbench" not in collected.stdout


def test_gpu_check_lists_a_function_for_every_step():
    script = (BENCH / "gpu_check.sh").read_text()
    steps = re.search(r"^STEPS=\(([^)]*)\)", script, re.M).group(1).split()
    assert {"throughput-tiny", "throughput-sd", "train-throughput"} <= set(steps)
    for step in steps:
        assert re.search(rf"^step_{step.replace('-', '_')}\(\) \{{", script, re.M), step
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")]).returncode == 0


def _tiny_sr_run(tmp_path):
    """A one-step SR run on 16² images: enough for the SR bench scripts to load and sample."""
    from ldm_fast.autoencoder import build_first_stage
    from ldm_fast.config import save_yaml
    from ldm_fast.data.procedural import ProceduralShapes
    from ldm_fast.run import RunDir
    from ldm_fast.tasks import build_conditioner, task_dataset, tiny_task_config
    from ldm_fast.training import train_ldm

    cfg = tiny_task_config("sr")
    cfg.data.resolution = cfg.autoencoder.resolution = 16
    cfg.data.num_samples, cfg.data.heldout_samples = 20, 3
    cfg.autoencoder.base_channels, cfg.unet.model_channels, cfg.unet.num_head_channels = 16, 32, 16
    tc = cfg.train_ldm
    tc.steps, tc.batch_size, tc.ckpt_every, tc.log_every, tc.warmup_steps = 1, 2, 1, 1, 0
    run = RunDir(tmp_path / "sr")
    first_stage = build_first_stage(cfg.autoencoder).eval()
    save_yaml(cfg, run.path / "config.yaml")
    run.save_first_stage(first_stage, cfg)
    train_ldm(cfg, run, first_stage, task_dataset(cfg, ProceduralShapes(4, 16)), progress=False,
              conditioner=build_conditioner(cfg, first_stage, None, run_dir=run.path))
    return run


def test_sr_figure_scores_every_row_and_draws_them(tmp_path):
    from PIL import Image

    from ldm_fast.config import save_yaml
    from ldm_fast.tasks import tiny_task_config

    run = _tiny_sr_run(tmp_path)
    out = tmp_path / "fig.png"
    assert load("sr_figure").main([str(run.path), str(out), "--n", "3"]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["n"] == 3 and list(result["rows"]) == [
        "low-resolution input", "bicubic", "LDM super-resolution", "first-stage reconstruction of the target",
        "target"]
    assert result["rows"]["target"]["psnr"] == 100.0  # scored against itself
    assert all(set(s) == {"psnr", "ssim", "grid_ratio"} for s in result["rows"].values())
    with Image.open(out) as im:  # 5 rows × 3 images of 16², framed, enlarged ×4
        assert im.size == (4 * (3 * 18 + 2), 4 * (5 * 18 + 2))
    (tmp_path / "cls").mkdir()
    save_yaml(tiny_task_config("class"), tmp_path / "cls" / "config.yaml")
    assert load("sr_figure").main([str(tmp_path / "cls"), str(out)]) == 2


def test_sr_latent_error_decodes_each_part_of_the_error(tmp_path):
    from ldm_fast.config import save_yaml
    from ldm_fast.tasks import tiny_task_config

    run = _tiny_sr_run(tmp_path)
    out = tmp_path / "err.json"
    assert load("sr_latent_error").main([str(run.path), "--n", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 3 and list(result["decoded"]) == [
        "SR latents", "first stage's own latents", "own + smooth part of the error", "own + cell-to-cell part",
        "own + another image's error", "own + random noise of the error's rms"]
    assert result["error_rms"] > 0 and result["posterior_std_over_latent_std"] > 0
    assert all(0 <= r <= 1 for r in result["r2_error_on_lr_pixel"] + result["r2_latent_on_lr_pixel"])
    (tmp_path / "cls").mkdir()
    save_yaml(tiny_task_config("class"), tmp_path / "cls" / "config.yaml")
    assert load("sr_latent_error").main([str(tmp_path / "cls")]) == 2
