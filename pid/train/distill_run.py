"""A `mode=distill` run from its plan: the student and the fake score start from the init teacher, the teacher is
frozen (bf16 on CUDA), the discriminator fresh; three optimisers; resume from the run's latest checkpoint; run
`pid.training.distill_loop.distill_loop`; write metrics."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

import torch
from loguru import logger
from torch import Tensor, nn

from pid.errors import CheckpointMismatchError
from pid.inference import distributed as dist
from pid.inference.io import append_jsonl, atomic_write_text, to_json
from pid.inference.lifecycle import exit_code_for_signal
from pid.models import PiDNet, build_pid_net
from pid.report.training import update_training_report
from pid.train.plan import RUN_FILE, TrainPlan
from pid.train.setup import (
    EXIT_OK,
    Progress,
    init_file,
    init_fresh_adapter,
    load_encoders,
    load_init,
    open_data,
    peak_memory_gib,
    seed_everything,
)
from pid.training.checkpoint import latest_checkpoint, load_checkpoint, read_init_weights, save_checkpoint
from pid.training.discriminator import FeatureDiscriminator
from pid.training.distill_loop import DistillConfig, DistillState, DistillStep, distill_loop, init_student_ema
from pid.training.loop import Encoders

if TYPE_CHECKING:
    from pid.training.distill_validation import DistillValidator


def build_copy(plan: TrainPlan, state: dict[str, Tensor], source: str, trainable: bool) -> PiDNet:
    """One network with the teacher's weights: trainable as mode=full (student, fake score) or frozen (teacher,
    in bf16 on CUDA where autocast computes in bf16 anyway)."""
    from pid.training import set_trainable

    net = build_pid_net(plan.net_config, device="cpu")
    init_fresh_adapter(net)
    fresh = load_init(net, state, source)
    if fresh:
        raise CheckpointMismatchError(f"{source} is not a complete teacher (it lacks {fresh[0]} and "
                                      f"{len(fresh) - 1} more); distil a trained undistilled decoder")
    if trainable:
        net.train()
        set_trainable(net, "full")
    else:
        net.eval()
        net.requires_grad_(False)
    if plan.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in [*net.patch_blocks, *net.pixel_blocks]:
            checkpoint(block)
    return net


def build_distill_step(plan: TrainPlan, source: str, device: torch.device) -> DistillStep:
    """The four networks; the teacher on `device`, or on the CPU between uses with teacher_offload=true."""
    weights = read_init_weights(source)
    student = build_copy(plan, weights, source, trainable=True)
    fake_score = build_copy(plan, weights, source, trainable=True)
    teacher = build_copy(plan, weights, source, trainable=False)
    del weights
    if device.type == "cuda":
        teacher.to(torch.bfloat16)
    if plan.distill.teacher_offload:
        from pid.training.distill_parallel import TeacherOffload

        teacher.offload = TeacherOffload(teacher, device, checkpointed=plan.activation_checkpointing)
    else:
        teacher.to(device)
    torch.manual_seed(plan.seed)  # the fresh discriminator (PyTorch's default init) is the same on every rank
    discriminator = FeatureDiscriminator((plan.distill.feature_block,), plan.net_config.hidden_size)
    step = DistillStep(student, fake_score, discriminator, teacher, plan.distill.dmd_config())
    return step.to(device)


def wrap_parallel(step: DistillStep) -> nn.Module:
    """FSDP2 over ranks, as mode=full: student, fake score and discriminator sharded (per block and per network
    root), the teacher replicated (pid.training.distill_parallel); the step itself on one process."""
    if dist.get_world_size() <= 1:
        return step
    from pid.training.distill_parallel import shard_distill_step

    return shard_distill_step(step)


def make_optimizers(step: DistillStep, plan: TrainPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """Student: AdamW(lr, wd) with the warm-up counted in student steps; fake score: AdamW(1e-5, wd 1e-3),
    discriminator: AdamW(1e-5, wd 0), both constant (spec §a, distillation table)."""
    from pid.training.optim import build_optimizer, build_warmup_scheduler

    d = plan.distill
    optimizers = {
        "student": build_optimizer(step.student.parameters(), plan.lr, plan.weight_decay),
        "fake_score": build_optimizer(step.fake_score.parameters(), d.fake_score_lr, d.fake_score_weight_decay),
        "discriminator": build_optimizer(step.discriminator.parameters(), d.discriminator_lr, 0.0),
    }
    schedulers = {name: build_warmup_scheduler(opt, plan.warmup_steps if name == "student" else 0)
                  for name, opt in optimizers.items()}
    return optimizers, schedulers


def negative_prompt_embeds(plan: TrainPlan, encoders: Encoders, device: torch.device) -> Tensor:
    """The teacher's unconditional branch: the encoded negative prompt [1, L, D] (a prepare cache has no text
    encoder loaded: Gemma-2 is loaded for this one encoding, then freed)."""
    from pid.text_encoder import NEGATIVE_PROMPT, CaptionEncoder

    encode = encoders.encode_captions
    text = None
    if encode is None:
        kwargs = {"name_or_path": plan.text_encoder} if plan.text_encoder else {}
        text = CaptionEncoder.from_pretrained(device=device, revision=plan.text_encoder_revision, **kwargs)
        encode = text.encode
    with torch.no_grad():
        embeds = encode([NEGATIVE_PROMPT]).to(device=device, dtype=torch.float32)
    del text
    return embeds


def open_distill_validation(plan: TrainPlan, step_module: DistillStep, encoders: Encoders, null_embeds: Tensor,
                            source: str, device: torch.device) -> DistillValidator | None:
    """The student's validator when `val_manifest=` is set (on every rank: each decodes its share of the set):
    the held-out set encoded once (with a prepare cache the VAE and Gemma-2 are loaded for this only, then
    dropped); the teacher's reference decodes wait for the first validation."""
    if plan.val is None:
        return None
    from pid.training.distill_validation import open_distill_validator

    own = encoders.encode_lq is None or encoders.encode_captions is None
    full = load_encoders(plan, device) if own else encoders
    validator = open_distill_validator(plan.val, plan.run_dir, plan.backbone, step_module.student, full.encode_lq,
                                       full.encode_captions, null_embeds, source, device)
    if own:
        del full
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return validator


