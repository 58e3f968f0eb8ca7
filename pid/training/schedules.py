"""Time, EMA and learning-rate schedules of the reference's training (spec §a, §c).

Pure functions of plain numbers or tensors; the trainer owns the state.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

NETWORK_TIME_SCALE = 1000.0  # the network sees 1000 * t (fm_timescale)
DEFAULT_BASE_SIZE = 2048
DEFAULT_BASE_SHIFT = 6.0


def dynamic_shift(
    height: int, width: int, base_size: int = DEFAULT_BASE_SIZE, base_shift: float = DEFAULT_BASE_SHIFT
) -> float:
    """The resolution-dependent time shift of one training step: base_shift * sqrt(sqrt(H*W) / base_size).

    6.0 at 2048x2048, 8.485 at 4096x4096. A Python float, as the reference computes it.
    """
    return base_shift * math.sqrt(math.sqrt(height * width) / base_size)


def shift_time(t: Tensor, shift: float) -> Tensor:
    """t' = shift * t / (1 + (shift - 1) * t); the identity for shift 1 (skipped, as the reference does)."""
    if shift == 1.0:
        return t
    return (shift * t) / (1.0 + (shift - 1.0) * t)


def logit_normal_time(t_normal: Tensor, shift: float = 1.0) -> Tensor:
    """Flow time t in (0, 1) from a standard-normal draw z: shift_time(sigmoid(z)) in fp32 (no clamping)."""
    return shift_time(torch.sigmoid(t_normal.float()), shift)


def dmd_time(t_normal: Tensor, t_min: float = 0.02, t_max: float = 0.99) -> Tensor:
    """DMD2 perturbation time: clamp(sigmoid(z), t_min, t_max), no shift (spec §d)."""
    return torch.sigmoid(t_normal.float()).clamp(t_min, t_max)


def power_ema_gamma(rate: float = 0.1) -> float:
    """EDM2 power-EMA exponent for a relative std `rate`: the largest real root of
    x^3 + 7x^2 + (16 - rate^-2) x + (12 - rate^-2) (6.937203937601809 for 0.1)."""
    inv = rate**-2
    return float(np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv]).real.max())


def ema_beta(iteration: int, rate: float = 0.1, iteration_shift: int = 0) -> float:
    """Power-EMA decay after the 0-based optimiser step `iteration`: (1 - 1/(n + 1))^(gamma + 1), n = it + shift.

    beta(0) = 0, so the EMA equals the weights after the first step.
    """
    n = iteration + iteration_shift
    if n <= 0:
        return 0.0
    return (1.0 - 1.0 / (n + 1)) ** (power_ema_gamma(rate) + 1.0)


def warmup_multiplier(
    step: int,
    warmup_steps: int,
    f_start: float = 1e-6,
    f_max: float = 1.0,
    f_min: float = 1.0,
    cycle_length: int = 10_000_000,
) -> float:
    """LR multiplier of the reference's LambdaLinearScheduler (one cycle): linear f_start -> f_max over
    `warmup_steps`, then linear f_max -> f_min until `cycle_length` (constant with the shipped f_min = f_max)."""
    if step < warmup_steps:
        return (f_max - f_start) / warmup_steps * step + f_start
    return f_min + (f_max - f_min) * (cycle_length - step) / (cycle_length - warmup_steps)
