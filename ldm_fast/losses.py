"""Stage-1 training objective: L1 + perceptual + patch-based adversarial (Rombach et al. 2022,
Sec. 3.1 and App. G; the VQGAN recipe of Esser et al. 2021).

- Perceptual term: LPIPS (Zhang et al. 2018, VGG16 backbone + learned 1×1 heads) when its weights
  are in a local file; otherwise a documented substitute, announced once (see `GradientPyramidLoss`).
- PatchGAN discriminator (Isola et al. 2017) with hinge loss.
- Adaptive generator weight ‖∇_last nll‖ / (‖∇_last g‖ + 1e-4), clamped to [0, 1e4], at the
  decoder's last layer, switched on after `disc_start` (optionally after a discriminator
  warm-up and with a linear ramp, `disc_warmup`; see `AutoencoderLoss.adversarial_factor`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ldm_fast import distributed
from ldm_fast.config import AutoencoderConfig

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- perceptual

class LPIPS(nn.Module):
    """VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, unit-normalised along
    channels, squared differences weighted by 1×1 heads (`lin0..4`), averaged over space.
    Weights come from a local safetensors file holding `net.*` (VGG16 convs, in order) and
    `lin*.weight`; no download is attempted."""

    widths = (64, 128, 256, 512, 512)
    convs_per_stage = (2, 2, 3, 3, 3)

    def __init__(self):
        super().__init__()
        self.net = nn.ModuleList()
        in_ch = 3
        for width, n in zip(self.widths, self.convs_per_stage):
            stage = []
            for _ in range(n):
                stage += [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU()]
                in_ch = width
            self.net.append(nn.Sequential(*stage))
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in self.widths)
        # ImageNet statistics of the backbone, in the [-1, 1] input range.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)

    @classmethod
    def from_file(cls, path: str) -> "LPIPS":
        model = cls()
        state = load_file(path)
        renamed = {k.replace("lin", "lins.", 1) if k.startswith("lin") else k: v for k, v in state.items()}
        model.load_state_dict(renamed, strict=True)
        return model.eval()

    def features(self, x):
        h, feats = (x - self.shift) / self.scale, []
        for i, stage in enumerate(self.net):
            if i:
                h = F.max_pool2d(h, 2)
            h = stage(h)
            feats.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return feats

    def forward(self, x, y):
        fx, fy = self.features(x), self.features(y)
        return sum(lin((a - b).pow(2)).mean(dim=(1, 2, 3)) for lin, a, b in zip(self.lins, fx, fy))


class GradientPyramidLoss(nn.Module):
    """Offline substitute for LPIPS: L1 between image gradients (finite differences) at three
    scales. It rewards sharp, correctly placed edges — the property the perceptual term is there
    for — without pretrained weights. It is *not* LPIPS and its values are not comparable."""

    def forward(self, x, y):
        total = x.new_zeros(x.shape[0])
        for level in range(3):
            if level:
                x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            for dim in (2, 3):
                total = total + (x.diff(dim=dim) - y.diff(dim=dim)).abs().mean(dim=(1, 2, 3))
        return total


def build_perceptual(cfg: AutoencoderConfig) -> nn.Module | None:
    if cfg.perceptual_weight <= 0:
        return None
    if cfg.lpips_weights:
        if not Path(cfg.lpips_weights).is_file():
            raise FileNotFoundError(f"autoencoder.lpips_weights: no file at {cfg.lpips_weights}")
        return LPIPS.from_file(cfg.lpips_weights)
    log.warning("perceptual loss: no LPIPS weights given (autoencoder.lpips_weights); using the "
                "offline substitute GradientPyramidLoss (multi-scale gradient L1), not LPIPS")
    return GradientPyramidLoss()


# ----------------------------------------------------------------------------- discriminator

class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of all ranks, so N ranks ×
    batch B normalise exactly like one rank × batch N·B. torch's SyncBatchNorm does this on CUDA
    only; this version reduces with differentiable all-reduces and so also runs on gloo/CPU.
    In a world of one (or in eval mode) it is plain BatchNorm2d."""

    def forward(self, x):
        ctx = distributed.current()
        if not (self.training and ctx.enabled):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        n = x.numel() // x.shape[1] * ctx.world_size
        total = all_reduce(torch.stack([x.sum(dim=(0, 2, 3)), x.pow(2).sum(dim=(0, 2, 3))]))
        mean = total[0] / n
        var = total[1] / n - mean.pow(2)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / max(n - 1, 1), self.momentum)
        shape = (1, -1, 1, 1)
        return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps) * self.weight.view(shape) \
            + self.bias.view(shape)


