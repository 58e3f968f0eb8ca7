"""How the reference makes the training condition from an HQ image (spec §b-§c):
a x4 bicubic antialiased downsample (the LQ image, also the colour-alignment target) and the
sigma-noising of its latent. Deterministic given the draws; `pid.training.randomness` draws them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DOWNSCALE = 4
LATENT_NOISE_APPLY_PROB = 0.75
LATENT_NOISE_SIGMA_MIN = 0.0
LATENT_NOISE_SIGMA_MAX = 0.8


def downsample(pixels: Tensor, factor: float = DOWNSCALE) -> Tensor:
    """The LQ image: bicubic, antialiased, align_corners=False, to (int(H/f), int(W/f)), clamped to [-1, 1]."""
    if pixels.ndim != 4:
        raise ValueError(f"downsample expects [B, C, H, W], got shape {tuple(pixels.shape)}")
    height, width = pixels.shape[-2:]
    size = (int(height / factor), int(width / factor))
    lq = F.interpolate(pixels.contiguous(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return lq.clamp(-1.0, 1.0)


def latent_sigma(
    apply_u: Tensor,
    sigma_u: Tensor,
    apply_prob: float = LATENT_NOISE_APPLY_PROB,
    sigma_min: float = LATENT_NOISE_SIGMA_MIN,
    sigma_max: float = LATENT_NOISE_SIGMA_MAX,
) -> Tensor:
    """Per-sample degrade sigma [B] (fp32): sigma_min + (sigma_max - sigma_min) * u where u_apply < apply_prob, else 0."""
    apply = apply_u < apply_prob
    lo = torch.full_like(sigma_u, sigma_min, dtype=torch.float32)
    hi = torch.full_like(sigma_u, sigma_max, dtype=torch.float32)
    sigma = lo + (hi - lo) * sigma_u.float()
    return torch.where(apply, sigma, torch.zeros_like(sigma))


def noise_latent(
    lq_latent: Tensor,
    apply_u: Tensor,
    sigma_u: Tensor,
    noise: Tensor,
    apply_prob: float = LATENT_NOISE_APPLY_PROB,
    sigma_min: float = LATENT_NOISE_SIGMA_MIN,
    sigma_max: float = LATENT_NOISE_SIGMA_MAX,
) -> tuple[Tensor, Tensor]:
    """Flow-matching latent noising: (where(apply, (1 - sigma) z + sigma eps, z), degrade_sigma [B]).

    Teaches the decoder latents as an LDM leaves them (not quite clean). Mixing happens in the
    latent's dtype, as the reference does.
    """
    sigma = latent_sigma(apply_u, sigma_u, apply_prob, sigma_min, sigma_max)
    apply = (apply_u < apply_prob).reshape(-1, *([1] * (lq_latent.ndim - 1)))
    s = sigma.to(lq_latent.dtype).reshape(apply.shape)
    mixed = (1.0 - s) * lq_latent + s * noise.to(lq_latent.dtype)
    return torch.where(apply, mixed, lq_latent), sigma


def draw_latent_noise(batch_size: int, latent_shape: Sequence[int], apply_prob: float,
                      generator: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The latent noiser's draws in the reference's order: apply u [B], then sigma u [B] and eps [B, *latent_shape]
    only when some sample is noised (the reference draws nothing more otherwise; zeros stand in)."""
    kw = {"generator": generator, "device": device}
    apply_u = torch.rand(batch_size, **kw)
    if bool((apply_u < apply_prob).any()):
        return apply_u, torch.rand(batch_size, **kw), torch.randn(batch_size, *latent_shape, **kw)
    return apply_u, torch.zeros(batch_size, device=device), torch.zeros(batch_size, *latent_shape, device=device)
