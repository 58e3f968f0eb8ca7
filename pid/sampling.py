"""Samplers of the PiD decoder as small pure functions of a velocity function.

A velocity function maps (x_t [B, 3, H, W] fp32, t_flow: float in [0, 1]) to v = eps - x0;
the caller owns the network, precision and conditioning. Time runs from 1 (noise) to 0.

Randomness, in draw order (so a seed reproduces an image on every run and device type):
the caller draws the initial noise x_T = randn([B, 3, H, W]) from its generator; the distilled
sampler then draws one randn of the same shape per re-noising step, in step order, from the
same generator (4 steps: 1 + 3 draws). The undistilled sampler draws nothing after x_T.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pid.errors import ConfigError

VelocityFn = Callable[[Tensor, float], Tensor]

# Fixed time list of the 4-step DMD-distilled students.
DISTILLED_T_LIST: tuple[float, ...] = (0.999, 0.866, 0.634, 0.342, 0.0)
MAX_DISTILLED_STEPS = len(DISTILLED_T_LIST) - 1
DEFAULT_SHIFT = 6.0


def _fp32(value: float) -> float:
    """The value as the fp32 number the reference computes with."""
    return float(torch.tensor(value, dtype=torch.float32))


def distilled_schedule(steps: int = MAX_DISTILLED_STEPS) -> list[float]:
    """Times visited by the distilled sampler, ending at 0.

    4 steps use the list as is; other counts index it at round(linspace(0, 4, n + 1)) (half to even), e.g.
    2 -> [0.999, 0.634, 0]; 1 step is a single call at t = 1.0. More than 4 steps follow the same upstream
    rule, which revisits times of the 5-point list (the decoders were distilled for 4; callers warn).
    """
    if steps < 1:
        raise ConfigError(f"distilled PiD checkpoints take at least 1 step, got {steps}")
    if steps == 1:
        return [1.0, 0.0]
    index = torch.linspace(0, MAX_DISTILLED_STEPS, steps + 1, dtype=torch.float64).round().long()
    return [_fp32(DISTILLED_T_LIST[i]) for i in index.tolist()]


def sample_distilled(
    velocity_fn: VelocityFn,
    noise: Tensor,
    schedule: Sequence[float],
    generator: torch.Generator | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> Tensor:
    """x0-predict-and-renoise sampling: x0 = x - t v, then x = (1 - t') x0 + t' eps (fresh eps)."""
    x = noise.float()
    x0 = x
    for i, (t_cur, t_next) in enumerate(zip(schedule[:-1], schedule[1:], strict=True)):
        v = velocity_fn(x, t_cur)
        x0 = (x.double() - t_cur * v.double()).float()
        if callback is not None:
            callback(i, t_cur)
        if t_next > 0:
            eps = torch.randn(
                x.shape, generator=generator, device=_gen_device(generator, x), dtype=torch.float32
            )
            x = (1.0 - t_next) * x0 + t_next * eps.to(x.device)
        else:
            return x0  # schedules of more than 4 steps end in repeated zeros: t = 0 is reached once
    return x0


def dynamic_shift(height: int, width: int, base_shift: float, base_size: int) -> float:
    """base_shift * sqrt(sqrt(H * W) / base_size): 6.0 at 2048^2, 8.485 at 4096^2 for v1.5."""
    return base_shift * math.sqrt(math.sqrt(height * width) / base_size)


def undistilled_schedule(steps: int, shift: float = DEFAULT_SHIFT) -> list[float]:
    """Shifted time grid of the undistilled sampler: t_0 = s(0.999) > ... > t_N = 0.

    u = linspace(0, 0.999, N + 1), s(u) = shift u / (1 + (shift - 1) u), reversed.
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    u = 1.0 - torch.linspace(1.0, 0.001, steps + 1, dtype=torch.float64)
    shifted = shift * u / (1.0 + (shift - 1.0) * u)
    return shifted.flip(0).tolist()


def sample_dpm_solver(
    velocity_fn: VelocityFn,
    noise: Tensor,
    schedule: Sequence[float],
    callback: Callable[[int, float], None] | None = None,
) -> Tensor:
    """DPM-Solver++(2M), data prediction, on alpha_t = 1 - t, sigma_t = t; first and last steps order 1.

    With lambda(t) = log((1 - t) / t) and h = lambda(t') - lambda(t):
    x' = (t'/t) x + (1 - t')(1 - e^-h) x0 [+ 0.5 (1 - t')(1 - e^-h)(x0 - x0_prev) h / h_prev].
    The final step into t = 0 returns the last x0 estimate. One network call per step.
    """
    x = noise.float()
    x0_prev: Tensor | None = None
    h_prev = 0.0
    for i, (t_cur, t_next) in enumerate(zip(schedule[:-1], schedule[1:], strict=True)):
        x0 = (x.double() - t_cur * velocity_fn(x, t_cur).double()).float()
        if callback is not None:
            callback(i, t_cur)
        if t_next <= 0:
            return x0
        h = math.log((1 - t_next) / t_next) - math.log((1 - t_cur) / t_cur)
        coeff = (1 - t_next) * (1 - math.exp(-h))
        x_next = (t_next / t_cur) * x + coeff * x0
        if x0_prev is not None:
            x_next = x_next + 0.5 * coeff * (h / h_prev) * (x0 - x0_prev)
        x, x0_prev, h_prev = x_next, x0, h
    return x


def _gen_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    return generator.device if generator is not None else like.device
