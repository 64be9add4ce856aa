"""`python -m ldm_fast.sample --ckpt RUN_DIR`: draw images from a trained run.

Same flags, same seed → same image (image i starts from the noise of seed + i, drawn on the
CPU, so CPU and CUDA agree). Conditional runs take their task's inputs:

  class      --class 3 7 12            (ids; --guidance for classifier-free guidance)
  text       --prompt "a large red circle on a plain background"  (repeatable; --negative-prompt)
  layout     --boxes "0.1,0.1,0.5,0.5,3;0.6,0.6,0.9,0.9,8"        (x0,y0,x1,y1,class per box)
  semantic   --semantic map.png        (an 8-bit image of class ids, or .npy)
  sr         --lr low_res.png
  inpaint    --image photo.png --mask mask.png   (mask: white = fill)
Fewer inputs than --n are cycled. Without inputs, the run's held-out data gives them (its
procedural images, or the held-out split of its image folder: the grid `train` writes). `--outdir DIR` writes one PNG per image, each carrying its prompt, seed,
sampler, steps, guidance and model in PNG text chunks, and DIR/grid.png; `--out` the grid
alone. `--height` and `--width` sample larger than the training size (convolutional
sampling); `--tile` decodes in tiles so memory stays bounded.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from ldm_fast import cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ldm_fast.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run directory written by ldm_fast.train")
    p.add_argument("--task", help="check that the run was trained for this task")
    cli.add_sampling_args(p)
    return p.parse_args(argv)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _main(argv=None) -> int:
    from ldm_fast.pipeline import Pipeline
    from ldm_fast.tasks import heldout_inputs

    args = parse_args(argv)
    kwargs = cli.sampling_kwargs(args)
    pipe = Pipeline.from_run_dir(args.ckpt, device=args.device, kernels=args.kernels,
                                 cuda_graph=args.cuda_graph)
    if args.task and args.task != pipe.cfg.conditioning.task:
        raise ValueError(f"--task {args.task}: this run was trained for {pipe.cfg.conditioning.task!r}")
    inputs = cli.pipeline_inputs(args)
    if kwargs["n"] is None and not any(k in inputs for k in pipe.inputs):
        kwargs["n"] = 16
    if pipe.inputs and not any(k in inputs for k in pipe.inputs):
        inputs.update(heldout_inputs(pipe.cfg, pipe.inputs, kwargs["n"], run_dir=args.ckpt))
    t0 = time.perf_counter()
    result = pipe(**inputs, **kwargs)
    written = cli.write_outputs(result, args)
    print(cli.describe(result, written, time.perf_counter() - t0)
          + f" (peak memory {peak_memory_mb(args.device):.0f} MiB)")
    return 0


def main(argv=None) -> int:
    return cli.guarded(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
