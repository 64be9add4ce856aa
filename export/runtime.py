"""The exported graphs as the parts of a ldm_fast.pipeline.Pipeline: ONNX Runtime, TensorRT.

    pipe = Pipeline.from_export_dir(EXPORT_DIR, backend="onnxruntime")   # or "tensorrt", "torch"
    images = pipe(class_labels=[1, 2, 3, 4], steps=25, seed=0, guidance=3.0).images

What differs between backends is only who evaluates the graphs:
  - `Denoiser`     __call__(x, t, cond) → prediction: the samplers' model interface, so
                   ldm_fast.samplers drives every backend's loop (and their updates go through
                   ops, i.e. the fused Triton step kernel when x is a CUDA tensor).
  - `Decoder`      scaled latents → images in [-1, 1] (the exported graph folds 1/scale_factor).
  - conditioner    encode_inputs(classes=…, prompts=…, boxes=…, lr=…, n=…) → (cond, uncond),
                   as tasks.Conditioner: the torch backend uses that object itself; the graph
                   backends use `ExportedConditioner` (host-side tokenisation and id checks,
                   τθ from the cond_encoder graph).
The sampling loop is the Pipeline's, the same for every backend (its seeds come from CPU
generators), so the images agree across backends up to the graphs' arithmetic.

The export folder (written by `python -m ldm_fast.export`) holds manifest.json — config,
schedule, latent scale, the graphs and their specs, the run directory the torch backend loads,
the conditioning facts — the .onnx graphs, tokenizer.json for text models, and engines/ with
the TensorRT engines and their sidecars.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldm_fast.config import from_dict, validate
from ldm_fast.diffusion import Schedule
from ldm_fast.export.onnx_export import GraphSpec

BACKENDS = ("torch", "onnxruntime", "tensorrt")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ldm_fast-export/1"

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def read_manifest(export_dir) -> dict:
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not an export folder (write one with python -m ldm_fast.export)")
    data = json.loads(path.read_text())
    if data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: unknown manifest format {data.get('format')!r}")
    return data


def schedule_from_record(record: dict) -> Schedule:
    """The exported schedule: ᾱ as stored (float64), β recovered from it."""
    ac = torch.tensor(record["alphas_cumprod"], dtype=torch.float64)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    return Schedule(betas=1 - ac / prev, alphas_cumprod=ac, parameterization=record["parameterization"])


# ----------------------------------------------------------------------------- graph runners

class OrtGraph:
    """An onnxruntime session fed from torch tensors: inputs are cast to the graph's declared
    dtypes, the output comes back as a float32 tensor on the first input's device."""

    def __init__(self, path, spec: GraphSpec, providers=None, threads: int | None = None):
        from ldm_fast.export.validate import session

        self.spec = spec
        self.session = session(path, threads, providers)
        self.input_dtypes = {t.name: _NP_DTYPES[t.dtype] for t in spec.inputs}

    def run(self, **inputs) -> torch.Tensor:
        missing = set(self.input_dtypes) - set(inputs)
        if missing:
            raise ValueError(f"{self.spec.name}: missing inputs {sorted(missing)}")
        device = next(iter(inputs.values())).device
        feed = {k: inputs[k].detach().cpu().numpy().astype(dt, copy=False) for k, dt in self.input_dtypes.items()}
        out = self.session.run([self.spec.outputs[0].name], feed)[0]
        return torch.from_numpy(out.astype(np.float32, copy=False)).to(device)


class TorchCastGraph:
    """Adapter: a graph runner's float output back in the caller's dtype (TensorRT runs fp16
    engines on fp16 buffers; the sampler keeps its latents in fp32)."""

    def __init__(self, runner):
        self.runner, self.spec = runner, runner.spec

    def run(self, **inputs) -> torch.Tensor:
        return self.runner.run(**inputs).float()


# ----------------------------------------------------------------------------- roles

class Denoiser:
    """The samplers' model interface over a UNet graph: model(x, t, cond) → prediction."""

    def __init__(self, graph):
        self.graph = graph
        self.spec = graph.spec
        self.names = {t.name for t in graph.spec.inputs}
        self.multiple = int(graph.spec.info.get("spatial_multiple", 1))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        cond = cond or {}
        extra = set(cond) - self.names
        if extra:
            raise ValueError(f"unet graph has no inputs {sorted(extra)} (it takes {sorted(self.names)})")
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"latent size {h}x{w}: must be a multiple of {self.multiple} for this UNet")
        feed = {"latent": x, "timestep": t.float(), **cond}
        return self.graph.run(**feed).to(x.dtype)


