"""Sampling throughput of the latent diffusion model, per backend, batch size and model size.

    python bench/throughput.py                       # defaults: a few minutes on a 2-core CPU
    python bench/throughput.py --sizes tiny,sd --batches 1,4 --steps 20
    python bench/throughput.py --backends eager:fp32,compile:fp32 --quick

Backends (`name:dtype`; defaults depend on the device):
  eager             PyTorch ops, LDM_KERNELS=eager (the baseline every speed-up is against)
  triton            the fused Triton kernels behind ldm_fast.ops (GroupNorm+SiLU, attention,
                    sampler steps) — CUDA only: the CPU interpreter's speed means nothing
  compile           torch.compile (Inductor, default mode) of the eager model and decoder
  triton-cudagraph  Triton kernels with the UNet call and the decoder captured as CUDA graphs
  onnxruntime       the exported ONNX graphs under ONNX Runtime (ldm_fast.export.runtime)
  tensorrt          TensorRT engines built from those graphs (ldm_fast.export.runtime)
Each backend that cannot run here is listed as skipped, with the reason.

Sizes: `tiny` (the tiny preset: 32² images, 8×8×3 latents, unconditional; random weights or
`--ckpt RUN_DIR`) and `sd` (an SD1.5-sized UNet — 320 channels, mult 1,2,4,4, 2 res blocks,
attention at ds 4,2,1, 8 heads, context 768 — with random weights at 64×64×4 latents, 77
random context tokens, classifier-free guidance, and the KL-f8 decoder to 512²). Zero-initialised
output layers are re-randomised so the outputs, and the cross-backend differences, are not
trivially zero.

Per (size, backend, batch) it reports: the first call's time (compilation, autotuning, graph
capture or session start, kept out of the timings), the UNet step latency (one model call; with
guidance on the doubled batch), the decode latency, the sampling throughput (images/s for
noise → `--steps` sampler steps → decoded images), peak CUDA memory, the speed-up over eager
fp32 measured in the same run, the largest deviation of the UNet output from eager fp32 on the
same input, and on a GPU the achieved TFLOP/s of the UNet step as a fraction of the device's
data-sheet peak, FLOPs counted analytically from the model (benchlib.FlopCounter, checked
against torch.utils.flop_counter). Warm-up calls are untimed; each timed repetition is
synchronised; medians with the interquartile range.

On CPU only ratios mean anything (shared cores, no tuned kernels); the absolute CPU numbers are
labelled as such. JSON (+ a Markdown table) goes to bench/results/throughput-<machine>.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import benchlib as bl  # noqa: E402
from ldm_fast import ops, samplers  # noqa: E402
from ldm_fast.pipeline import Pipeline  # noqa: E402
from ldm_fast.config import (Config, ConditioningConfig, DataConfig, DiffusionConfig,  # noqa: E402
                             UNetConfig, get_preset, validate)
from ldm_fast.model import LatentDiffusion  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("eager", "triton", "compile", "triton-cudagraph", "onnxruntime", "tensorrt")
DEFAULT_BACKENDS = {
    "cuda": "eager:fp32,eager:fp16,eager:bf16,triton:fp16,compile:fp16,triton-cudagraph:fp16,"
            "onnxruntime:fp16,tensorrt:fp16",
    # fp16 has no fast path on common CPUs (bf16 is the CPU low-precision type).
    "cpu": "eager:fp32,eager:bf16,triton:fp16,triton-cudagraph:fp16,onnxruntime:fp32,tensorrt:fp16",
}
# Not in the CPU default (listed as skipped with this reason); measured when asked for.
CPU_DEFAULT_LEAVES_OUT = {
    ("compile", "fp32"): "not in the CPU default run: Inductor's C++ build of the tiny UNet and "
                         "decoder took 41-47 s + 23-24 s per batch size on the 2-core CPU (and "
                         "gained 1.0-1.1x); add compile:fp32 to --backends to measure it",
}
DEFAULT_BATCHES = {"cuda": {"tiny": "1,16,64", "sd": "1,4"}, "cpu": {"tiny": "1,8,32", "sd": "1"}}
CFG_SCALE = 7.5


class Skip(Exception):
    """A backend that cannot run here; the message is the reason."""


# ----------------------------------------------------------------------------- models

def sd15_config() -> Config:
    """SD1.5's UNet numbers on the KL-f8 first stage at 512² (random weights)."""
    cfg = get_preset("kl-f8")
    cfg.name = "sd15-size"
    cfg.unet = UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                          num_res_blocks=2, attention_resolutions=(4, 2, 1), num_heads=8,
                          num_head_channels=-1, use_spatial_transformer=True, transformer_depth=1,
                          context_dim=768)
    cfg.conditioning = ConditioningConfig(task="text", mode="crossattn", embed_dim=768, max_length=77)
    cfg.diffusion = DiffusionConfig(linear_start=0.00085, linear_end=0.012, scale_by_std=False,
                                    scale_factor=0.18215)
    cfg.data = DataConfig(resolution=512)
    return validate(cfg)