def run_distill(plan: TrainPlan, encoders: Encoders | None = None, data: Any = None) -> int:
    """Distil (or resume distilling) the run `plan` describes; 0 done, 130 stopped by a signal."""
    env = dist.init_distributed()
    device = torch.device(plan.device) if plan.device else dist.rank_device()
    seed_everything(plan.seed + env.rank)
    run_dir = plan.run_dir
    source = init_file(plan)
    logger.info("teacher (and the student's and fake score's start) from {}", source)
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RUN_FILE, to_json({"identity": plan.identity(), "init_file": str(source),
                                                       "plan": plan.describe(0, env.world_size)}))
    step_module = build_distill_step(plan, str(source), device)
    model = wrap_parallel(step_module)
    optimizers, schedulers = make_optimizers(step_module, plan)
    state = DistillState(step=0, model=model, optimizers=optimizers, schedulers=schedulers,
                         ema=init_student_ema(model))
    data = data if data is not None else open_data(plan, env.rank, env.world_size)
    resume = latest_checkpoint(run_dir)
    if resume is not None:
        data.load_state_dict(load_checkpoint(resume, state))
        logger.info("resuming {} at step {}", run_dir, state.step)
    if state.step >= plan.steps:
        logger.info("{} already finished {} iterations; export it with: python -m pid.train.export {}", run_dir,
                    state.step, run_dir)
        return EXIT_OK
    if encoders is None:
        cached = plan.data.format == "prepare cache"
        encoders = Encoders(None, None) if cached else load_encoders(plan, device)
    null_embeds = negative_prompt_embeds(plan, encoders, device)
    cfg = DistillConfig(steps=plan.steps, batch_size=plan.batch_size, dmd=plan.distill.dmd_config(),
                        grad_accum=plan.grad_accum, grad_clip=plan.grad_clip, ema_rate=plan.ema_rate,
                        caption_dropout=plan.caption_dropout, seed=plan.seed, ckpt_every=plan.ckpt_every,
                        log_every=plan.log_every)

    validator = open_distill_validation(plan, step_module, encoders, null_embeds, str(source), device)

    def on_log(record: dict[str, Any]) -> None:
        skip_log = getattr(data, "skip_log", None)
        record = {**record, "peak_memory_gib": peak_memory_gib(device),
                  "skipped_items": skip_log.count if skip_log is not None else 0}
        if env.rank == 0:
            append_jsonl(run_dir / "metrics.jsonl", record)
            update_training_report(run_dir)

    def on_checkpoint(current: DistillState, final: bool) -> None:
        folder = save_checkpoint(run_dir, current, data.state_dict(), plan.keep_checkpoints)
        if env.rank == 0:
            logger.info("checkpoint {} written", folder.name)

    progress = Progress(plan, state.step, plan.progress and env.rank == 0)

    def on_step(current: DistillState) -> None:
        progress(current)
        if validator is not None and (current.step % validator.cfg.every == 0 or current.step == plan.steps):
            validator(current.step, step_module.student, current.ema, step_module.teacher)
            if env.rank == 0:
                update_training_report(run_dir, final=True)

    try:
        status = distill_loop(cfg, state, data, encoders, null_embeds, device, env.rank, env.world_size,
                              on_log=on_log, on_checkpoint=on_checkpoint, on_step=on_step)
    finally:
        progress.close()
        if env.rank == 0:
            update_training_report(run_dir, final=True)
    if status == "stopped":
        logger.warning("stopped by {} at iteration {}; the checkpoint is saved, rerun the command to resume",
                       signal.Signals(state.stop_signal).name, state.step)
        return exit_code_for_signal(state.stop_signal)
    if env.rank == 0:
        logger.info("done: {} iterations; export the 4-step student (EMA) with: python -m pid.train.export {}",
                    state.step, run_dir)
    return EXIT_OK