class Decoder:
    """Scaled latents → images through a decoder graph."""

    def __init__(self, graph):
        self.graph = graph

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.graph.run(latent=z)


class ExportedConditioner:
    """tasks.Conditioner.encode_inputs for the graph backends: ids and tokens prepared on the
    host, the context computed by the cond_encoder graph. Supports unconditional, class
    (cross-attention and adm), text (trained τθ with its tokenizer.json), layout, and the
    super-resolution concat input; semantic maps and inpainting need weights that are not
    exported as graphs, so they run with the torch backend only."""

    def __init__(self, record: dict, graph, export_dir, device):
        self.record, self.graph, self.device = record, graph, torch.device(device)
        from ldm_fast.tasks import check_task

        self.task, self.mode = record["task"], record.get("mode", "")
        task = check_task(self.task, self.mode)
        if not task.exportable:
            raise NotImplementedError(f"task {self.task!r}: its concat conditioner is not exported; "
                                      "use --backend torch")
        parts = [task.export_part] if task.export_part else []
        if "prompt" in task.sampling_inputs(self.mode):
            parts.append("text")
        self.parts = parts
        # τθ runs as the cond_encoder graph for prompts, layouts and cross-attended class ids.
        needs_graph = any(p in ("text", "layout") for p in parts) or ("class" in parts and self.mode != "adm")
        if needs_graph and graph is None:
            raise FileNotFoundError(f"task {self.task!r} ({self.mode}): the export has no cond_encoder graph "
                                    "(pretrained Hugging Face / CLIP text encoders are not exported; use "
                                    "--backend torch)")
        self.inputs = tuple({"class": "classes", "layout": "boxes", "sr": "lr", "text": "prompts"}[p]
                            for p in parts)
        # A class table without a null row (cin256 v1) has no unconditional input to guide from.
        self.supports_guidance = any(p != "sr" for p in parts) and record.get("null_class", True)
        self._tokenizer = self._layout = None
        if "text" in parts:
            from ldm_fast.conditioning import load_tokenizer
            self._tokenizer = load_tokenizer(Path(export_dir) / record["tokenizer"])
        if "layout" in parts:
            from ldm_fast.conditioning import LayoutEncoder
            # Used for its box → token rules and checks only: a zero-layer, width-1 encoder
            # whose weights are never run (τθ itself is the graph).
            self._layout = LayoutEncoder(record["num_classes"], record["max_length"], 1, 0, 1,
                                         grid=record.get("grid", 32))

    def _context(self, **inputs):
        return {"context": self.graph.run(**{k: v.to(self.device) for k, v in inputs.items()})}

    def _part(self, part: str, given: dict) -> tuple[dict, callable]:
        """(cond entries, null(batch) → uncond entries) of one part."""
        from ldm_fast import conditioning as C

        r = self.record
        if part == "class":
            ids = C.check_class_ids(given["classes"], r["num_classes"], allow_null=False)
            if self.mode == "adm":
                out = {"class_labels": ids.to(self.device)}
                return out, lambda b: {"class_labels": torch.full((b,), r["num_classes"], device=self.device)}
            return self._context(class_labels=ids), \
                lambda b: self._context(class_labels=torch.full((b,), r["num_classes"]))
        if part == "text":
            prompts = given["prompts"]
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            ids = self._tokenizer.encode(prompts, r["max_length"])
            negative = given.get("negative_prompts")
            return self._context(tokens=ids), \
                lambda b: self._context(tokens=self._tokenizer.encode(
                    list(negative) if negative is not None else [""] * b, r["max_length"]))
        if part == "layout":
            tokens = self._layout.tokenize_lists(given["boxes"])
            return self._context(tokens=tokens), lambda b: self._context(tokens=self._layout.null_tokens(b))
        if part == "sr":
            concat = C.sr_concat(given["lr"], r["sr_factor"], r["factor"]).to(self.device)
            return {"concat": concat}, None
        raise AssertionError(part)

    def encode_inputs(self, *, classes=None, prompts=None, boxes=None, lr=None, negative_prompts=None,
                      n: int | None = None, **unsupported) -> tuple[dict, dict | None]:
        from ldm_fast.tasks import check_inputs, check_negative, repeat_to_batch

        given = {"classes": classes, "prompts": prompts, "boxes": boxes, "lr": lr}
        check_inputs(self.task, self.mode, self.inputs, {**given, **unsupported})
        check_negative(self.task, self.inputs, negative_prompts)
        given["negative_prompts"] = negative_prompts
        if not self.parts:
            return {}, None
        with torch.no_grad():
            encoded = [self._part(p, given) for p in self.parts]
        outs, target = repeat_to_batch([out for out, _ in encoded], n)
        cond, uncond = {}, ({} if self.supports_guidance else None)
        for out, (_, null) in zip(outs, encoded):
            cond.update(out)
            if uncond is not None:
                uncond.update(null(target) if null is not None else out)
        return cond, uncond

    @staticmethod
    def latent_size(cond: dict | None):
        return tuple(cond["concat"].shape[-2:]) if cond and "concat" in cond else None