@dataclass
class Size:
    name: str
    cfg: Config
    latent: tuple            # (C, h, w)
    context: tuple | None    # (L, D) cross-attention tokens, or None (unconditional)
    guidance: float          # classifier-free guidance scale (1 = one model call per step)
    ckpt: str | None = None
    model: LatentDiffusion | None = field(default=None, repr=False)

    @property
    def cfg_factor(self) -> int:
        return 2 if self.guidance != 1.0 else 1


def make_size(name: str, ckpt: str | None) -> Size:
    if name == "tiny":
        if ckpt:
            from ldm_fast.run import load_config
            cfg = load_config(ckpt)
        else:
            cfg = get_preset("tiny")
        side = cfg.data.resolution // cfg.autoencoder.factor
        return Size("tiny", cfg, (cfg.unet.out_channels, side, side), None, 1.0, ckpt)
    if name == "sd":
        return Size("sd", sd15_config(), (4, 64, 64), (77, 768), CFG_SCALE)
    raise SystemExit(f"--sizes: unknown size {name!r} (tiny, sd)")


def randomize_zero_layers(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Residual output layers start at zero (zero_module); a random-weight benchmark model would
    then output exactly zero and every cross-backend comparison would pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_model(size: Size, device: torch.device) -> LatentDiffusion:
    if size.ckpt:
        from ldm_fast.run import load_model
        model, _ = load_model(size.ckpt, device="cpu")
    else:
        torch.manual_seed(0)
        model = LatentDiffusion(size.cfg)
        randomize_zero_layers(model)
    return model.to(device).eval().requires_grad_(False)


def count_flops(size: Size, unet_batch: int) -> dict:
    """FLOPs of one UNet call at `unet_batch` and of decoding one image, on the meta device."""
    with torch.device("meta"):
        model = LatentDiffusion(size.cfg)
        x = torch.empty(unet_batch, *size.latent)
        t = torch.full((unet_batch,), 500.0)
        cond = {"context": torch.empty(unet_batch, *size.context)} if size.context else {}
        z = torch.empty(1, *size.latent)
    with ops.backend("eager"):
        with bl.FlopCounter(model.unet) as fc:
            model(x, t, cond)
        unet = dict(fc.by_kind, total=fc.total)
        unet["torch_flop_counter"] = bl.torch_flop_count(lambda: model(x, t, cond))
        with bl.FlopCounter(model.first_stage) as fc:
            model.decode(z)
        decode = dict(fc.by_kind, total=fc.total)
    return {"unet_call": unet, "decode_per_image": decode}


# ----------------------------------------------------------------------------- backends

@dataclass
class Runner:
    """One backend ready to run: `unet(x, t, cond)` is the samplers' model interface,
    `decode(z)` maps latents to images; both take and return tensors of `dtype`."""
    backend: str
    dtype: torch.dtype
    kernels: str                         # what ldm_fast.ops runs around it (sampler updates)
    unet: object
    decode: object
    notes: list = field(default_factory=list)


def _cast_model(base: LatentDiffusion, dtype: torch.dtype, cache: dict) -> LatentDiffusion:
    if dtype == torch.float32:
        return base
    if dtype not in cache:
        cache[dtype] = copy.deepcopy(base).to(dtype)
    return cache[dtype]


def _graphed(fn, example_args: list[torch.Tensor]):
    """Capture fn(*args) as a CUDA graph (here: the decoder, whose signature is not a
    denoiser's); the returned callable copies its arguments into the
    captured buffers, replays, and returns a copy of the output (the samplers keep outputs
    across steps, e.g. PLMS's ε history, and the next replay overwrites the buffer)."""
    with torch.inference_mode():
        static = [a.clone() for a in example_args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):   # warm-up off the default stream, as capture requires
            for _ in range(3):
                fn(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*static)

    def run(*args):
        for buf, a in zip(static, args):
            buf.copy_(a)
        graph.replay()
        return out.clone()
    return run


def make_runner(backend: str, dtype: torch.dtype, base: LatentDiffusion, size: Size,
                device: torch.device, batch: int, cache: dict, compile_mode: str) -> Runner:
    """Build the backend for this batch; raises Skip with the reason if it cannot run here."""
    cuda = device.type == "cuda"
    if backend in ("triton", "triton-cudagraph") and not cuda:
        raise Skip("Triton kernels need CUDA; on CPU they run only under TRITON_INTERPRET=1, "
                   "which executes them in numpy (speed meaningless)")
    if backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise Skip("tensorrt is not installed (its wheels are not reachable from this "
                       "environment)") from None
        if not cuda:
            raise Skip("TensorRT needs CUDA")
    if dtype == torch.float16 and not cuda:
        raise Skip("fp16 on CPU: no fast path on common CPUs; bf16 is the CPU low-precision type")
    if backend == "eager":
        m = _cast_model(base, dtype, cache)
        return Runner(backend, dtype, "eager", m, m.decode)
    if backend == "triton":
        m = _cast_model(base, dtype, cache)
        return Runner(backend, dtype, "triton", m, m.decode)
    if backend == "compile":
        m = _cast_model(base, dtype, cache)
        key = ("compile", dtype)
        if key not in cache:
            # dynamic=False: one specialised graph per batch size, as a deployment would have;
            # each new shape's compile time shows up in that batch's first-call time.
            cache[key] = (torch.compile(m, mode=compile_mode, dynamic=False),
                          torch.compile(m.decode, mode=compile_mode, dynamic=False))
        unet, decode = cache[key]
        return Runner(backend, dtype, "eager", unet, decode,
                      [f"torch.compile mode={compile_mode}, Inductor, eager ops inside"])
    if backend == "triton-cudagraph":
        m = _cast_model(base, dtype, cache)
        t_capture = time.perf_counter()
        n = batch * size.cfg_factor
        x = torch.randn(n, *size.latent, device=device, dtype=dtype)
        t = torch.full((n,), 500.0, device=device)
        with ops.backend("triton"):
            # The UNet step through the engine's own CUDA-graph denoiser (what
            # Pipeline(cuda_graph=True) runs), captured here, before the timed calls.
            from ldm_fast.cuda_graph import CUDAGraphDenoiser

            unet = CUDAGraphDenoiser(m)
            cond = {"context": torch.randn(n, *size.context, device=device, dtype=dtype)} \
                if size.context else {}
            unet(x, t, cond)
            decode = _graphed(m.decode, [torch.randn(batch, *size.latent, device=device, dtype=dtype)])
        return Runner(backend, dtype, "triton", unet, decode,
                      [f"UNet call and decoder captured for this batch size in "
                       f"{time.perf_counter() - t_capture:.1f} s (warm-up, autotuning and capture; "
                       "not in the first-call time); sampler updates launched outside the graph"])
    if backend in ("onnxruntime", "tensorrt"):
        return _exported_runner(backend, dtype, base, size, device, batch, cache)
    raise SystemExit(f"--backends: unknown backend {backend!r} ({', '.join(BACKENDS)})")


# ----------------------------------------------------------------------------- exported graphs

def onnx_cache_dir() -> Path:
    from ldm_fast.metrics.features import default_cache_dir
    return default_cache_dir() / "bench_onnx"


def _export_graphs(base: LatentDiffusion, precision: str, cache: dict) -> tuple[Path, dict, float, bool]:
    """UNet + decoder graphs of this model (ldm_fast.export.onnx_export), exported once and
    kept on disk keyed by the weights, the precision and the exporter's source: the dynamo
    export takes minutes on a small CPU, and re-exporting identical weights measures nothing."""
    import hashlib
    import inspect
    import json

    from ldm_fast.data.latent_cache import first_stage_fingerprint
    from ldm_fast.export import onnx_export as E

    key = ("export", precision)
    if key in cache:
        return cache[key]
    h = hashlib.sha1(first_stage_fingerprint(base).encode())
    h.update(inspect.getsource(E).encode())
    h.update(f"{precision}:{E.DEFAULT_OPSET}:{torch.__version__}".encode())
    folder = onnx_cache_dir() / f"{base.cfg.name}-{precision}-{h.hexdigest()[:16]}"
    record = folder / "graphs.json"
    if record.is_file():
        cache[key] = (folder, json.loads(record.read_text()), 0.0, True)
        return cache[key]
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    graphs = E.export_all(base, None, folder, precision, graphs=["unet", "decoder"])
    seconds = time.perf_counter() - t0
    record.write_text(json.dumps(graphs))     # last: its presence means the export completed
    cache[key] = (folder, graphs, seconds, False)
    return cache[key]


def _exported_runner(backend, dtype, base, size, device, batch, cache) -> Runner:
    """ONNX Runtime or TensorRT on the exported graphs, through ldm_fast.export.runtime's
    Denoiser / Decoder (the samplers' model interface over a graph)."""
    precision = next(k for k, v in DTYPES.items() if v == dtype)
    try:
        from ldm_fast.export import onnx_export as E
        from ldm_fast.export import runtime as R
    except ImportError as e:
        raise Skip(f"ldm_fast.export is not importable ({e})") from None
    cuda = device.type == "cuda"
    if backend == "onnxruntime":
        try:
            import onnxruntime as ort
        except ImportError:
            raise Skip("onnxruntime is not installed") from None
        if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip("onnxruntime has no CUDAExecutionProvider here (onnxruntime-gpu not installed); "
                       f"available: {ort.get_available_providers()}")
        if not cuda and dtype == torch.bfloat16:
            raise Skip("onnxruntime's CPU provider has no bf16 Conv kernel")
        providers = ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    try:
        folder, graphs, export_s, reused = _export_graphs(base, precision, cache)
    except Exception as e:  # noqa: BLE001 - an export failure is this backend's, not the run's
        raise Skip(f"ONNX export failed: {type(e).__name__}: {e}") from None
    notes = [f"graphs {'reused from' if reused else 'exported to'} {folder}"
             + ("" if reused else f" in {export_s:.0f} s (not in the first-call time)")]
    if backend == "onnxruntime":
        key = ("ort", precision)
        if key not in cache:
            make = R.ort_graph_maker(folder, providers, torch.get_num_threads() if not cuda else None)
            try:
                cache[key] = R.graph_parts(make, graphs)  # the deployment's factory
            except Exception as e:  # noqa: BLE001 - e.g. a provider that fails to start
                raise Skip(f"onnxruntime session failed: {type(e).__name__}: {e}") from None
        unet, decode = cache[key]
        if cuda:
            notes.append("inputs and outputs cross host memory each call (no I/O binding)")
        return Runner(backend, dtype, "eager", unet, _as_dtype(decode, dtype), notes)
    # TensorRT: one engine per graph with a static profile at this batch (the fastest case).
    from ldm_fast.export import tensorrt_build as T

    key = ("trt", precision, batch)
    if key not in cache:
        h, w = size.latent[1:]
        engines = {}
        for name, b in (("unet", batch * size.cfg_factor), ("decoder", batch)):
            spec = E.GraphSpec.from_json(graphs[name]["spec"])
            tokens = size.context[0] if size.context else 1
            profile = T.profile_shapes(spec, (b, b, b), (h, h, h), (w, w, w),
                                       max(1, base.cfg.autoencoder.factor), (tokens,) * 3)
            engine = folder / "engines" / f"{name}-b{b}.plan"
            try:
                if not engine.is_file():
                    T.build_engine(folder / graphs[name]["file"], engine, spec, profile,
                                   timing_cache=folder / "engines" / "timing.cache")
                engines[name] = R.trt_graph(engine)
            except Exception as e:  # noqa: BLE001 - a build failure is this backend's, not the run's
                raise Skip(f"TensorRT engine for {name} failed: {type(e).__name__}: {e}") from None
        cache[key] = R.graph_parts(lambda name, rec: engines[name], graphs)
    unet, decode = cache[key]
    notes.append("strongly typed engines, static profile per batch, CUDA graphs in the runtime")
    return Runner(backend, dtype, "eager", unet, _as_dtype(decode, dtype), notes)


def _as_dtype(fn, dtype):
    """The graph runtimes return float32 images; the other backends return the model dtype."""
    return lambda z: fn(z).to(dtype)


# ----------------------------------------------------------------------------- measuring

def make_inputs(size: Size, batch: int, dtype, device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    n = batch * size.cfg_factor
    x = torch.randn(n, *size.latent, generator=g).to(device, dtype)
    t = torch.full((n,), 500.0, device=device)
    cond = {"context": torch.randn(n, *size.context, generator=g).to(device, dtype)} if size.context else {}
    z = torch.randn(batch, *size.latent, generator=g).to(device, dtype)
    return x, t, cond, z


def sample_images(runner: Runner, size: Size, schedule, batch: int, steps: int, sampler: str,
                  device, seed: int = 0):
    """noise → sampler loop in latent space → decode through ldm_fast.pipeline.Pipeline, with
    the runner as denoiser and decoder, in the runner's dtype and kernels."""
    pipe = Pipeline(size.cfg, schedule, runner.unet, runner.decode, device=device, dtype=runner.dtype,
                    kernels=runner.kernels, backend=runner.backend)
    cond = uncond = None
    if size.context:
        c = torch.randn((batch, *size.context), generator=torch.Generator().manual_seed(seed)).to(device)
        cond, uncond = {"context": c}, {"context": torch.zeros_like(c)}
    images, _ = pipe.sample(batch, cond, uncond, seed=seed, sampler=sampler, steps=steps, guidance=size.guidance,
                            latent_size=size.latent[1:])
    return images


def _call(runner: Runner, fn):
    """Run fn with ldm_fast.ops switched to the runner's kernels (sampler updates included)."""
    with ops.backend(runner.kernels):
        return fn()


def _interleaved(runners: list[Runner], make_fn, device, warmup: int, reps: int,
                 track_memory: bool = False) -> list[dict]:
    """Time make_fn(runner)() for every runner, the repetitions interleaved (rep 1 of every
    runner, then rep 2, …): on shared or throttling machines a slow spell then hits all
    backends alike instead of whichever happened to run during it, which keeps the ratios
    honest. Returns per runner summarize() (+ 'peak_bytes' with track_memory on CUDA), or
    {'error': …} for a runner that raised (it is left out of the remaining repetitions)."""
    fns = [make_fn(r) for r in runners]
    samples = [[] for _ in runners]
    peaks = [None for _ in runners]
    errors = [None for _ in runners]
    for i, (r, fn) in enumerate(zip(runners, fns)):
        try:
            for _ in range(warmup):
                _call(r, fn)
        except Exception as e:  # noqa: BLE001 - one failing backend must not hide the others
            errors[i] = f"{type(e).__name__}: {e}"
    for _ in range(reps):
        for i, (r, fn) in enumerate(zip(runners, fns)):
            if errors[i]:
                continue
            try:
                with bl.peak_memory(device) as mem:
                    dt, _ = bl.time_once(lambda: _call(r, fn), device)
            except Exception as e:  # noqa: BLE001
                errors[i] = f"{type(e).__name__}: {e}"
                continue
            samples[i].append(dt)
            if track_memory and mem["bytes"] is not None:
                peaks[i] = max(peaks[i] or 0, mem["bytes"])
    out = []
    for s, p, err in zip(samples, peaks, errors):
        if err:
            out.append({"error": err})
            continue
        stats = bl.summarize(s)
        if p is not None:
            stats["peak_bytes"] = p
        out.append(stats)
    return out


@torch.inference_mode()
def run_group(runners: list[Runner], size: Size, schedule, batch: int, args, device, reference) -> list[dict]:
    """Measure every runner at one (size, batch); a runner that fails is reported with its
    error and left out of the remaining phases."""
    rows, live, inputs = {}, [], {}
    for r in runners:
        x, t, cond, z = inputs[id(r)] = make_inputs(size, batch, r.dtype, device)
        try:
            first_unet, out = bl.time_once(lambda: _call(r, lambda: r.unet(x, t, cond)), device)
            first_decode, _ = bl.time_once(lambda: _call(r, lambda: r.decode(z)), device)
        except Exception as e:  # noqa: BLE001 - one failing backend must not hide the others
            rows[id(r)] = {"error": f"{type(e).__name__}: {e}"}
            bl.log(f"[{size.name}] {r.backend} batch {batch}: FAILED {rows[id(r)]['error']}")
            continue
        row = rows[id(r)] = {"first_call_s": {"unet": first_unet, "decode": first_decode}}
        ref = reference.get(batch)
        if ref is not None:
            diff = (out.float() - ref).abs().max().item()
            row["max_abs_diff_vs_eager_fp32"] = diff
            row["rel_diff_vs_eager_fp32"] = diff / max(ref.abs().max().item(), 1e-12)
        live.append(r)

    def unet_fn(r):
        x, t, cond, _ = inputs[id(r)]
        return lambda: r.unet(x, t, cond)

    def decode_fn(r):
        z = inputs[id(r)][3]
        return lambda: r.decode(z)

    def sample_fn(r):
        return lambda: sample_images(r, size, schedule, batch, args.steps, args.sampler, device)

    phases = [("unet_step_s", unet_fn, args.warmup, args.reps)]
    if args.sample_reps:
        phases += [("decode_s", decode_fn, 1, args.reps), ("sample_s", sample_fn, 1, args.sample_reps)]
    for key, make_fn, warmup, reps in phases:
        for r, stats in zip(list(live), _interleaved(live, make_fn, device, warmup, reps,
                                                     track_memory=key == "sample_s")):
            if "error" in stats:
                rows[id(r)]["error"] = f"{key}: {stats['error']}"
                bl.log(f"[{size.name}] {r.backend} batch {batch}: FAILED {rows[id(r)]['error']}")
                live.remove(r)
                continue
            peak = stats.pop("peak_bytes", None)
            rows[id(r)][key] = stats
            if key == "sample_s":
                rows[id(r)]["peak_mem_MiB"] = None if peak is None else peak / 2**20
                rows[id(r)]["images_per_s"] = batch / stats["median"]
    return [rows[id(r)] for r in runners]


def parse_backends(text: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, dt = item.partition(":")
        dt = dt or "fp32"
        if name not in BACKENDS:
            raise SystemExit(f"--backends: unknown backend {name!r} (known: {', '.join(BACKENDS)})")
        if dt not in DTYPES:
            raise SystemExit(f"--backends: unknown dtype {dt!r} in {item!r} (fp32, fp16, bf16)")
        out.append((name, dt))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sizes", default=None, help="comma list of tiny, sd (default: tiny,sd on CUDA; "
                    "tiny on CPU, where sd is listed as skipped)")
    ap.add_argument("--batches", default=None, help="images per sampling run, comma list (default "
                    "per size and device; guidance doubles the UNet batch)")
    ap.add_argument("--backends", default=None, help="comma list of name:dtype (default: every "
                    "backend, each measured or listed as skipped)")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps per image (default 20)")
    ap.add_argument("--sampler", default="ddim", choices=sorted(samplers.SAMPLERS))
    ap.add_argument("--warmup", type=int, default=3, help="untimed UNet calls before timing")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions of a UNet call / decode")
    ap.add_argument("--sample-reps", type=int, default=3, help="timed sampling runs (0: none)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode")
    ap.add_argument("--ckpt", default=None, help="trained RUN_DIR for the tiny size (default: random weights)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--quick", action="store_true", help="smallest run that exercises everything "
                    "(batch 2, 3 steps, 2 repetitions): proves the script works, numbers are noise")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/throughput-<machine>.json); "
                    "a Markdown table is written next to it")
    bl.add_threads_arg(ap)
    args = ap.parse_args(argv)
    bl.set_threads(args.threads)
    device = bl.pick_device(args.device)
    dev = "cuda" if device.type == "cuda" else "cpu"
    if args.quick:
        args.warmup, args.reps, args.sample_reps, args.steps = 1, 2, 1, 3
        args.batches = args.batches or "2"
    sizes = (args.sizes or ("tiny,sd" if dev == "cuda" else "tiny")).split(",")
    backends = parse_backends(args.backends or DEFAULT_BACKENDS[dev])
    info = bl.machine(device)
    bl.log(f"throughput on {info['name']}: torch {info['torch']}, sizes {sizes}, "
           f"backends {[f'{b}:{d}' for b, d in backends]}")

    results, skipped, models = [], [], {}
    if dev == "cpu" and args.backends is None:
        skipped += [{"size": "*", "backend": f"{b}:{d}", "reason": why}
                    for (b, d), why in CPU_DEFAULT_LEAVES_OUT.items()]
    if dev == "cpu" and "sd" not in sizes:
        skipped.append({"size": "sd", "backend": "*", "reason": "SD-size UNet on CPU (≈1.6 TFLOP per "
                        "guided step) is left out of the default run; --sizes tiny,sd measures one "
                        "UNet call (eager fp32, batch 1)"})
    for size_name in sizes:
        size = make_size(size_name, args.ckpt)
        batches = [int(b) for b in (args.batches or DEFAULT_BATCHES[dev][size_name]).split(",")]
        size_backends, size_args = backends, args
        if dev == "cpu" and size_name == "sd":
            # One tiny measurement: a single UNet call, no sampling (minutes of CPU otherwise).
            size_backends = [("eager", "fp32")]
            size_args = argparse.Namespace(**{**vars(args), "warmup": 1, "reps": 1, "sample_reps": 0})
            size.guidance = 1.0
            batches = [1]
            for b, d in backends:
                if (b, d) != ("eager", "fp32"):
                    skipped.append({"size": "sd", "backend": f"{b}:{d}",
                                    "reason": "SD size on CPU: only one eager fp32 UNet call is measured"})
        t0 = time.perf_counter()
        base = build_model(size, device)
        params = sum(p.numel() for p in base.unet.parameters())
        models[size_name] = {"config": size.cfg.name, "unet_params": params, "latent": list(size.latent),
                             "context": list(size.context) if size.context else None,
                             "guidance": size.guidance, "ckpt": size.ckpt,
                             "flops": {b: count_flops(size, b * size.cfg_factor) for b in batches}}
        bl.log(f"[{size_name}] UNet {params / 1e6:.1f} M params, built in {time.perf_counter() - t0:.1f} s; "
               f"UNet call FLOPs per image {models[size_name]['flops'][batches[0]]['unet_call']['total'] / batches[0] / 1e9:.2f} G")
        cache, reference = {}, {}
        with torch.inference_mode():
            for b in batches:
                x, t, cond, _ = make_inputs(size, b, torch.float32, device)
                with ops.backend("eager"):
                    reference[b] = base(x, t, cond).float()
        skipped_here = set()
        for b in batches:
            runners = []
            for backend, dt in size_backends:
                if (backend, dt) in skipped_here:
                    continue
                try:
                    runners.append(make_runner(backend, DTYPES[dt], base, size, device, b, cache,
                                               args.compile_mode))
                except Skip as e:   # the reason holds for every batch size
                    skipped_here.add((backend, dt))
                    skipped.append({"size": size_name, "backend": f"{backend}:{dt}", "reason": str(e)})
                    bl.log(f"[{size_name}] {backend}:{dt}: skipped — {e}")
            for runner, row in zip(runners, run_group(runners, size, base.schedule, b, size_args,
                                                      device, reference)):
                dt = next(k for k, v in DTYPES.items() if v == runner.dtype)
                row.update({"size": size_name, "backend": f"{runner.backend}:{dt}", "batch": b},
                           unet_batch=b * size.cfg_factor, dtype=dt, notes=runner.notes,
                           steps=args.steps, sampler=args.sampler)
                _add_flop_rates(row, models[size_name]["flops"][b], info, runner.dtype)
                results.append(row)
                bl.log(f"[{size_name}] {row['backend']} batch {b}: step "
                       f"{bl.fmt_spread(row.get('unet_step_s'))} ms, "
                       f"{bl.fmt(row.get('images_per_s'))} img/s")
        del base, cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _add_speedups(results)

    payload = {"benchmark": "throughput", "machine": info, "args": vars(args), "models": models,
               "results": results, "skipped": skipped,
               "notes": _notes(dev), "smoke": args.quick}
    # The device's default size set writes throughput-<machine>.json; other sets get their own
    # file (throughput-sd-<machine>.json, …) so a partial run never replaces the full one.
    default_sizes = "tiny,sd" if dev == "cuda" else "tiny"
    name = "throughput" if ",".join(sizes) == default_sizes else "throughput-" + "-".join(sizes)
    out = Path(args.out) if args.out else bl.default_out(name, info, smoke=args.quick)
    bl.write_report(payload, out, markdown(payload))
    return 1 if any("error" in r for r in results) else 0


def _notes(dev: str) -> list[str]:
    notes = ["speed-ups are against eager fp32 in the same run, same size and batch",
             "UNet step = one model call (guidance doubles its batch); images/s = batch / "
             "(noise → steps → decode)"]
    if dev == "cpu":
        notes.append("CPU: absolute times are CPU times on shared cores — quote the ratios only")
    return notes


def _add_flop_rates(row: dict, flops: dict, info: dict, dtype) -> None:
    step = row.get("unet_step_s")
    if not step:
        return
    row["unet_tflops_per_s"] = flops["unet_call"]["total"] / step["median"] / 1e12
    peak = bl.peak_flops(info.get("gpu"), dtype)
    if peak:
        row["peak_flops"], row["peak_kind"] = peak
        row["unet_frac_of_peak"] = flops["unet_call"]["total"] / step["median"] / peak[0]


def _add_speedups(results: list[dict]) -> None:
    base = {(r["size"], r["batch"]): r for r in results
            if r["backend"] == "eager:fp32" and "unet_step_s" in r}
    for r in results:
        b = base.get((r["size"], r["batch"]))
        if b is None or "unet_step_s" not in r:
            continue
        r["speedup_vs_eager_fp32"] = {"unet_step": b["unet_step_s"]["median"] / r["unet_step_s"]["median"]}
        if "decode_s" in r and "decode_s" in b:
            r["speedup_vs_eager_fp32"]["decode"] = b["decode_s"]["median"] / r["decode_s"]["median"]
        if "images_per_s" in r and "images_per_s" in b:
            r["speedup_vs_eager_fp32"]["images_per_s"] = r["images_per_s"] / b["images_per_s"]


def markdown(payload: dict) -> str:
    info = payload["machine"]
    cpu = info["device_type"] == "cpu"
    unit = "ms, CPU" if cpu else "ms"
    lines = [f"### Sampling throughput — {info['name']}",
             f"{info['date']}; torch {info['torch']}, triton {info['triton']}, onnxruntime "
             f"{info['onnxruntime']}" + (f", CUDA {info.get('cuda')}" if not cpu else "")
             + f"; {payload['args']['sampler']} {payload['args']['steps']} steps per image.", ""]
    if cpu:
        lines += ["CPU run: absolute times are from shared CPU cores and are labelled as such; "
                  "only the speed-up ratios are meaningful.", ""]
    headers = ["size", "backend", "batch", f"UNet step ({unit}), median (IQR)", f"decode ({unit})",
               "images/s" + (" (CPU)" if cpu else ""), "× eager fp32 (step / img/s)", "first call s",
               "peak MiB", "TFLOP/s" + (" (CPU)" if cpu else ""), "% peak", "max |Δ| vs fp32"]
    rows = []
    for r in payload["results"]:
        if "error" in r:
            rows.append([r["size"], r["backend"], r["batch"], "FAILED: " + r["error"][:80]] + [""] * 8)
            continue
        sp = r.get("speedup_vs_eager_fp32", {})
        first = r.get("first_call_s", {})
        rows.append([
            r["size"], r["backend"], f"{r['batch']} (UNet {r['unet_batch']})" if r["unet_batch"] != r["batch"] else r["batch"],
            bl.fmt_spread(r.get("unet_step_s")), bl.fmt_spread(r.get("decode_s")),
            bl.fmt(r.get("images_per_s")),
            f"{bl.fmt(sp.get('unet_step'), '.2f')} / {bl.fmt(sp.get('images_per_s'), '.2f')}",
            f"{bl.fmt(first.get('unet'), '.2g')} + {bl.fmt(first.get('decode'), '.2g')}",
            bl.fmt(r.get("peak_mem_MiB"), ".0f"), bl.fmt(r.get("unet_tflops_per_s"), ".3g"),
            bl.fmt(None if r.get("unet_frac_of_peak") is None else 100 * r["unet_frac_of_peak"], ".1f"),
            bl.fmt(r.get("max_abs_diff_vs_eager_fp32"), ".2g"),
        ])
    lines.append(bl.table(headers, rows))
    if payload["skipped"]:
        lines += ["", "Skipped:"]
        lines += [f"- {s['size']} {s['backend']}: {s['reason']}" for s in payload["skipped"]]
    lines += ["", "FLOPs per UNet call (analytic: conv + linear + attention matmuls, 2 per MAC):"]
    for name, m in payload["models"].items():
        for b, f in m["flops"].items():
            u = f["unet_call"]
            lines.append(f"- {name}, UNet batch {int(b) * (2 if m['guidance'] != 1.0 else 1)}: "
                         f"{u['total'] / 1e9:.3g} GFLOP (torch FlopCounterMode: "
                         f"{bl.fmt(None if u['torch_flop_counter'] is None else u['torch_flop_counter'] / 1e9, '.3g')}); "
                         f"decode {f['decode_per_image']['total'] / 1e9:.3g} GFLOP per image; "
                         f"{m['unet_params'] / 1e6:.1f} M UNet parameters")
            break
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
