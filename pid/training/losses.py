"""The reference's loss functions as pure functions of tensors (spec §c, §d).

Teacher: flow-matching velocity loss + the YCbCr Charbonnier colour-alignment loss of the aux
RGB head. Distillation (DMD2): VSD, DSM, non-saturating GAN losses and the finite-difference R1.
Argument order follows the reference's functions, so recorded inputs can be replayed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ALIGN_WEIGHT = 0.8  # lq_latent_image_align_config.weight
ALIGN_Y_WEIGHT = 0.25
ALIGN_CHROMA_WEIGHT = 1.0
ALIGN_EPS = 1e-3
ALIGN_SIGMA_POWER = 1.0


# ---------------------------------------------------------------------------------------------
# Flow matching
# ---------------------------------------------------------------------------------------------


def noisy_pixels(x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps in fp32 (t = 0 clean, t = 1 noise), returned in x0's dtype."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    t = t.float().reshape(shape)
    return ((1.0 - t) * x0.float() + t * noise.float()).to(x0.dtype)


def flow_matching_loss(net_out: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """mean((v_pred - (x0 - eps))^2) with v_pred = -net_out (the net predicts eps - x0); no time weighting."""
    target = x0.float() - noise.float()
    return ((-net_out).float() - target).pow(2).mean()


# ---------------------------------------------------------------------------------------------
# Colour alignment of the aux RGB head
# ---------------------------------------------------------------------------------------------


def rgb_to_ycbcr(rgb: Tensor) -> Tensor:
    """[B, 3, ...] RGB in [0, 1] -> (Y, Cb, Cr) (BT.601 full range, no offsets)."""
    r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    return torch.cat([y, cb, cr], dim=1)


def color_align_per_sample(
    pred_lq_rgb: Tensor,
    target_lq: Tensor,
    y_weight: float = ALIGN_Y_WEIGHT,
    chroma_weight: float = ALIGN_CHROMA_WEIGHT,
    eps: float = ALIGN_EPS,
) -> Tensor:
    """Per-sample mean Charbonnier distance sqrt((w_c dYCbCr)^2 + eps^2) - eps, [B] fp32.

    The target is clamped to [-1, 1] and area-resized to the prediction's size if they differ.
    """
    pred = pred_lq_rgb.float()
    target = target_lq.to(device=pred.device).float()
    if target.shape[-2:] != pred.shape[-2:]:
        target = F.interpolate(target, size=pred.shape[-2:], mode="area")
    pred_ycc = rgb_to_ycbcr((pred + 1.0) * 0.5)
    target_ycc = rgb_to_ycbcr((target.clamp(-1, 1) + 1.0) * 0.5)
    weights = pred_ycc.new_tensor([y_weight, chroma_weight, chroma_weight]).view(1, 3, 1, 1)
    rho = torch.sqrt(((pred_ycc - target_ycc) * weights).pow(2) + eps * eps) - eps
    return rho.mean(dim=(1, 2, 3))


def color_align_loss(
    pred_lq_rgb: Tensor,
    target_lq: Tensor,
    degrade_sigma: Tensor | None = None,
    keep_mask: Tensor | None = None,
    *,
    sigma_power: float = ALIGN_SIGMA_POWER,
    y_weight: float = ALIGN_Y_WEIGHT,
    chroma_weight: float = ALIGN_CHROMA_WEIGHT,
    eps: float = ALIGN_EPS,
) -> Tensor:
    """Colour-alignment loss (unweighted; the trainer multiplies by 0.8).

    Sample weight m_b = [mean|T_b| > 1e-6] * keep_b * (1 - sigma_b)^sigma_power: a dropped LQ
    latent carries no colour to align to, and a noisier latent carries less.
    Returns sum_b m_b rho_b / max(sum_b m_b, 1e-6).
    """
    per_sample = color_align_per_sample(pred_lq_rgb, target_lq, y_weight, chroma_weight, eps)
    target = target_lq.to(per_sample.device).float()
    if target.shape[-2:] != pred_lq_rgb.shape[-2:]:
        target = F.interpolate(target, size=pred_lq_rgb.shape[-2:], mode="area")
    valid = target.abs().flatten(1).mean(dim=1) > 1e-6
    if keep_mask is not None:
        valid = valid & keep_mask.to(device=valid.device, dtype=torch.bool).view(-1)
    weight = valid.to(per_sample.dtype)
    if degrade_sigma is not None:
        sigma = degrade_sigma.to(per_sample.device).float().view(-1)
        weight = weight * (1.0 - sigma).clamp_min(0.0).pow(sigma_power)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1e-6)


# ---------------------------------------------------------------------------------------------
# DMD2 distillation (dmd_losses.py)
# ---------------------------------------------------------------------------------------------


def vsd_loss(gen_data: Tensor, teacher_x0: Tensor, fake_score_x0: Tensor) -> Tensor:
    """Variational score distillation in x0 space, in float64.

    w_b = 1 / (mean|x0_student - x0_teacher| + 1e-6); g = nan_to_num((x0_fake - x0_teacher) w);
    loss = 0.5 mean((x0_student - sg(x0_student - g))^2), so d loss / d x0_student = g / N.
    """
    dims = tuple(range(1, teacher_x0.ndim))
    with torch.no_grad():
        gen64, teacher64, fake64 = gen_data.double(), teacher_x0.double(), fake_score_x0.double()
        weight = 1.0 / ((gen64 - teacher64).abs().mean(dim=dims, keepdim=True) + 1e-6)
        grad = torch.nan_to_num((fake64 - teacher64) * weight, nan=0.0, posinf=0.0, neginf=0.0)
        pseudo_target = gen64 - grad
    return 0.5 * F.mse_loss(gen_data.double(), pseudo_target, reduction="mean")


def dsm_loss(pred_velocity: Tensor, target_velocity: Tensor) -> Tensor:
    """Denoising score matching for the fake score: mean((v_fake - (eps - x0_student))^2)."""
    return F.mse_loss(pred_velocity, target_velocity, reduction="mean")


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss mean(softplus(-D(fake)))."""
    return F.softplus(-fake_logits).mean()


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Logistic discriminator loss mean(softplus(D(fake))) + mean(softplus(-D(real)))."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def r1_loss(real_logits: Tensor, perturbed_real_logits: Tensor) -> Tensor:
    """Approximate (finite-difference) R1: mean((D(real) - D(real + alpha eps))^2)."""
    return F.mse_loss(real_logits, perturbed_real_logits)
