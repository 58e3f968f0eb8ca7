"""The DMD2 distillation loop (spec §d), beside the teacher loop and built from its pieces.

Per iteration `it` (one `state.step`), for each of `grad_accum` micro-steps:
    batch -> LQ latent and caption embeddings (caption dropout 0.1, no LQ dropout) -> the iteration's draws ->
    `student_losses` (it % student_update_freq == 0) or `fake_score_losses` (otherwise) under bf16 autocast
    (CUDA; fp32 on CPU) -> backward of total / grad_accum
then, student iterations: clip 0.1 on the student, its AdamW and warm-up scheduler step, power EMA with
ema_beta(it // student_update_freq); other iterations: clip 0.1 on the fake score, NaN-zeroing only on the
discriminator, both AdamW + schedulers step -> metrics, checkpoint.

The frozen teacher is not a submodule of `DistillStep`: it is never saved (a rerun reloads it from the init file)
and neither FSDP2 nor DDP shards, broadcasts or hooks it. Draws are per sample from (seed, iteration, sample slot) as in the
teacher loop, so a 2-rank run equals a 1-rank run with grad_accum=2 and a resume equals an uninterrupted run.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pid.training import ema_beta
from pid.training.dmd import (
    DMDConfig,
    draw_dmd_randomness,
    fake_score_losses,
    gan_generator_weight,
    is_student_step,
    student_losses,
)
from pid.training.loop import (
    BatchSource,
    Encoders,
    StopRequest,
    any_rank,
    caption_embeds_of,
    clip_gradients,
    lq_latent_of,
    reduce_mean,
    sample_seed,
)
from pid.training.teacher import drop_captions

NETWORKS = ("student", "fake_score", "discriminator")
# The iteration-wide self-rollout length is drawn from its own slot, past any sample's.
ROLLOUT_SLOT = 2**40


@dataclass
class DistillConfig:
    steps: int  # iterations (student + fake-score ones)
    batch_size: int
    dmd: DMDConfig
    grad_accum: int = 1
    grad_clip: float = 0.1
    ema_rate: float = 0.1
    caption_dropout: float = 0.1
    seed: int = 0
    ckpt_every: int = 100
    log_every: int = 50


class DistillStep(nn.Module):
    """Student, fake score and discriminator as one module (FSDP2 shards it as the root), the teacher beside."""

    def __init__(self, student: nn.Module, fake_score: nn.Module, discriminator: nn.Module, teacher: nn.Module,
                 cfg: DMDConfig) -> None:
        super().__init__()
        self.student, self.fake_score, self.discriminator = student, fake_score, discriminator
        object.__setattr__(self, "teacher", teacher)  # not registered: not saved, not wrapped
        self.cfg = cfg

    def forward(self, student_phase: bool, batch: dict[str, Tensor], draws: dict[str, Tensor],
                iteration: int) -> dict[str, Tensor]:
        nets = (self.student, self.teacher, self.fake_score, self.discriminator)
        if student_phase:
            return student_losses(*nets, batch, draws, iteration=iteration, cfg=self.cfg)
        return fake_score_losses(*nets, batch, draws, cfg=self.cfg)


@dataclass
class DistillState:
    """Everything a distillation checkpoint holds besides the data position (the checkpoint helpers read
    `optimizers` / `schedulers` in place of a teacher run's single ones)."""

    step: int  # iterations done
    model: nn.Module  # the `DistillStep` (FSDP2-sharded on several processes)
    optimizers: dict[str, torch.optim.Optimizer]  # student, fake_score, discriminator
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
    ema: dict[str, Tensor]  # student parameter name -> EMA tensor (trainable parameters)
    log: dict[str, float] = field(default_factory=dict)
    stop_signal: int | None = None  # the signal that stopped the run (distill_loop returned "stopped")


def unwrap(model: nn.Module) -> DistillStep:
    return model.module if hasattr(model, "module") else model


def trainable(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in net.named_parameters() if p.requires_grad]


def init_student_ema(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in trainable(unwrap(model).student)}


@torch.no_grad()
def update_student_ema(ema: dict[str, Tensor], model: nn.Module, beta: float) -> None:
    for name, p in unwrap(model).student.named_parameters():
        if name in ema:
            ema[name].mul_(beta).add_(p.detach(), alpha=1.0 - beta)


def draw_dmd_batch(seed: int, iteration: int, first_slot: int, captions: Sequence[str],
                   latent_shape: Sequence[int], pixel_shape: Sequence[int], device: torch.device,
                   caption_dropout: float, student_phase: bool, cfg: DMDConfig) -> tuple[list[str], dict[str, Tensor]]:
    """Captions after dropout and one iteration's DMD draws for a micro-batch, one generator per sample.

    Self-rollout: the rollout length k is one per iteration (the whole batch rolls out together), drawn from
    the iteration's own slot; each sample then draws its k re-noise tensors after its other draws."""
    rollout = cfg.student_input_mode == "self_rollout"
    steps = cfg.num_student_steps
    if rollout:
        generator = torch.Generator().manual_seed(sample_seed(seed, iteration, ROLLOUT_SLOT))
        k = torch.randint(0, steps, (1,), generator=generator)
    kept, per_sample = [], []
    for i, caption in enumerate(captions):
        seed_i = sample_seed(seed, iteration, first_slot + i)
        kept += drop_captions([caption], caption_dropout, rng=random.Random(seed_i))
        generator = torch.Generator().manual_seed(seed_i)
        draws = draw_dmd_randomness(1, latent_shape, pixel_shape, student_phase=student_phase, generator=generator,
                                    num_student_steps=steps, r1=cfg.r1_weight > 0)
        if rollout:
            del draws["t_index"]
            count = int(k) if cfg.student_sample_type == "sde" else 0
            draws["rollout_noise"] = torch.randn(count, 1, *pixel_shape, generator=generator)
        per_sample.append(draws)
    out = {key: torch.cat([d[key] for d in per_sample], dim=1 if key == "rollout_noise" else 0).to(device)
           for key in per_sample[0]}
    if rollout:
        out["rollout_steps"] = k.to(device)
    return kept, out


def discriminator_accuracy(real_logits: Tensor, fake_logits: Tensor) -> float:
    """Share of correct calls over real (logit > 0) and fake (logit < 0) samples."""
    return 0.5 * (float((real_logits > 0).float().mean()) + float((fake_logits < 0).float().mean()))


def _nan_to_zero(params: list[nn.Parameter]) -> None:
    for p in params:
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)


