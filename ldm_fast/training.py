"""The two training stages as plain functions: `train_autoencoder` then `train_ldm`.

Both share the same skeleton (`_Loop`): deterministic, resumable batch order; a non-finite loss
skips the step and is counted, too many in a row stop the run with the last good checkpoint
intact; checkpoints carry model, optimizer, EMA, step and RNG state, so `resume=True` continues
exactly; metrics go to `metrics.jsonl` and a tqdm bar.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ldm_fast import checkpoint as ckpt
from ldm_fast.autoencoder import build_first_stage
from ldm_fast.config import Config, TrainConfig, save_yaml, to_dict
from ldm_fast.diffusion import diffusion_loss
from ldm_fast.images import save_grid
from ldm_fast.losses import AutoencoderLoss
from ldm_fast.model import EMA, LatentDiffusion
from ldm_fast.run import RunDir

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses."""


# ----------------------------------------------------------------------------- data order

class ResumableSampler(Sampler):
    """Shuffled indices, epoch e permuted by seed + e, starting at a given sample position:
    resuming at step s with batch B continues with exactly the batches an unbroken run sees."""

    def __init__(self, size: int, seed: int, start: int = 0):
        self.size, self.seed, self.start = size, seed, start

    def __iter__(self):
        position = self.start
        while True:
            epoch, offset = divmod(position, self.size)
            perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
            for i in perm[offset:].tolist():
                yield i
            position = (epoch + 1) * self.size

    def __len__(self):  # infinite stream; DataLoader only needs a number
        return 2 ** 62


def make_loader(dataset: Dataset, tc: TrainConfig, seed: int, step: int, num_workers: int) -> DataLoader:
    sampler = ResumableSampler(len(dataset), seed, start=step * tc.batch_size)
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


def _lr_at(step: int, tc: TrainConfig) -> float:
    if tc.warmup_steps and step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    return tc.lr


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


class _Loop:
    """Step bookkeeping shared by both stages: logging, non-finite accounting, progress."""

    def __init__(self, stage: str, tc: TrainConfig, run: RunDir, start: int, progress: bool):
        self.stage, self.tc, self.run = stage, tc, run
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.bar = tqdm(total=tc.steps, initial=start, desc=stage, disable=not progress, dynamic_ncols=True)
        self.t0, self.images = time.perf_counter(), 0

    def check_finite(self, loss: torch.Tensor, step: int) -> bool:
        if torch.isfinite(loss).all():
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
        self.images += self.tc.batch_size
        self.bar.update(1)
        if (step + 1) % self.tc.log_every and step + 1 != self.tc.steps:
            return
        elapsed = time.perf_counter() - self.t0
        record = {"stage": self.stage, "step": step + 1, "images_per_s": self.images / max(elapsed, 1e-9),
                  "nonfinite_skipped": self.nonfinite_total}
        record.update({k: float(v) for k, v in logs.items()})
        self.run.append_metrics(record)
        self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", img_s=f"{record['images_per_s']:.1f}")
        self.t0, self.images = time.perf_counter(), 0

    def close(self):
        self.bar.close()


# ----------------------------------------------------------------------------- stage 1

def train_autoencoder(cfg: Config, run: RunDir, train_set: Dataset, heldout: Dataset,
                      device: str = "cpu", resume: bool = False, progress: bool = True) -> torch.nn.Module:
    """Train the first stage (L1 + perceptual + PatchGAN) and write `autoencoder.safetensors`."""
    device = torch.device(device)
    tc = cfg.train_autoencoder
    torch.manual_seed(cfg.seed)  # before any module is built: the initial weights follow the seed
    model = build_first_stage(cfg.autoencoder).to(device)
    if cfg.autoencoder.kind == "identity":
        run.save_first_stage(model, cfg)
        return model
    loss_fn = AutoencoderLoss(cfg.autoencoder).to(device)
    gen_params = list(model.parameters())
    opt_g = torch.optim.Adam(gen_params, lr=tc.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=tc.lr, betas=(0.5, 0.9))
    generator = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if resume and (found := ckpt.latest_valid(run.stage_dir("autoencoder"))):
        path, tensors, meta = found
        model.load_state_dict(ckpt.unflatten_state("model.", tensors))
        loss_fn.discriminator.load_state_dict(ckpt.unflatten_state("disc.", tensors))
        ckpt.optimizer_from_tensors("opt_g.", opt_g, tensors, meta["opt_g"])
        ckpt.optimizer_from_tensors("opt_d.", opt_d, tensors, meta["opt_d"])
        _restore_rng(tensors, generator)
        start = int(meta["step"])
        log.info("autoencoder: resumed from %s at step %d", path, start)

    def save(step: int):
        if not _all_finite(model):
            log.error("autoencoder: parameters are not finite at step %d; checkpoint NOT written", step)
            return
        t_g, j_g = ckpt.optimizer_to_tensors("opt_g.", opt_g)
        t_d, j_d = ckpt.optimizer_to_tensors("opt_d.", opt_d)
        tensors = {**ckpt.flatten_state("model.", model.state_dict()),
                   **ckpt.flatten_state("disc.", loss_fn.discriminator.state_dict()),
                   **t_g, **t_d, **_rng_tensors(generator)}
        ckpt.save_checkpoint(ckpt.checkpoint_path(run.stage_dir("autoencoder"), step), tensors,
                             {"step": step, "opt_g": j_g, "opt_d": j_d, "config": json.dumps(to_dict(cfg))})
        ckpt.prune(run.stage_dir("autoencoder"), tc.keep_last)

    loop = _Loop("autoencoder", tc, run, start, progress)
    loader = make_loader(train_set, tc, cfg.seed, start, cfg.data.num_workers)
    batches = iter(loader)
    model.train()
    logvar = getattr(model, "logvar", None)
    for step in range(start, tc.steps):
        x = next(batches)["image"].to(device)
        for group in (*opt_g.param_groups, *opt_d.param_groups):
            group["lr"] = _lr_at(step, tc)
        with _autocast(device, cfg.precision):
            recon, reg_loss, stats = model(x)
            loss, logs = loss_fn.generator(x, recon.float(), reg_loss, step, model.decoder.last_layer, logvar)
        if loop.check_finite(loss, step):
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(gen_params, tc.grad_clip)
            opt_g.step()
            with _autocast(device, cfg.precision):
                d_loss, d_logs = loss_fn.discriminator_loss(x, recon.float(), step)
            if d_loss is not None and loop.check_finite(d_loss, step):
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                logs.update(d_logs)
            logs.update(loss=loss.detach(), **{k: v for k, v in stats.items()})
        loop.log(step, logs)
        if (step + 1) % tc.ckpt_every == 0 or step + 1 == tc.steps:
            save(step + 1)
    loop.close()
    model.eval()
    run.save_first_stage(model, cfg)
    with torch.no_grad():
        x = torch.stack([heldout[i]["image"] for i in range(min(16, len(heldout)))]).to(device)
        recon = model(x, sample=False)[0]
        save_grid(torch.cat([x, recon]), run.path / "reconstructions.png", nrow=len(x), upscale=4 if x.shape[-1] <= 64 else 1)
    return model


