"""One teacher training step end to end against the reference's `PidModel.training_step` golden
(tiny PidNet, fp32 CPU): draws, intermediates, the three losses and the adapter gradients."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_training_pieces import assert_close

from pid.training import (
    draw_teacher_randomness,
    drop_captions,
    dynamic_shift,
    set_trainable,
    teacher_losses,
    teacher_step_outputs,
)

from training_golden import (
    json_data,
    lq_latent_of,
    stub_caption_embeds,
    teacher_batch_pixels,
    tensors,
    tiny_teacher_net,
)

CAPTIONS = ["a red fox", "a blue car", "", "mountain lake at dawn"]


def golden_draws() -> dict[str, torch.Tensor]:
    t = tensors("teacher_step")
    return {
        "degrade_apply_u": t["draw00_rand"],
        "degrade_sigma_u": t["draw01_rand"],
        "degrade_noise": t["draw02_randn_like"],
        "keep_lq": t["draw07_bernoulli"].bool(),
        "t_normal": t["draw08_randn"],
        "noise": t["draw09_randn_like"],
    }


def golden_batch() -> dict[str, torch.Tensor]:
    pixels = teacher_batch_pixels()
    return {
        "pixels": pixels,
        "lq_latent": lq_latent_of(pixels),
        "caption_embeds": tensors("teacher_step")["caption_embs"],
    }


@pytest.fixture(scope="module")
def teacher_run():
    net = tiny_teacher_net()
    trainable = set_trainable(net, "teacher")
    out = teacher_step_outputs(net, golden_batch(), golden_draws(), shift=6.0)
    out.total.backward()
    return net, trainable, out


def test_tiny_config_loads_reference_weights_and_forward_matches(teacher_run):
    _, _, out = teacher_run
    t = tensors("teacher_step")
    assert_close(out.net_out, t["net_out"])
    assert_close(out.pred_lq_rgb, t["pred_lq_rgb"])


def test_teacher_step_intermediates_match_reference(teacher_run):
    _, _, out = teacher_run
    t = tensors("teacher_step")
    g = json_data("teacher_step")
    assert_close(out.lq_image, t["LQ_video_or_image"])
    assert_close(out.lq_latent_noised, t["LQ_latent_noised"])
    assert_close(out.degrade_sigma, t["degrade_sigma"])
    assert_close(out.lq_latent_to_net, t["lq_latent_to_net(after LQ dropout)"])
    assert not out.lq_latent_to_net[1].any()  # sample 1's latent was dropped
    assert_close(out.t, t["t_shifted"])
    assert_close(out.t, g["t_shifted"])
    assert_close(out.x_t, t["x_t"])


def test_teacher_step_losses_match_reference(teacher_run):
    _, _, out = teacher_run
    losses = json_data("teacher_step")["loss_dict"]
    assert_close(out.diffusion, losses["diffusion_loss"])  # 1.3914285898
    assert_close(out.align, losses["lq_latent_image_align_loss"])  # 0.1082776636
    assert_close(out.total, losses["total_loss"])  # 1.4780507088


def test_teacher_step_adapter_gradients_match_reference(teacher_run):
    net, _, _ = teacher_run
    t = tensors("teacher_step")
    params = dict(net.named_parameters())
    names = [k.removeprefix("grad::") for k in t if k.startswith("grad::")]
    assert len(names) == 4
    for name in names:
        assert_close(params[name].grad, t[f"grad::{name}"])


def test_teacher_step_grads_reach_only_the_adapter(teacher_run):
    net, trainable, _ = teacher_run
    assert trainable and all(n.startswith(("lq_proj.", "pit_lq_gate.")) for n in trainable)
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)
    # the tiny net's adapter parameter count (spec §a: lq_proj.* + pit_lq_gate.*)
    assert len(trainable) == sum(1 for n, _ in net.named_parameters() if n.startswith(("lq_proj.", "pit_lq_gate.")))


def _global_grad_norm(net) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in net.parameters() if p.grad is not None))


# Sample 1's latent is dropped (all zeros), so the adapter CNN sees a spatially constant map and its
# GroupNorms divide by a near-zero std: fp32 rounding differences upstream (attention summation order)
# are amplified ~1e4x into the first convolutions' gradients. In float64 the reference's PidNet and
# ours give the same norm (0.01164427 vs 0.01164428, docs/training.md); in float32 the reference's
# own norm is 0.02% off that and ours 0.3%. The four recorded adapter gradients are well conditioned
# and match to 1e-5 (test above); the global norm is checked to 0.5% and the exact value is expected
# to fail.
def test_teacher_step_global_grad_norm_is_close_to_reference(teacher_run):
    net, _, _ = teacher_run
    golden = json_data("teacher_step")["trainable_grad_global_l2_norm"]
    assert _global_grad_norm(net) == pytest.approx(golden, rel=5e-3)


@pytest.mark.xfail(strict=True, reason="ill-conditioned in fp32 (dropped latent through GroupNorm), see above")
def test_teacher_step_global_grad_norm_matches_reference_exactly(teacher_run):
    net, _, _ = teacher_run
    golden = json_data("teacher_step")["trainable_grad_global_l2_norm"]
    assert _global_grad_norm(net) == pytest.approx(golden, rel=1e-5)


def test_teacher_losses_contract():
    net = tiny_teacher_net()
    set_trainable(net, "teacher")
    losses = teacher_losses(net, golden_batch(), golden_draws(), shift=dynamic_shift(64, 64, base_size=64))
    assert set(losses) == {"diffusion", "align", "total"}
    assert all(v.ndim == 0 for v in losses.values())
    assert_close(losses["total"], json_data("teacher_step")["loss_dict"]["total_loss"])
    losses["total"].backward()
    assert net.pit_lq_gate.log_alpha.grad is not None
    # another shift is another step: the losses must move
    other = teacher_losses(net, golden_batch(), golden_draws(), shift=1.0)
    assert abs(other["diffusion"].item() - losses["diffusion"].item()) > 1e-4


def test_teacher_draws_follow_the_reference_order():
    g = json_data("teacher_step")
    t = tensors("teacher_step")
    torch.manual_seed(g["inputs"]["torch.manual_seed"])
    random.seed(g["inputs"]["random.seed"])
    draws = draw_teacher_randomness(4, (16, 2, 2), (3, 64, 64))
    for key, value in golden_draws().items():
        assert torch.equal(draws[key], value), key
    captions = drop_captions(CAPTIONS)
    assert_close(stub_caption_embeds(captions), t["caption_embs"])
    expected = ["" if float(t[f"draw0{k}_random"]) < 0.1 else c for k, c in zip(range(3, 7), CAPTIONS)]
    assert captions == expected
    # a generator gives the same stream as the seeded global RNG
    again = draw_teacher_randomness(4, (16, 2, 2), (3, 64, 64), torch.Generator().manual_seed(2026))
    assert all(torch.equal(again[k], draws[k]) for k in draws)


def test_teacher_draws_skip_what_the_reference_skips():
    gen = torch.Generator().manual_seed(0)
    draws = draw_teacher_randomness(3, (4, 2, 2), (3, 16, 16), gen, apply_prob=0.0, lq_dropout=0.0)
    assert not draws["degrade_sigma_u"].any() and not draws["degrade_noise"].any()
    assert draws["keep_lq"].all()
    # only z and the pixel noise were drawn after the apply draw
    ref = torch.Generator().manual_seed(0)
    torch.rand(3, generator=ref)
    assert torch.equal(draws["t_normal"], torch.randn(3, generator=ref))


def test_full_mode_freezes_only_the_last_blocks_text_output_branch():
    net = tiny_teacher_net()
    trainable = set(set_trainable(net, "full"))
    frozen = {n for n, _ in net.named_parameters()} - trainable
    assert frozen == {
        n
        for n, _ in net.named_parameters()
        if n.startswith(("patch_blocks.1.attn.proj_y.", "patch_blocks.1.norm_y2.", "patch_blocks.1.mlp_y."))
    }
    assert frozen and "patch_blocks.0.attn.proj_y.weight" in trainable
    with pytest.raises(ValueError, match="unknown training mode"):
        set_trainable(net, "lora")


def test_training_forward_leaves_inference_unchanged():
    net = tiny_teacher_net()
    t = tensors("teacher_step")
    args = (t["x_t"], t["t_shifted"] * 1000, t["caption_embs"], t["lq_latent_to_net(after LQ dropout)"], t["degrade_sigma"])
    with torch.no_grad():
        velocity = net(*args)
        train = net(*args, train_outputs=True, lq_rgb=True, feature_blocks=[0, 1])
        early = net(*args, train_outputs=True, feature_blocks=[0], features_only=True)
    assert torch.equal(train.velocity, velocity)
    assert train.pred_lq_rgb.shape == (4, 3, 16, 16)
    assert [tuple(f.shape) for f in train.block_features] == [(4, 32, 4, 4), (4, 32, 4, 4)]
    assert early.velocity is None and torch.equal(early.block_features[0], train.block_features[0])
    with pytest.raises(ValueError, match="train_outputs=True"):
        net(*args, lq_rgb=True)
    # the state-dict keys are the released files' (the tiny table is the reference's own list)
    table = json_data("teacher_step")["param_table(i, name, shape, rule)"]
    assert sorted(net.state_dict()) == sorted(row[1] for row in table)


def test_teacher_losses_through_ddp(tmp_path):
    """teacher_losses calls net(...), so a DistributedDataParallel-wrapped net works (1-rank gloo)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        net = tiny_teacher_net()
        set_trainable(net, "teacher")
        losses = teacher_losses(DistributedDataParallel(net), golden_batch(), golden_draws(), shift=6.0)
        assert_close(losses["total"], json_data("teacher_step")["loss_dict"]["total_loss"])
        losses["total"].backward()
        assert_close(net.lq_proj.pit_head.weight.grad, tensors("teacher_step")["grad::lq_proj.pit_head.weight"])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "config, total, teacher_trainable, student_total, student_trainable",
    [
        ("v1pt5_latent16ch", 1_401_300_163, 98_829_376, 1_400_199_315, 1_378_962_579),
        ("v1pt5_flux2_latent128ch", 1_401_447_619, 98_976_832, None, None),
    ],
)
def test_trainable_counts_of_the_shipped_configs(config, total, teacher_trainable, student_total, student_trainable):
    """Spec §a's meta-device counts: teacher = lq_proj + pit_lq_gate; DMD student (no aux head) = all but
    the last block's text output branch."""
    from dataclasses import replace

    from pid.models import build_pid_net, get_net_config

    def counts(net, mode):
        names = set(set_trainable(net, mode))
        return sum(p.numel() for p in net.parameters()), sum(p.numel() for n, p in net.named_parameters() if n in names)

    net = build_pid_net(config, device="meta")
    assert counts(net, "teacher") == (total, teacher_trainable)
    assert len(net.state_dict()) == 467
    if student_total is not None:
        student = build_pid_net(replace(get_net_config(config), aux_rgb_head=False), device="meta")
        assert counts(student, "full") == (student_total, student_trainable)
        assert len(student.state_dict()) == 461
