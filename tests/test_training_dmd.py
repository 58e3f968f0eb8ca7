"""DMD2 distillation against the reference's `PidDistillModel.training_step` goldens (tiny PidNets, fp32 CPU):
the student phase (iteration 60) and the fake-score + discriminator phase (iteration 61), replayed from
the recorded draws, and the student's 4-step SDE / ODE and 1-step samplers."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_training_pieces import assert_close

from pid.sampling import distilled_schedule, sample_distilled
from pid.training import (
    DMDConfig,
    draw_dmd_randomness,
    drop_captions,
    fake_score_losses,
    gan_generator_weight,
    is_student_step,
    sample_student_ode,
    set_trainable,
    student_losses,
    student_t_list,
)
from pid.training.dmd import dmd_inputs, student_x0, velocity_to_x0

from training_golden import hq_images, json_data, lq_latent_of, stub_caption_embeds, tensors, tiny_dmd_nets

CAPTIONS = ["a red fox", "a blue car"]
CFG = DMDConfig(feature_blocks=(1,))  # the tiny nets have 2 patch blocks; the golden taps block 1


def golden_draws(iteration: int) -> dict[str, torch.Tensor]:
    t = tensors("dmd_step")
    p = f"it{iteration}_"
    draws = {
        "degrade_apply_u": t[p + "draw00_rand"],
        "degrade_sigma_u": t[p + "draw01_rand"],
        "degrade_noise": t[p + "draw02_randn_like"],
        "student_noise": t[p + "draw05_randn_like"],
        "t_index": t[p + "draw06_randint"],
        "t_normal": t[p + "draw07_randn"],
        "noise": t[p + "draw08_randn_like"],
    }
    if p + "draw09_randn_like" in t:
        draws["r1_noise"] = t[p + "draw09_randn_like"]
    return draws


def golden_captions(iteration: int) -> list[str]:
    t = tensors("dmd_step")
    draws = [float(t[f"it{iteration}_draw0{k}_random"]) for k in (3, 4)]
    return ["" if u < 0.1 else caption for u, caption in zip(draws, CAPTIONS)]


def golden_batch(iteration: int) -> dict[str, torch.Tensor]:
    pixels = hq_images(2)
    return {
        "pixels": pixels,
        "lq_latent": lq_latent_of(pixels),
        "caption_embeds": stub_caption_embeds(golden_captions(iteration)),
        "null_embeds": stub_caption_embeds(["NEGATIVE"]),
    }


def grad_norm(module) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in module.parameters() if p.grad is not None))


def test_dmd_phases_and_gan_weight():
    assert [is_student_step(it) for it in (0, 1, 5, 6, 60, 61)] == [True, False, False, True, True, False]
    assert gan_generator_weight(60) == pytest.approx(json_data("dmd_step")["steps"]["60"]["gan_weight_at_iteration"])
    assert gan_generator_weight(61) == pytest.approx(json_data("dmd_step")["steps"]["61"]["gan_weight_at_iteration"])
    assert gan_generator_weight(0) == 0.0 and gan_generator_weight(500) == 0.05


def test_dmd_draws_follow_the_reference_order():
    steps = json_data("dmd_step")["steps"]
    for iteration in (60, 61):
        step = steps[str(iteration)]
        torch.manual_seed(step["torch.manual_seed"])
        random.seed(step["random.seed"])
        draws = draw_dmd_randomness(2, (16, 2, 2), (3, 64, 64), student_phase=is_student_step(iteration))
        assert set(draws) == set(golden_draws(iteration))
        for key, value in golden_draws(iteration).items():
            assert torch.equal(draws[key], value), (iteration, key)
        assert drop_captions(CAPTIONS) == golden_captions(iteration)


def test_dmd_inputs_match_reference():
    t = tensors("dmd_step")
    for iteration in (60, 61):
        inp = dmd_inputs(golden_batch(iteration), golden_draws(iteration))
        assert_close(inp.lq_latent, t[f"it{iteration}_LQ_latent"])
        assert_close(inp.degrade_sigma, t[f"it{iteration}_degrade_sigma"])
        trace = json_data("dmd_step")["steps"][str(iteration)]["network_call_trace_in_order"]
        assert float(inp.caption_embeds.sum()) == pytest.approx(trace[0]["y_sum"], rel=1e-6)


def test_student_phase_matches_reference():
    student, teacher, fake_score, discriminator = tiny_dmd_nets()
    set_trainable(student, "full")
    discriminator.requires_grad_(False)
    batch, draws = golden_batch(60), golden_draws(60)
    out = student_losses(student, teacher, fake_score, discriminator, batch, draws, iteration=60, cfg=CFG)
    g = json_data("dmd_step")["steps"]["60"]
    t = tensors("dmd_step")
    # the exact tensors the reference handed to its VSD and GAN losses
    inp = dmd_inputs(batch, draws)
    with torch.no_grad():
        x0_student = student_x0(student, inp, draws, CFG)
    assert_close(x0_student, t["it60_loss_io::variational_score_distillation_loss_arg0"])
    assert_close(out["vsd"], g["outputs"]["vsd_loss"])
    assert_close(out["vsd"], t["it60_loss_io::variational_score_distillation_loss_out"][0])
    assert_close(out["gan_gen"], g["outputs"]["gan_loss_gen"])
    assert_close(out["total"], g["total_loss(backward)"])
    out["total"].backward()
    assert grad_norm(student) == pytest.approx(g["grad_global_l2_norms"]["net"], rel=1e-5)
    assert all(p.grad is None for m in (teacher, fake_score, discriminator) for p in m.parameters())


def test_student_phase_teacher_cfg_target_matches_reference():
    """x0_teacher = x_t - t (n_u + 3 (n_c - n_u)) with the negative prompt as the unconditional branch."""
    _, teacher, fake_score, _ = tiny_dmd_nets()
    t = tensors("dmd_step")
    x0_student = t["it60_loss_io::variational_score_distillation_loss_arg0"]
    draws = golden_draws(60)
    inp = dmd_inputs(golden_batch(60), draws)
    tt = torch.sigmoid(draws["t_normal"]).clamp(0.02, 0.99)
    x_t = (1 - tt.view(-1, 1, 1, 1)) * x0_student + tt.view(-1, 1, 1, 1) * draws["noise"]
    with torch.no_grad():
        args = (tt * 1000, inp.caption_embeds, inp.lq_latent, inp.degrade_sigma)
        cond = teacher(x_t, *args)
        uncond = teacher(x_t, tt * 1000, inp.null_embeds.expand(2, -1, -1), inp.lq_latent, inp.degrade_sigma)
        fake = fake_score(x_t, *args)
    assert_close(velocity_to_x0(x_t, uncond + 3 * (cond - uncond), tt), t["it60_loss_io::variational_score_distillation_loss_arg1"])
    assert_close(velocity_to_x0(x_t, fake, tt), t["it60_loss_io::variational_score_distillation_loss_arg2"])


def test_fake_score_phase_matches_reference():
    student, teacher, fake_score, discriminator = tiny_dmd_nets()
    set_trainable(fake_score, "full")
    discriminator.requires_grad_(True)
    batch, draws = golden_batch(61), golden_draws(61)
    out = fake_score_losses(student, teacher, fake_score, discriminator, batch, draws, cfg=CFG)
    g = json_data("dmd_step")["steps"]["61"]
    t = tensors("dmd_step")
    assert_close(out["dsm"], g["outputs"]["dsm_loss"])
    assert_close(out["dsm"], t["it61_loss_io::denoising_score_matching_loss_flow_out"][0])
    assert_close(out["gan_disc"], g["outputs"]["gan_loss_disc"])
    # R1 is the mean square of d, the difference of two nearly equal fp32 logits (|d| ~ 7e-3, logits ~ 0.2), so
    # its relative error is that of the logits over |d|: 2e-5 to 2e-4 depending on the CPU's kernels. Held to
    # what the logits' own agreement (1e-5 of their scale, tested below) implies: |dR1| <= 2 sqrt(R1) e + e^2.
    logit_error = 1e-5 * float(t["it61_loss_io::gan_loss_discriminator_arg0"].abs().max())
    r1_golden = g["outputs"]["gan_loss_r1"]
    assert abs(float(out["r1"]) - r1_golden) <= 2 * r1_golden**0.5 * logit_error + logit_error**2
    assert_close(out["total"], g["total_loss(backward)"])
    out["total"].backward()
    norms = g["grad_global_l2_norms"]
    assert grad_norm(fake_score) == pytest.approx(norms["fake_score"], rel=1e-5)
    assert grad_norm(discriminator) == pytest.approx(norms["discriminator"], rel=1e-4)
    assert all(p.grad is None for m in (student, teacher) for p in m.parameters())


def test_fake_score_phase_discriminator_logits_match_reference():
    student, teacher, _, discriminator = tiny_dmd_nets()
    batch, draws = golden_batch(61), golden_draws(61)
    inp = dmd_inputs(batch, draws)
    t = tensors("dmd_step")
    with torch.no_grad():
        x0_student = student_x0(student, inp, draws, CFG)
        tt = torch.sigmoid(draws["t_normal"]).clamp(0.02, 0.99).view(-1, 1, 1, 1)
        x_t = (1 - tt) * x0_student + tt * draws["noise"]
        real_x_t = (1 - tt) * inp.pixels + tt * draws["noise"]
        args = (tt.flatten() * 1000, inp.caption_embeds, inp.lq_latent, inp.degrade_sigma)
        fake = teacher.forward_train(x_t, *args, feature_blocks=[1], features_only=True)
        real = teacher.forward_train(real_x_t, *args, feature_blocks=[1], features_only=True)
        assert fake.velocity is None
        assert_close(discriminator(real.block_features), t["it61_loss_io::gan_loss_discriminator_arg0"])
        assert_close(discriminator(fake.block_features), t["it61_loss_io::gan_loss_discriminator_arg1"])
    assert_close(draws["noise"] - x0_student, t["it61_loss_io::denoising_score_matching_loss_flow_arg1"])


def _student_velocity(student, lq_latent):
    embeds = stub_caption_embeds(CAPTIONS)
    sigma = torch.tensor([0.2, 0.0])

    def velocity(x, t_flow):
        t = torch.as_tensor(t_flow, dtype=torch.float32).expand(x.shape[0]) * 1000
        return student(x, t, embeds, lq_latent, sigma)

    return velocity


def test_released_student_sampler_matches_reference():
    """pid.sampling.sample_distilled (what inference runs for released students) is the reference's
    _student_sample_loop (SDE, 4 steps) and _student_sample_1step, draw for draw."""
    student, *_ = tiny_dmd_nets()
    t = tensors("dmd_step")
    velocity = _student_velocity(student, t["it60_LQ_latent"])
    gen = torch.Generator().manual_seed(77)
    noise = torch.randn(2, 3, 64, 64, generator=gen)
    assert torch.equal(noise, t["sampler_sde_draw00_randn"])
    with torch.no_grad():
        sde = sample_distilled(velocity, noise, distilled_schedule(4), generator=gen)
        one = sample_distilled(velocity, noise, distilled_schedule(1))
    assert_close(sde, t["sampler_sde_4step_out"])
    assert_close(one, t["sampler_1step_out"])
    assert_close(torch.tensor(distilled_schedule(4)), student_t_list(4), rel=0)


def test_student_ode_sampler_matches_reference():
    student, *_ = tiny_dmd_nets()
    t = tensors("dmd_step")
    velocity = _student_velocity(student, t["it60_LQ_latent"])
    with torch.no_grad():
        out = sample_student_ode(velocity, t["sampler_ode_draw00_randn"], student_t_list(4))
    assert_close(out, t["sampler_ode_4step_out"])
    assert float(out.sum()) == pytest.approx(json_data("dmd_step")["samplers"]["ode"]["out_sum"], rel=1e-5)


@pytest.mark.parametrize("sample_type", ["sde", "ode"])
def test_self_rollout_to_the_last_step_is_the_reference_sampler(sample_type):
    """The self-rollout student input (not shipped) run to k = 3 is the 4-step sampler: against the
    golden `samplers` outputs, with the sampler's recorded re-noise draws as the rollout noise."""
    from pid.training.dmd import DMDInputs, self_rollout_x0

    student, *_ = tiny_dmd_nets()
    t = tensors("dmd_step")
    p = f"sampler_{sample_type}_"
    inp = DMDInputs(
        pixels=torch.zeros(2, 3, 64, 64),
        caption_embeds=stub_caption_embeds(CAPTIONS),
        null_embeds=stub_caption_embeds(["NEGATIVE"]),
        lq_latent=t["it60_LQ_latent"],
        degrade_sigma=torch.tensor([0.2, 0.0]),
    )
    rollout_noise = [t[f"{p}draw0{i}_randn_like"] for i in (1, 2, 3)] if sample_type == "sde" else []
    draws = {
        "student_noise": t[f"{p}draw00_randn"],
        "rollout_steps": torch.tensor([3]),
        "rollout_noise": torch.stack(rollout_noise) if rollout_noise else torch.zeros(0, 2, 3, 64, 64),
    }
    set_trainable(student, "full")
    x0 = self_rollout_x0(student, inp, draws, student_t_list(4), sample_type)
    assert_close(x0, t[f"{p}4step_out"])
    x0.sum().backward()  # exactly one call carries grad: the rollout itself does not
    assert student.lq_proj.latent_proj[0].weight.grad is not None
    # k = 0 is the student's one step from noise at t = 0.999
    with torch.no_grad():
        first = self_rollout_x0(student, inp, {**draws, "rollout_steps": torch.tensor([0])}, student_t_list(4))
        direct = velocity_to_x0(
            draws["student_noise"],
            student(draws["student_noise"], torch.full((2,), 999.0), inp.caption_embeds, inp.lq_latent, inp.degrade_sigma),
            torch.full((2,), 0.999),
        )
    assert_close(first, direct)


def test_self_rollout_draws():
    gen = torch.Generator().manual_seed(3)
    draws = draw_dmd_randomness(
        2, (16, 2, 2), (3, 8, 8), student_phase=True, generator=gen, student_input_mode="self_rollout"
    )
    k = int(draws["rollout_steps"])
    assert 0 <= k < 4 and draws["rollout_noise"].shape == (k, 2, 3, 8, 8) and "t_index" not in draws
    with pytest.raises(ValueError, match="student_input_mode"):
        draw_dmd_randomness(2, (16, 2, 2), (3, 8, 8), student_phase=True, student_input_mode="rollout")
