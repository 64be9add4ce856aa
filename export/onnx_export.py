"""ONNX export of the deployable graphs: UNet, first-stage decoder and encoder, conditioning encoder.

Each graph is a small wrapper module around the *same* model objects training and sampling
use, exported with the dynamo-based `torch.onnx.export` (torch ≥ 2.9). What the wrappers fold
into the graph, so that a deployment needs nothing but the file and its metadata:

  unet.onnx          latent (B, c, h, w), timestep (B,) float32  [+ context (B, L, D)]
                     [+ class_labels (B,) int64] [+ concat (B, C_in − c, h, w)] → prediction
  decoder.onnx       latent (B, c, h, w), *scaled* as the sampler sees it → image (B, 3, H, W);
                     1/scale_factor and the VQ codebook lookup are inside the graph
  encoder.onnx       image (B, 3, H, W) → latent (B, c, h, w), scaled; the KL posterior's mean
                     (sampling would need an RNG inside the graph, and deployment wants the mean)
  cond_encoder.onnx  class_labels (B,) int64 or tokens (B, L) int64 → context (B, L, D); the
                     tokenizer (text) and the box tokenizer (layout) stay in Python

Inputs exist iff the config asks for them: context iff unet.context_dim > 0, class_labels iff
unet.num_classes > 0, concat iff unet.in_channels > unet.out_channels. Batch and spatial axes
are dynamic (named batch / height / width / tokens); the UNet needs h and w to be multiples of
2^(levels − 1) (`spatial_multiple`), like the PyTorch model.

Opset. The default is 21: the first opset whose GroupNormalization has per-channel scale and
bias (opset 18's per-group definition was deprecated), so GroupNorm is one native node that
onnxruntime (checked: 1.32 CPU) and TensorRT ≥ 10.9 (onnx-tensorrt added opset-21 GroupNorm
in 10.9) fuse. LayerNormalization (17) and Gelu (20) are native too. Opset 18 still works
(GroupNorm becomes the InstanceNormalization pattern) for TensorRT < 10.9. Opset 23 would
turn attention into the native Attention op, which onnxruntime 1.32 runs but TensorRT parses
only from 10.14 on — so it is not the default.

Precision. fp16/bf16 variants are exported from a copy of the module cast to that dtype, so
the graph *is* the precision (TensorRT's strongly typed networks take it from there; TRT 11
has no FP16/BF16 builder flags). The reference ops keep GroupNorm statistics and the
timestep embedding in fp32, so those appear as fp32 islands between Casts, and the VQ
distance computation is done in fp32 so the fp16 graph picks the same codes. The timestep
input is float32 in every variant. onnxruntime's CPU provider has no bf16 Conv kernel, so bf16
graphs are exported and structurally checked but not numerically validated here.

Export always goes through the PyTorch reference ops (`ops.set_backend("eager")` for the
duration, then restored): a Triton custom op in the graph would be unreadable to every
runtime. Graphs whose weights exceed ~2 GB (protobuf's limit) are written with external
data (`<name>.onnx.data` next to the graph).
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import ldm_fast
from ldm_fast import ops
from ldm_fast.config import Config, to_dict

DEFAULT_OPSET = 21
MIN_OPSET = 18  # the dynamo exporter's floor; below 21 GroupNorm is decomposed
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Protobuf refuses messages over 2 GiB; stay clear of it (graph structure + metadata included).
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)
META_PREFIX = "ldm_fast."
GRAPHS = ("unet", "decoder", "encoder", "cond_encoder")


class ExportError(RuntimeError):
    """A model part that cannot be exported (unsupported module, bad option)."""


# ----------------------------------------------------------------------------- graph specs

@dataclass
class TensorSpec:
    """One graph input or output: its name, dtype name and shape (ints are fixed sizes,
    strings are the dynamic axis names shared across the graph's tensors)."""

    name: str
    dtype: str                 # "float32", "float16", "bfloat16", "int64"
    shape: list

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class GraphSpec:
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    info: dict = field(default_factory=dict)   # graph-specific facts (spatial_multiple, null ids, …)

    def to_json(self) -> dict:
        return {"name": self.name, "inputs": [asdict(t) for t in self.inputs],
                "outputs": [asdict(t) for t in self.outputs], "info": self.info}

    @classmethod
    def from_json(cls, data: dict) -> "GraphSpec":
        return cls(data["name"], [TensorSpec(**t) for t in data["inputs"]],
                   [TensorSpec(**t) for t in data["outputs"]], data.get("info", {}))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def spatial_multiple(cfg: Config) -> int:
    """Latent sides must be multiples of this: the UNet halves the grid (levels − 1) times and
    concatenates skips of equal size on the way up."""
    return 2 ** (len(cfg.unet.channel_mult) - 1)


def latent_size(cfg: Config) -> int:
    return cfg.data.resolution // max(1, cfg.autoencoder.factor)


def unet_spec(cfg: Config, precision: str = "fp32") -> GraphSpec:
    un, dt = cfg.unet, _dtype_name(PRECISIONS[precision])
    c = un.out_channels
    inputs = [TensorSpec("latent", dt, ["batch", c, "height", "width"]),
              TensorSpec("timestep", "float32", ["batch"])]
    if un.context_dim > 0:
        inputs.append(TensorSpec("context", dt, ["batch", "tokens", un.context_dim]))
    if un.num_classes > 0:
        inputs.append(TensorSpec("class_labels", "int64", ["batch"]))
    if un.in_channels > un.out_channels:
        inputs.append(TensorSpec("concat", dt, ["batch", un.in_channels - c, "height", "width"]))
    outputs = [TensorSpec("prediction", dt, ["batch", c, "height", "width"])]
    return GraphSpec("unet", inputs, outputs, {"spatial_multiple": spatial_multiple(cfg)})


def decoder_spec(cfg: Config, precision: str = "fp32") -> GraphSpec:
    dt, ae = _dtype_name(PRECISIONS[precision]), cfg.autoencoder
    c = ae.z_channels if ae.kind != "identity" else cfg.unet.out_channels
    return GraphSpec("decoder", [TensorSpec("latent", dt, ["batch", c, "height", "width"])],
                     [TensorSpec("image", dt, ["batch", ae.in_channels, "image_height", "image_width"])],
                     {"factor": ae.factor})


def encoder_spec(cfg: Config, precision: str = "fp32") -> GraphSpec:
    dt, ae = _dtype_name(PRECISIONS[precision]), cfg.autoencoder
    c = ae.z_channels if ae.kind != "identity" else cfg.unet.out_channels
    return GraphSpec("encoder", [TensorSpec("image", dt, ["batch", ae.in_channels, "image_height", "image_width"])],
                     [TensorSpec("latent", dt, ["batch", c, "height", "width"])], {"factor": ae.factor})


# ----------------------------------------------------------------------------- wrappers

class UNetGraph(nn.Module):
    """LatentDiffusion.forward with the conditioning dict flattened into named inputs."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, latent, timestep, context=None, class_labels=None, concat=None):
        x = latent if concat is None else torch.cat([latent, concat.to(latent.dtype)], dim=1)
        return self.unet(x, timestep, context=context, class_labels=class_labels)


def _quantize(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest codebook entry per position, the VectorQuantizer's forward without its loss and
    statistics (which have no place in an inference graph). Distances in fp32: in fp16 two
    near-equidistant codes could swap and change the picture, not just its last bits."""
    b, c, h, w = z.shape
    flat = z.float().permute(0, 2, 3, 1).reshape(-1, c)
    cb = codebook.float()
    dist = flat.pow(2).sum(1, keepdim=True) + cb.pow(2).sum(1)[None] - 2 * flat @ cb.t()
    zq = cb[dist.argmin(dim=1)]
    return zq.reshape(b, h, w, c).permute(0, 3, 1, 2).to(z.dtype)


class DecoderGraph(nn.Module):
    """Scaled latent → image: z / scale_factor → (VQ: quantise) → post_quant_conv → decoder."""

    def __init__(self, first_stage: nn.Module, scale_factor: float):
        super().__init__()
        self.first_stage = first_stage
        self.kind = getattr(first_stage, "kind", "identity")
        # A Python float is folded into the graph as a constant (the value is in the metadata).
        self.inv_scale = 1.0 / float(scale_factor)

    def forward(self, latent):
        z = latent * self.inv_scale
        if self.kind == "identity":
            return z
        if self.kind == "vq":
            z = _quantize(z, self.first_stage.quantize.embedding.weight)
        return self.first_stage.decoder(self.first_stage.post_quant_conv(z))


class EncoderGraph(nn.Module):
    """Image → scaled latent: the KL posterior's mean (or the VQ pre-quantisation features,
    which is what stage 2 was trained on) times scale_factor."""

    def __init__(self, first_stage: nn.Module, scale_factor: float):
        super().__init__()
        self.first_stage = first_stage
        self.kind = getattr(first_stage, "kind", "identity")
        self.scale = float(scale_factor)

    def forward(self, image):
        if self.kind == "identity":
            return image * self.scale
        h = self.first_stage.quant_conv(self.first_stage.encoder(image))
        if self.kind == "kl":
            h = h[:, : self.first_stage.cfg.z_channels]  # moments = [mean | logvar]
        return h * self.scale


class TokenEncoderGraph(nn.Module):
    """τθ transformer on token ids (text or layout): the TransformerEncoder's forward without
    its data-dependent range checks, which the runtime does on the host before feeding."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, tokens):
        t = self.transformer
        x = t.token_emb(tokens) + t.pos_emb[:, : tokens.shape[1]]
        for layer in t.layers:
            x = layer(x)
        return t.norm(x)


class ClassEncoderGraph(nn.Module):
    """ClassEmbedder: class ids (null id = num_classes) → a one-token context (B, 1, D)."""

    def __init__(self, embedder: nn.Module):
        super().__init__()
        self.embedding = embedder.embedding

    def forward(self, class_labels):
        return self.embedding(class_labels)[:, None]


def cond_encoder_graph(module: nn.Module, cfg: Config, precision: str = "fp32") -> tuple[nn.Module, GraphSpec]:
    """The exportable wrapper and spec of a conditioning encoder (conditioning.py's modules)."""
    from ldm_fast import conditioning as C

    dt = _dtype_name(PRECISIONS[precision])
    if isinstance(module, C.ClassEmbedder):
        d = module.embedding.embedding_dim
        spec = GraphSpec("cond_encoder", [TensorSpec("class_labels", "int64", ["batch"])],
                         [TensorSpec("context", dt, ["batch", 1, d])],
                         {"kind": "class", "num_classes": module.num_classes,
                          "null_id": module.null_id if module.null_class else None})  # cin256 v1: no null row
        return ClassEncoderGraph(module), spec
    if isinstance(module, (C.TextTransformer, C.LayoutEncoder)):
        tr = module.transformer
        d, length = tr.norm.normalized_shape[0], tr.max_length
        info = {"kind": "text" if isinstance(module, C.TextTransformer) else "layout",
                "max_length": length, "vocab_size": tr.vocab_size}
        if isinstance(module, C.LayoutEncoder):
            info.update(num_classes=module.num_classes, grid=module.grid, pad_id=module.pad_id)
        else:
            info.update(pad_id=module.tokenizer.pad_id)
        # The token axis is fixed: both tokenizers always pad to max_length.
        spec = GraphSpec("cond_encoder", [TensorSpec("tokens", "int64", ["batch", length])],
                         [TensorSpec("context", dt, ["batch", length, d])], info)
        return TokenEncoderGraph(tr), spec
    raise ExportError(f"conditioning encoder {type(module).__name__}: no ONNX export (the class "
                      "embedder, the trained text transformer and the layout encoder have one; "
                      "a frozen pretrained Hugging Face encoder must be exported with its own tools, "
                      "and concat conditioners run in Python)")


# ----------------------------------------------------------------------------- export core

def reference_ops():
    """Run the block with the PyTorch reference ops, then restore the caller's switch exactly
    (including "unset", which defers to $LDM_KERNELS)."""
    return ops.backend("eager")


def _example(spec: GraphSpec, sizes: dict[str, int], dtype_override: dict | None = None):
    """Example tensors for tracing: small random values (int inputs: zeros, always valid)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        if t.dtype == "int64":
            out[t.name] = torch.zeros(shape, dtype=torch.long)
        elif t.name == "timestep":
            out[t.name] = torch.rand(shape, generator=g) * 999
        else:
            out[t.name] = torch.randn(shape, generator=g).to(t.torch_dtype)
    return out


def _trace_sizes(cfg: Config) -> dict[str, int]:
    # Batch 2 (1 would be specialised away) and distinct sides so that height and width are
    # never unified into one symbol; both multiples of what the UNet needs.
    m = spatial_multiple(cfg)
    h, w = 2 * m, 3 * m
    f = max(1, cfg.autoencoder.factor)
    return {"batch": 2, "height": h, "width": w, "image_height": h * f, "image_width": w * f,
            "tokens": 5}


def weights_nbytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def metadata(cfg: Config, model, precision: str, spec: GraphSpec, opset: int) -> dict[str, str]:
    """The key → string map stored in every graph's metadata_props: enough to sample from the
    graph without the PyTorch code (schedule, parameterization, latent scale, config)."""
    sched = model.schedule
    d = cfg.diffusion
    return {
        "version": ldm_fast.__version__,
        "graph": spec.name,
        "precision": precision,
        "opset": str(opset),
        "config": json.dumps(to_dict(cfg)),
        "scale_factor": repr(float(model.scale_factor)),
        "parameterization": sched.parameterization,
        "schedule": json.dumps({"kind": d.schedule, "timesteps": d.timesteps,
                                "linear_start": d.linear_start, "linear_end": d.linear_end}),
        # float64 values; json writes the shortest repr that round-trips exactly.
        "alphas_cumprod": json.dumps([float(a) for a in sched.alphas_cumprod.tolist()]),
        "latent_channels": str(cfg.unet.out_channels),
        "factor": str(cfg.autoencoder.factor),
        "spatial_multiple": str(spatial_multiple(cfg)),
        "spec": json.dumps(spec.to_json()),
    }


def read_metadata(path) -> dict:
    """The ldm_fast.* metadata of an exported graph, JSON fields decoded."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    raw = {p.key[len(META_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}
    out = dict(raw)
    for key in ("config", "schedule", "alphas_cumprod", "spec"):
        if key in out:
            out[key] = json.loads(out[key])
    for key in ("scale_factor",):
        if key in out:
            out[key] = float(out[key])
    return out


def file_sha256(path) -> str:
    """SHA-256 of the graph file followed by its external data file, if any."""
    h = hashlib.sha256()
    for p in (Path(path), Path(str(path) + ".data")):
        if p.is_file():
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def export_graph(module: nn.Module, spec: GraphSpec, path, sizes: dict[str, int], meta: dict[str, str],
                 opset: int = DEFAULT_OPSET, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Export one wrapper module to `path` with the spec's input/output names and dynamic axes,
    attach the metadata, save (external data above the threshold) and run the ONNX checker.
    The module's forward must name its parameters as the spec names the inputs (the first is
    passed positionally, the rest by keyword, so optional conditioning inputs can be left out)."""
    import onnx

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset}: the exporter needs ≥ {MIN_OPSET}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _example(spec, sizes)
    dynamic = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs}
    names = [t.name for t in spec.inputs]
    args = tuple(example[n] for n in names[:1])
    kwargs = {n: example[n] for n in names[1:]}
    module = module.eval()
    with reference_ops(), torch.no_grad(), warnings.catch_warnings():
        # Benign exporter chatter: axis names shared by several inputs (batch, height) are
        # reported once per extra input, and a torch-internal pytree deprecation.
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                    output_names=[t.name for t in spec.outputs], dynamic_shapes=dynamic,
                                    verbose=False)
    model = program.model
    _name_output_axes(model, spec)
    for key, value in meta.items():
        model.metadata_props[META_PREFIX + key] = value
    model.producer_name, model.producer_version = "ldm_fast", ldm_fast.__version__
    external = weights_nbytes(module) > external_data_threshold
    for stale in (path, Path(str(path) + ".data")):
        stale.unlink(missing_ok=True)
    program.save(str(path), external_data=external)
    onnx.checker.check_model(str(path), full_check=False)  # by path: external data is found
    return path


def _name_output_axes(model, spec: GraphSpec) -> None:
    """The exporter names output axes by the expression it derived (e.g. 2*((height−1)//2)+2
    for a UNet output, which equals height for every valid input); use the spec's names."""
    import onnx_ir as ir

    for value, t in zip(model.graph.outputs, spec.outputs):
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(d) if isinstance(d, str) else d for d in t.shape]
        if len(dims) == len(value.shape):
            value.shape = ir.Shape(dims)


# ----------------------------------------------------------------------------- the four graphs

def _cast(module: nn.Module, precision: str) -> nn.Module:
    return copy.deepcopy(module).to(PRECISIONS[precision]).eval()


def build_graph(name: str, model, cond_module=None, precision: str = "fp32") -> tuple[nn.Module, GraphSpec]:
    """The wrapper module (on a copy of the weights cast to `precision`) and spec of graph
    `name`; validation builds the fp32 one of the same graph as its reference."""
    cfg = model.cfg
    if name == "unet":
        return UNetGraph(_cast(model.unet, precision)), unet_spec(cfg, precision)
    if name == "decoder":
        return DecoderGraph(_cast(model.first_stage, precision), float(model.scale_factor)), \
            decoder_spec(cfg, precision)
    if name == "encoder":
        return EncoderGraph(_cast(model.first_stage, precision), float(model.scale_factor)), \
            encoder_spec(cfg, precision)
    if name == "cond_encoder":
        if cond_module is None:
            raise ExportError("cond_encoder: this model has no conditioning encoder")
        graph, spec = cond_encoder_graph(cond_module, cfg, precision)
        return _cast(graph, precision), spec
    raise ExportError(f"graph: expected one of {GRAPHS}, got {name!r}")


def export_one(name: str, model, path, cond_module=None, precision: str = "fp32",
               opset: int = DEFAULT_OPSET, **kw) -> tuple[Path, GraphSpec]:
    """Export graph `name` of a LatentDiffusion (and its conditioning encoder) to `path`."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
    module, spec = build_graph(name, model, cond_module, precision)
    sizes = _trace_sizes(model.cfg)
    return export_graph(module, spec, path, sizes, metadata(model.cfg, model, precision, spec, opset),
                        opset, **kw), spec


def available_graphs(model, cond_module=None) -> list[str]:
    """The graphs this model has: the conditioning encoder only when there is one to export."""
    return [g for g in GRAPHS if g != "cond_encoder" or cond_module is not None]


def export_all(model, cond_module, out_dir, precision="fp32", opset=DEFAULT_OPSET,
               graphs=None, **kw) -> dict[str, dict]:
    """Export the model's graphs into out_dir; returns {graph: {file, spec, sha256, external_data}}."""
    out_dir = Path(out_dir)
    done = {}
    for name in graphs or available_graphs(model, cond_module):
        path, spec = export_one(name, model, out_dir / f"{name}.onnx", cond_module, precision, opset, **kw)
        data = Path(str(path) + ".data")
        done[name] = {"file": path.name, "spec": spec.to_json(), "sha256": file_sha256(path),
                      "external_data": data.name if data.is_file() else None}
    return done


def schedule_record(model) -> dict:
    """Schedule facts for manifests and engine sidecars (what the native runner reads)."""
    d = model.cfg.diffusion
    return {"kind": d.schedule, "timesteps": d.timesteps, "linear_start": d.linear_start,
            "linear_end": d.linear_end, "parameterization": model.schedule.parameterization,
            "alphas_cumprod": [float(a) for a in model.schedule.alphas_cumprod.tolist()]}