def distill_loop(cfg: DistillConfig, state: DistillState, data: BatchSource, encoders: Encoders,
                 null_embeds: Tensor, device: torch.device, rank: int = 0, world_size: int = 1,
                 on_log: Callable[[dict[str, Any]], None] | None = None,
                 on_checkpoint: Callable[[DistillState, bool], None] | None = None,
                 on_step: Callable[[DistillState], None] | None = None) -> str:
    """Run iterations state.step .. cfg.steps - 1; returns "done" or "stopped" (a checkpoint was written).
    `null_embeds`: the encoded negative prompt [1, L, D], the teacher's unconditional branch."""
    model, dmd = state.model, cfg.dmd
    step_module = unwrap(model)
    params = {name: [p for _, p in trainable(getattr(step_module, name))] for name in NETWORKS}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    window: dict[str, float] = {}
    counts: dict[str, int] = {}
    window_images, window_start = 0, time.perf_counter()
    batches = iter(data)
    status = "done"

    def add(key: str, value: float) -> None:
        window[key] = window.get(key, 0.0) + value
        counts[key] = counts.get(key, 0) + 1

    with StopRequest() as stop:
        while state.step < cfg.steps:
            it = state.step
            student_phase = is_student_step(it, dmd.student_update_freq)
            # the discriminator is a fixed critic in the student phase (its weights get no gradient)
            step_module.discriminator.requires_grad_(not student_phase)
            sums: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                pixels = batch.pixels.to(device=device, dtype=torch.float32)
                lq_latent = lq_latent_of(batch, encoders, pixels)
                first_slot = (micro * world_size + rank) * cfg.batch_size
                captions, draws = draw_dmd_batch(cfg.seed, it, first_slot, batch.captions,
                                                 tuple(lq_latent.shape[1:]), tuple(pixels.shape[1:]), device,
                                                 cfg.caption_dropout, student_phase, dmd)
                inputs = {"pixels": pixels, "lq_latent": lq_latent, "null_embeds": null_embeds,
                          "caption_embeds": caption_embeds_of(batch, captions, encoders, device)}
                last = micro == cfg.grad_accum - 1
                sync = model.no_sync() if (hasattr(model, "no_sync") and not last) else nullcontext()
                with sync:
                    with autocast:
                        losses = model(student_phase, inputs, draws, it)
                    (losses["total"] / cfg.grad_accum).backward()
                for key in ("vsd", "gan_gen") if student_phase else ("dsm", "gan_disc", "r1"):
                    if key in losses:
                        sums[key] = sums.get(key, 0.0) + float(losses[key].detach()) / cfg.grad_accum
                if not student_phase:
                    acc = discriminator_accuracy(losses["real_logits"], losses["fake_logits"])
                    sums["accuracy"] = sums.get("accuracy", 0.0) + acc / cfg.grad_accum
                window_images += pixels.shape[0]
            if student_phase:
                grad_norm, finite = clip_gradients(params["student"], cfg.grad_clip)
                stepped = ("student",)
                beta = ema_beta(it // dmd.student_update_freq, cfg.ema_rate)
            else:
                grad_norm, finite = clip_gradients(params["fake_score"], cfg.grad_clip)
                _nan_to_zero(params["discriminator"])
                stepped = ("fake_score", "discriminator")
            for name in stepped:
                state.optimizers[name].step()
                state.schedulers[name].step()
            for optimizer in state.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            step_module.discriminator.requires_grad_(True)  # trainable again: checkpoints keep trainable tensors only
            if student_phase:
                update_student_ema(state.ema, model, beta)
                state.log["ema_beta"] = beta
            state.step = it + 1
            prefix = "student" if student_phase else "fake_score"
            for key, value in sums.items():
                add(key, value)
            add(f"grad_norm_{prefix}", grad_norm)
            window["skipped_steps"] = window.get("skipped_steps", 0.0) + (0.0 if finite else 1.0)
            counts["steps"] = counts.get("steps", 0) + 1
            state.log["loss"] = float(losses["total"].detach())
            if on_step is not None:
                on_step(state)
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                means = reduce_mean({k: v / counts[k] for k, v in window.items() if k != "skipped_steps"}, device)
                names = {"vsd": "loss_vsd", "gan_gen": "loss_gan_gen", "dsm": "loss_dsm", "gan_disc": "loss_gan_disc",
                         "r1": "loss_r1", "accuracy": "discriminator_accuracy"}
                record = {"step": state.step, **{names.get(k, k): v for k, v in sorted(means.items())},
                          "skipped_steps": int(window.get("skipped_steps", 0)),
                          "student_steps": (state.step + dmd.student_update_freq - 1) // dmd.student_update_freq,
                          "lr": state.optimizers["student"].param_groups[0]["lr"],
                          "lr_fake_score": state.optimizers["fake_score"].param_groups[0]["lr"],
                          "lr_discriminator": state.optimizers["discriminator"].param_groups[0]["lr"],
                          "ema_beta": state.log.get("ema_beta", 0.0),
                          "gan_weight": gan_generator_weight(it, dmd.gan_weight, dmd.gan_warmup_iterations),
                          "images_per_s": window_images * world_size / max(elapsed, 1e-9)}
                if on_log is not None:
                    on_log(record)
                window, counts, window_images, window_start = {}, {}, 0, time.perf_counter()
            stopping = any_rank(stop.signal is not None, device)
            if on_checkpoint is not None and (state.step % cfg.ckpt_every == 0 or state.step == cfg.steps
                                              or stopping):
                on_checkpoint(state, state.step == cfg.steps)
            if stopping and state.step < cfg.steps:
                state.stop_signal = stop.signal or signal.SIGTERM  # another rank's signal: as a preemption
                status = "stopped"
                break
    return status


__all__ = ["DistillConfig", "DistillState", "DistillStep", "discriminator_accuracy", "distill_loop",
           "draw_dmd_batch", "init_student_ema"]
