"""One teacher training step, as the reference computes it (spec §c), split into the random
draws (`draw_teacher_randomness`, `drop_captions`) and the deterministic maths
(`teacher_step_outputs` / `teacher_losses`), so golden draws can be replayed.

Draw order (torch RNG), as the reference consumes it: latent-noising apply u [B], then — only if
some sample is noised — sigma u [B] and eps [B, C, h, w]; LQ keep mask bernoulli(1 - p) [B]
(only if p > 0); logit-normal z [B]; flow-matching noise [B, 3, H, W]. Caption dropout draws
random.random() once per sample from Python's RNG (a separate stream).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pid.training.degradation import LATENT_NOISE_APPLY_PROB, downsample, draw_latent_noise, noise_latent
from pid.training.losses import ALIGN_WEIGHT, color_align_loss, flow_matching_loss, noisy_pixels
from pid.training.schedules import NETWORK_TIME_SCALE, logit_normal_time

CAPTION_DROPOUT = 0.1
LQ_DROPOUT = 0.1  # teacher; distillation uses 0

DRAW_KEYS = ("degrade_apply_u", "degrade_sigma_u", "degrade_noise", "keep_lq", "t_normal", "noise")


def drop_captions(
    captions: Sequence[str], p: float = CAPTION_DROPOUT, rng: random.Random | None = None
) -> list[str]:
    """Per-sample caption dropout to "" (one rng.random() per caption, in order; none when p <= 0)."""
    if p <= 0:
        return list(captions)
    draw = (rng or random).random
    return ["" if draw() < p else caption for caption in captions]


def draw_teacher_randomness(
    batch_size: int,
    latent_shape: Sequence[int],
    pixel_shape: Sequence[int],
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str = "cpu",
    apply_prob: float = LATENT_NOISE_APPLY_PROB,
    lq_dropout: float = LQ_DROPOUT,
) -> dict[str, Tensor]:
    """The teacher step's torch draws, in the reference's order, from `generator` (else torch's global RNG),
    returned on `device`.

    `latent_shape` / `pixel_shape` are per sample ([C, h, w] / [3, H, W]). Draws the reference
    skips (sigma u and eps when no sample is noised; the keep mask when lq_dropout is 0) are not
    made; their entries are filled with values that leave the step unchanged.
    """
    # Drawn where the generator lives (so a CPU generator gives the same draws on any device), then moved.
    target, device = torch.device(device), generator.device if generator is not None else torch.device(device)
    kw = {"generator": generator, "device": device}
    apply_u, sigma_u, degrade_noise = draw_latent_noise(batch_size, latent_shape, apply_prob, generator, device)
    if lq_dropout > 0:
        probs = torch.full((batch_size,), 1.0 - lq_dropout, device=device)
        keep_lq = torch.bernoulli(probs, generator=generator).bool()
    else:
        keep_lq = torch.ones(batch_size, dtype=torch.bool, device=device)
    t_normal = torch.randn(batch_size, **kw)
    noise = torch.randn(batch_size, *pixel_shape, **kw)
    draws = {
        "degrade_apply_u": apply_u,
        "degrade_sigma_u": sigma_u,
        "degrade_noise": degrade_noise,
        "keep_lq": keep_lq,
        "t_normal": t_normal,
        "noise": noise,
    }
    return {key: value.to(target) for key, value in draws.items()}


@dataclass
class TeacherStepOutputs:
    """Losses and the intermediates of one teacher step (names as in the golden files)."""

    diffusion: Tensor
    align: Tensor
    total: Tensor
    lq_image: Tensor  # downsample(pixels), the align target
    lq_latent_noised: Tensor
    degrade_sigma: Tensor
    lq_latent_to_net: Tensor  # after LQ dropout
    t: Tensor  # shifted flow time
    x_t: Tensor
    net_out: Tensor  # eps - x0 prediction
    pred_lq_rgb: Tensor


def teacher_step_outputs(
    net: nn.Module,
    batch: Mapping[str, Tensor],
    draws: Mapping[str, Tensor],
    *,
    shift: float,
    align_weight: float = ALIGN_WEIGHT,
) -> TeacherStepOutputs:
    """The teacher step's maths for given draws; see `teacher_losses`."""
    missing = [key for key in DRAW_KEYS if key not in draws]
    if missing:
        raise KeyError(f"teacher draws lack {', '.join(missing)}; draw them with draw_teacher_randomness()")
    x0 = batch["pixels"].float()
    lq_image = downsample(x0)
    lq_noised, degrade_sigma = noise_latent(
        batch["lq_latent"], draws["degrade_apply_u"], draws["degrade_sigma_u"], draws["degrade_noise"]
    )
    keep = draws["keep_lq"].to(lq_noised.dtype).view(-1, *([1] * (lq_noised.ndim - 1)))
    lq_to_net = keep * lq_noised
    # A zeroed latent (dropped) carries no colour: excluded from the align loss, as the reference does.
    keep_mask = lq_to_net.detach().abs().flatten(1).any(dim=1)

    t = logit_normal_time(draws["t_normal"], shift)
    noise = draws["noise"]
    x_t = noisy_pixels(x0, t, noise)
    # Through net(...) rather than net.forward_train, so a DDP / FSDP-wrapped net works too.
    out = net(
        x_t,
        t * NETWORK_TIME_SCALE,
        batch["caption_embeds"],
        lq_to_net,
        degrade_sigma,
        train_outputs=True,
        lq_rgb=True,
    )
    diffusion = flow_matching_loss(out.velocity, x0, noise)
    align = color_align_loss(out.pred_lq_rgb, lq_image, degrade_sigma, keep_mask)
    return TeacherStepOutputs(
        diffusion=diffusion,
        align=align,
        total=diffusion + align_weight * align,
        lq_image=lq_image,
        lq_latent_noised=lq_noised,
        degrade_sigma=degrade_sigma,
        lq_latent_to_net=lq_to_net,
        t=t,
        x_t=x_t,
        net_out=out.velocity,
        pred_lq_rgb=out.pred_lq_rgb,
    )


def teacher_losses(
    net: nn.Module, batch: Mapping[str, Tensor], draws: Mapping[str, Tensor], *, shift: float
) -> dict[str, Tensor]:
    """Losses of one teacher step: {"diffusion", "align", "total"} (total = diffusion + 0.8 align).

    `net`: a PiDNet with aux_rgb_head=True. `batch`: pixels [B, 3, H, W] in [-1, 1], lq_latent
    [B, C, h, w] (normalised clean latent of downsample(pixels)), caption_embeds [B, L, D] (after
    caption dropout). `draws`: see `draw_teacher_randomness`. `shift`: `dynamic_shift(H, W)`.
    """
    out = teacher_step_outputs(net, batch, draws, shift=shift)
    return {"diffusion": out.diffusion, "align": out.align, "total": out.total}
