"""The two training stages as plain functions: `train_autoencoder` then `train_ldm`.

Both share the same skeleton (`_Loop`):
- deterministic, resumable batch order, sliced per rank (ldm_fast.distributed), and every random
  number drawn for the global batch from one seeded generator, so N ranks match one rank with
  N times the batch and a resumed run matches an unbroken one;
- a non-finite loss (on any rank) skips the step and is counted; too many in a row stop the run
  with the last good checkpoint intact;
- checkpoints carry model, optimizer, EMA, step, RNG state and, for shard streams, the data
  position; written by rank 0 only (FSDP shards gathered first), also on SIGTERM (preemption)
  before the process exits;
- metrics go to `metrics.jsonl` and a tqdm bar (rank 0).
"""

from __future__ import annotations

import json
import logging
import signal
import time
import warnings
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ldm_fast import checkpoint as ckpt
from ldm_fast import distributed, fsdp
from ldm_fast.autoencoder import build_first_stage
from ldm_fast.config import Config, TrainConfig, save_yaml, to_dict
from ldm_fast.data.epoch import EpochIndex
from ldm_fast.data.stream import PositionTracker, ShardStream
from ldm_fast.diffusion import diffusion_loss
from ldm_fast.images import save_grid
from ldm_fast.losses import AutoencoderLoss
from ldm_fast.model import EMA, LatentDiffusion
from ldm_fast.run import RunDir

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses."""


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint was written and the run stopped."""


# ----------------------------------------------------------------------------- data order

class ResumableSampler(Sampler):
    """Shuffled indices, epoch e permuted by seed + e, starting at a global sample position.
    With several ranks every global batch of `batch_size × world_size` indices is cut in
    contiguous per-rank slices, so the union over ranks is exactly what one rank with the whole
    global batch would read. Resuming at step s continues with the batches an unbroken run sees.
    Indices are `EpochIndex` values, so datasets with per-item randomness vary it per epoch."""

    def __init__(self, size: int, seed: int, start: int = 0, batch_size: int = 1,
                 ctx: distributed.DistContext = distributed.DistContext()):
        self.size, self.seed, self.start = size, seed, start
        self.batch_size, self.ctx = batch_size, ctx

    def _global_stream(self):
        position = self.start
        while True:
            epoch, offset = divmod(position, self.size)
            perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from (EpochIndex(i, epoch) for i in perm[offset:].tolist())
            position = (epoch + 1) * self.size

    def __iter__(self):
        stream, global_batch = self._global_stream(), self.batch_size * self.ctx.world_size
        lo = self.ctx.rank * self.batch_size
        while True:
            batch = [next(stream) for _ in range(global_batch)]
            yield from batch[lo:lo + self.batch_size]

    def __len__(self):  # an endless stream; DataLoader only needs a number
        return 2 ** 62


def make_loader(dataset: Dataset, tc: TrainConfig, seed: int, step: int, num_workers: int,
                ctx: distributed.DistContext, data_state: dict | None = None):
    """Batches from `step` on. A map-style dataset is indexed by ResumableSampler (its place
    follows from the step); a shard stream resumes from `data_state`, the positions stored in
    the checkpoint, and the returned PositionTracker reports them for the next one."""
    if isinstance(dataset, ShardStream):
        loader = DataLoader(dataset.resume(data_state), batch_size=tc.batch_size, num_workers=num_workers,
                            persistent_workers=num_workers > 0)
        return PositionTracker(loader, ctx.world_size * max(1, num_workers), num_workers, data_state)
    start = step * tc.grad_accum * tc.batch_size * ctx.world_size
    sampler = ResumableSampler(len(dataset), seed, start, tc.batch_size, ctx)
    # Its own generator: creating the iterator would otherwise draw from the global RNG and
    # shift every later random number of a resumed run.
    return DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, drop_last=True,
                      num_workers=num_workers, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- shared loop parts

