"""CUDA-graph capture of the denoising step: `CUDAGraphDenoiser(f)(x, t, cond)` ≡ `f(x, t, cond)`.

A UNet step launches a few hundred kernels; at small batch the GPU idles between them while
the host dispatches the next (~10 µs per custom op). A CUDA graph records the whole step once
and replays it with one launch. The rules that make replay equal to a fresh call:

- Static buffers. A graph reads and writes fixed addresses, so each call copies x, t and the
  cond tensors into buffers allocated once per signature, replays, and hands back the output
  buffer (cloned by default: the next replay overwrites it, and samplers keep outputs around).
- Warm-up outside the capture, on a side stream: the first calls autotune Triton kernels,
  pick cuDNN algorithms and allocate workspaces; none of that may happen inside a capture.
- Re-capture on signature change: shapes, dtypes, devices and cond keys (and non-tensor cond
  values) form the key; a new key captures a new graph (the last few are kept, sharing one
  memory pool), e.g. the doubled batch of classifier-free guidance.
- One clear fallback: when capture is impossible (CPU tensors, no CUDA, an op that
  synchronises or allocates on the host inside the step) the call runs `f` eagerly and says
  why once per reason.

Inference only: calls run under torch.no_grad(). Used as `samplers.sample_ddim(CUDAGraphDenoiser(model), …)`.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable

import torch

Denoiser = Callable[..., torch.Tensor]


def signature(x: torch.Tensor, t: torch.Tensor, cond: dict | None) -> tuple:
    """What a captured graph is specialised to: every tensor's shape, dtype and device, the
    cond keys, and non-tensor cond values (compared by value)."""
    def sig(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype, v.device)
        return ("value", v)
    return sig(x), sig(t), tuple(sorted((k, sig(v)) for k, v in (cond or {}).items()))


class StaticInputs:
    """Buffers at fixed addresses for one signature, filled by copy before each replay."""

    def __init__(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None):
        def alloc(v):
            return torch.empty_like(v, memory_format=torch.preserve_format) if isinstance(v, torch.Tensor) else v
        self.x, self.t = alloc(x), alloc(t)
        self.cond = {k: alloc(v) for k, v in (cond or {}).items()}
        self.fill(x, t, cond)

    def fill(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None) -> None:
        self.x.copy_(x)
        self.t.copy_(t)
        for k, v in (cond or {}).items():
            if isinstance(v, torch.Tensor):
                self.cond[k].copy_(v)

    def args(self) -> tuple:
        return self.x, self.t, self.cond


def capture_cuda_graph(fn: Denoiser, static: StaticInputs, warmup: int, pool=None) -> tuple[Callable, torch.Tensor]:
    """Warm `fn` up on a side stream, capture one call on the static inputs; returns (replay,
    static output)."""
    side = torch.cuda.Stream(device=static.x.device)
    side.wait_stream(torch.cuda.current_stream(static.x.device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(*static.args())
    torch.cuda.current_stream(static.x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(*static.args())
    return graph.replay, out


class CUDAGraphDenoiser:
    """Wrap a denoiser `fn(x, t, cond) -> out` so that each call replays a CUDA graph captured
    for its input signature (see the module docstring for the rules)."""

    def __init__(self, fn: Denoiser, warmup: int = 2, clone_output: bool = True, max_graphs: int = 4,
                 capture: Callable | None = None):
        """warmup: untimed calls before each capture; clone_output: return a copy of the
        static output; max_graphs: captured signatures kept (least recently used dropped);
        capture: the capture function (default `capture_cuda_graph`; tests pass a stand-in)."""
        if warmup < 1:
            raise ValueError(f"warmup: need at least one call before capture, got {warmup}")
        self.fn, self.warmup, self.clone_output, self.max_graphs = fn, warmup, clone_output, max_graphs
        self._capture = capture or capture_cuda_graph
        self._graphs: OrderedDict[tuple, tuple[StaticInputs, Callable, torch.Tensor]] = OrderedDict()
        self._failed: set[tuple] = set()
        self._said: set[str] = set()
        self._pool = None
        self.captures = 0   # graphs captured so far (re-captures included)

    def _fallback(self, reason: str, x, t, cond):
        if reason not in self._said:
            self._said.add(reason)
            warnings.warn(f"cuda_graph: {reason}; running the denoiser without a CUDA graph", stacklevel=3)
        return self.fn(x, t, cond)

    def _can_capture(self, x: torch.Tensor) -> str | None:
        if self._capture is not capture_cuda_graph:
            return None
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if not x.is_cuda:
            return f"capture needs CUDA tensors, got {x.device}"
        return None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        cond = {} if cond is None else cond
        why = self._can_capture(x)
        if why:
            return self._fallback(why, x, t, cond)
        key = signature(x, t, cond)
        if key in self._failed:
            return self.fn(x, t, cond)
        entry = self._graphs.get(key)
        if entry is None:
            static = StaticInputs(x, t, cond)
            if self._pool is None and self._capture is capture_cuda_graph:
                self._pool = torch.cuda.graph_pool_handle()
            try:
                replay, out = self._capture(self.fn, static, self.warmup, self._pool)
            except Exception as e:   # capture is impossible for this step: say so, run eagerly
                self._failed.add(key)
                return self._fallback(f"capture failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                                      x, t, cond)
            self.captures += 1
            entry = self._graphs[key] = (static, replay, out)
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            entry[0].fill(x, t, cond)
        _, replay, out = entry
        replay()
        return out.clone() if self.clone_output else out
