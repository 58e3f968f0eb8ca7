"""Optimiser, LR schedule, gradient clipping and power EMA as the reference trains (spec §a)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from pid.training.schedules import ema_beta, warmup_multiplier

GRAD_CLIP_NORM = 0.1


def build_optimizer(
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW with ONE parameter group holding every trainable parameter; weight decay on all of them
    (biases and norms included), as the reference. Fused where every parameter is on CUDA."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters to optimise")
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused)


def build_warmup_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, f_start: float = 1e-6
) -> LambdaLR:
    """Linear warm-up from f_start * lr to lr over `warmup_steps` scheduler steps, then constant."""
    return LambdaLR(optimizer, partial(warmup_multiplier, warmup_steps=warmup_steps, f_start=f_start))


def global_grad_norm(params: Iterable[nn.Parameter]) -> float:
    """L2 norm of all gradients, accumulated in fp64 (inf when non-finite)."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            n = float(p.grad.detach().float().norm())
            total += n * n
    return math.sqrt(total) if math.isfinite(total) else math.inf


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float = GRAD_CLIP_NORM) -> tuple[float, bool]:
    """The reference's GradClip: NaN/inf grads -> 0, then clip to `max_norm` (L2, global).

    Returns (norm before clipping, step_ok). When the norm is non-finite (fp64 scan or the clip's
    own fp32 sum overflowing), every grad is dropped (set to None) so the optimiser step is a true
    no-op (no weight-decay drift) and step_ok is False.
    """
    params = [p for p in params if p.grad is not None]
    for p in params:
        torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0, out=p.grad)
    robust = global_grad_norm(params)
    clip_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    if not (math.isfinite(robust) and math.isfinite(clip_norm)):
        for p in params:
            p.grad = None
        return math.inf, False
    return clip_norm, True


class PowerEMA:
    """EDM2-style power EMA of a network's parameters (all of them, fp32): ema <- beta ema + (1 - beta) net,
    beta = ema_beta(iteration, rate). Update after optimizer.step() with the 0-based step index
    (beta(0) = 0, so the EMA starts as the weights after the first step)."""

    def __init__(self, net: nn.Module, rate: float = 0.1) -> None:
        self.rate = rate
        self.params = [p.detach().float().clone() for p in net.parameters()]

    @torch.no_grad()
    def update(self, net: nn.Module, iteration: int) -> float:
        beta = ema_beta(iteration, self.rate)
        current = [p.detach().float() for p in net.parameters()]
        torch._foreach_mul_(self.params, beta)
        torch._foreach_add_(self.params, current, alpha=1.0 - beta)
        return beta

    @torch.no_grad()
    def copy_to(self, net: nn.Module) -> None:
        for target, source in zip(net.parameters(), self.params, strict=True):
            target.copy_(source.to(target.dtype))

    def state_dict(self) -> dict[str, object]:
        return {"rate": self.rate, "params": self.params}

    def load_state_dict(self, state: dict[str, object]) -> None:
        params = state["params"]
        if len(params) != len(self.params):
            raise ValueError(f"EMA state has {len(params)} tensors, this network {len(self.params)}")
        self.rate = float(state["rate"])
        self.params = [p.clone() for p in params]
