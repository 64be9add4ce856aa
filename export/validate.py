"""Check exported graphs against PyTorch with onnxruntime on the CPU.

Every graph is run at two batch sizes × two resolutions (one of them non-square) and its
output compared with the fp32 PyTorch module of the same graph (`build_graph`), evaluated on
the *same* inputs — rounded to the graph's precision first, so what is measured is the graph,
not the rounding of its inputs. Integer inputs (class ids, tokens) are drawn over their
whole valid range, null ids included.

Tolerances (err = max |onnx − torch_fp32| over the output, scale = max |torch_fp32|):
    fp32   err ≤ 1e-5 + 5e-4·scale             same arithmetic, different kernels and
                                                summation orders; a wrong op is O(scale)
    fp16   err ≤ max(2·e16, 1e-2·scale) + 1e-3  e16 = the error of the same graph run by
                                                PyTorch in fp16 (the design card's "2× the
                                                same-precision reference"); the 1e-2·scale floor
                                                keeps a lucky PyTorch run from being the bar
    bf16   not run: onnxruntime's CPU provider has no bf16 Conv kernel (checked with 1.32).
           The graph is still exported and passes the ONNX checker; validate it on a GPU
           runtime. `validate_graph` raises NotValidated rather than pass it silently.
A mismatch raises ValidationError naming the graph, the output, the case and both numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ldm_fast.export.onnx_export import (GraphSpec, build_graph, latent_size, reference_ops,
                                         spatial_multiple)


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float            # × max |reference|
    same_precision: float  # × the same-precision PyTorch error (0: not used)


TOLERANCES = {
    "fp32": Tolerance(atol=1e-5, rtol=5e-4, same_precision=0.0),
    "fp16": Tolerance(atol=1e-3, rtol=1e-2, same_precision=2.0),
}


class ValidationError(AssertionError):
    """An exported graph disagrees with PyTorch beyond the documented tolerance."""


class NotValidated(RuntimeError):
    """The graph cannot be validated here (e.g. bf16 on onnxruntime's CPU provider)."""


@dataclass
class Check:
    graph: str
    precision: str
    output: str
    batch: int
    size: tuple            # latent (h, w); () for the conditioning encoder
    max_error: float
    allowed: float
    scale: float
    same_precision_error: float | None

    @property
    def passed(self) -> bool:
        return self.max_error <= self.allowed

    def to_json(self) -> dict:
        return {**asdict(self), "size": list(self.size), "passed": self.passed}


def default_sizes(cfg) -> list[tuple[int, int]]:
    """The config's latent size and a non-square one a spatial multiple larger."""
    m = spatial_multiple(cfg)
    s = max(m, latent_size(cfg) // m * m)
    return [(s, s), (s + m, s)]


def session(path, threads: int | None = None, providers=None):
    """An onnxruntime session. Intra-op threads default to torch's setting: onnxruntime's own
    default (every core it sees) oversubscribes shared machines, where its spinning workers
    then make small graphs 10-30× slower."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def make_inputs(spec: GraphSpec, batch: int, size: tuple, factor: int, generator: torch.Generator):
    """Random inputs for one case, as fp32/int64 torch tensors."""
    h, w = size if size else (1, 1)
    dims = {"batch": batch, "height": h, "width": w, "image_height": h * factor,
            "image_width": w * factor, "tokens": 7}
    out = {}
    for t in spec.inputs:
        shape = [dims[d] if isinstance(d, str) else d for d in t.shape]
        if t.dtype == "int64":
            hi = _int_range(spec, t.name)
            out[t.name] = torch.randint(0, hi, shape, generator=generator)
        elif t.name == "timestep":
            out[t.name] = torch.rand(shape, generator=generator) * 999
        elif t.name == "image":
            out[t.name] = torch.rand(shape, generator=generator) * 2 - 1
        else:
            out[t.name] = torch.randn(shape, generator=generator)
    return out


def _int_range(spec: GraphSpec, name: str) -> int:
    info = spec.info
    if spec.name == "cond_encoder":
        if info.get("kind") == "class":
            return info["num_classes"] + 1      # null id included
        return info["vocab_size"]
    if name == "class_labels":
        return info.get("num_classes", 1)
    raise KeyError(name)


def _run_torch(module, spec: GraphSpec, inputs: dict, dtype: torch.dtype) -> torch.Tensor:
    args = {k: (v.to(dtype) if v.is_floating_point() and k != "timestep" else v) for k, v in inputs.items()}
    names = [t.name for t in spec.inputs]
    with reference_ops(), torch.no_grad():
        return module(*[args[n] for n in names]).float()


def validate_graph(path, model, cond_module, name: str, precision: str, batches=(1, 3),
                   sizes=None, seed: int = 0, raise_on_mismatch: bool = True) -> list[Check]:
    """Compare the exported graph `name` at `path` with PyTorch; returns one Check per case."""
    if precision not in TOLERANCES:
        raise NotValidated(f"{name} ({precision}): not validated — onnxruntime's CPU provider has no "
                           f"{precision} kernels for Conv; run this graph on a GPU runtime to check it")
    tol = TOLERANCES[precision]
    cfg = model.cfg
    ref_module, spec32 = build_graph(name, model, cond_module, "fp32")
    low_module, spec = build_graph(name, model, cond_module, precision) if precision != "fp32" else (None, spec32)
    sess = session(path)
    sizes = [()] if name == "cond_encoder" else (sizes or default_sizes(cfg))
    factor = max(1, cfg.autoencoder.factor)
    g = torch.Generator().manual_seed(seed)
    checks = []
    for batch in batches:
        for size in sizes:
            inputs = make_inputs(spec, batch, size, factor, g)
            # Round float inputs to the graph's precision, then give the same values to fp32.
            low = {k: (v.to(spec_dtype(spec, k)) if v.is_floating_point() else v) for k, v in inputs.items()}
            ref = _run_torch(ref_module, spec, {k: v.float() if v.is_floating_point() else v
                                                for k, v in low.items()}, torch.float32)
            feed = {k: v.numpy() for k, v in low.items()}
            out = sess.run([spec.outputs[0].name], feed)[0].astype(np.float32)
            out = torch.from_numpy(out)
            if out.shape != ref.shape:
                raise ValidationError(f"{name} output '{spec.outputs[0].name}': shape {tuple(out.shape)} "
                                      f"≠ PyTorch {tuple(ref.shape)} at batch {batch}, size {size}")
            err = float((out - ref).abs().max())
            scale = float(ref.abs().max())
            e_low = None
            allowed = tol.atol + tol.rtol * scale
            if tol.same_precision:
                e_low = float((_run_torch(low_module, spec, low, spec_dtype(spec, spec.inputs[0].name))
                               - ref).abs().max())
                allowed = max(tol.same_precision * e_low, tol.rtol * scale) + tol.atol
            check = Check(name, precision, spec.outputs[0].name, batch, tuple(size), err, allowed, scale, e_low)
            checks.append(check)
            if not np.isfinite(err) or (raise_on_mismatch and not check.passed):
                raise ValidationError(
                    f"{name} ({precision}) output '{check.output}': max error {err:.3g} exceeds the "
                    f"allowed {allowed:.3g} at batch {batch}, latent size {size} (max |ref| {scale:.3g}"
                    + (f", PyTorch {precision} error {e_low:.3g}" if e_low is not None else "") + f"); file {path}")
    return checks


def spec_dtype(spec: GraphSpec, input_name: str) -> torch.dtype:
    for t in spec.inputs:
        if t.name == input_name:
            return t.torch_dtype
    raise KeyError(input_name)


def validate_export(model, cond_module, out_dir, graphs: dict, precision: str, batches=(1, 3),
                    sizes=None) -> dict:
    """Validate every exported graph listed in `graphs` ({name: {file: …}}, as export_all returns).
    Returns {graph: [check, …]} as JSON-ready dicts, or {graph: {"not_validated": reason}}."""
    report = {}
    for name, rec in graphs.items():
        try:
            checks = validate_graph(Path(out_dir) / rec["file"], model, cond_module, name, precision,
                                    batches, sizes)
            report[name] = [c.to_json() for c in checks]
        except NotValidated as exc:
            report[name] = {"not_validated": str(exc)}
    return report