class PatchDiscriminator(nn.Module):
    """PatchGAN: 4×4 convs, widths 64→128→256→512→1, BatchNorm, LeakyReLU(0.2), N(0, 0.02) init.
    Each output logit judges one receptive-field patch."""

    def __init__(self, in_channels=3, channels=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       GlobalBatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll_loss, g_loss, last_layer, disc_weight):
    """Balance the GAN gradient against the reconstruction gradient at the last decoder layer."""
    # Averaged over ranks: the weight then equals the one the global batch would give.
    nll_grad = distributed.all_reduce_mean(torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0])
    g_grad = distributed.all_reduce_mean(torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0])
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * disc_weight


# ----------------------------------------------------------------------------- combined

class AutoencoderLoss(nn.Module):
    """Generator and discriminator objectives of the first stage.

    generator(): rec = |x − x̂| + w_p·perceptual; nll = rec/exp(logvar) + logvar (KL models; VQ
    models have no logvar) summed over pixels and averaged over the batch; + regulariser (KL·w or
    the VQ codebook loss); + adaptive·(−mean D(x̂)) once step ≥ disc_start.
    discriminator(): hinge loss on detached reconstructions, active from disc_start.
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.perceptual = build_perceptual(cfg)
        self.discriminator = PatchDiscriminator(cfg.in_channels, cfg.disc_channels, cfg.disc_layers)

    def adversarial_factor(self, step: int) -> float:
        """Share of the generator's adversarial term at `step`: 0 before disc_start + warm-up,
        then rising linearly to 1 over `disc_warmup` steps (1 from disc_start when it is 0).

        Why: the adaptive weight makes the adversarial gradient at the decoder's last layer as
        large as the reconstruction gradient (× disc_weight) — or, with the weight at its clamp,
        whatever a discriminator still at chance gives. On a short run the first stage has not
        converged by then, and its reconstruction error jumps (measured on 32² photographs:
        L1 0.089 → 0.15 within 150 steps of the switch at step 1200). A discriminator trained
        alone first gives a meaningful gradient, and the ramp lets reconstruction absorb it."""
        start, warm = self.cfg.disc_start, self.cfg.disc_warmup
        if step < start + warm:
            return 0.0
        return 1.0 if warm == 0 else min(1.0, (step - start - warm + 1) / warm)

    def generator(self, x, recon, reg_loss, step, last_layer, logvar=None):
        rec = (x - recon).abs()
        if self.perceptual is not None:
            rec = rec + self.cfg.perceptual_weight * self.perceptual(x, recon).view(-1, 1, 1, 1)
        nll = rec / torch.exp(logvar) + logvar if logvar is not None else rec
        nll_loss = nll.sum() / x.shape[0]
        logs = {"l1": (x - recon).abs().mean().detach(), "nll": nll_loss.detach(), "reg": reg_loss.detach()}
        loss = nll_loss + reg_loss
        factor = self.adversarial_factor(step)
        if factor > 0 and self.cfg.disc_weight > 0:
            g_loss = -self.discriminator(recon).mean()
            weight = adaptive_weight(nll_loss, g_loss, last_layer, self.cfg.disc_weight) if self.training \
                else torch.tensor(0.0)
            loss = loss + factor * weight * g_loss
            logs.update(g=g_loss.detach(), d_weight=weight, adv_factor=torch.tensor(factor))
        return loss, logs

    def discriminator_loss(self, x, recon, step):
        if step < self.cfg.disc_start or self.cfg.disc_weight <= 0:
            return None, {}
        loss = hinge_d_loss(self.discriminator(x.detach()), self.discriminator(recon.detach()))
        return loss, {"d": loss.detach()}
