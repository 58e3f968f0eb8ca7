"""DMD2 distillation maths (spec §d): the student's teacher-forcing input, the student (generator)
phase and the fake-score + discriminator phase, for given random draws.

Phases alternate by iteration: `it % student_update_freq == 0` is a student step. Torch draws per
iteration, in the reference's order: latent noising (apply u [B]; sigma u [B] and eps only if a
sample is noised), student-input noise [B, 3, H, W], t-list index randint(0, steps) [B],
perturbation z [B], perturbation eps [B, 3, H, W], and in the fake phase the R1 noise
[B, 3, H, W]. Caption dropout uses Python's RNG (`drop_captions`). LQ dropout is 0 here.
The self-rollout student input (implemented by the reference, not enabled by its configs) draws
randint(0, steps) [1] and one re-noise eps per rollout step in place of the t-list index.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pid.sampling import DISTILLED_T_LIST
from pid.training.degradation import LATENT_NOISE_APPLY_PROB, draw_latent_noise, noise_latent
from pid.training.losses import (
    dsm_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    r1_loss,
    vsd_loss,
)
from pid.training.schedules import NETWORK_TIME_SCALE, dmd_time


@dataclass(frozen=True)
class DMDConfig:
    """The shipped distillation hyper-parameters (experiment_pid_v1pt5_<bb>/distillation.py)."""

    student_update_freq: int = 6
    t_list: tuple[float, ...] = DISTILLED_T_LIST
    t_min: float = 0.02
    t_max: float = 0.99
    teacher_cfg: float = 3.0
    vsd_weight: float = 1.0
    dsm_weight: float = 1.0
    gan_weight: float = 0.05
    gan_warmup_iterations: int = 100
    r1_weight: float = 200.0
    r1_alpha: float = 0.1
    feature_blocks: tuple[int, ...] = (7,)
    # "teacher_forcing" (shipped): the real image noised to a random t of the list; "self_rollout":
    # the student's own no-grad rollout from noise to a random step k, then one step with grad.
    student_input_mode: Literal["teacher_forcing", "self_rollout"] = "teacher_forcing"
    student_sample_type: Literal["sde", "ode"] = "sde"  # the self-rollout's stepping

    @property
    def num_student_steps(self) -> int:
        return len(self.t_list) - 1


def is_student_step(iteration: int, freq: int = 6) -> bool:
    """Iteration `iteration` (0-based) updates the student iff it is a multiple of `freq`."""
    return iteration % freq == 0


def gan_generator_weight(iteration: int, weight: float = 0.05, warmup: int = 100) -> float:
    """GAN generator weight with its linear warm-up over raw iterations: weight * min(it / warmup, 1)."""
    if warmup > 0 and iteration < warmup:
        return weight * iteration / warmup
    return weight


def student_t_list(
    num_steps: int | None = None,
    t_list: Sequence[float] = DISTILLED_T_LIST,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The student's time list (fp32), subsampled evenly to `num_steps` + 1 points when that differs
    from the trained step count (2 -> [0.999, 0.634, 0], 1 -> [0.999, 0])."""
    full = torch.tensor(list(t_list), dtype=torch.float32, device=device)
    if num_steps is None or num_steps == len(full) - 1:
        return full
    index = torch.linspace(0, len(full) - 1, num_steps + 1).round().long()
    return full[index.to(full.device)]


def velocity_to_x0(x_t: Tensor, net_out: Tensor, t: Tensor) -> Tensor:
    """x0 = x_t - t * net_out in float64, returned in x_t's dtype (net_out = eps - x0)."""
    t64 = t.double().view(-1, *([1] * (x_t.ndim - 1)))
    return (x_t.double() - t64 * net_out.double()).to(x_t.dtype)


