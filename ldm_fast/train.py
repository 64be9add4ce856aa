"""`python -m ldm_fast.train`: train the autoencoder, then the latent diffusion model.

With no arguments: the `tiny` preset on the embedded procedural data, on CPU, ending with a
PNG sample grid. See `--help` for the flags; any config field can be overridden with
`--set section.field=value` (e.g. `--set unet.model_channels=96`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from ldm_fast import cli, distributed, ops
from ldm_fast.checkpoint import list_checkpoints
from ldm_fast.config import ConfigError, apply_override, get_preset, load_yaml, validate
from ldm_fast.data.build import build_datasets
from ldm_fast.run import RunDir, load_config, load_first_stage
from ldm_fast.tasks import (TASK_PRESETS, TASKS, build_conditioner, dataset_captions, preset_for, task_dataset,
                            task_fields, task_of)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ldm_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="named preset (default: tiny, or tiny-<task> with --task)")
    p.add_argument("--task", choices=TASKS, help="the paper's task to train (default: the preset's)")
    p.add_argument("--config", help="YAML config file (instead of --preset)")
    p.add_argument("--stage", choices=("autoencoder", "ldm", "all"), default="all")
    p.add_argument("--data", help="image folder to train on (default: the procedural data)")
    p.add_argument("--out", help="run directory (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--steps", type=int, help="training steps of each stage trained")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--seed", type=int)
    p.add_argument("--kernels", choices=ops.BACKENDS, help="eager | triton | auto (default: config / $LDM_KERNELS)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (or, in a log file, progress lines); metrics still go to metrics.jsonl")
    return p.parse_args(argv)


def build_config(args):
    if args.resume and args.out and (Path(args.out) / "config.yaml").is_file() and not args.config:
        cfg = load_config(args.out)  # a resumed run keeps its own config
    else:
        cfg = load_yaml(args.config) if args.config else _preset(args.preset, args.task)
        if args.task and cfg.conditioning.task != args.task:
            raise ConfigError(f"conditioning.task: the config trains {cfg.conditioning.task!r}, "
                              f"not --task {args.task!r}")
    for assignment in args.set:
        cfg = apply_override(cfg, assignment)
    for stage in ("train_autoencoder", "train_ldm"):
        tc = getattr(cfg, stage)
        if args.steps is not None:
            tc.steps = args.steps
        if args.batch_size is not None:
            tc.batch_size = args.batch_size
    if args.data:
        cfg.data.dataset, cfg.data.root = "folder", args.data
    if args.precision:
        cfg.precision = args.precision
    if args.seed is not None:
        cfg.seed = args.seed
    if args.kernels:
        cfg.kernels = args.kernels
    return validate(cfg)


def _preset(name: str, task: str | None):
    if task:
        name = preset_for(task, name)
    if name in TASK_PRESETS:
        return validate(TASK_PRESETS[name]())
    return get_preset(name)


def main(argv=None) -> int:
    return cli.guarded(_main, argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = build_config(args)
    run = RunDir(args.out or Path("runs") / cfg.name)
    stages = ("autoencoder", "ldm") if args.stage == "all" else (args.stage,)
    if not args.resume and any(list_checkpoints(run.stage_dir(s)) for s in stages):
        print(f"error: {run.path} already holds checkpoints; pass --resume to continue it or --out for a new run",
              file=sys.stderr)
        return 2
    ops.set_backend(None if cfg.kernels == "auto" else cfg.kernels)
    ctx = distributed.init_from_env(args.device)
    device = distributed.device_for(args.device, ctx)
    try:
        return _train(cfg, run, stages, args, device, ctx)
    finally:
        distributed.cleanup()


def _train(cfg, run, stages, args, device, ctx) -> int:
    from ldm_fast.training import Preempted, TrainingDiverged, save_config, train_autoencoder, train_ldm

    if ctx.is_main:
        save_config(cfg, run)
        print(f"run directory: {run.path.resolve()}" + (f" ({ctx.world_size} ranks)" if ctx.enabled else ""))
    summary: list[str] = []
    train_set, heldout = build_datasets(cfg.data, task_fields(cfg), run_dir=run.path, store_split=ctx.is_main,
                                        summary=summary)
    if ctx.is_main and summary:
        print("\n".join(summary))
    progress = not args.no_progress
    try:
        if "autoencoder" in stages:
            first_stage = train_autoencoder(cfg, run, train_set, heldout, device, args.resume, progress)
            if ctx.is_main:
                print(f"autoencoder: {run.path / 'autoencoder.safetensors'}, "
                      f"reconstructions: {run.path / 'reconstructions.png'}")
        else:
            first_stage = load_first_stage(run.path, device, cfg)
        if "ldm" in stages:
            ldm_set = task_dataset(cfg, train_set)
            conditioner = None
            if task_of(cfg).conditional:
                conditioner = build_conditioner(cfg, first_stage, dataset_captions(ldm_set),
                                                run_dir=run.path, device=device)
                if ctx.is_main:
                    save_config(cfg, run)  # the text context may have grown to fit the captions
            if cfg.train_ldm.cached_latents:
                ldm_set = _cached(cfg, first_stage, ldm_set, device, progress and ctx.is_main)
            train_ldm(cfg, run, first_stage, ldm_set, device, args.resume, progress, conditioner)
    except (TrainingDiverged, Preempted) as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 3
    if "ldm" in stages and ctx.is_main:
        path = final_grid(run.path, device, cfg.seed, progress)
        print(f"samples: {path}")
    return 0


def final_grid(run_dir: Path, device, seed: int, progress: bool, n: int = 16) -> Path:
    """The sample grid of a finished run: the EMA weights, loaded the way sampling sees them
    (Pipeline.from_run_dir), conditioned on held-out inputs for conditional tasks."""
    from ldm_fast.images import save_grid
    from ldm_fast.pipeline import Pipeline
    from ldm_fast.tasks import heldout_inputs

    pipe = Pipeline.from_run_dir(run_dir, device=device)
    inputs = heldout_inputs(pipe.cfg, pipe.inputs, n, run_dir=run_dir) if pipe.inputs else {}
    out = pipe(**inputs, n=n, seed=seed, progress=progress)
    return save_grid(out.images, Path(run_dir) / "samples.png", upscale=4 if out.images.shape[-1] <= 64 else 1)


def _cached(cfg, first_stage, dataset, device, progress):
    """Encode the training set once with the frozen first stage (reused while the first stage's
    weights and the dataset size, or shard list, are unchanged) and train on the stored latents.
    Every rank encodes its share (build_latent_cache splits the work and synchronises)."""
    from ldm_fast.data.latent_cache import LatentCacheDataset, build_latent_cache
    from ldm_fast.data.stream import ShardStream

    if isinstance(dataset, ShardStream):
        if dataset.transforms:
            # The task's pairs (SR degradations, inpainting masks) are drawn per sample while
            # streaming; one_pass yields the samples without them, so a cache would lack them.
            raise ValueError(f"train_ldm.cached_latents: the {cfg.conditioning.task!r} task draws its "
                             "inputs per streamed sample, which a latent cache of data.dataset=shards "
                             "does not store; unset train_ldm.cached_latents or train from an image folder")
        dataset = dataset.one_pass()  # the stream is endless: encode each listed shard once, in order
    build_latent_cache(first_stage, dataset, cfg.train_ldm.cached_latents, device=device, progress=progress)
    # Unscaled latents: train_ldm applies (and on the first batch measures) the scale factor.
    return LatentCacheDataset(cfg.train_ldm.cached_latents, scale_factor=1.0, seed=cfg.seed)


if __name__ == "__main__":
    sys.exit(main())
