"""Samplers: schedules equal the reference's numbers; update rules and draw order."""

import math

import pytest
import torch

from pid.errors import ConfigError
from pid.sampling import (
    distilled_schedule,
    dynamic_shift,
    sample_distilled,
    sample_dpm_solver,
    undistilled_schedule,
)


def test_distilled_schedules():
    f = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    assert distilled_schedule(4) == [f(0.999), f(0.866), f(0.634), f(0.342), 0.0]
    assert distilled_schedule(3) == [f(0.999), f(0.866), f(0.342), 0.0]
    assert distilled_schedule(2) == [f(0.999), f(0.634), 0.0]
    assert distilled_schedule(1) == [1.0, 0.0]


def test_distilled_rejects_zero_steps():
    with pytest.raises(ConfigError, match="at least 1 step"):
        distilled_schedule(0)


def test_more_than_four_distilled_steps_follow_upstreams_rule():
    f = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    # round(linspace(0, 4, 6)) = [0, 1, 2, 2, 3, 4] (half to even)
    assert distilled_schedule(5) == [f(0.999), f(0.866), f(0.634), f(0.634), f(0.342), 0.0]
    # ten steps end in two zeros; the sampler stops at the first, so it makes 9 network calls
    schedule = distilled_schedule(10)
    assert schedule[-2:] == [0.0, 0.0] and len(schedule) == 11
    calls = []
    noise = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample_distilled(lambda x, t: calls.append(t) or torch.zeros_like(x), noise, schedule,
                           torch.Generator().manual_seed(1))
    assert len(calls) == 9 and calls[-1] == f(0.342)
    assert torch.isfinite(out).all()


def test_undistilled_schedule_matches_reference_numbers():
    expected = [
        0.99983,
        0.99293,
        0.98554,
        0.9776,
        0.96904,
        0.95981,
        0.9498,
        0.93893,
        0.92706,
        0.91407,
        0.89977,
        0.88398,
        0.86643,
        0.84681,
        0.82474,
        0.79973,
        0.77115,
        0.73818,
        0.69971,
        0.65425,
        0.5997,
        0.53304,
        0.44972,
        0.34261,
        0.19983,
        0.0,
    ]
    assert [round(t, 5) for t in undistilled_schedule(25, 6.0)] == expected


def test_dynamic_shift_values():
    assert math.isclose(dynamic_shift(2048, 2048, 6.0, 2048), 6.0)
    assert round(dynamic_shift(3840, 3840, 6.0, 2048), 3) == 8.216
    assert round(dynamic_shift(4096, 4096, 6.0, 2048), 3) == 8.485


def test_distilled_update_and_draw_order():
    x0_target = torch.full((1, 3, 4, 4), 0.25)
    calls = []

    def velocity(x, t):  # a perfect model for x0_target: v = (x - x0) / t
        calls.append(t)
        return (x - x0_target) / t

    g = torch.Generator().manual_seed(7)
    noise = torch.randn(1, 3, 4, 4, generator=g)
    out = sample_distilled(velocity, noise, distilled_schedule(4), g)
    assert torch.allclose(out, x0_target, atol=1e-6)
    assert len(calls) == 4

    # Re-noise draws come from the same generator, after the initial noise, in step order.
    seen = []

    def recording(x, t):
        seen.append(x.clone())
        return torch.zeros_like(x)  # x0 = x

    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 3, 4, 4, generator=g)
    sample_distilled(recording, noise, distilled_schedule(4), g)
    g2 = torch.Generator().manual_seed(3)
    torch.randn(1, 3, 4, 4, generator=g2)
    eps1 = torch.randn(1, 3, 4, 4, generator=g2)
    t1 = distilled_schedule(4)[1]
    assert torch.allclose(seen[1], (1 - t1) * noise + t1 * eps1, atol=1e-6)


def test_dpm_solver_recovers_exact_x0_and_counts_calls():
    x0_target = torch.linspace(-1, 1, 48).reshape(1, 3, 4, 4)
    calls = []

    def velocity(x, t):
        calls.append(t)
        return (x - x0_target) / t

    noise = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample_dpm_solver(velocity, noise, undistilled_schedule(10, 6.0))
    assert len(calls) == 10
    assert torch.allclose(out, x0_target, atol=1e-5)


def test_dpm_solver_second_order_term_is_used():
    # A model whose x0 estimate drifts with t: first- and second-order results must differ.
    noise = torch.ones(1, 1, 1, 1)
    velocity = lambda x, t: x - (1 - t)  # noqa: E731
    two = sample_dpm_solver(velocity, noise, undistilled_schedule(6, 3.0))
    # hand-rolled first-order (DDIM-like) for comparison
    sched = undistilled_schedule(6, 3.0)
    x = noise.clone()
    for t, tn in zip(sched[:-1], sched[1:]):
        x0 = x - t * velocity(x, t)
        if tn == 0:
            x = x0
            break
        h = math.log((1 - tn) / tn) - math.log((1 - t) / t)
        x = (tn / t) * x + (1 - tn) * (1 - math.exp(-h)) * x0
    assert not torch.allclose(two, x)