# ----------------------------------------------------------------------------- stage 2

def train_ldm(cfg: Config, run: RunDir, first_stage: torch.nn.Module, train_set: Dataset,
              device: str = "cpu", resume: bool = False, progress: bool = True,
              conditioner=None) -> tuple[LatentDiffusion, EMA | None]:
    """Train the latent UNet (ε/v objective) on the frozen first stage; writes `ldm.safetensors`.

    `conditioner(batch, generator) -> (cond dict, trainable module or None)` turns a data batch
    into the UNet's conditioning (see model.py); None trains unconditionally."""
    device = torch.device(device)
    tc = cfg.train_ldm
    torch.manual_seed(cfg.seed + 1)
    model = LatentDiffusion(cfg, first_stage).to(device)
    cond_module = getattr(conditioner, "module", None)
    params = list(model.unet.parameters()) + (list(cond_module.parameters()) if cond_module else [])
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    ema = EMA(model.unet, tc.ema_decay).to(device) if tc.ema_decay > 0 else None
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    start, scale_known = 0, not (cfg.diffusion.scale_by_std and cfg.autoencoder.kind == "kl")
    if resume and (found := ckpt.latest_valid(run.stage_dir("ldm"))):
        path, tensors, meta = found
        model.unet.load_state_dict(ckpt.unflatten_state("unet.", tensors))
        model.scale_factor.copy_(tensors["scale_factor"])
        if ema is not None:
            ema.load_state_dict(ckpt.unflatten_state("ema.", tensors))
        if cond_module is not None:
            cond_module.load_state_dict(ckpt.unflatten_state("cond.", tensors))
        ckpt.optimizer_from_tensors("opt.", opt, tensors, meta["opt"])
        _restore_rng(tensors, generator)
        start, scale_known = int(meta["step"]), True
        log.info("ldm: resumed from %s at step %d", path, start)

    def save(step: int):
        if not _all_finite(model.unet):
            log.error("ldm: parameters are not finite at step %d; checkpoint NOT written", step)
            return
        t_opt, j_opt = ckpt.optimizer_to_tensors("opt.", opt)
        tensors = {**ckpt.flatten_state("unet.", model.unet.state_dict()), **t_opt,
                   "scale_factor": model.scale_factor, **_rng_tensors(generator)}
        if ema is not None:
            tensors.update(ckpt.flatten_state("ema.", ema.state_dict()))
        if cond_module is not None:
            tensors.update(ckpt.flatten_state("cond.", cond_module.state_dict()))
        ckpt.save_checkpoint(ckpt.checkpoint_path(run.stage_dir("ldm"), step), tensors,
                             {"step": step, "opt": j_opt, "config": json.dumps(to_dict(cfg))})
        ckpt.prune(run.stage_dir("ldm"), tc.keep_last)

    loop = _Loop("ldm", tc, run, start, progress)
    batches = iter(make_loader(train_set, tc, cfg.seed + 1, start, cfg.data.num_workers))
    model.train()
    for step in range(start, tc.steps):
        batch = next(batches)
        x = batch["image"].to(device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, tc)
        if not scale_known:
            # scale_by_std: measured once, on the first batch of stage 2 (paper App. G).
            z = model.first_stage.encode_latent(x, sample=True, generator=generator)
            value = model.set_scale_from_latents(z)
            log.info("ldm: latent scale factor set to %.5f (1/std of the first batch)", value)
            run.append_metrics({"stage": "ldm", "step": step, "scale_factor": value})
            scale_known = True
        with _autocast(device, cfg.precision):
            z = model.encode(x, generator=generator)
            cond = conditioner(batch, generator) if conditioner else {}
            loss = diffusion_loss(model, z, model.schedule, cond=cond, loss_type=cfg.diffusion.loss,
                                  generator=generator)
        logs = {}
        if loop.check_finite(loss, step):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            opt.step()
            if ema is not None:
                ema.update(model.unet)
            logs["loss"] = loss.detach()
        loop.log(step, logs)
        if (step + 1) % tc.ckpt_every == 0 or step + 1 == tc.steps:
            save(step + 1)
    loop.close()
    model.eval()
    run.save_ldm(model, ema, cond_module, cfg)
    return model, ema


def save_config(cfg: Config, run: RunDir) -> None:
    save_yaml(cfg, run.path / "config.yaml")
