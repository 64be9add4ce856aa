"""`python -m ldm_fast.deploy --engine-dir DIR --backend onnxruntime --class 3 --n 4 --outdir out/`:
sample from an export folder (written by `python -m ldm_fast.export`).

The whole loop runs from the exported files: conditioning encoder (class ids / prompt tokens /
layout tokens → context), UNet steps with classifier-free guidance (--guidance G ≠ 1 doubles
the batch with the null condition), the sampler update (ldm_fast.samplers; the fused Triton
step kernel on CUDA), the decoder, and the PNGs. Backends: onnxruntime (the .onnx graphs,
CPU), tensorrt (DIR/engines, checked against their sidecars first), torch (the original run
directory recorded in DIR/manifest.json, or --run-dir). The flags, defaults and seeds are
`python -m ldm_fast.sample`'s (one Pipeline behind both): the same seed gives the same images
across backends, up to the graphs' arithmetic, and `--backend torch` gives sample's PNG.
"""

from __future__ import annotations

import argparse
import sys
import time

from ldm_fast import cli


def parse_args(argv=None):
    from ldm_fast.export.runtime import BACKENDS

    p = argparse.ArgumentParser(prog="python -m ldm_fast.deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True, help="export folder (manifest.json, *.onnx, engines/)")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--run-dir", help="torch backend: the run directory, if not where the manifest says")
    p.add_argument("--no-cuda-graphs", action="store_true", help="tensorrt: plain enqueue, no graph replay")
    cli.add_sampling_args(p)
    p.set_defaults(device=None)  # each backend's own default device (onnxruntime: cpu)
    return p.parse_args(argv)


def _main(argv=None) -> int:
    from ldm_fast.pipeline import Pipeline

    args = parse_args(argv)
    kwargs = cli.sampling_kwargs(args)
    inputs = cli.pipeline_inputs(args)
    if kwargs["n"] is None and not inputs:
        kwargs["n"] = 16
    pipe = Pipeline.from_export_dir(args.engine_dir, args.backend, device=args.device, run_dir=args.run_dir,
                                    cuda_graphs=not args.no_cuda_graphs, kernels=args.kernels)
    pipe.cuda_graph = args.cuda_graph   # the torch backend's denoising step (see --cuda-graph)
    t0 = time.perf_counter()
    result = pipe(**inputs, **kwargs)
    seconds = time.perf_counter() - t0
    written = cli.write_outputs(result, args)
    print(f"{args.backend}: " + cli.describe(result, written, seconds))
    return 0


def main(argv=None) -> int:
    return cli.guarded(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
