"""`Trainer`: the training loop both stages run; a stage supplies what its step computes.

The loop owns everything that is not the model's business, once for both stages:
- resume: the newest valid checkpoint's step, RNG states, data position and loss scale, the
  stage's own tensors handed back to it;
- saving: every `ckpt_every` steps, at the end and on SIGTERM (then `Preempted`), never a
  checkpoint with non-finite values; pruned to `keep_last`;
- per step: the learning rate (linear warm-up, scaled by ranks × accumulation when asked),
  gradient accumulation over micro-batches with the gradient sync only on the last one,
  mixed precision (autocast around the forward; fp16 scales the loss with a GradScaler),
  `backward()` outside autocast, gradient clipping on unscaled gradients, gradients averaged
  by hand where DDP does not reach, the optimizer step, then the stage's `after_step` (EMA);
- a non-finite loss on any rank skips the step (agreed across ranks) and is counted; more
  than `max_nonfinite` in a row raise `TrainingDiverged`, the last good checkpoint intact;
- metrics to RUN_DIR/metrics.jsonl and progress (ldm_fast.progress) on rank 0.

A step is a list of `Phase`s, one per optimizer (the autoencoder: generator, then
discriminator; the LDM: UNet + τθ). `Phase.prepare(micro, step)` fetches a micro-batch's inputs
(in full precision), `Phase.loss(inputs, step)` runs under autocast and returns its loss (None:
the phase is inactive this step) and its logs.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from ldm_fast import checkpoint as ckpt
from ldm_fast import distributed, fsdp
from ldm_fast.config import Config, TrainConfig, to_dict
from ldm_fast.progress import progress_bar
from ldm_fast.run import RunDir

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses."""


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint was written and the run stopped."""


@dataclass
class Phase:
    """One optimizer's update within a training step."""
    name: str
    optimizer: torch.optim.Optimizer
    loss: Callable                       # (inputs, step) → (loss or None, logs), under autocast
    params: list                         # what grad_clip clips
    prepare: Callable | None = None      # (micro, step) → inputs, outside autocast (default: micro)
    clip_grads: bool = True              # apply train.grad_clip to this phase
    ddp: torch.nn.Module | None = None   # its gradient sync is skipped on non-final micro-batches
    average_by_hand: list = field(default_factory=list)  # grads DDP does not see, averaged over ranks
    clip: Callable | None = None         # (max_norm) → norm, instead of clip_grad_norm_(params)
    after_step: Callable | None = None   # e.g. the EMA update
    log_grad_norm: bool = False


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    if device.type != "cuda":
        warnings.warn(f"precision={precision} requested on {device.type}: mixed precision is used on "
                      "CUDA only; training in fp32", stacklevel=3)
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _no_sync(wrapped: torch.nn.Module | None, sync: bool):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP) of a non-final micro-batch."""
    if sync or wrapped is None:
        return nullcontext()
    if fsdp.is_sharded(wrapped):
        return fsdp.no_gradient_sync(wrapped)
    return wrapped.no_sync() if hasattr(wrapped, "no_sync") else nullcontext()


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


class Trainer:
    """The loop of one stage ("autoencoder" or "ldm"), checkpointed in RUN_DIR/<stage>/."""

    def __init__(self, stage: str, cfg: Config, tc: TrainConfig, run: RunDir, device, seed: int,
                 progress: bool = True, shown: dict[str, str] | None = None):
        self.stage, self.cfg, self.tc, self.run = stage, cfg, tc, run
        # What the progress bar shows: label → key of the step's logs (those present).
        self.shown = shown or {"loss": "loss"}
        self.device, self.ctx = torch.device(device), distributed.current()
        self.progress = progress
        # Every random number of the stage comes from this generator (drawn for the global batch).
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16"
                                           and self.device.type == "cuda")
        self.start, self.data_state = 0, None
        self.nonfinite_total = self.nonfinite_streak = 0

    # -------------------------------------------------------------- resume / save

    def resume(self, load: Callable[[dict, dict], None]) -> bool:
        """Continue from the newest valid checkpoint, if any: `load(tensors, meta)` restores the
        stage's own state; step, RNG, data position and loss scale are restored here."""
        found = ckpt.latest_valid(self.run.stage_dir(self.stage))
        if not found:
            return False
        path, tensors, meta = found
        load(tensors, meta)
        _restore_rng(tensors, self.generator)
        self.start, self.data_state = int(meta["step"]), json.loads(meta.get("data", "null"))
        if "scaler" in meta:
            self.scaler.load_state_dict(json.loads(meta["scaler"]))
        log.info("%s: resumed from %s at step %d", self.stage, path, self.start)
        return True

    def _save(self, step: int, state: Callable, collective: bool, batches) -> None:
        from ldm_fast.data.stream import PositionTracker

        data = json.dumps(batches.state(distributed.all_gather_object)) \
            if isinstance(batches, PositionTracker) else None  # collective: on every rank
        if self.ctx.is_main or collective:  # FSDP: every rank takes part in gathering the shards
            out = state(self.ctx.is_main)
            if self.ctx.is_main:
                self._write(step, *out, data)
        distributed.barrier()

    def _write(self, step: int, tensors: dict, meta: dict, data: str | None) -> None:
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            log.error("%s: non-finite values at step %d (e.g. %s); checkpoint NOT written", self.stage, step, bad[0])
            return
        tensors = {**tensors, **_rng_tensors(self.generator)}
        meta = {**meta, "step": step, "config": json.dumps(to_dict(self.cfg))}
        if self.scaler.is_enabled():
            meta["scaler"] = json.dumps(self.scaler.state_dict())
        if data:
            meta["data"] = data
        ckpt.save_checkpoint(ckpt.checkpoint_path(self.run.stage_dir(self.stage), step), tensors, meta)
        ckpt.prune(self.run.stage_dir(self.stage), self.tc.keep_last)

    # -------------------------------------------------------------- the loop

    def lr_at(self, step: int) -> float:
        tc = self.tc
        lr = tc.lr * (self.ctx.world_size * tc.grad_accum if tc.scale_lr else 1)
        if tc.warmup_steps and step < tc.warmup_steps:
            return lr * (step + 1) / tc.warmup_steps
        if tc.lr_decay == "cosine" and tc.steps > tc.warmup_steps:
            # A short run ends on small steps instead of the peak rate's noise (the original's
            # runs are long and constant). The schedule follows `steps`: extending a finished
            # run with a larger --steps restarts from a higher rate.
            progress = min(1.0, (step - tc.warmup_steps) / (tc.steps - tc.warmup_steps))
            return lr * 0.5 * (1 + math.cos(math.pi * progress))
        return lr

    def finite(self, loss: torch.Tensor, step: int) -> bool:
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

    def _phase(self, phase: Phase, step: int, logs: dict) -> bool | None:
        """One optimizer update; False: a non-finite loss skipped the step, None: inactive."""
        tc, sync_all = self.tc, not self.ctx.enabled
        phase.optimizer.zero_grad(set_to_none=True)
        for micro in range(tc.grad_accum):
            inputs = phase.prepare(micro, step) if phase.prepare is not None else micro
            with _no_sync(phase.ddp, micro == tc.grad_accum - 1 or sync_all):
                with autocast(self.device, self.cfg.precision):
                    loss, micro_logs = phase.loss(inputs, step)
                if loss is None:
                    return None
                if not self.finite(loss, step):
                    return False
                self.scaler.scale(loss / tc.grad_accum).backward()
            logs.update(micro_logs)
        if phase.average_by_hand:
            distributed.average_gradients(phase.average_by_hand)
        if tc.grad_clip and phase.clip_grads:
            self.scaler.unscale_(phase.optimizer)
            norm = phase.clip(tc.grad_clip) if phase.clip else torch.nn.utils.clip_grad_norm_(phase.params,
                                                                                              tc.grad_clip)
            if phase.log_grad_norm:
                logs["grad_norm"] = norm
        self.scaler.step(phase.optimizer)
        if phase.after_step is not None:
            phase.after_step()
        return True

    def train_step(self, phases: list[Phase], step: int) -> dict:
        """One training step (the learning rate, every phase, the loss-scale update) → its logs.
        fit() runs these; bench/train_throughput.py times them."""
        for phase in phases:
            for group in phase.optimizer.param_groups:
                group["lr"] = self.lr_at(step)
        logs = {}
        for phase in phases:
            if self._phase(phase, step, logs) is False:
                break  # a skipped step: the later phases skip it too
        self.scaler.update()
        return logs

    def fit(self, phases: list[Phase], batches, state: Callable, collective_save: bool = False) -> None:
        """Steps self.start … tc.steps − 1. `state(keep) → (tensors, meta)` is the stage's part
        of a checkpoint (called on every rank when `collective_save`, only rank 0 otherwise;
        `keep` is False on ranks that only help gathering)."""
        tc, ctx = self.tc, self.ctx
        bar = progress_bar(tc.steps, self.stage, enabled=self.progress and ctx.is_main, initial=self.start)
        t0, images = time.perf_counter(), 0
        try:
            with _SigtermFlag() as sigterm:
                for step in range(self.start, tc.steps):
                    logs = self.train_step(phases, step)
                    images += tc.batch_size * tc.grad_accum * ctx.world_size
                    bar.update(1)
                    if ctx.is_main and ((step + 1) % tc.log_every == 0 or step + 1 == tc.steps):
                        elapsed = time.perf_counter() - t0
                        record = {"stage": self.stage, "step": step + 1,
                                  "images_per_s": images / max(elapsed, 1e-9),
                                  "nonfinite_skipped": self.nonfinite_total}
                        record.update({k: float(v) for k, v in logs.items()})
                        self.run.append_metrics(record)
                        bar.set_postfix(**{label: f"{record[key]:.4g}" for label, key in self.shown.items()
                                           if key in record}, img_s=f"{record['images_per_s']:.1f}")
                        t0, images = time.perf_counter(), 0
                    if (step + 1) % tc.ckpt_every == 0 or step + 1 == tc.steps or sigterm.raised:
                        self._save(step + 1, state, collective_save, batches)
                        if sigterm.raised:
                            raise Preempted(f"{self.stage}: SIGTERM received; checkpoint at step {step + 1} "
                                            f"written to {self.run.stage_dir(self.stage)}; continue with --resume")
        finally:
            bar.close()
