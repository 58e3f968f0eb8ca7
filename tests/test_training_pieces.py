"""The reference's training formulas, piece by piece, against its golden values (fp32 CPU, 1e-5 relative).

Golden files: tests/data/training_golden/ (README there); each test names the reference function it pins.
"""

from __future__ import annotations

import math

import pytest
import torch

from pid.training import (
    color_align_loss,
    dmd_time,
    downsample,
    dsm_loss,
    dynamic_shift,
    ema_beta,
    flow_matching_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    logit_normal_time,
    noise_latent,
    noisy_pixels,
    power_ema_gamma,
    r1_loss,
    rgb_to_ycbcr,
    shift_time,
    student_t_list,
    vsd_loss,
    warmup_multiplier,
)
from pid.training.losses import color_align_per_sample
from pid.training.schedules import NETWORK_TIME_SCALE

from training_golden import json_data, tensors


def assert_close(actual, expected, rel: float = 1e-5) -> None:
    """max |actual - expected| <= rel * max(|expected|) (the golden README's atol = 1e-5 * scale)."""
    actual = torch.as_tensor(actual.detach() if isinstance(actual, torch.Tensor) else actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(expected.abs().max()), 1e-12)
    err = float((actual - expected).abs().max())
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:.0e} * {scale:.3e}"


# ------------------------------------------------------------------------------------------------
# colour alignment (PidModel._rgb_to_ycbcr, _lq_latent_image_align_loss)
# ------------------------------------------------------------------------------------------------


def test_rgb_to_ycbcr_matches_reference():
    g = json_data("color_align")["rgb_to_ycbcr"]
    rgb = torch.tensor(g["input_rgb_list"], dtype=torch.float64)[:, :, None, None]
    assert_close(rgb_to_ycbcr(rgb)[:, :, 0, 0], g["output_ycbcr_list"], rel=1e-12)


def test_color_align_loss_matches_reference():
    g = json_data("color_align")["align_loss"]
    t = tensors("color_align")
    pred, target, sigma = t["pred"], t["target"], t["sigma"]
    keep_all = torch.ones(3, dtype=torch.bool)
    keep_ttf = torch.tensor([True, True, False])
    out = g["outputs"]
    assert_close(color_align_per_sample(pred, target), g["per_sample_unweighted_charbonnier_mean"])
    assert_close(color_align_loss(pred, target, sigma, keep_all), out["all_keep"])
    assert_close(color_align_loss(pred, target, sigma, keep_ttf), out["keep_mask_TTF"])
    assert_close(color_align_loss(pred, target, None, keep_all), out["no_sigma"])
    # a target at another size is area-resized to the prediction's
    assert_close(color_align_loss(pred, t["target_big"], sigma, keep_all), out["target16_area_resized"])
    assert_close(0.8 * color_align_loss(pred, target, sigma, keep_all), g["weighted_total_for_all_keep(weight*loss)"])


# ------------------------------------------------------------------------------------------------
# time: dynamic shift, logit-normal sampling, DMD clamp, student t-list
# ------------------------------------------------------------------------------------------------


def test_dynamic_shift_and_time_shift_match_reference():
    g = json_data("timesteps")["shift"]
    base = g["dynamic_shift_config"]
    for row in g["rows"]:
        shift = dynamic_shift(row["H"], row["W"], base["base_image_size_for_shift_calc"], base["base_shift"])
        assert shift == pytest.approx(row["shift"], rel=1e-12)
        t_in = torch.tensor(row["t_in"], dtype=torch.float32)
        assert_close(shift_time(t_in, shift), row["t_shifted_float32"])
    assert dynamic_shift(2048, 2048) == pytest.approx(6.0)
    assert dynamic_shift(4096, 4096) == pytest.approx(6.0 * math.sqrt(2))


def test_logit_normal_time_matches_reference():
    g = json_data("timesteps")["t_sampling"]
    seeded = g["seeded_example"]
    torch.manual_seed(seeded["torch.manual_seed"])
    z = torch.randn(len(seeded["t"]))
    assert_close(z, seeded["normal_draw_z"])
    assert_close(logit_normal_time(z), seeded["t"])
    z = torch.tensor(g["fixed_normal_draw_z"], dtype=torch.float32)
    assert_close(logit_normal_time(z), g["t_unshifted"])
    assert_close(logit_normal_time(z, dynamic_shift(2048, 2048)), g["t_shifted_2048x2048(shift=6)"])
    assert_close(logit_normal_time(z, dynamic_shift(4096, 4096)), g["t_shifted_4096x4096(shift=6*sqrt(2))"])
    dmd_key = next(k for k in g if k.startswith("dmd_perturbation_t"))
    assert_close(dmd_time(z), g[dmd_key])
    time_key = next(k for k in g if k.startswith("network_time_input"))
    assert_close(logit_normal_time(z) * NETWORK_TIME_SCALE, g[time_key])


def test_dmd_time_is_clamped():
    t = dmd_time(torch.tensor([-10.0, 0.0, 10.0]))
    assert t.tolist() == pytest.approx([0.02, 0.5, 0.99])


def test_student_t_list_matches_reference():
    values = json_data("timesteps")["student_t_list"]["values"]
    for steps in (1, 2, 3, 4):
        assert_close(student_t_list(steps), values[str(steps)], rel=0)
    assert_close(student_t_list(None), values["training(num_steps=None)"], rel=0)


