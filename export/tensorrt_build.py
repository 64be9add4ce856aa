"""TensorRT engines from the exported ONNX graphs (TensorRT 10.x and 11.x Python API).

Thin on purpose: the ONNX graph decides everything numeric. The network is *strongly typed*
(`NetworkDefinitionCreationFlag.STRONGLY_TYPED`, required for this on 10.x, accepted and
implied on 11.x), so an fp16 graph builds an fp16 engine and the fp32 islands the exporter
left (GroupNorm statistics, the timestep embedding, VQ distances) stay fp32. No FP16/BF16
builder flags: TensorRT 11 removed them, and on 10.x they would let the builder pick
precisions the graph did not ask for.

What the builder is given: one optimization profile (min/opt/max per dynamic input, derived
from batch and latent-size ranges), a workspace limit, and a timing cache file that is read
before and written after every build, so the second graph — and the next run — reuse the
kernel timings already measured. Next to each engine a JSON sidecar records what the engine
is tied to (TensorRT version, GPU name and compute capability), the profile, the SHA-256 of
the source ONNX, and the model facts a runner needs (schedule, parameterization, input specs);
`trt_runtime.load_engine` checks it before deserialising anything.

Status: written against the documented API; not run here (no TensorRT in this environment).
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from ldm_fast.export.onnx_export import GraphSpec, file_sha256

SIDECAR_FORMAT = "ldm_fast-engine/1"
SIDECAR_SUFFIX = ".json"


class TensorRTNotInstalled(ImportError):
    pass


def require_tensorrt():
    """Import tensorrt, or say clearly that it is missing (imported lazily everywhere)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTNotInstalled(
            "TensorRT not installed: `import tensorrt` failed. Install TensorRT 10.x or 11.x for your "
            "CUDA version (pip install tensorrt, from NVIDIA's index) on a machine with an NVIDIA GPU; "
            "the ONNX graphs run without it through onnxruntime (--backend onnxruntime)") from exc
    return trt


def sidecar_path(engine_path) -> Path:
    return Path(str(engine_path) + SIDECAR_SUFFIX)


def current_gpu() -> dict:
    """Name and compute capability of the current CUDA device (through torch)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines need a CUDA GPU; torch.cuda.is_available() is False")
    idx = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    return {"name": torch.cuda.get_device_name(idx), "compute_capability": [major, minor]}


# ----------------------------------------------------------------------------- profiles

def profile_shapes(spec: GraphSpec, batch: tuple[int, int, int], height: tuple[int, int, int],
                   width: tuple[int, int, int], factor: int = 1,
                   tokens: tuple[int, int, int] = (77, 77, 77)) -> dict[str, list[list[int]]]:
    """{input: [min, opt, max] shapes} for every input of `spec`, from (min, opt, max) ranges of
    the batch and the *latent* height and width (image axes are factor× those)."""
    ranges = {"batch": batch, "height": height, "width": width,
              "image_height": tuple(v * factor for v in height),
              "image_width": tuple(v * factor for v in width), "tokens": tokens}
    out = {}
    for t in spec.inputs:
        shapes = []
        for k in range(3):
            shapes.append([ranges[d][k] if isinstance(d, str) else int(d) for d in t.shape])
        out[t.name] = shapes
    return out


def check_ranges(name: str, lo_opt_hi) -> None:
    lo, opt, hi = lo_opt_hi
    if not 0 < lo <= opt <= hi:
        raise ValueError(f"{name}: need 0 < min ≤ opt ≤ max, got {lo_opt_hi}")


# ----------------------------------------------------------------------------- build

def make_sidecar(spec: GraphSpec, tensorrt_version: str, gpu: dict, onnx_path, profile: dict,
                 workspace_bytes: int, timing_cache: str | None, model_info: dict | None,
                 build_seconds: float = 0.0) -> dict:
    """The sidecar's JSON schema in one place (the native runner parses the same fields)."""
    onnx_path = Path(onnx_path)
    return {
        "format": SIDECAR_FORMAT,
        "graph": spec.name,
        "tensorrt_version": tensorrt_version,
        "gpu": gpu,
        "source_onnx": {"file": onnx_path.name,
                        "sha256": file_sha256(onnx_path) if onnx_path.is_file() else None},
        "profiles": [{name: {"min": s[0], "opt": s[1], "max": s[2]} for name, s in profile.items()}],
        "workspace_bytes": int(workspace_bytes),
        "timing_cache": timing_cache,
        "strongly_typed": True,
        "build_seconds": round(build_seconds, 3),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.to_json(),
        "model": model_info or {},
    }


def build_engine(onnx_path, engine_path, spec: GraphSpec, profile: dict[str, list[list[int]]],
                 workspace_bytes: int = 4 << 30, timing_cache=None, model_info: dict | None = None,
                 optimization_level: int | None = None, log_level: str = "WARNING") -> dict:
    """Parse `onnx_path` into a strongly typed network, build and write the serialized engine
    and its sidecar; returns the sidecar dict."""
    trt = require_tensorrt()
    gpu = current_gpu()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # 10.x: opt in; 11.x: always on (the flag is accepted)
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file, not parse(bytes): it resolves external data next to the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    build_s = time.perf_counter() - t0
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if cache_path is not None:
        # The config's cache now holds this build's timings merged with the loaded ones.
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))

    sidecar = make_sidecar(spec, trt.__version__, gpu, onnx_path, profile, workspace_bytes,
                           cache_path.name if cache_path else None, model_info, build_s)
    sidecar_path(engine_path).write_text(json.dumps(sidecar, indent=1))
    return sidecar
