"""Run a TensorRT engine written by tensorrt_build.py, from torch CUDA tensors.

Loading reads the JSON sidecar first and compares it with the installed TensorRT version and
the current GPU (name and compute capability): an engine is a compiled program for exactly one
TensorRT release and one GPU, and deserialising a foreign one fails with an opaque message or,
worse, runs. A mismatch raises EngineMismatch saying which of the three differs, before
`tensorrt` deserialises anything.

Execution uses the name-based API of TensorRT 10/11 (`set_input_shape`, `set_tensor_address`,
`execute_async_v3`) on torch-allocated buffers and a private stream. With `cuda_graphs=True`
(the default) the first call for an input-shape signature enqueues once (TensorRT does its
shape-dependent set-up there, which must not be captured), then captures the enqueue into a
CUDA graph; later calls with the same shapes — every step of a sampling loop — copy their
inputs into the static buffers and replay the graph. One graph is kept per shape signature;
all of them use the context's scratch memory, which is safe because they run one at a time
on the same stream.

Status: written against the documented API; not run here (no TensorRT, no GPU). The sidecar
check is tested with fake sidecars.
"""

from __future__ import annotations

import json
from pathlib import Path

from ldm_fast.export.onnx_export import GraphSpec
from ldm_fast.export.tensorrt_build import SIDECAR_FORMAT, current_gpu, require_tensorrt, sidecar_path


class EngineMismatch(RuntimeError):
    """The engine was built for another TensorRT version or GPU."""


def read_sidecar(engine_path) -> dict:
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the engine's sidecar is missing; rebuild the engine with "
                                "`python -m ldm_fast.export --tensorrt` (it records what the engine is tied to)")
    data = json.loads(path.read_text())
    if data.get("format") != SIDECAR_FORMAT:
        raise EngineMismatch(f"{path}: unknown sidecar format {data.get('format')!r} (expected {SIDECAR_FORMAT!r})")
    return data


def check_sidecar(sidecar: dict, tensorrt_version: str, gpu: dict, where: str = "engine") -> None:
    """Raise EngineMismatch naming every difference between what the engine was built for and
    the environment (TensorRT version, GPU name, compute capability)."""
    problems = []
    built = sidecar.get("tensorrt_version")
    if built != tensorrt_version:
        problems.append(f"TensorRT version: engine built with {built}, installed {tensorrt_version}")
    want_cc = list(sidecar.get("gpu", {}).get("compute_capability", []))
    have_cc = list(gpu.get("compute_capability", []))
    if want_cc != have_cc:
        problems.append(f"GPU compute capability: engine built for sm_{''.join(map(str, want_cc))}, "
                        f"this GPU is sm_{''.join(map(str, have_cc))}")
    want_name = sidecar.get("gpu", {}).get("name")
    if want_name != gpu.get("name"):
        problems.append(f"GPU: engine built on {want_name!r}, running on {gpu.get('name')!r}")
    if problems:
        raise EngineMismatch(f"{where}: " + "; ".join(problems) + ". Engines are tied to one TensorRT "
                             "version and one GPU model: rebuild with `python -m ldm_fast.export --tensorrt` here.")


def load_engine(engine_path, environment: dict | None = None):
    """(deserialised ICudaEngine, sidecar). `environment` ({'tensorrt_version', 'gpu'}) replaces
    the detected one (tests); the check runs before tensorrt is asked to deserialise."""
    engine_path = Path(engine_path)
    sidecar = read_sidecar(engine_path)
    if environment is None:
        trt = require_tensorrt()
        environment = {"tensorrt_version": trt.__version__, "gpu": current_gpu()}
    check_sidecar(sidecar, environment["tensorrt_version"], environment["gpu"], str(engine_path))
    trt = require_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"{engine_path}: TensorRT could not deserialise the engine (corrupt file?)")
    return engine, sidecar


def _torch_dtype(trt, dt):
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
             trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    return table[dt]


class TrtGraph:
    """One engine with the same `run(**inputs) -> output` interface as the onnxruntime graph."""

    def __init__(self, engine_path, cuda_graphs: bool = True, environment: dict | None = None):
        import torch

        self.trt = require_tensorrt()
        self.engine, self.sidecar = load_engine(engine_path, environment)
        self.spec = GraphSpec.from_json(self.sidecar["spec"])
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.cuda_graphs = cuda_graphs
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.dtypes = {n: _torch_dtype(self.trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._cache = {}  # shape signature → (static inputs, outputs, CUDA graph or None)

    def _prepare(self, shapes: dict):
        import torch

        static = {n: torch.empty(shapes[n], dtype=self.dtypes[n], device="cuda") for n in self.inputs}
        for n, t in static.items():
            if not self.context.set_input_shape(n, tuple(t.shape)):
                raise ValueError(f"{self.spec.name}: input {n} shape {tuple(t.shape)} is outside the "
                                 f"engine's optimization profile {self.sidecar['profiles'][0].get(n)}")
        outs = {n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n], device="cuda")
                for n in self.outputs}
        for n, t in {**static, **outs}.items():
            self.context.set_tensor_address(n, t.data_ptr())
        return static, outs

    def _enqueue(self):
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{self.spec.name}: TensorRT execute_async_v3 failed")

    def run(self, **inputs):
        import torch

        missing = set(self.inputs) - set(inputs)
        if missing:
            raise ValueError(f"{self.spec.name}: missing inputs {sorted(missing)}")
        sig = tuple((n, tuple(inputs[n].shape)) for n in self.inputs)
        entry = self._cache.get(sig)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            if entry is None:
                static, outs = self._prepare(dict(sig))
                for n in self.inputs:
                    static[n].copy_(inputs[n])
                self._enqueue()  # shape-dependent set-up happens here, outside any capture
                graph = None
                if self.cuda_graphs:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        self._enqueue()
                entry = self._cache[sig] = (static, outs, graph)
            else:
                static, outs, graph = entry
                if graph is None:
                    # Another signature may have set other shapes/addresses on the context.
                    for n, t in static.items():
                        self.context.set_input_shape(n, tuple(t.shape))
                    for n, t in {**static, **outs}.items():
                        self.context.set_tensor_address(n, t.data_ptr())
                for n in self.inputs:
                    static[n].copy_(inputs[n])
                if graph is not None:
                    graph.replay()
                else:
                    self._enqueue()
            result = outs[self.outputs[0]].clone()
        torch.cuda.current_stream().wait_stream(self.stream)
        # Allocated on the side stream, used on the caller's: tell the caching allocator.
        result.record_stream(torch.cuda.current_stream())
        return result
