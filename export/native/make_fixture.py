"""Write export/native/fixture.json: reference values from the Python implementation that the
native ctest (test_native.cpp) must reproduce.

    python export/native/make_fixture.py            # rewrites fixture.json next to this file

Everything comes from the code the Python runtimes use: schedules from ldm_fast.diffusion,
timestep grids from ldm_fast.samplers.make_timesteps, DDIM steps from the eager reference
kernels/sampler_steps.py ddim_step_ref in float64, whole DDIM loops from
samplers.sample_ddim with an analytic denoiser, image grids from ldm_fast/images.py, and the
engine sidecar from export/tensorrt_build.make_sidecar (with made-up GPU / TensorRT facts),
written as sidecar_example.json the way build_engine writes a real one.
Deterministic: rerunning it gives the same file.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from ldm_fast import samplers
from ldm_fast.diffusion import make_schedule
from ldm_fast.export.onnx_export import reference_ops
from ldm_fast.images import make_grid
from ldm_fast.kernels.sampler_steps import ddim_step_ref

HERE = Path(__file__).resolve().parent


def _f32(t: torch.Tensor) -> list[float]:
    """Values exactly representable in float32 (what the C++ side stores), as Python floats."""
    return [float(v) for v in t.float().double().flatten().tolist()]


def schedules() -> list[dict]:
    out = []
    for kind, T, start, end in [("linear", 1000, 0.0015, 0.0195), ("linear", 1000, 0.00085, 0.012),
                                ("cosine", 1000, 0.0015, 0.0195), ("linear", 7, 0.01, 0.2)]:
        ac = make_schedule(kind, T, start, end).alphas_cumprod
        idx = sorted(set(list(range(0, T, 37)) + [1, 2, T - 2, T - 1]))
        out.append({"kind": kind, "timesteps": T, "linear_start": start, "linear_end": end,
                    "index": idx, "alphas_cumprod": [float(ac[i]) for i in idx]})
    return out


def timesteps() -> list[dict]:
    sched = make_schedule("linear", 1000)
    small = make_schedule("linear", 10, 0.01, 0.2)
    cases = [(sched, s) for s in (1, 2, 3, 4, 5, 6, 7, 9, 10, 20, 25, 27, 50, 64, 100, 101, 250, 333, 999, 1000)]
    cases += [(small, s) for s in (1, 2, 3, 4, 5, 10)]
    return [{"T": sch.num_timesteps, "steps": s, "ts": samplers.make_timesteps(sch, s)} for sch, s in cases]


def ddim_cases() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ac = make_schedule("linear", 1000).alphas_cumprod
    out = []
    for param in ("eps", "v"):
        for (t, t_next), eta, guidance in [((999, 959), 0.0, 1.0), ((500, 459), 0.0, 3.5),
                                           ((41, 0), 0.7, 2.0), ((0, None), 0.0, 1.0), ((300, 200), 1.0, 1.0)]:
            a_t, a_next = float(ac[t]), (1.0 if t_next is None else float(ac[t_next]))
            n = 13
            x = torch.randn(n, generator=g).float().double()
            cond = torch.randn(n, generator=g).float().double()
            uncond = torch.randn(n, generator=g).float().double() if guidance != 1.0 else None
            noise = torch.randn(n, generator=g).float().double() if eta > 0 and a_next < 1 else None
            stacked = torch.cat([uncond, cond]) if uncond is not None else cond
            # (1, n) rows: ddim_step_ref splits a stacked [u; c] output along dim 0.
            res = ddim_step_ref(x[None], stacked.view(-1, n), a_t, a_next, eta=eta,
                                noise=None if noise is None else noise[None], parameterization=param,
                                guidance=guidance)
            out.append({"param": param, "a_t": a_t, "a_next": a_next, "eta": eta, "guidance": guidance,
                        "x": _f32(x), "cond": _f32(cond), "uncond": None if uncond is None else _f32(uncond),
                        "noise": None if noise is None else _f32(noise), "expected": res[0].tolist()})
    return out


def ddim_loops() -> list[dict]:
    """Whole deterministic DDIM runs with the denoiser m(x, t) = k·x (any fixed map exercises
    the plan: timesteps, ᾱ per step, the final step to ᾱ = 1)."""
    out = []
    g = torch.Generator().manual_seed(1)
    for param, steps, k in [("eps", 10, 0.5), ("v", 7, 0.3), ("eps", 1, 0.8)]:
        sched = make_schedule("linear", 1000, parameterization=param)
        x = torch.randn(9, generator=g).float().double()[None]
        with reference_ops():  # the eager update, whatever the caller's kernel switch
            res = samplers.sample_ddim(lambda z, t, c: k * z, x, sched, steps=steps)
        out.append({"param": param, "steps": steps, "k": k, "x": _f32(x), "expected": res[0].tolist()})
    return out


def _halfway_values(n: int) -> list[float]:
    """float32 v with (v + 1)·127.5 == k + 0.5 exactly for even k: round-half-to-even gives k,
    round-half-away gives k + 1, so the grid catches the wrong rounding rule."""
    import numpy as np

    out = []
    for k in range(64, 255, 2):
        v = np.float32((k + 0.5) / 127.5 - 1)
        for _ in range(64):
            if (v + np.float32(1)) * np.float32(127.5) == np.float32(k + 0.5):
                out.append(float(v))
                break
            v = np.nextafter(v, np.float32(1))
        if len(out) == n:
            return out
    raise AssertionError("no halfway values found")


def grid() -> dict:
    g = torch.Generator().manual_seed(2)
    images = (torch.rand(3, 3, 4, 5, generator=g) * 2.4 - 1.2).float()  # some values outside [-1, 1]
    images[0, 0, 0, :5] = torch.tensor([-1.0, 1.0, 0.0, -1 + 1 / 127.5, 1 / 255])
    images[1, 1, 1, :5] = torch.tensor(_halfway_values(5))  # (v + 1)·127.5 = even + ½ exactly
    arr = make_grid(images)
    return {"b": 3, "h": 4, "w": 5, "pad": 2, "images": _f32(images), "grid_h": arr.shape[0],
            "grid_w": arr.shape[1], "expected": [int(v) for v in arr.flatten().tolist()]}


def sidecar(out_dir: Path = HERE) -> dict:
    from ldm_fast.config import get_preset
    from ldm_fast.export.onnx_export import unet_spec
    from ldm_fast.export.tensorrt_build import make_sidecar, profile_shapes

    cfg = get_preset("cin256-ldm-vq-4")
    spec = unet_spec(cfg, "fp16")
    profile = profile_shapes(spec, (1, 2, 8), (32, 64, 96), (32, 64, 128), 4, (1, 1, 1))
    sched = make_schedule("linear", 10, 0.01, 0.2)
    info = {"scale_factor": 0.18215, "latent_channels": 3, "factor": 4, "spatial_multiple": 8,
            "schedule": {"kind": "linear", "timesteps": 10, "linear_start": 0.01, "linear_end": 0.2,
                         "parameterization": "eps", "alphas_cumprod": [float(a) for a in sched.alphas_cumprod]}}
    side = make_sidecar(spec, "10.13.0.35", {"name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]},
                        "unet.onnx", profile, 4 << 30, "timing.cache", info, 12.5)
    side["built_at"] = "2025-01-01T00:00:00+00:00"  # deterministic file
    side["source_onnx"]["sha256"] = "0" * 64
    side["note"] = "unicode \u00e9\u4e2d \\ \"quoted\" \ud83d\ude00"  # escapes the parser must handle
    checks = [
        {"trt": "10.13.0.35", "gpu": "NVIDIA H100 80GB HBM3", "cc": [9, 0], "mentions": []},
        {"trt": "11.0.0.1", "gpu": "NVIDIA H100 80GB HBM3", "cc": [9, 0], "mentions": ["TensorRT version"]},
        {"trt": "10.13.0.35", "gpu": "NVIDIA A100-SXM4-80GB", "cc": [8, 0],
         "mentions": ["compute capability", "GPU: engine built on"]},
    ]
    (out_dir / "sidecar_example.json").write_text(json.dumps(side, indent=1) + "\n")
    return {"file": "sidecar_example.json", "alphas_cumprod": info["schedule"]["alphas_cumprod"],
            "inputs": [t.name for t in spec.inputs], "checks": checks}


def halves() -> dict:
    """float32 values → fp16 / bf16 bits as numpy and torch round them (nearest even), incl.
    subnormals, exact halfway cases, overflow and values outside both ranges."""
    import numpy as np

    g = torch.Generator().manual_seed(3)
    special = [0.0, -0.0, 1.0, -2.5, 65504.0, 65519.996, 65520.0, 1e6, -1e6, 6.1e-5, 5.96e-8, 2.98e-8,
               1e-10, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 3.0e38, 1.00390625, 1.01171875]
    values = torch.tensor(special + (torch.randn(40, generator=g) * 10 ** torch.randint(-6, 5, (40,),
                                     generator=g).double()).tolist(), dtype=torch.float32)
    f = values.numpy()
    with np.errstate(over="ignore"):  # 1e6 and 3e38 overflow to inf in fp16, on purpose
        half = f.astype(np.float16)
    return {"values": [float(v) for v in f.tolist()],
            "half": [int(b) for b in half.view(np.uint16).tolist()],
            "bf16": [int(b) & 0xFFFF for b in values.to(torch.bfloat16).view(torch.int16).tolist()]}


def checksums() -> dict:
    data = list(b"ldm_fast native \x00\xff PNG check " * 3)
    return {"data": data, "crc32": zlib.crc32(bytes(data)), "adler32": zlib.adler32(bytes(data))}


def main(path: Path = HERE / "fixture.json") -> Path:
    fixture = {"generated_by": "export/native/make_fixture.py", "schedules": schedules(),
               "timesteps": timesteps(), "ddim": ddim_cases(), "ddim_loops": ddim_loops(), "grid": grid(),
               "sidecar": sidecar(path.parent), "checksums": checksums(),
               "halves": halves()}
    path.write_text(json.dumps(fixture, indent=None, separators=(",", ":")) + "\n")
    return path


if __name__ == "__main__":
    print(f"wrote {main()}")
