"""The distillation loop's wiring, which the per-step goldens (one step's losses and gradients) cannot see: which
network each phase steps, that no gradient leaks into the frozen teacher or into the networks the phase does not
train, that every gradient is cleared between phases, and that the student's EMA follows the student on student
iterations only (spec §d: "only the current phase's optimisers/schedulers" step, "EMA on student steps (β(it//6))").
Tiny networks on CPU, driven through the real plan (the CLI parser) and the real `distill_loop`."""

from __future__ import annotations

import torch

from train_harness import plan_for, prepare, tiny_encoders


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_phase_steps_only_its_networks_clears_every_gradient_and_the_ema_follows_student_steps(tmp_path):
    from pid.train.distill_run import build_distill_step, make_optimizers, negative_prompt_embeds
    from pid.train.setup import init_file, open_data
    from pid.training.distill_loop import DistillConfig, DistillState, distill_loop, init_student_ema
    from pid.training.schedules import ema_beta

    torch.manual_seed(0)
    plan = plan_for(prepare(tmp_path), "mode=distill", "batch_size=1", "steps=4", "student_update_freq=2",
                    "lr=1e-3", "fake_score_lr=1e-3", "discriminator_lr=1e-3", "run_name=wiring")
    device = torch.device("cpu")
    step = build_distill_step(plan, str(init_file(plan)), device)
    optimizers, schedulers = make_optimizers(step, plan)
    state = DistillState(step=0, model=step, optimizers=optimizers, schedulers=schedulers, ema=init_student_ema(step))
    encoders = tiny_encoders()
    cfg = DistillConfig(steps=plan.steps, batch_size=1, dmd=plan.distill.dmd_config(), seed=plan.seed,
                        ckpt_every=10**6, log_every=10**6)
    nets = {"student": step.student, "fake_score": step.fake_score, "discriminator": step.discriminator,
            "teacher": step.teacher}
    before = {name: _snapshot(net) for name, net in nets.items()}
    ema_before = {k: v.clone() for k, v in state.ema.items()}
    seen: list[int] = []

    def check(current: DistillState) -> None:
        nonlocal before, ema_before
        it = current.step - 1
        seen.append(it)
        student_phase = it % 2 == 0
        after = {name: _snapshot(net) for name, net in nets.items()}
        leftover = [f"{name}.{p}" for name, net in nets.items() for p, param in net.named_parameters()
                    if param.grad is not None]
        assert not leftover, f"iteration {it}: gradients left after the step, e.g. {leftover[0]}"
        assert _same(after["teacher"], before["teacher"]), f"iteration {it} changed the frozen teacher"
        trained = {"student"} if student_phase else {"fake_score", "discriminator"}
        for name in ("student", "fake_score", "discriminator"):
            moved = not _same(after[name], before[name])
            assert moved == (name in trained), f"iteration {it} ({'student' if student_phase else 'fake'} " \
                                               f"phase): {name} {'moved' if moved else 'did not move'}"
        if student_phase:
            beta = ema_beta(it // 2, cfg.ema_rate)
            for name, value in current.ema.items():
                expected = beta * ema_before[name] + (1 - beta) * after["student"][name]
                torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        else:
            assert all(torch.equal(current.ema[k], ema_before[k]) for k in ema_before), f"EMA moved at {it}"
        before, ema_before = after, {k: v.clone() for k, v in current.ema.items()}

    null = negative_prompt_embeds(plan, encoders, device)
    status = distill_loop(cfg, state, open_data(plan, 0, 1), encoders, null, device, on_step=check)
    assert status == "done" and seen == list(range(4))
    # the student's first step sets its EMA to the stepped weights (beta(0) = 0), later ones average
    assert ema_beta(0, cfg.ema_rate) == 0.0 and 0.0 < ema_beta(1, cfg.ema_rate) < 1.0