# ----------------------------------------------------------------------------- opening an export

@dataclass
class ExportParts:
    """What ldm_fast.pipeline.Pipeline needs from an export folder on a graph backend."""
    cfg: object
    schedule: Schedule
    denoiser: Denoiser
    decoder: Decoder
    conditioner: ExportedConditioner | None
    device: torch.device
    manifest: dict


def recorded_run_dir(export_dir, run_dir=None) -> Path:
    """The run directory the torch backend loads: `run_dir`, else the manifest's."""
    manifest = read_manifest(export_dir)
    run = Path(run_dir or manifest.get("run_dir") or "")
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"torch backend: run directory {str(run)!r} (recorded in {MANIFEST}) not "
                                "found; pass run_dir= / --run-dir")
    return run


def _cond_graph(manifest, make):
    rec = manifest["graphs"].get("cond_encoder")
    return make("cond_encoder", rec) if rec else None


def ort_graph_maker(export_dir, providers=None, threads: int | None = None):
    """(name, graph record) → OrtGraph for the .onnx files of an export folder (records as in
    manifest.json's "graphs" or onnx_export.export_all's return)."""
    export_dir = Path(export_dir)

    def make(name, rec):
        return OrtGraph(export_dir / rec["file"], GraphSpec.from_json(rec["spec"]), providers, threads)
    return make


def trt_graph(engine_path, cuda_graphs: bool = True) -> TorchCastGraph:
    """A TensorRT engine (checked against its sidecar first) as a graph runner."""
    from ldm_fast.export.trt_runtime import TrtGraph

    return TorchCastGraph(TrtGraph(engine_path, cuda_graphs=cuda_graphs))


def graph_parts(make, graphs: dict) -> tuple[Denoiser, Decoder]:
    """The samplers' denoiser and the decoder over the "unet" and "decoder" graphs; the one
    factory the deployment (open_export) and the throughput benchmark both build backends with."""
    return Denoiser(make("unet", graphs["unet"])), Decoder(make("decoder", graphs["decoder"]))


def open_export(export_dir, backend: str = "onnxruntime", device=None, providers=None,
                threads: int | None = None, cuda_graphs: bool = True) -> ExportParts:
    """The graphs of an export folder on a graph backend. onnxruntime: the .onnx graphs (CPU
    provider unless `providers` says otherwise); tensorrt: the engines in engines/, each
    checked against its sidecar before it is deserialised. (The torch backend is the run
    directory itself: Pipeline.from_export_dir loads it with `recorded_run_dir`.)"""
    if backend not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"graph backend: expected onnxruntime or tensorrt, got {backend!r}")
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    cfg = validate(from_dict(manifest["config"]))
    schedule = schedule_from_record(manifest["schedule"])
    from ldm_fast.tasks import task_of

    cond_rec = manifest.get("conditioning")
    conditional = task_of(cfg).conditional

    if backend == "onnxruntime":
        device = torch.device(device or "cpu")
        make = ort_graph_maker(export_dir, providers, threads)
    else:
        device = torch.device(device or "cuda")
        engines = manifest.get("engines") or {}
        if "unet" not in engines or "decoder" not in engines:
            raise FileNotFoundError(f"{export_dir}: no TensorRT engines recorded in {MANIFEST}; build them "
                                    "with python -m ldm_fast.export --tensorrt")

        def make(name, rec):
            if name not in engines:
                raise FileNotFoundError(f"{export_dir}: no TensorRT engine for {name}")
            return trt_graph(export_dir / engines[name], cuda_graphs)

    graphs = manifest["graphs"]
    denoiser, decoder = graph_parts(make, graphs)
    conditioner = None
    if conditional:
        conditioner = ExportedConditioner(cond_rec, _cond_graph(manifest, make), export_dir, device)
    return ExportParts(cfg, schedule, denoiser, decoder, conditioner, device, manifest)
