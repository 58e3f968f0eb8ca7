"""Optimiser pieces of the reference's recipe: AdamW group, warm-up LambdaLR, grad clip with the
non-finite guard, power EMA."""

from __future__ import annotations

import math

import pytest
import torch
from test_training_pieces import assert_close
from torch import nn

from pid.training import PowerEMA, build_optimizer, build_warmup_scheduler, clip_gradients, ema_beta

from training_golden import json_data


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def test_adamw_one_group_with_weight_decay_on_all_trainable():
    model = _model()
    model[1].weight.requires_grad_(False)
    opt = build_optimizer(model.parameters(), lr=5e-5, weight_decay=1e-3)
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["weight_decay"] == 1e-3 and group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert len(group["params"]) == 3  # the frozen LayerNorm weight is left out
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer([p for p in model.parameters() if not p.requires_grad], lr=1.0, weight_decay=0.0)


def test_warmup_scheduler_follows_the_reference_multipliers():
    expected = json_data("schedules")["lr_multiplier"]["W=2000 (teacher/finetune)"]
    opt = build_optimizer(_model().parameters(), lr=5e-5, weight_decay=0.0)
    sched = build_warmup_scheduler(opt, 2000)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(2):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([5e-5 * expected["0"], 5e-5 * expected["1"], 5e-5 * (2 * 0.9999990 / 2000 + 1e-6)])
    for step in ("1000", "1999", "2000", "2001", "20000"):
        assert sched.lr_lambdas[0](int(step)) == pytest.approx(expected[step], rel=1e-12)


def test_grad_clip_clips_to_point_one_and_zeroes_nan():
    model = _model()
    model(torch.randn(8, 4)).pow(2).sum().mul(100).backward()
    model[0].bias.grad[0] = float("nan")
    norm, ok = clip_gradients(model.parameters())
    assert ok and norm > 0.1
    assert model[0].bias.grad[0] == 0.0
    total = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    assert total == pytest.approx(0.1, rel=1e-5)


def test_non_finite_gradients_skip_the_step():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(torch.randn(8, 4)).sum().backward()
    model[0].weight.grad.fill_(3e38)  # finite elements whose squared sum overflows
    norm, ok = clip_gradients(model.parameters())
    assert not ok and math.isinf(norm)
    assert all(p.grad is None for p in model.parameters())
    opt.step()  # a true no-op: no weight-decay drift either
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_power_ema_starts_at_the_first_step_and_follows_beta():
    model = _model()
    ema = PowerEMA(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert ema.update(model, 0) == 0.0
    assert all(torch.equal(e, p.detach()) for e, p in zip(ema.params, model.parameters()))
    snapshot = [e.clone() for e in ema.params]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    beta = ema.update(model, 10)
    assert beta == ema_beta(10)
    for e, s, p in zip(ema.params, snapshot, model.parameters()):
        assert_close(e, beta * s + (1 - beta) * p.detach())
    target = _model()
    ema.copy_to(target)
    assert all(torch.equal(e, p.detach()) for e, p in zip(ema.params, target.parameters()))
    restored = PowerEMA(_model())
    restored.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.params, ema.params))
