"""Post-hoc image guidance for super-resolution (a denoiser wrapper the Pipeline builds)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SRImageGuidance:
    """Post-hoc image-based guidance for super-resolution (the paper's Sec. 4.4 remark on
    raising PSNR/SSIM): at every step the predicted clean latent is pulled toward agreement
    with the low-resolution input y,  x̂0 ← x̂0 − scale · r · ∇ ½‖↓(D(x̂0)) − y‖²,  with ↓ the
    antialiased bicubic downsampling to y's size, D the decoder, and r = pixels per LR pixel
    (↓ averages about r pixels, so its gradient is ~1/r of the residual: with r, scale 1 is
    about one full correction in pixel space; through a decoder, tune it on held-out PSNR).
    The prediction is returned for that x̂0. The network output is held constant in the
    gradient (only the decoder is differentiated): one decoder forward + backward per step.

    Wraps the model for the samplers (`Pipeline(…)(lr=…, sr_guidance=0.5)` builds it in
    Pipeline._denoiser); it exposes the model's schedule, first stage and scale. A doubled (CFG) batch of a
    hybrid model is guided with y repeated."""

    def __init__(self, model, lr: torch.Tensor, scale: float = 1.0):
        if scale < 0:
            raise ValueError(f"image guidance scale must be >= 0, got {scale}")
        self.model, self.scale = model, float(scale)
        self.lr = lr if lr.dim() == 4 else lr[None]

    def __getattr__(self, name):  # schedule, first_stage, scale_factor, cfg, factor, decode, …
        return getattr(self.model, name)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        out = self.model(x, t, cond)
        if self.scale == 0:
            return out
        param = self.model.schedule.parameterization
        a = self.model.schedule.gather(self.model.schedule.alphas_cumprod, t.long().cpu(), x)
        sa, s1a = a.sqrt(), (1 - a).sqrt()
        eps = out if param == "eps" else sa * out + s1a * x  # v → ε
        x0 = (x - s1a * eps) / sa
        lr = self.lr.to(x.device, torch.float32)
        if x.shape[0] != lr.shape[0]:
            lr = lr.repeat(x.shape[0] // lr.shape[0], 1, 1, 1)
        with torch.enable_grad():
            z0 = x0.detach().float().requires_grad_(True)
            image = self.model.first_stage.decode(z0 / self.model.scale_factor)
            down = F.interpolate(image, size=lr.shape[-2:], mode="bicubic", antialias=True, align_corners=False)
            (grad,) = torch.autograd.grad(0.5 * (down - lr).pow(2).sum(), z0)
        ratio = image.shape[-2] * image.shape[-1] / (lr.shape[-2] * lr.shape[-1])
        x0 = x0 - self.scale * ratio * grad.to(x0.dtype)
        eps = (x - sa * x0) / s1a
        return eps if param == "eps" else sa * eps - s1a * x0