def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    if device.type != "cuda":
        warnings.warn(f"precision={precision} requested on {device.type}: mixed precision is used on "
                      "CUDA only; training in fp32", stacklevel=3)
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _lr_at(step: int, tc: TrainConfig, ctx: distributed.DistContext) -> float:
    lr = tc.lr * (ctx.world_size * tc.grad_accum if tc.scale_lr else 1)
    if tc.warmup_steps and step < tc.warmup_steps:
        return lr * (step + 1) / tc.warmup_steps
    return lr


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state(), "rng.train": generator.get_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def _restore_rng(tensors: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    generator.set_state(tensors["rng.train"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def _all_finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


def _wrap(module: torch.nn.Module, tc: TrainConfig, ctx: distributed.DistContext, device: torch.device):
    """DDP around a trainable module; the module itself in a world of one or when it is
    already sharded by FSDP (train_ldm shards before building the optimizer, ldm_fast.fsdp)."""
    if not ctx.enabled or fsdp.is_sharded(module):
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def _no_sync(wrapped: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP) of a non-final micro-batch."""
    if sync:
        return nullcontext()
    return fsdp.no_gradient_sync(wrapped) if fsdp.is_sharded(wrapped) else wrapped.no_sync()


class _SigtermFlag:
    """Turns SIGTERM (preemption) into a flag the loop checks after each step."""

    def __init__(self):
        self.raised = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside some test runners): no handler
            self.previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


class _Loop:
    """Step bookkeeping shared by both stages: logging, non-finite accounting, progress."""

    def __init__(self, stage: str, tc: TrainConfig, run: RunDir, start: int, progress: bool,
                 ctx: distributed.DistContext):
        self.stage, self.tc, self.run, self.ctx = stage, tc, run, ctx
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.bar = tqdm(total=tc.steps, initial=start, desc=stage, disable=not (progress and ctx.is_main),
                        dynamic_ncols=True)
        self.t0, self.images = time.perf_counter(), 0

    def check_finite(self, loss: torch.Tensor, step: int) -> bool:
        # Agreed across ranks: one rank skipping a backward the others run would hang DDP.
        finite = float(distributed.all_reduce_mean(torch.isfinite(loss).all().float().reshape(1)))
        if finite == 1.0:
            self.nonfinite_streak = 0
            return True
        self.nonfinite_total += 1
        self.nonfinite_streak += 1
        log.warning("%s step %d: non-finite loss, step skipped (%d in a row, %d in total)",
                    self.stage, step, self.nonfinite_streak, self.nonfinite_total)
        if self.nonfinite_streak > self.tc.max_nonfinite:
            raise TrainingDiverged(
                f"{self.stage}: {self.nonfinite_streak} consecutive non-finite losses at step {step}; "
                f"stopped. The last good checkpoint in {self.run.stage_dir(self.stage)} is intact "
                "(try a lower learning rate, fp32, or gradient clipping)")
        return False

    def log(self, step: int, logs: dict) -> None:
        self.images += self.tc.batch_size * self.tc.grad_accum * self.ctx.world_size
        self.bar.update(1)
        if not self.ctx.is_main or ((step + 1) % self.tc.log_every and step + 1 != self.tc.steps):
            return
        elapsed = time.perf_counter() - self.t0
        record = {"stage": self.stage, "step": step + 1, "images_per_s": self.images / max(elapsed, 1e-9),
                  "nonfinite_skipped": self.nonfinite_total}
        record.update({k: float(v) for k, v in logs.items()})
        self.run.append_metrics(record)
        self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", img_s=f"{record['images_per_s']:.1f}")
        self.t0, self.images = time.perf_counter(), 0

    def should_save(self, step: int, sigterm: _SigtermFlag) -> bool:
        return (step + 1) % self.tc.ckpt_every == 0 or step + 1 == self.tc.steps or sigterm.raised

    def close(self):
        self.bar.close()


def _data_state(batches) -> str | None:
    """The data position to store in a checkpoint, as JSON (collective: call on every rank)."""
    if not isinstance(batches, PositionTracker):
        return None  # map-style data: the position follows from the step
    return json.dumps(batches.state(distributed.all_gather_object))


def _save_then_maybe_stop(loop: _Loop, save, step: int, sigterm: _SigtermFlag, batches) -> None:
    data_state = _data_state(batches)
    save(step + 1, data_state)  # every rank: FSDP gathers shards; only rank 0 writes
    distributed.barrier()
    if sigterm.raised:
        loop.close()
        raise Preempted(f"{loop.stage}: SIGTERM received; checkpoint at step {step + 1} written to "
                        f"{loop.run.stage_dir(loop.stage)}; continue with --resume")


# ----------------------------------------------------------------------------- stage 1

def train_autoencoder(cfg: Config, run: RunDir, train_set: Dataset, heldout: Dataset,
                      device: str = "cpu", resume: bool = False, progress: bool = True) -> torch.nn.Module:
    """Train the first stage (L1 + perceptual + PatchGAN) and write `autoencoder.safetensors`."""
    device, ctx = torch.device(device), distributed.current()
    tc = cfg.train_autoencoder
    torch.manual_seed(cfg.seed)  # before any module is built: the initial weights follow the seed
    model = build_first_stage(cfg.autoencoder).to(device)
    if cfg.autoencoder.kind == "identity":
        if ctx.is_main:
            run.save_first_stage(model, cfg)
        return model
    loss_fn = AutoencoderLoss(cfg.autoencoder).to(device)
    disc = loss_fn.discriminator
    gen_params = list(model.parameters())
    opt_g = torch.optim.Adam(gen_params, lr=tc.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=tc.lr, betas=(0.5, 0.9))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    start, data_state = 0, None
    if resume and (found := ckpt.latest_valid(run.stage_dir("autoencoder"))):
        path, tensors, meta = found
        model.load_state_dict(ckpt.unflatten_state("model.", tensors))
        disc.load_state_dict(ckpt.unflatten_state("disc.", tensors))
        ckpt.optimizer_from_tensors("opt_g.", opt_g, tensors, meta["opt_g"])
        ckpt.optimizer_from_tensors("opt_d.", opt_d, tensors, meta["opt_d"])
        _restore_rng(tensors, generator)
        start, data_state = int(meta["step"]), json.loads(meta.get("data", "null"))
        log.info("autoencoder: resumed from %s at step %d", path, start)

    def save(step: int, data_state: str | None):
        if not ctx.is_main:
            return
        if not _all_finite(model):
            log.error("autoencoder: parameters are not finite at step %d; checkpoint NOT written", step)
            return
        t_g, j_g = ckpt.optimizer_to_tensors("opt_g.", opt_g)
        t_d, j_d = ckpt.optimizer_to_tensors("opt_d.", opt_d)
        tensors = {**ckpt.flatten_state("model.", model.state_dict()),
                   **ckpt.flatten_state("disc.", disc.state_dict()),
                   **t_g, **t_d, **_rng_tensors(generator)}
        meta = {"step": step, "opt_g": j_g, "opt_d": j_d, "config": json.dumps(to_dict(cfg))}
        ckpt.save_checkpoint(ckpt.checkpoint_path(run.stage_dir("autoencoder"), step), tensors,
                             {**meta, **({"data": data_state} if data_state else {})})
        ckpt.prune(run.stage_dir("autoencoder"), tc.keep_last)

    # The generator is wrapped in DDP; the discriminator is called several times per step
    # (real, fake, and inside the generator loss), so its gradients are averaged by hand.
    wrapped = _wrap(model, tc, ctx, device)
    loop = _Loop("autoencoder", tc, run, start, progress, ctx)
    batches = iter(make_loader(train_set, tc, cfg.seed, start, cfg.data.num_workers, ctx, data_state))
    model.train()
    logvar = getattr(model, "logvar", None)
    f, z_ch = cfg.autoencoder.factor, cfg.autoencoder.z_channels
    with _SigtermFlag() as sigterm:
        for step in range(start, tc.steps):
            for group in (*opt_g.param_groups, *opt_d.param_groups):
                group["lr"] = _lr_at(step, tc, ctx)
            opt_g.zero_grad(set_to_none=True)
            logs, micro_batches, ok = {}, [], True
            for micro in range(tc.grad_accum):
                x = next(batches)["image"].to(device)
                noise = distributed.randn_global((x.shape[0], z_ch, x.shape[2] // f, x.shape[3] // f),
                                                 generator, ctx, device)
                sync = micro == tc.grad_accum - 1 or not ctx.enabled
                with _autocast(device, cfg.precision), (nullcontext() if sync else wrapped.no_sync()):
                    recon, reg_loss, stats = wrapped(x, noise=noise)
                    loss, logs = loss_fn.generator(x, recon.float(), reg_loss, step, model.decoder.last_layer, logvar)
                    if not loop.check_finite(loss, step):
                        ok = False
                        break
                    (loss / tc.grad_accum).backward()
                micro_batches.append((x, recon.detach()))
                logs.update(loss=loss.detach(), **stats)
            if ok:
                if tc.grad_clip:
                    torch.nn.utils.clip_grad_norm_(gen_params, tc.grad_clip)
                opt_g.step()
                opt_d.zero_grad(set_to_none=True)
                d_ok = True
                for x, recon in micro_batches:
                    with _autocast(device, cfg.precision):
                        d_loss, d_logs = loss_fn.discriminator_loss(x, recon.float(), step)
                    if d_loss is None or not loop.check_finite(d_loss, step):
                        d_ok = False
                        break
                    (d_loss / tc.grad_accum).backward()
                    logs.update(d_logs)
                if d_ok:
                    distributed.average_gradients(disc.parameters())
                    opt_d.step()
            loop.log(step, logs)
            if loop.should_save(step, sigterm):
                _save_then_maybe_stop(loop, save, step, sigterm, batches)
    loop.close()
    model.eval()
    if ctx.is_main:
        run.save_first_stage(model, cfg)
        with torch.no_grad():
            x = torch.stack([heldout[i]["image"] for i in range(min(16, len(heldout)))]).to(device)
            recon = model(x, sample=False)[0]
            save_grid(torch.cat([x, recon]), run.path / "reconstructions.png", nrow=len(x),
                      upscale=4 if x.shape[-1] <= 64 else 1)
    return model


# ----------------------------------------------------------------------------- stage 2

def train_ldm(cfg: Config, run: RunDir, first_stage: torch.nn.Module, train_set: Dataset,
              device: str = "cpu", resume: bool = False, progress: bool = True,
              conditioner=None) -> tuple[LatentDiffusion, EMA | None]:
    """Train the latent UNet (ε/v objective) on the frozen first stage; writes `ldm.safetensors`.

    `conditioner(batch, generator) -> cond dict` turns a data batch into the UNet's
    conditioning (see model.py); its `.module`, when not None, is trained jointly. None trains
    unconditionally. A batch carrying 'latent' (cached latents) skips the first-stage encoder."""
    device, ctx = torch.device(device), distributed.current()
    tc = cfg.train_ldm
    torch.manual_seed(cfg.seed + 1)
    model = LatentDiffusion(cfg, first_stage).to(device)
    cond_module = getattr(conditioner, "module", None)
    ema = EMA(model.unet, tc.ema_decay).to(device) if tc.ema_decay > 0 else None
    sharded = ctx.enabled and tc.strategy == "fsdp"
    if sharded:  # before the optimizer sees the parameters: they become shards
        fsdp.shard_unet(model.unet)
        if ema is not None:
            fsdp.shard_unet(ema.module)
    unet_params = list(model.unet.parameters())
    cond_params = list(cond_module.parameters()) if cond_module else []
    params = unet_params + cond_params
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    start, data_state = 0, None
    scale_known = not (cfg.diffusion.scale_by_std and cfg.autoencoder.kind == "kl")
    if resume and (found := ckpt.latest_valid(run.stage_dir("ldm"))):
        path, tensors, meta = found
        fsdp.load_full_state_dict(model.unet, ckpt.unflatten_state("unet.", tensors))
        model.scale_factor.copy_(tensors["scale_factor"])
        if ema is not None:
            fsdp.load_full_state_dict(ema, ckpt.unflatten_state("ema.", tensors))
        if cond_module is not None:
            cond_module.load_state_dict(ckpt.unflatten_state("cond.", tensors))
        fsdp.optimizer_from_tensors("opt.", opt, tensors, meta["opt"])
        _restore_rng(tensors, generator)
        start, scale_known = int(meta["step"]), True
        data_state = json.loads(meta.get("data", "null"))
        log.info("ldm: resumed from %s at step %d", path, start)

    def save(step: int, data_state: str | None):
        # FSDP: every rank takes part in gathering the shards; rank 0 writes.
        if not (ctx.is_main or sharded):
            return
        unet_state = fsdp.full_state_dict(model.unet, keep=ctx.is_main)
        t_opt, j_opt = fsdp.optimizer_to_tensors("opt.", opt, keep=ctx.is_main)
        ema_state = fsdp.full_state_dict(ema, keep=ctx.is_main) if ema is not None else None
        if not ctx.is_main:
            return
        if not all(torch.isfinite(v).all() for v in unet_state.values() if v.is_floating_point()):
            log.error("ldm: parameters are not finite at step %d; checkpoint NOT written", step)
            return
        tensors = {**ckpt.flatten_state("unet.", unet_state), **t_opt,
                   "scale_factor": model.scale_factor, **_rng_tensors(generator)}
        if ema_state is not None:
            tensors.update(ckpt.flatten_state("ema.", ema_state))
        if cond_module is not None:
            tensors.update(ckpt.flatten_state("cond.", cond_module.state_dict()))
        meta = {"step": step, "opt": j_opt, "config": json.dumps(to_dict(cfg))}
        ckpt.save_checkpoint(ckpt.checkpoint_path(run.stage_dir("ldm"), step), tensors,
                             {**meta, **({"data": data_state} if data_state else {})})
        ckpt.prune(run.stage_dir("ldm"), tc.keep_last)

    unet = model.unet
    model.unet = _wrap(unet, tc, ctx, device)  # LatentDiffusion.forward now goes through DDP
    loop = _Loop("ldm", tc, run, start, progress, ctx)
    batches = iter(make_loader(train_set, tc, cfg.seed + 1, start, cfg.data.num_workers, ctx, data_state))
    model.train()
    T = model.schedule.num_timesteps
    try:
        with _SigtermFlag() as sigterm:
            for step in range(start, tc.steps):
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, tc, ctx)
                opt.zero_grad(set_to_none=True)
                logs, ok = {}, True
                for micro in range(tc.grad_accum):
                    batch = next(batches)
                    with torch.no_grad():
                        z = _latents(model, batch, generator, ctx, device)
                    if not scale_known:
                        # scale_by_std: measured once, on the first batch of stage 2 (paper App. G),
                        # over the global batch so every rank agrees.
                        value = model.set_scale_from_latents(z)
                        z = z * value
                        log.info("ldm: latent scale factor set to %.5f (1/std of the first batch)", value)
                        if ctx.is_main:
                            run.append_metrics({"stage": "ldm", "step": step, "scale_factor": value})
                        scale_known = True
                    t = distributed.randint_global(T, z.shape[0], generator, ctx, device)
                    noise = distributed.randn_global(z.shape, generator, ctx, device)
                    sync = micro == tc.grad_accum - 1 or not ctx.enabled
                    with _autocast(device, cfg.precision), _no_sync(model.unet, sync):
                        cond = conditioner(batch, generator) if conditioner else {}
                        loss = diffusion_loss(model, z, model.schedule, cond=cond, loss_type=cfg.diffusion.loss,
                                              t=t, noise=noise)
                        if not loop.check_finite(loss, step):
                            ok = False
                            break
                        (loss / tc.grad_accum).backward()
                    logs["loss"] = loss.detach()
                if ok:
                    if cond_module is not None:
                        # τθ is reached through the conditioner, not through DDP: average by hand.
                        distributed.average_gradients(cond_module.parameters())
                    if tc.grad_clip and sharded:
                        logs["grad_norm"] = fsdp.clip_grad_norm(unet_params, cond_params, tc.grad_clip)
                    elif tc.grad_clip:
                        logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                    opt.step()
                    if ema is not None:
                        ema.update(unet)
                loop.log(step, logs)
                if loop.should_save(step, sigterm):
                    _save_then_maybe_stop(loop, save, step, sigterm, batches)
    finally:
        model.unet = unet
    loop.close()
    if sharded:  # what callers (sampling, evaluation) get is a plain model, on every rank
        model, ema = _unsharded(cfg, first_stage, model, ema, device)
    model.eval()
    if ctx.is_main:
        run.save_ldm(model, ema, cond_module, cfg)
    return model, ema


def _unsharded(cfg: Config, first_stage, model: LatentDiffusion, ema: EMA | None, device):
    """Plain copies of an FSDP-trained model and its EMA (collective: gathers every shard)."""
    plain = LatentDiffusion(cfg, first_stage).to(device)
    plain.unet.load_state_dict(fsdp.full_state_dict(model.unet))
    plain.scale_factor.copy_(model.scale_factor)
    plain_ema = None
    if ema is not None:
        plain_ema = EMA(plain.unet, ema.decay).to(device)
        plain_ema.load_state_dict(fsdp.full_state_dict(ema))
    return plain, plain_ema


def _latents(model: LatentDiffusion, batch: dict, generator, ctx, device) -> torch.Tensor:
    """Scaled latents of a batch: from the cache when it carries them, else encoded now. The KL
    posterior noise is drawn for the global batch (see ldm_fast.distributed)."""
    if "latent" in batch:
        return batch["latent"].to(device) * model.scale_factor
    x = batch["image"].to(device)
    noise = None
    if model.cfg.autoencoder.kind == "kl":
        f = model.factor
        shape = (x.shape[0], model.cfg.autoencoder.z_channels, x.shape[2] // f, x.shape[3] // f)
        noise = distributed.randn_global(shape, generator, ctx, device)
    return model.encode(x, noise=noise)


def save_config(cfg: Config, run: RunDir) -> None:
    save_yaml(cfg, run.path / "config.yaml")