def mix(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """(1 - t) x0 + t noise with a per-sample t."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - t) * x0 + t * noise


def teacher_forcing_input(
    pixels: Tensor, noise: Tensor, t_index: Tensor, t_list: Tensor
) -> tuple[Tensor, Tensor]:
    """The student's training input: the real image noised to a random t of its time list.

    Returns (x_in [B, 3, H, W], t_student [B] fp32).
    """
    t_student = t_list.to(pixels.device)[t_index.to(pixels.device)]
    return mix(pixels.detach(), noise, t_student), t_student


def draw_dmd_randomness(
    batch_size: int,
    latent_shape: Sequence[int],
    pixel_shape: Sequence[int],
    *,
    student_phase: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    num_student_steps: int = 4,
    apply_prob: float = LATENT_NOISE_APPLY_PROB,
    r1: bool = True,
    student_input_mode: str = "teacher_forcing",
    student_sample_type: str = "sde",
) -> dict[str, Tensor]:
    """One distillation iteration's torch draws in the reference's order (see the module docstring),
    from `generator` (else torch's global RNG), returned on `device`.

    Self-rollout draws, instead of the t-list index, the rollout length k = randint(0, steps) [1] and
    then (SDE) one re-noise eps per rollout step, `rollout_noise` [k, B, 3, H, W].
    """
    # Drawn where the generator lives (so a CPU generator gives the same draws on any device), then moved.
    target, device = torch.device(device), generator.device if generator is not None else torch.device(device)
    kw = {"generator": generator, "device": device}
    apply_u, sigma_u, degrade_noise = draw_latent_noise(batch_size, latent_shape, apply_prob, generator, device)
    draws = {
        "degrade_apply_u": apply_u,
        "degrade_sigma_u": sigma_u,
        "degrade_noise": degrade_noise,
        "student_noise": torch.randn(batch_size, *pixel_shape, **kw),
    }
    if student_input_mode == "teacher_forcing":
        draws["t_index"] = torch.randint(0, num_student_steps, (batch_size,), **kw)
    elif student_input_mode == "self_rollout":
        steps = torch.randint(0, num_student_steps, (1,), **kw)
        count = int(steps) if student_sample_type == "sde" else 0
        draws["rollout_steps"] = steps
        draws["rollout_noise"] = (
            torch.stack([torch.randn(batch_size, *pixel_shape, **kw) for _ in range(count)])
            if count
            else torch.zeros(0, batch_size, *pixel_shape, device=device)
        )
    else:
        raise ValueError(
            f"unknown student_input_mode {student_input_mode!r}; use teacher_forcing or self_rollout"
        )
    draws["t_normal"] = torch.randn(batch_size, **kw)
    draws["noise"] = torch.randn(batch_size, *pixel_shape, **kw)
    if not student_phase and r1:
        draws["r1_noise"] = torch.randn(batch_size, *pixel_shape, **kw)
    return {key: value.to(target) for key, value in draws.items()}


@dataclass
class DMDInputs:
    """What both phases share: the real image, the conditioning and the degraded latent."""

    pixels: Tensor
    caption_embeds: Tensor
    null_embeds: Tensor  # the encoded negative prompt, [1 or B, L, D]
    lq_latent: Tensor  # after noising
    degrade_sigma: Tensor


def dmd_inputs(batch: Mapping[str, Tensor], draws: Mapping[str, Tensor]) -> DMDInputs:
    """Degrade the batch's clean latent with the draws (LQ dropout is 0 in distillation)."""
    lq_latent, sigma = noise_latent(
        batch["lq_latent"], draws["degrade_apply_u"], draws["degrade_sigma_u"], draws["degrade_noise"]
    )
    return DMDInputs(
        pixels=batch["pixels"].float(),
        caption_embeds=batch["caption_embeds"],
        null_embeds=batch["null_embeds"],
        lq_latent=lq_latent,
        degrade_sigma=sigma,
    )


def _call(net: nn.Module, x: Tensor, t: Tensor, embeds: Tensor, inp: DMDInputs, **kw):
    # net(...) rather than net.forward_train, so DDP / FSDP wrappers see the call.
    return net(x, t * NETWORK_TIME_SCALE, embeds, inp.lq_latent, inp.degrade_sigma, train_outputs=True, **kw)


def student_x0(student: nn.Module, inp: DMDInputs, draws: Mapping[str, Tensor], cfg: DMDConfig) -> Tensor:
    """x0 of the student on its training input (grad flows through one network call when grad mode is on)."""
    t_list = student_t_list(None, cfg.t_list, inp.pixels.device)
    if cfg.student_input_mode == "self_rollout":
        return self_rollout_x0(student, inp, draws, t_list, cfg.student_sample_type)
    x_in, t_student = teacher_forcing_input(inp.pixels, draws["student_noise"], draws["t_index"], t_list)
    v = _call(student, x_in, t_student, inp.caption_embeds, inp).velocity
    return velocity_to_x0(x_in, v, t_student)


def self_rollout_x0(
    student: nn.Module, inp: DMDInputs, draws: Mapping[str, Tensor], t_list: Tensor, sample_type: str = "sde"
) -> Tensor:
    """The DMD2-style student input (not shipped): roll the student out from noise for k steps without
    grad (SDE re-noise with `rollout_noise`, or ODE), then its x0 at step k with grad (input detached)."""
    x, batch = draws["student_noise"], inp.pixels.shape[0]
    steps = int(draws["rollout_steps"].reshape(-1)[0])
    with torch.no_grad():
        for i in range(steps):
            t_cur = t_list[i].expand(batch)
            v = _call(student, x, t_cur, inp.caption_embeds, inp).velocity
            if sample_type == "sde":
                x = mix(velocity_to_x0(x, v, t_cur), draws["rollout_noise"][i], t_list[i + 1].expand(batch))
            else:
                x = x + (t_list[i + 1] - t_list[i]) * v
    t_cur = t_list[steps].expand(batch)
    x = x.detach()
    return velocity_to_x0(x, _call(student, x, t_cur, inp.caption_embeds, inp).velocity, t_cur)


def student_losses(
    student: nn.Module,
    teacher: nn.Module,
    fake_score: nn.Module,
    discriminator: nn.Module,
    batch: Mapping[str, Tensor],
    draws: Mapping[str, Tensor],
    *,
    iteration: int,
    cfg: DMDConfig = DMDConfig(),
) -> dict[str, Tensor]:
    """Student (generator) phase: {"vsd", "gan_gen", "total"} (total = vsd + w_gan(it) * gan_gen).

    Gradients reach the student only (the teacher is a frozen but differentiable feature extractor
    for the GAN term; the fake score runs without grad). `batch`: pixels, lq_latent (clean),
    caption_embeds (after dropout), null_embeds (the negative prompt's embedding).
    """
    inp = dmd_inputs(batch, draws)
    x0_student = student_x0(student, inp, draws, cfg)
    t = dmd_time(draws["t_normal"], cfg.t_min, cfg.t_max)
    x_t = mix(x0_student, draws["noise"], t)  # not detached: the GAN term backpropagates into the student
    cond = _call(teacher, x_t, t, inp.caption_embeds, inp, feature_blocks=cfg.feature_blocks)
    with torch.no_grad():
        v_cond = cond.velocity.detach()
        null = inp.null_embeds.expand(x_t.shape[0], -1, -1).to(inp.caption_embeds)
        v_uncond = _call(teacher, x_t, t, null, inp).velocity
        x0_teacher = velocity_to_x0(x_t, v_uncond + cfg.teacher_cfg * (v_cond - v_uncond), t).detach()
    gan_gen = gan_generator_loss(discriminator(cond.block_features))
    with torch.no_grad():
        x0_fake = velocity_to_x0(x_t, _call(fake_score, x_t, t, inp.caption_embeds, inp).velocity, t)
    vsd = vsd_loss(x0_student, x0_teacher, x0_fake)
    weight = gan_generator_weight(iteration, cfg.gan_weight, cfg.gan_warmup_iterations)
    return {"vsd": vsd, "gan_gen": gan_gen, "total": cfg.vsd_weight * vsd + weight * gan_gen}


def fake_score_losses(
    student: nn.Module,
    teacher: nn.Module,
    fake_score: nn.Module,
    discriminator: nn.Module,
    batch: Mapping[str, Tensor],
    draws: Mapping[str, Tensor],
    *,
    cfg: DMDConfig = DMDConfig(),
) -> dict[str, Tensor]:
    """Fake-score + discriminator phase: {"dsm", "gan_disc", "r1", "total"}
    (total = dsm + gan_disc + r1_weight * r1) and the detached "real_logits" / "fake_logits" (for the
    discriminator's accuracy). Gradients reach the fake score and the discriminator."""
    inp = dmd_inputs(batch, draws)
    with torch.no_grad():
        x0_student = student_x0(student, inp, draws, cfg)
    t, eps = dmd_time(draws["t_normal"], cfg.t_min, cfg.t_max), draws["noise"]
    x_t = mix(x0_student, eps, t)
    v_fake = _call(fake_score, x_t, t, inp.caption_embeds, inp).velocity
    dsm = dsm_loss(v_fake, eps - x0_student)

    blocks = cfg.feature_blocks
    with torch.no_grad():
        fake_feat = _call(teacher, x_t, t, inp.caption_embeds, inp, feature_blocks=blocks, features_only=True)
        real_x_t = mix(inp.pixels, eps, t)  # same t and eps as the fake sample
        real_feat = _call(
            teacher, real_x_t, t, inp.caption_embeds, inp, feature_blocks=blocks, features_only=True
        )
    real_logits = discriminator(real_feat.block_features)
    fake_logits = discriminator(fake_feat.block_features)
    gan_disc = gan_discriminator_loss(real_logits, fake_logits)
    total = cfg.dsm_weight * dsm + gan_disc
    out = {"dsm": dsm, "gan_disc": gan_disc, "real_logits": real_logits.detach(), "fake_logits": fake_logits.detach()}
    if cfg.r1_weight > 0:
        # Finite-difference R1: the discriminator's logit change under a small input perturbation.
        with torch.no_grad():
            perturbed = real_x_t + cfg.r1_alpha * draws["r1_noise"]
            alpha_feat = _call(
                teacher, perturbed, t, inp.caption_embeds, inp, feature_blocks=blocks, features_only=True
            )
        r1 = r1_loss(real_logits, discriminator(alpha_feat.block_features))
        out["r1"] = r1
        total = total + cfg.r1_weight * r1
    out["total"] = total
    return out


def sample_student_ode(
    velocity_fn: Callable[[Tensor, Tensor], Tensor], noise: Tensor, t_list: Tensor
) -> Tensor:
    """The reference's ODE option of the student sampler: Euler steps x += (t' - t) v on the t-list,
    then x0 = x - t v at its last non-zero time. (The SDE default is `pid.sampling.sample_distilled`.)
    `velocity_fn(x, t [B] flow time)` returns eps - x0."""
    x, batch = noise, noise.shape[0]
    for i in range(len(t_list) - 2):
        t_cur, t_next = t_list[i], t_list[i + 1]
        x = x + (t_next - t_cur) * velocity_fn(x, t_cur.expand(batch))
    t_last = t_list[-2].expand(batch)
    return velocity_to_x0(x, velocity_fn(x, t_last), t_last)