# ------------------------------------------------------------------------------------------------
# flow matching (FlowMatchingTrainer.loss, velocity mode)
# ------------------------------------------------------------------------------------------------


def test_flow_matching_matches_reference():
    g = json_data("flow_matching")["flow_matching"]
    t = tensors("flow_matching")
    x_t = noisy_pixels(t["x0"], t["t"], t["noise"])
    assert_close(x_t, t["x_t"])
    assert_close(t["t"] * NETWORK_TIME_SCALE, g["t_passed_to_net"])
    loss = flow_matching_loss(t["net_out"], t["x0"], t["noise"])
    assert_close(loss, g["loss"])
    assert_close(-t["net_out"], t["v_pred"], rel=0)
    assert_close(t["x0"] - t["noise"], t["target"])
    # a wrong sign convention would not pass
    assert abs(float(flow_matching_loss(-t["net_out"], t["x0"], t["noise"])) - g["loss"]) > 1e-2


# ------------------------------------------------------------------------------------------------
# degradation (simple_downsample_image, LatentNoiser)
# ------------------------------------------------------------------------------------------------


def test_downsample_matches_reference():
    t = tensors("degradation")
    lq = downsample(t["image64"])
    assert_close(lq, t["lq16"])
    assert float((lq - t["lq16_no_antialias"]).abs().max()) > 1e-3  # antialias matters
    odd = torch.zeros(1, 3, 66, 70)
    assert tuple(downsample(odd).shape[-2:]) == tuple(json_data("degradation")["downsample"]["odd_size_66x70_target"])
    assert_close(downsample(torch.full((1, 3, 64, 64), 1.5)), torch.ones(1, 3, 16, 16), rel=0)  # clamped


def test_latent_noising_matches_reference():
    g = json_data("degradation")["latent_noising"]
    t = tensors("degradation")
    noised, sigma = noise_latent(
        t["latent_clean"], t["noise_draw00_rand"], t["noise_draw01_rand"], t["noise_draw02_randn_like"]
    )
    assert_close(noised, t["latent_noised"])
    assert_close(sigma, t["degrade_sigma"])
    assert_close(sigma, g["degrade_sigma"])
    applied = (t["noise_draw00_rand"] < 0.75).tolist()
    assert applied == g["apply_mask"]
    kept = ~torch.tensor(applied)
    assert torch.equal(noised[kept], t["latent_clean"][kept])  # not applied: the clean latent, sigma 0


# ------------------------------------------------------------------------------------------------
# schedules: power EMA, LR warm-up
# ------------------------------------------------------------------------------------------------


def test_ema_beta_matches_reference():
    g = json_data("schedules")["ema"]
    assert power_ema_gamma(0.1) == pytest.approx(g["ema_exp_coefficient(s=0.1)"], rel=1e-12)
    for iteration, beta in g["beta"].items():
        assert ema_beta(int(iteration)) == pytest.approx(beta, rel=1e-10, abs=1e-15)
    assert ema_beta(0) == 0.0


def test_lr_warmup_multiplier_matches_reference():
    g = json_data("schedules")["lr_multiplier"]
    for key, warmup in (("W=2000 (teacher/finetune)", 2000), (next(k for k in g if k.startswith("W=100")), 100)):
        for step, multiplier in g[key].items():
            assert warmup_multiplier(int(step), warmup) == pytest.approx(multiplier, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# DMD2 losses (dmd_losses.py)
# ------------------------------------------------------------------------------------------------


def test_vsd_loss_and_gradient_match_reference():
    g = json_data("dmd_losses")
    t = tensors("dmd_losses")
    gen = t["gen"].clone().requires_grad_(True)
    loss = vsd_loss(gen, t["teacher_x0"], t["fake_x0"])
    assert loss.dtype == torch.float64
    assert_close(loss, g["vsd"]["loss"])
    loss.backward()
    assert_close(gen.grad, t["vsd_grad"])
    assert_close(gen.grad.abs().sum(), g["vsd"]["grad_wrt_gen_sum_abs"])


def test_dsm_and_gan_losses_match_reference():
    g = json_data("dmd_losses")
    t = tensors("dmd_losses")
    assert_close(dsm_loss(t["v_fake"], t["eps"] - t["x0_student"]), g["dsm"]["loss"])
    gan = g["gan"]
    real = torch.tensor(gan["real_logits"]).view(3, 1)
    fake = torch.tensor(gan["fake_logits"]).view(3, 1)
    alpha = torch.tensor(gan["real_logits_alpha"]).view(3, 1)
    assert_close(gan_generator_loss(fake), gan["gan_loss_generator(fake_logits)"])
    assert_close(gan_discriminator_loss(real, fake), gan["gan_loss_discriminator(real_logits, fake_logits)"])
    assert abs(float(gan_discriminator_loss(fake, real)) - gan["gan_loss_discriminator(real_logits, fake_logits)"]) > 0.1
    r1_key = next(k for k in gan if k.startswith("r1 ="))
    assert_close(r1_loss(real, alpha), gan[r1_key])
    assert_close(200 * r1_loss(real, alpha), gan["r1_weighted(x200)"])
