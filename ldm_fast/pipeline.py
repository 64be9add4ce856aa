"""`Pipeline`: noise → sampler loop in latent space → decode — the one place images are made.

    from ldm_fast import Pipeline
    pipe = Pipeline.from_run_dir("runs/tiny-text")
    images = pipe(prompt="a large red circle on a plain background", n=4).pil

The same object runs a trained run directory with the PyTorch modules (`from_run_dir`, or
`from_model` for objects in memory) and an export folder on ONNX Runtime or TensorRT
(`from_export_dir`): only who evaluates the denoiser, the decoder and τθ differs. Sampling,
evaluation, deployment, training's final grid, the task metrics and the benchmarks all call it.

Seeds: image i of a call with `seed=s` starts from noise drawn from a CPU torch.Generator
seeded s + i, then moved to the device, so a seed gives the same image on CPU and CUDA and
on every backend, whatever the batch size (a deterministic sampler's image i is the image of
`seed=s + i, n=1`). Stochastic sampler updates draw from the generator of the batch's first
image, continuing after its noise.

Defaults come from `sampling_defaults(cfg)`; keyword options a sampler takes beyond the common
ones (e.g. `spacing=`, `timesteps=`) pass through to ldm_fast.samplers.sample unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm_fast import ops, samplers
from ldm_fast.pipeline_inputs import as_batch, cycle, json_value, length, take
from ldm_fast.tiling import decode_tiled

# Pipeline keyword → the conditioner's encode_inputs keyword.
TASK_INPUTS = {"prompt": "prompts", "class_labels": "classes", "boxes": "boxes", "semantic": "semantic",
               "lr": "lr", "image": "image", "mask": "mask"}


@dataclass(frozen=True)
class SamplingDefaults:
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance: float = 3.0  # applies where the task has a null condition; 1 (off) elsewhere


def sampling_defaults(cfg) -> SamplingDefaults:
    """The sampling defaults of a run (every CLI and the Pipeline take theirs from here). The
    config stores none yet; a run-specific default belongs here when it does."""
    return SamplingDefaults()


@dataclass
class PipelineOutput:
    images: torch.Tensor                 # (n, 3, H, W) in [-1, 1], float32 on the CPU
    latents: torch.Tensor                # (n, C, h, w) the sampler's final latents, CPU
    seeds: list[int]                     # the noise seed of each image
    metadata: list[dict] = field(default_factory=list)  # per image: prompt, seed, sampler, …

    @property
    def pil(self) -> list:
        """The images as PIL RGB images."""
        from PIL import Image

        from ldm_fast.images import to_uint8

        return [Image.fromarray(a) for a in to_uint8(self.images)]


# ----------------------------------------------------------------------------- the pipeline

class Pipeline:
    """Denoiser, decoder, schedule and conditioner of one model on one backend. Call it with
    the task's inputs to get images; see the module docstring."""

    def __init__(self, cfg, schedule, denoiser, decode, conditioner=None, *, device="cpu", dtype=None,
                 kernels: str | None = None, backend: str = "torch", name: str = "", model=None,
                 decode_dtype=None, cuda_graph: bool = False):
        if kernels is not None and kernels not in ops.BACKENDS:
            raise ValueError(f"kernels: expected one of {ops.BACKENDS}, got {kernels!r}")
        self.cfg, self.schedule, self.denoiser, self.decode = cfg, schedule, denoiser, decode
        self.conditioner, self.device, self.dtype = conditioner, torch.device(device), dtype
        self.kernels, self.backend, self.name, self.model = kernels, backend, name or cfg.name, model
        self.decode_dtype = decode_dtype  # latents are cast to it before decoding (None: as they are)
        self.defaults = sampling_defaults(cfg)
        # Replay each denoising step as a CUDA graph (ldm_fast.cuda_graph; torch backend, CUDA
        # only, falls back with one line). Opt-in until a GPU run has measured it.
        self.cuda_graph = cuda_graph
        self._graphed = None

    # -------------------------------------------------------------- construction

    @classmethod
    def from_model(cls, model, conditioner=None, *, kernels=None, dtype=None, name: str = "",
                   cuda_graph: bool = False) -> "Pipeline":
        """A LatentDiffusion (and its task conditioner) already in memory, on its device."""
        device = model.scale_factor.device
        return cls(model.cfg, model.schedule, model, model.decode, conditioner, device=device, dtype=dtype,
                   kernels=kernels, name=name, model=model, cuda_graph=cuda_graph)

    @classmethod
    def from_run_dir(cls, path, device=None, kernels: str | None = None, dtype=None,
                     cuda_graph: bool = False) -> "Pipeline":
        """A run directory written by `python -m ldm_fast.train` (EMA weights, conditioner,
        tokenizer) with the PyTorch modules. kernels: eager | triton | auto (default: the
        run's config, else $LDM_KERNELS); dtype: the UNet's, e.g. torch.bfloat16 (default
        fp32) — the first stage and τθ stay fp32 (half-precision decoding costs quality, and
        the concat conditioners encode through the first stage)."""
        from ldm_fast.run import load_model
        from ldm_fast.tasks import load_conditioner, task_of

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, cond_state = load_model(path, device)
        if dtype is not None:
            model.unet.to(dtype)
        cfg = model.cfg
        conditioner = None
        if task_of(cfg).conditional:
            conditioner = load_conditioner(path, model, cond_state, device=device)
        if kernels is None and cfg.kernels != "auto":
            kernels = cfg.kernels
        pipe = cls.from_model(model, conditioner, kernels=kernels, dtype=dtype, name=Path(path).name,
                              cuda_graph=cuda_graph)
        pipe.decode_dtype = torch.float32 if dtype is not None else None
        return pipe

    @classmethod
    def from_export_dir(cls, path, backend: str = "onnxruntime", device=None, *, run_dir=None, providers=None,
                        threads: int | None = None, cuda_graphs: bool = True,
                        kernels: str | None = None) -> "Pipeline":
        """An export folder (`python -m ldm_fast.export`): the .onnx graphs on ONNX Runtime,
        the TensorRT engines, or — backend "torch" — the run directory its manifest records
        (or `run_dir`) with the PyTorch modules. cuda_graphs: TensorRT's engines replay as CUDA
        graphs (default on, as the engines are static); the torch backend takes the opt-in
        `cuda_graph` of from_run_dir instead (set the attribute)."""
        from ldm_fast.export.runtime import BACKENDS, open_export, recorded_run_dir

        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if backend == "torch":
            return cls.from_run_dir(recorded_run_dir(path, run_dir), device=device, kernels=kernels)
        parts = open_export(path, backend, device=device, providers=providers, threads=threads,
                            cuda_graphs=cuda_graphs)
        return cls(parts.cfg, parts.schedule, parts.denoiser, parts.decoder, parts.conditioner,
                   device=parts.device, kernels=kernels, backend=backend,
                   name=parts.manifest.get("name") or Path(path).name)

    # -------------------------------------------------------------- facts

    @property
    def factor(self) -> int:
        return max(1, self.cfg.autoencoder.factor)

    @property
    def latent_channels(self) -> int:
        return self.cfg.unet.out_channels

    @property
    def inputs(self) -> tuple[str, ...]:
        """The Pipeline keywords this model's task takes (e.g. ('prompt',))."""
        if self.conditioner is None:
            return ()
        back = {v: k for k, v in TASK_INPUTS.items()}
        return tuple(back[name] for name in self.conditioner.inputs)

    @property
    def supports_guidance(self) -> bool:
        return self.conditioner is not None and self.conditioner.supports_guidance

    # -------------------------------------------------------------- the per-step model

    def _denoiser(self, image_guidance: tuple[torch.Tensor, float] | None = None):
        """The callable the sampler calls every step: model(x, t, cond) → prediction. The one
        place it is built (a CUDA-graph wrapper goes here). image_guidance = (lr, scale) wraps
        it in super-resolution image guidance (torch backend)."""
        if image_guidance is None or image_guidance[1] == 0:
            if self.cuda_graph and self.backend == "torch":
                if self._graphed is None:   # kept: its captured graphs serve later calls too
                    from ldm_fast.cuda_graph import CUDAGraphDenoiser

                    self._graphed = CUDAGraphDenoiser(self.denoiser)
                return self._graphed
            return self.denoiser
        if self.model is None:
            raise ValueError("sr_guidance needs the PyTorch modules (backend torch)")
        from ldm_fast.tasks import SRImageGuidance

        lr, scale = image_guidance
        return SRImageGuidance(self.model, lr, scale)

    # -------------------------------------------------------------- sampling

    def _settings(self, sampler, steps, eta, guidance) -> tuple[str, int, float, float]:
        d = self.defaults
        sampler = sampler or d.sampler
        steps = d.steps if steps is None else int(steps)
        eta = d.eta if eta is None else float(eta)
        if guidance is None:
            guidance = d.guidance if self.supports_guidance else 1.0
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"sampler: expected one of {sorted(samplers.SAMPLERS)}, got {sampler!r}")
        if steps < 1:
            raise ValueError(f"steps: must be positive, got {steps}")
        if guidance != 1.0 and not self.supports_guidance:
            raise ValueError(f"guidance {guidance}: task {self.cfg.conditioning.task!r} has no null condition, "
                             "so classifier-free guidance cannot apply; use guidance 1")
        return sampler, steps, eta, float(guidance)

    def _latent_size(self, height, width) -> tuple[int, int]:
        f = self.factor
        height = height or self.cfg.data.resolution
        width = width or self.cfg.data.resolution
        if height % f or width % f:
            raise ValueError(f"height/width {height}x{width}: must be multiples of the first stage's factor {f}")
        return height // f, width // f

    def _cast(self, cond: dict | None) -> dict | None:
        if cond is None or self.dtype is None:
            return cond
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in cond.items()}

    @torch.no_grad()
    def sample(self, n: int, cond: dict | None = None, uncond: dict | None = None, *, seed: int = 0,
               sampler: str | None = None, steps: int | None = None, eta: float | None = None,
               guidance: float = 1.0, latent_size: tuple[int, int] | None = None, tile: int = 0,
               denoiser=None, on_step=None, **sampler_options) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch from encoded conditions (cond / uncond dicts as the samplers take them):
        (images in [-1, 1], latents), both on the pipeline's device. Image i's noise comes from
        a CPU generator seeded seed + i; `on_step()` is called after every sampler step."""
        sampler = sampler or self.defaults.sampler
        steps = self.defaults.steps if steps is None else steps
        eta = self.defaults.eta if eta is None else eta
        if latent_size is None:
            latent_size = self._latent_size(None, None)
        shape = (self.latent_channels, *latent_size)
        generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(n)]
        x = torch.stack([torch.randn(shape, generator=g) for g in generators])
        x = x.to(self.device, self.dtype or torch.float32)
        user_callback = sampler_options.pop("callback", None)
        # The run's own timestep grid (a converted checkpoint: its original's) unless overridden.
        sampler_options = {**samplers.schedule_defaults(self.cfg, sampler),
                           **{k: v for k, v in sampler_options.items() if v is not None}}

        def callback(info):
            if user_callback is not None:
                user_callback(info)
            if on_step is not None:
                on_step()

        use_callback = user_callback is not None or on_step is not None
        with ops.backend(self.kernels):
            z = samplers.sample(sampler, denoiser or self._denoiser(), x, self.schedule, steps=steps, eta=eta,
                                cond=self._cast(cond), uncond=self._cast(uncond), guidance=guidance,
                                generator=generators[0], callback=callback if use_callback else None,
                                **sampler_options)
            zd = z if self.decode_dtype is None else z.to(self.decode_dtype)
            if tile:
                images = decode_tiled(self.decode, zd, self.factor, tile=tile, overlap=max(1, tile // 4))
            else:
                images = self.decode(zd)
        return images.float().clamp(-1, 1), z

    @torch.no_grad()
    def __call__(self, *, prompt=None, negative_prompt=None, class_labels=None, boxes=None, image=None,
                 mask=None, lr=None, semantic=None, n: int | None = None, seed: int = 0,
                 sampler: str | None = None, steps: int | None = None, eta: float | None = None,
                 guidance: float | None = None, height: int | None = None, width: int | None = None,
                 batch_size: int | None = None, tile: int = 0, sr_guidance: float = 0.0,
                 progress: bool = True, **sampler_options) -> PipelineOutput:
        """`n` images for the task's inputs (default n: the number of inputs given, else 1;
        fewer inputs than n are cycled). height/width in pixels (default: the training
        resolution; concat tasks take theirs from the input). guidance defaults to
        sampling_defaults' where the task has a null condition, 1 (off) elsewhere;
        negative_prompt replaces the empty prompt of the null condition. batch_size images
        go through the sampler at once (default all n); tile > 0 decodes in tiles of that many
        latent pixels. Returns a PipelineOutput (.images tensors, .pil PIL images)."""
        given = {k: v for k, v in dict(prompt=prompt, class_labels=class_labels, boxes=boxes, semantic=semantic,
                                       lr=lr, image=image, mask=mask).items() if v is not None}
        if self.conditioner is None and (given or negative_prompt is not None):
            raise ValueError(f"this model is unconditional: it takes no inputs (got {sorted(given)})")
        batches = {k: as_batch(k, v) for k, v in given.items()}
        if n is None:
            n = max((length(v) for v in batches.values()), default=1)
        if n < 1:
            raise ValueError(f"n: must be positive, got {n}")
        batches = {k: cycle(k, v, n) for k, v in batches.items()}
        negative = cycle("negative_prompt", as_batch("negative_prompt", negative_prompt), n) \
            if negative_prompt is not None else None
        sampler, steps, eta, guidance = self._settings(sampler, steps, eta, guidance)
        batch_size = batch_size or n
        if batch_size < 1:
            raise ValueError(f"batch_size: must be positive, got {batch_size}")
        starts = list(range(0, n, batch_size))
        bar = None
        if progress:
            from ldm_fast.progress import progress_bar

            bar = progress_bar(len(starts) * steps, f"sampling {n} ({sampler} {steps})")
        images, latents = [], []
        try:
            for start in starts:
                m = min(batch_size, n - start)
                part = {k: take(v, list(range(start, start + m))) for k, v in batches.items()}
                out, z = self._batch(part, negative[start:start + m] if negative else None, m, seed + start,
                                     sampler, steps, eta, guidance, height, width, tile, sr_guidance,
                                     bar.update if bar is not None else None, sampler_options)
                images.append(out.cpu())
                latents.append(z.float().cpu())
        finally:
            if bar is not None:
                bar.close()
        seeds = [seed + i for i in range(n)]
        meta = self._metadata(batches, negative, seeds, sampler, steps, eta, guidance)
        return PipelineOutput(torch.cat(images), torch.cat(latents), seeds, meta)

    def _batch(self, part, negative, m, seed, sampler, steps, eta, guidance, height, width, tile, sr_guidance,
               on_step, sampler_options):
        cond = uncond = None
        if self.conditioner is not None:
            kwargs = {TASK_INPUTS[k]: v for k, v in part.items()}
            if negative is not None:
                kwargs["negative_prompts"] = negative
            cond, uncond = self.conditioner.encode_inputs(**kwargs, n=m)
        fixed = self.conditioner.latent_size(cond) if self.conditioner is not None else None
        latent_size = self._latent_size(height, width)
        if fixed is not None:
            if (height or width) and tuple(fixed) != latent_size:
                raise ValueError(f"height/width: the task's input fixes the output at "
                                 f"{fixed[0] * self.factor}x{fixed[1] * self.factor} pixels")
            latent_size = tuple(fixed)
        image_guidance = (part["lr"], sr_guidance) if sr_guidance else None
        images, z = self.sample(m, cond, uncond if guidance != 1.0 else None, seed=seed, sampler=sampler,
                                steps=steps, eta=eta, guidance=guidance, latent_size=latent_size, tile=tile,
                                denoiser=self._denoiser(image_guidance), on_step=on_step, **sampler_options)
        finish = getattr(self.conditioner, "finish", None)
        if finish is not None:
            images = finish(images, {TASK_INPUTS[k]: v for k, v in part.items()})
        return images, z

    def _metadata(self, batches, negative, seeds, sampler, steps, eta, guidance) -> list[dict]:
        """Per image: what made it (written into each PNG's text chunks by the CLIs)."""
        out = []
        for i, seed in enumerate(seeds):
            rec = {"model": self.name, "backend": self.backend, "seed": seed, "sampler": sampler,
                   "steps": steps, "eta": eta, "guidance": guidance}
            if negative is not None:
                rec["negative_prompt"] = negative[i]
            for k, v in batches.items():
                if k == "prompt":
                    rec["prompt"] = v[i]
                elif k == "class_labels":
                    rec["class_label"] = int(v[i])
                elif k == "boxes":  # one layout: [[x0, y0, x1, y1, class], …] (or boxes, labels)
                    rec["boxes"] = json.dumps([json_value(t[i]) for t in v] if isinstance(v, tuple)
                                              else json_value(v[i]))
            out.append(rec)
        return out
