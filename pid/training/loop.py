"""The training loop: one plain loop, readable in one sitting (DiT / nanoGPT style).

Per optimiser step, for each of `grad_accum` micro-steps:
    batch -> LQ latent (prepared cache, or VAE encode of downsample(pixels)) and caption embeddings (with
    dropout to "") -> the step's random draws -> `teacher_losses` under bf16 autocast (CUDA; fp32 on CPU)
    -> backward of total / grad_accum
then: gradient clip 0.1 with the non-finite guard -> AdamW step -> LambdaLR step -> power-EMA update with
ema_beta(step) -> metrics, checkpoint.

Random draws are made per sample from a generator seeded by (seed, step, sample slot), where the slot is the
sample's place in the global batch ((micro * world + rank) * batch + i). So the draws do not depend on how
many processes share the batch (a 2-rank run equals a 1-rank run with grad_accum=2), and a resumed run makes
the same draws as an uninterrupted one without restoring any generator.
"""

from __future__ import annotations

import math
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pid.training import (
    draw_teacher_randomness,
    drop_captions,
    dynamic_shift,
    ema_beta,
    optim,
    teacher_losses,
)

LOSS_KEYS = ("total", "diffusion", "align")


class TrainBatchLike(Protocol):
    pixels: Tensor  # [B, 3, H, W] in [-1, 1]
    captions: list[str]
    keys: list[str]


class BatchSource(Protocol):
    """A resumable iterator of batches sharded for this rank (see pid.training.data)."""

    def __iter__(self) -> Iterator[TrainBatchLike]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class LoopConfig:
    steps: int
    batch_size: int
    grad_accum: int = 1
    grad_clip: float = 0.1
    ema_rate: float = 0.1
    caption_dropout: float = 0.1
    lq_dropout: float = 0.1
    seed: int = 0
    ckpt_every: int = 5000
    log_every: int = 50


@dataclass
class Encoders:
    """Frozen encoders of the condition; a prepared cache makes both unnecessary (batch carries them)."""

    encode_lq: Callable[[Tensor], Tensor] | None  # LQ image [B,3,h,w] in [-1,1] -> normalised latent
    encode_captions: Callable[[Sequence[str]], Tensor] | None  # captions -> [B, L, D]


@dataclass
class TrainState:
    """Everything a checkpoint holds besides the data position."""

    step: int  # optimiser steps done
    model: nn.Module  # the (possibly DDP / FSDP-wrapped) `TeacherStep`
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: dict[str, Tensor]  # trainable parameter name (as in net.named_parameters) -> EMA tensor
    log: dict[str, float] = field(default_factory=dict)
    stop_signal: int | None = None  # the signal that stopped the run (train_loop returned "stopped")


class TeacherStep(nn.Module):
    """The network and its loss as one module, so DDP / FSDP2 wrap the whole step (and hook every forward)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch: dict[str, Tensor], draws: dict[str, Tensor], shift: float) -> dict[str, Tensor]:
        return teacher_losses(self.net, batch, draws, shift=shift)


# ------------------------------------------------------------------------------------------------------------
# Small pure pieces


def sample_seed(seed: int, step: int, slot: int) -> int:
    """A 63-bit seed for one sample of one step, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, step, slot]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def draw_batch(seed: int, step: int, first_slot: int, captions: Sequence[str], latent_shape: Sequence[int],
               pixel_shape: Sequence[int], device: torch.device, caption_dropout: float,
               lq_dropout: float) -> tuple[list[str], dict[str, Tensor]]:
    """Captions after dropout and the teacher draws of one micro-batch, one generator per sample."""
    kept, per_sample = [], []
    for i, caption in enumerate(captions):
        seed_i = sample_seed(seed, step, first_slot + i)
        kept += drop_captions([caption], caption_dropout, rng=random.Random(seed_i))
        generator = torch.Generator(device="cpu").manual_seed(seed_i)
        per_sample.append(draw_teacher_randomness(1, latent_shape, pixel_shape, generator, lq_dropout=lq_dropout))
    draws = {key: torch.cat([d[key] for d in per_sample]).to(device) for key in per_sample[0]}
    return kept, draws


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the parameters that learn, names as in the bare network (`lq_proj...`)."""
    net = unwrap(model).net
    return [(name, p) for name, p in net.named_parameters() if p.requires_grad]


def unwrap(model: nn.Module) -> TeacherStep:
    return model.module if hasattr(model, "module") else model  # DDP keeps the module as .module


def init_ema(model: nn.Module) -> dict[str, Tensor]:
    """EMA copies of the trainable parameters (frozen ones never change, so they need none)."""
    return {name: p.detach().clone() for name, p in trainable_parameters(model)}


@torch.no_grad()
def update_ema(ema: dict[str, Tensor], model: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * weights (beta(0) = 0: the EMA starts as the first step's weights)."""
    for name, p in trainable_parameters(model):
        ema[name].mul_(beta).add_(p.detach(), alpha=1.0 - beta)


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> tuple[float, bool]:
    """The reference's clip with the non-finite guard (`pid.training.optim.clip_gradients`); with FSDP2's
    sharded gradients (DTensors) the norm is taken over all shards by torch's own clip."""
    if not any(hasattr(p.grad, "full_tensor") for p in params):
        return optim.clip_gradients(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm).full_tensor().double())
    if not math.isfinite(norm):
        for p in params:
            p.grad = None
        return math.inf, False
    return norm, True


def reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean over ranks of a few scalars (one all-reduce), or the values themselves without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    packed /= dist.get_world_size()
    return dict(zip(keys, packed.tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on some rank (stop requests must be agreed on)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop checkpoints after the current step and exits (preemption)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (embedded use): no handler
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------------------------
# The loop


def lq_latent_of(batch: TrainBatchLike, encoders: Encoders, pixels: Tensor) -> Tensor:
    """The normalised clean latent of downsample(pixels): from the prepared cache, else encoded now (frozen)."""
    from pid.training import downsample

    cached = getattr(batch, "lq_latent", None)
    if cached is not None:
        return cached.to(device=pixels.device, dtype=torch.float32)
    with torch.no_grad():
        return encoders.encode_lq(downsample(pixels)).to(device=pixels.device, dtype=torch.float32)


def caption_embeds_of(batch: TrainBatchLike, captions: Sequence[str], encoders: Encoders,
                      device: torch.device) -> Tensor:
    """Caption embeddings after dropout (a dropped caption is encoded as ""): from the cache, else encoded now."""
    cached = getattr(batch, "caption_embeds", None)
    if cached is not None and encoders.encode_captions is None:
        empty = batch.null_caption_embed  # the cache's encoding of ""
        rows = [cached[i] if text else empty.reshape(cached.shape[1:]) for i, text in enumerate(captions)]
        return torch.stack(rows).to(device=device, dtype=torch.float32)
    with torch.no_grad():
        return encoders.encode_captions(list(captions)).to(device=device, dtype=torch.float32)


def train_loop(cfg: LoopConfig, state: TrainState, data: BatchSource, encoders: Encoders, device: torch.device,
               rank: int = 0, world_size: int = 1,
               on_log: Callable[[dict[str, Any]], None] | None = None,
               on_checkpoint: Callable[[TrainState, bool], None] | None = None,
               on_step: Callable[[TrainState], None] | None = None) -> str:
    """Run optimiser steps state.step .. cfg.steps - 1. Returns "done" or "stopped" (a signal arrived; a
    checkpoint was written). `on_checkpoint(state, final)` writes checkpoints; `on_log(record)` receives the
    metrics every `log_every` steps (mean over ranks); `on_step(state)` runs after each step (progress bar)."""
    model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
    params = [p for _, p in trainable_parameters(model)]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
    window: dict[str, float] = {}
    window_images, window_start = 0, time.perf_counter()
    batches = iter(data)
    status = "done"
    with StopRequest() as stop:
        while state.step < cfg.steps:
            step = state.step
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                pixels = batch.pixels.to(device=device, dtype=torch.float32)
                lq_latent = lq_latent_of(batch, encoders, pixels)
                first_slot = (micro * world_size + rank) * cfg.batch_size
                captions, draws = draw_batch(
                    cfg.seed, step, first_slot, batch.captions, tuple(lq_latent.shape[1:]),
                    tuple(pixels.shape[1:]), device, cfg.caption_dropout, cfg.lq_dropout)
                caption_embeds = caption_embeds_of(batch, captions, encoders, device)
                last = micro == cfg.grad_accum - 1
                sync = model.no_sync() if (hasattr(model, "no_sync") and not last) else nullcontext()
                if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
                    model.set_requires_gradient_sync(last)
                with sync:
                    with autocast:
                        losses = model({"pixels": pixels, "lq_latent": lq_latent,
                                        "caption_embeds": caption_embeds}, draws, dynamic_shift(*pixels.shape[-2:]))
                    (losses["total"] / cfg.grad_accum).backward()
                for key in LOSS_KEYS:
                    window[key] = window.get(key, 0.0) + float(losses[key].detach()) / cfg.grad_accum
                window_images += pixels.shape[0]
            grad_norm, finite = clip_gradients(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            beta = ema_beta(step, cfg.ema_rate)
            update_ema(state.ema, model, beta)
            state.step = step + 1
            window["steps"] = window.get("steps", 0.0) + 1.0  # a resumed run starts mid-window
            window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm
            window["skipped_steps"] = window.get("skipped_steps", 0.0) + (0.0 if finite else 1.0)
            state.log = {"loss": float(losses["total"].detach()), "lr": optimizer.param_groups[0]["lr"]}
            if on_step is not None:
                on_step(state)
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                n = window.pop("steps")
                elapsed = time.perf_counter() - window_start
                means = reduce_mean({k: v / n for k, v in window.items() if k != "skipped_steps"}, device)
                record = {"step": state.step, **{f"loss_{k}": means[k] for k in LOSS_KEYS},
                          "grad_norm": means["grad_norm"], "skipped_steps": int(window.get("skipped_steps", 0)),
                          "lr": optimizer.param_groups[0]["lr"], "ema_beta": beta,
                          "images_per_s": window_images * world_size / max(elapsed, 1e-9)}
                if on_log is not None:
                    on_log(record)
                window, window_images, window_start = {}, 0, time.perf_counter()
            stopping = any_rank(stop.signal is not None, device)
            if on_checkpoint is not None and (state.step % cfg.ckpt_every == 0 or state.step == cfg.steps
                                              or stopping):
                on_checkpoint(state, state.step == cfg.steps)
            if stopping and state.step < cfg.steps:
                status = "stopped"
                state.stop_signal = stop.signal or signal.SIGTERM  # another rank's signal: as a preemption
                break
    return status
