"""`python -m ldm_fast.export --ckpt RUN_DIR --out DIR`: ONNX graphs (+ validation, + TensorRT engines).

Writes DIR/unet.onnx, decoder.onnx, encoder.onnx and, for class / text / layout conditioning,
cond_encoder.onnx (plus tokenizer.json for text), validates each against PyTorch with
onnxruntime on the CPU (two batch sizes × two latent sizes; tolerances in export/validate.py),
and records everything in DIR/manifest.json — the file `python -m ldm_fast.deploy --engine-dir
DIR` reads. With --tensorrt (and TensorRT installed, on a GPU) it also builds DIR/engines/*.plan
with one optimization profile from --min/--opt/--max-shape (batch,latent_h,latent_w; the UNet's
batch counts the doubled classifier-free-guidance batch, so serving n images with guidance
needs max batch ≥ 2n) and a shared timing cache.

Exit status: 0 done, 1 a graph failed validation (the files stay for inspection), 2 bad
arguments or inputs, 3 --tensorrt asked for but TensorRT is not usable here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

import ldm_fast
from ldm_fast.config import to_dict
from ldm_fast.export import onnx_export as E


def _triple(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected batch,height,width (positive ints), got {text!r}")
    return tuple(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ldm_fast.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run directory written by ldm_fast.train")
    p.add_argument("--out", required=True, help="export folder to write")
    p.add_argument("--precision", choices=sorted(E.PRECISIONS), default="fp32",
                   help="graph precision (bf16 is exported but cannot be validated on onnxruntime CPU)")
    p.add_argument("--opset", type=int, default=E.DEFAULT_OPSET,
                   help=f"ONNX opset (default {E.DEFAULT_OPSET}: native GroupNormalization; 18 for TensorRT < 10.9)")
    p.add_argument("--graphs", default=",".join(E.GRAPHS), help="comma-separated subset of " + ",".join(E.GRAPHS))
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime parity check")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (needs TensorRT + a GPU)")
    p.add_argument("--min-shape", type=_triple, help="batch,latent_h,latent_w (default 1,side/2,side/2)")
    p.add_argument("--opt-shape", type=_triple, help="default 2,side,side")
    p.add_argument("--max-shape", type=_triple, help="default 8,2*side,2*side")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT workspace limit")
    p.add_argument("--timing-cache", help="TensorRT timing cache file (default OUT/engines/timing.cache)")
    return p.parse_args(argv)


def context_encoder(conditioner):
    """The τθ module that maps ids/tokens to the cross-attention context, if there is one."""
    if conditioner is None:
        return None
    for part in getattr(conditioner, "parts", []):
        if getattr(part, "name", None) in ("class", "text", "layout"):
            module = getattr(part, "embedder", None) or getattr(part, "encoder", None)
            if module is not None:
                return module
    return None


def conditioning_record(cfg, cond_module) -> dict:
    cc = cfg.conditioning
    rec = {"task": cc.task, "mode": cc.mode, "num_classes": cc.num_classes, "max_length": cc.max_length,
           "embed_dim": cc.embed_dim, "sr_factor": cc.sr_factor, "factor": cfg.autoencoder.factor,
           "tokenizer": None, "exported_encoder": type(cond_module).__name__ if cond_module is not None else None,
           "null_class": cc.null_class}
    if cond_module is not None and hasattr(cond_module, "grid"):
        rec["grid"] = cond_module.grid
    return rec


def context_tokens(cfg) -> int:
    from ldm_fast.tasks import task_of

    return task_of(cfg).context_tokens(cfg)


def _shapes(args, cfg):
    side = E.latent_size(cfg)
    m = E.spatial_multiple(cfg)

    def snap(v):  # profiles must hold only sizes the UNet accepts
        return max(m, v // m * m)
    lo = args.min_shape or (1, snap(side // 2), snap(side // 2))
    opt = args.opt_shape or (2, snap(side), snap(side))
    hi = args.max_shape or (8, snap(2 * side), snap(2 * side))
    return lo, opt, hi


def build_engines(args, model, out: Path, graphs: dict) -> dict:
    from ldm_fast.export import tensorrt_build as T

    lo, opt, hi = _shapes(args, model.cfg)
    for i, name in enumerate(("batch", "height", "width")):
        T.check_ranges(name, (lo[i], opt[i], hi[i]))
    tokens = context_tokens(model.cfg)
    cache = Path(args.timing_cache) if args.timing_cache else out / "engines" / "timing.cache"
    info = {"scale_factor": float(model.scale_factor), "latent_channels": model.cfg.unet.out_channels,
            "factor": model.cfg.autoencoder.factor, "spatial_multiple": E.spatial_multiple(model.cfg),
            "schedule": E.schedule_record(model)}
    engines = {}
    for name, rec in graphs.items():
        spec = E.GraphSpec.from_json(rec["spec"])
        profile = T.profile_shapes(spec, (lo[0], opt[0], hi[0]), (lo[1], opt[1], hi[1]),
                                   (lo[2], opt[2], hi[2]), max(1, model.cfg.autoencoder.factor),
                                   (tokens, tokens, tokens))
        engine = out / "engines" / f"{name}.plan"
        print(f"building TensorRT engine {engine} …", flush=True)
        T.build_engine(out / rec["file"], engine, spec, profile, int(args.workspace_gb * 2**30), cache,
                       model_info=info)
        engines[name] = str(engine.relative_to(out))
    return engines


def main(argv=None) -> int:
    from ldm_fast.cli import guarded

    return guarded(_main, argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    from ldm_fast.run import load_model

    graphs_wanted = [g.strip() for g in args.graphs.split(",") if g.strip()]
    bad = [g for g in graphs_wanted if g not in E.GRAPHS]
    if bad:
        print(f"error: unknown graphs {bad} (known: {', '.join(E.GRAPHS)})", file=sys.stderr)
        return 2
    try:
        model, state = load_model(args.ckpt, "cpu")
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = model.cfg
    conditioner = None
    from ldm_fast.tasks import load_conditioner, task_of

    if task_of(cfg).conditional:
        conditioner = load_conditioner(args.ckpt, model, state, "cpu")
    cond_module = context_encoder(conditioner)
    if cond_module is not None:
        try:
            E.cond_encoder_graph(cond_module, cfg)
        except E.ExportError as exc:
            print(f"note: {exc}; the cond_encoder graph is skipped", file=sys.stderr)
            cond_module = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = [g for g in graphs_wanted if g in E.available_graphs(model, cond_module)]
    if "unet" not in wanted or "decoder" not in wanted:
        print("note: without both unet and decoder graphs the folder cannot be deployed", file=sys.stderr)
    graphs = E.export_all(model, cond_module, out, args.precision, args.opset, graphs=wanted)
    for name, rec in graphs.items():
        print(f"wrote {out / rec['file']}" + (f" (+ {rec['external_data']})" if rec["external_data"] else ""))

    cond_rec = conditioning_record(cfg, cond_module)
    tok = Path(args.ckpt) / "tokenizer.json"
    if cond_module is not None and type(cond_module).__name__ == "TextTransformer" and tok.is_file():
        shutil.copyfile(tok, out / "tokenizer.json")
        cond_rec["tokenizer"] = "tokenizer.json"
    manifest = {
        "format": "ldm_fast-export/1",
        "ldm_fast_version": ldm_fast.__version__,
        "torch_version": torch.__version__,
        "run_dir": str(Path(args.ckpt).resolve()),
        "precision": args.precision,
        "opset": args.opset,
        "config": to_dict(cfg),
        "scale_factor": float(model.scale_factor),
        "schedule": E.schedule_record(model),
        "conditioning": cond_rec,
        "graphs": graphs,
        "validation": None,
        "engines": None,
    }
    manifest_path = out / "manifest.json"

    def write():
        manifest_path.write_text(json.dumps(manifest, indent=1))

    write()
    status = 0
    if not args.no_validate:
        from ldm_fast.export.validate import ValidationError, validate_export
        try:
            manifest["validation"] = validate_export(model, cond_module, out, graphs, args.precision)
        except ValidationError as exc:
            manifest["validation"] = {"failed": str(exc)}
            print(f"VALIDATION FAILED: {exc}", file=sys.stderr)
            status = 1
        write()
        for name, checks in (manifest["validation"] or {}).items():
            if isinstance(checks, list):
                worst = max(checks, key=lambda c: c["max_error"] / max(c["allowed"], 1e-30))
                print(f"validated {name}: {len(checks)} cases, worst max error {worst['max_error']:.3g} "
                      f"(allowed {worst['allowed']:.3g})")
            elif isinstance(checks, dict) and "not_validated" in checks:
                print(f"NOT validated {name}: {checks['not_validated']}")
    if args.tensorrt and status == 0:
        from ldm_fast.export.tensorrt_build import TensorRTNotInstalled
        try:
            manifest["engines"] = build_engines(args, model, out, graphs)
        except (TensorRTNotInstalled, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            write()
            return 3
        write()
    print(f"manifest: {manifest_path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
