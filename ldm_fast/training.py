"""The two training stages: `train_autoencoder` then `train_ldm`. Each builds its model and
optimizers, says what one step computes (ldm_fast.trainer.Phase) and what its checkpoint
holds, and runs the one `Trainer` loop (resume, saving, accumulation, precision, signals,
non-finite handling), with:
- deterministic, resumable batch order, sliced per rank (ldm_fast.distributed), and every random
  number drawn for the global batch from one seeded generator, so N ranks match one rank with
  N times the batch and a resumed run matches an unbroken one;
- checkpoints carrying model, optimizer, EMA, step, RNG state and, for shard streams, the data
  position; written by rank 0 only (FSDP shards gathered first), also on SIGTERM.
"""

from __future__ import annotations

import logging

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm_fast import checkpoint as ckpt
from ldm_fast import distributed, fsdp
from ldm_fast.autoencoder import build_first_stage
from ldm_fast.config import Config, TrainConfig, save_yaml
from ldm_fast.data.epoch import EpochIndex
from ldm_fast.data.stream import PositionTracker, ShardStream
from ldm_fast.diffusion import diffusion_loss
from ldm_fast.images import save_grid
from ldm_fast.losses import AutoencoderLoss
from ldm_fast.model import EMA, LatentDiffusion
from ldm_fast.run import RunDir
from ldm_fast.trainer import Phase, Preempted, Trainer, TrainingDiverged

__all__ = ["Preempted", "ResumableSampler", "TrainingDiverged", "make_loader", "save_config", "train_autoencoder",
           "train_ldm"]

log = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------- shared

def _wrap(module: torch.nn.Module, tc: TrainConfig, ctx: distributed.DistContext, device: torch.device):
    """DDP around a trainable module; the module itself in a world of one or when it is
    already sharded by FSDP (train_ldm shards before building the optimizer, ldm_fast.fsdp)."""
    if not ctx.enabled or fsdp.is_sharded(module):
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


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
    # The reconstruction error first: the learned-variance NLL (rec/exp(logvar) + logvar, summed
    # over pixels) goes far below zero as logvar falls, which alone reads like a bug.
    trainer = Trainer("autoencoder", cfg, tc, run, device, cfg.seed, progress,
                      shown={"rec_l1": "l1", "nll": "nll", "d_weight": "d_weight"})
    generator = trainer.generator

    def load(tensors, meta):
        model.load_state_dict(ckpt.unflatten_state("model.", tensors))
        disc.load_state_dict(ckpt.unflatten_state("disc.", tensors))
        ckpt.optimizer_from_tensors("opt_g.", opt_g, tensors, meta["opt_g"])
        ckpt.optimizer_from_tensors("opt_d.", opt_d, tensors, meta["opt_d"])

    def state(keep: bool):
        t_g, j_g = ckpt.optimizer_to_tensors("opt_g.", opt_g)
        t_d, j_d = ckpt.optimizer_to_tensors("opt_d.", opt_d)
        tensors = {**ckpt.flatten_state("model.", model.state_dict()),
                   **ckpt.flatten_state("disc.", disc.state_dict()), **t_g, **t_d}
        return tensors, {"opt_g": j_g, "opt_d": j_d}

    if resume:
        trainer.resume(load)
    # The generator is wrapped in DDP; the discriminator is called several times per step
    # (real, fake, and inside the generator loss), so its gradients are averaged by hand.
    wrapped = _wrap(model, tc, ctx, device)
    batches = iter(make_loader(train_set, tc, cfg.seed, trainer.start, cfg.data.num_workers, ctx,
                               trainer.data_state))
    phases = autoencoder_phases(cfg, model, loss_fn, opt_g, opt_d, batches, generator, device, forward=wrapped)
    model.train()
    trainer.fit(phases, batches, state)
    model.eval()
    if ctx.is_main:
        run.save_first_stage(model, cfg)
        with torch.no_grad():
            x = torch.stack([heldout[i]["image"] for i in range(min(16, len(heldout)))]).to(device)
            recon = model(x, sample=False)[0]
            save_grid(torch.cat([x, recon]), run.path / "reconstructions.png", nrow=len(x),
                      upscale=4 if x.shape[-1] <= 64 else 1)
    return model


def autoencoder_phases(cfg: Config, model, loss_fn: AutoencoderLoss, opt_g, opt_d, batches, generator, device,
                       forward=None) -> list[Phase]:
    """Stage 1's step: the generator update (reconstruction + perceptual + adversarial term),
    then the discriminator's on the same micro-batches. `forward`: the model as called (DDP-
    wrapped or compiled; default the model)."""
    ctx = distributed.current()
    forward = forward or model
    disc = loss_fn.discriminator
    logvar = getattr(model, "logvar", None)
    f, z_ch = cfg.autoencoder.factor, cfg.autoencoder.z_channels
    micro_batches = []  # (images, reconstructions) of this step, for the discriminator

    def gen_inputs(micro, step):
        if micro == 0:
            micro_batches.clear()
        x = next(batches)["image"].to(device)
        noise = distributed.randn_global((x.shape[0], z_ch, x.shape[2] // f, x.shape[3] // f), generator, ctx, device)
        return x, noise

    def gen_loss(inputs, step):
        x, noise = inputs
        recon, reg_loss, stats = forward(x, noise=noise)
        loss, logs = loss_fn.generator(x, recon.float(), reg_loss, step, model.decoder.last_layer, logvar)
        micro_batches.append((x, recon.detach()))
        return loss, {**logs, "loss": loss.detach(), **stats}

    def disc_loss(micro, step):
        x, recon = micro_batches[micro]
        return loss_fn.discriminator_loss(x, recon.float(), step)

    return [Phase("generator", opt_g, gen_loss, list(model.parameters()), prepare=gen_inputs,
                  ddp=forward if forward is not model else None),
            Phase("discriminator", opt_d, disc_loss, list(disc.parameters()),
                  average_by_hand=list(disc.parameters()), clip_grads=False)]


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
    trainer = Trainer("ldm", cfg, tc, run, device, cfg.seed + 1, progress)
    generator = trainer.generator
    scale_known = not (cfg.diffusion.scale_by_std and cfg.autoencoder.kind == "kl")

    def load(tensors, meta):
        nonlocal scale_known
        fsdp.load_full_state_dict(model.unet, ckpt.unflatten_state("unet.", tensors))
        model.scale_factor.copy_(tensors["scale_factor"])
        if ema is not None:
            fsdp.load_full_state_dict(ema, ckpt.unflatten_state("ema.", tensors))
        if cond_module is not None:
            cond_module.load_state_dict(ckpt.unflatten_state("cond.", tensors))
        fsdp.optimizer_from_tensors("opt.", opt, tensors, meta["opt"])
        scale_known = True

    def state(keep: bool):
        # FSDP: every rank takes part in gathering the shards; only rank 0 keeps them.
        unet_state = fsdp.full_state_dict(model.unet, keep=keep)
        t_opt, j_opt = fsdp.optimizer_to_tensors("opt.", opt, keep=keep)
        ema_state = fsdp.full_state_dict(ema, keep=keep) if ema is not None else None
        if not keep:
            return None
        tensors = {**ckpt.flatten_state("unet.", unet_state), **t_opt, "scale_factor": model.scale_factor}
        if ema_state is not None:
            tensors.update(ckpt.flatten_state("ema.", ema_state))
        if cond_module is not None:
            tensors.update(ckpt.flatten_state("cond.", cond_module.state_dict()))
        return tensors, {"opt": j_opt}

    if resume:
        trainer.resume(load)
    unet = model.unet
    model.unet = _wrap(unet, tc, ctx, device)  # LatentDiffusion.forward now goes through DDP
    batches = iter(make_loader(train_set, tc, cfg.seed + 1, trainer.start, cfg.data.num_workers, ctx,
                               trainer.data_state))

    def on_scale(value, step):
        log.info("ldm: latent scale factor set to %.5f (1/std of the first batch)", value)
        if ctx.is_main:
            run.append_metrics({"stage": "ldm", "step": step, "scale_factor": value})

    clip = (lambda max_norm: fsdp.clip_grad_norm(unet_params, cond_params, max_norm)) if sharded else None
    phase = ldm_phase(cfg, model, opt, params, batches, generator, device, conditioner=conditioner,
                      cond_params=cond_params, ema=ema, ema_source=unet, clip=clip,
                      measure_scale=None if scale_known else on_scale)
    model.train()
    try:
        trainer.fit([phase], batches, state, collective_save=sharded)
    finally:
        model.unet = unet
    if sharded:  # what callers (sampling, evaluation) get is a plain model, on every rank
        model, ema = _unsharded(cfg, first_stage, model, ema, device)
    model.eval()
    if ctx.is_main:
        run.save_ldm(model, ema, cond_module, cfg)
    return model, ema


def ldm_phase(cfg: Config, model: LatentDiffusion, opt, params, batches, generator, device, *, conditioner=None,
              cond_params=(), ema: EMA | None = None, ema_source=None, clip=None, denoiser=None,
              measure_scale=None) -> Phase:
    """Stage 2's step: latents of a batch (encoded now, or from the cache), a timestep and
    noise for the global batch, the ε/v loss; then the EMA update. `measure_scale(value, step)`
    given: scale_by_std on the first batch (paper App. G), reported through it; `denoiser`:
    the model as called in the loss (e.g. compiled; default the model)."""
    ctx = distributed.current()
    T = model.schedule.num_timesteps
    pending = [measure_scale]

    def inputs(micro, step):
        batch = next(batches)
        with torch.no_grad():
            z = _latents(model, batch, generator, ctx, device)
        if pending[0] is not None:
            # Measured over the global batch, so every rank agrees.
            value = model.set_scale_from_latents(z)
            z = z * value
            pending.pop()(value, step)
            pending.append(None)
        t = distributed.randint_global(T, z.shape[0], generator, ctx, device)
        noise = distributed.randn_global(z.shape, generator, ctx, device)
        return batch, z, t, noise

    def loss(inputs, step):
        batch, z, t, noise = inputs
        cond = conditioner(batch, generator) if conditioner else {}
        value = diffusion_loss(denoiser or model, z, model.schedule, cond=cond, loss_type=cfg.diffusion.loss,
                               t=t, noise=noise)
        return value, {"loss": value.detach()}

    # τθ is reached through the conditioner, not through DDP: its gradients are averaged by hand.
    return Phase("ldm", opt, loss, list(params), prepare=inputs, ddp=model.unet, average_by_hand=list(cond_params),
                 clip=clip, after_step=(lambda: ema.update(ema_source or model.unet)) if ema is not None else None,
                 log_grad_norm=True)


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
