"""A training run from its plan: build the network from the init weights, the encoders, the data, the
optimiser; resume from the run's latest checkpoint; run `pid.training.loop.train_loop`; write metrics."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from loguru import logger
from torch import Tensor, nn

from pid.inference import distributed as dist
from pid.inference.io import append_jsonl, atomic_write_text, to_json
from pid.inference.lifecycle import exit_code_for_signal
from pid.models import PiDNet, PiDNetConfig, build_pid_net
from pid.models.configs import net_config_to_dict
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
from pid.training.loop import Encoders, LoopConfig, TeacherStep, TrainState, init_ema, train_loop

if TYPE_CHECKING:
    from pid.training.validation import Validator


# ------------------------------------------------------------------------------------------------------------
# The network


def build_network(plan: TrainPlan, state: dict[str, Tensor], source: str, device: torch.device) -> PiDNet:
    """The network to train: fp32 weights, fresh adapter parts, requires_grad per mode; in teacher mode on
    CUDA the frozen backbone is held in bf16 (autocast computes in bf16 anyway)."""
    from pid.training import set_trainable

    torch.manual_seed(plan.seed)  # the fresh adapter is the same on every rank and every rerun
    net = build_pid_net(plan.net_config, device="cpu")
    init_fresh_adapter(net)
    fresh = load_init(net, state, source)
    if fresh:
        logger.info("init: {} adapter tensors start fresh (e.g. {})", len(fresh), fresh[0])
    net.train()
    set_trainable(net, plan.mode)
    if plan.mode == "teacher" and device.type == "cuda":
        for param in net.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    if plan.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in [*net.patch_blocks, *net.pixel_blocks]:
            checkpoint(block)
    return net.to(device)


def wrap_parallel(step: TeacherStep, plan: TrainPlan, device: torch.device) -> nn.Module:
    """DDP across ranks (teacher, or full on one GPU); FSDP2 `fully_shard` per block for mode=full on many."""
    if dist.get_world_size() <= 1:
        return step
    if plan.mode == "full":
        from torch.distributed.fsdp import fully_shard

        from pid.training.parallel import average_replicated_gradients

        # FSDP2 cannot shard 0-d parameters (the gates' log_alpha): they stay replicated, their gradients
        # averaged over ranks by a hook, as DDP would.
        scalars = {p for p in step.parameters() if p.ndim == 0}
        average_replicated_gradients(scalars)
        for block in [*step.net.patch_blocks, *step.net.pixel_blocks]:
            fully_shard(block)
        return fully_shard(step, ignored_params=scalars)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(step, device_ids=ids, broadcast_buffers=True)


def make_optimizer(model: nn.Module, plan: TrainPlan):
    """AdamW over every trainable parameter (one group, weight decay on all) and the warm-up LambdaLR."""
    from pid.training.optim import build_optimizer, build_warmup_scheduler

    optimizer = build_optimizer(model.parameters(), plan.lr, plan.weight_decay)
    return optimizer, build_warmup_scheduler(optimizer, plan.warmup_steps)


# ------------------------------------------------------------------------------------------------------------
# The run


def run(plan: TrainPlan, encoders: Encoders | None = None, data: Any = None) -> int:
    """Train (or resume) the run `plan` describes; returns the exit code (0 done, 128 + the signal's
    number when stopped by one: 130 SIGINT, 143 SIGTERM).
    `encoders` / `data` may be passed in (tests, embedding)."""
    if plan.mode == "distill":
        from pid.train.distill_run import run_distill

        return run_distill(plan, encoders, data)
    env = dist.init_distributed()
    device = torch.device(plan.device) if plan.device else dist.rank_device()
    seed_everything(plan.seed + env.rank)
    run_dir = plan.run_dir
    source = init_file(plan)
    logger.info("init weights from {}", source)
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RUN_FILE, to_json({"identity": plan.identity(), "init_file": str(source),
                                                       "plan": plan.describe(0, env.world_size)}))
    net = build_network(plan, read_init_weights(source), str(source), device)
    model = wrap_parallel(TeacherStep(net), plan, device)
    optimizer, scheduler = make_optimizer(model, plan)
    state = TrainState(step=0, model=model, optimizer=optimizer, scheduler=scheduler, ema=init_ema(model))
    data = data if data is not None else open_data(plan, env.rank, env.world_size)
    finished = plan.resume_step is not None and plan.resume_step >= plan.steps
    if encoders is None and not finished:
        # a prepare cache carries the latents and caption embeddings: neither the VAE nor Gemma-2 is loaded
        cached = plan.data.format == "prepare cache"
        encoders = Encoders(None, None) if cached else load_encoders(plan, device)
    validator = open_validation(plan, net, encoders, device) if not finished else None
    resume = latest_checkpoint(run_dir)
    if resume is not None:
        data.load_state_dict(load_checkpoint(resume, state))
        logger.info("resuming {} at step {}", run_dir, state.step)
    if state.step >= plan.steps:
        logger.info("{} already finished {} steps; export it with: python -m pid.train.export {}", run_dir,
                    state.step, run_dir)
        return EXIT_OK
    cfg = LoopConfig(steps=plan.steps, batch_size=plan.batch_size, grad_accum=plan.grad_accum,
                     grad_clip=plan.grad_clip, ema_rate=plan.ema_rate, caption_dropout=plan.caption_dropout,
                     lq_dropout=plan.lq_dropout, seed=plan.seed, ckpt_every=plan.ckpt_every,
                     log_every=plan.log_every)

    def on_log(record: dict[str, Any]) -> None:
        skip_log = getattr(data, "skip_log", None)
        record = {**record, "peak_memory_gib": peak_memory_gib(device),
                  "skipped_items": skip_log.count if skip_log is not None else 0}
        if env.rank == 0:
            append_jsonl(run_dir / "metrics.jsonl", record)
            update_training_report(run_dir)

    def on_checkpoint(current: TrainState, final: bool) -> None:
        folder = save_checkpoint(run_dir, current, data.state_dict(), plan.keep_checkpoints)
        if env.rank == 0:
            logger.info("checkpoint {} written", folder.name)

    progress = Progress(plan, state.step, plan.progress and env.rank == 0)

    def on_step(current: TrainState) -> None:
        progress(current)
        if validator is not None and (current.step % validator.cfg.every == 0 or current.step == plan.steps):
            validator(current.step, net, current.ema)
            if env.rank == 0:
                update_training_report(run_dir, final=True)

    try:
        status = train_loop(cfg, state, data, encoders, device, env.rank, env.world_size, on_log=on_log,
                            on_checkpoint=on_checkpoint, on_step=on_step)
    finally:
        progress.close()
        if env.rank == 0:
            update_training_report(run_dir, final=True)
    if status == "stopped":
        logger.warning("stopped by {} at step {}; the checkpoint is saved, rerun the command to resume",
                       signal.Signals(state.stop_signal).name, state.step)
        return exit_code_for_signal(state.stop_signal)
    if env.rank == 0:
        logger.info("done: {} steps; export the EMA weights with: python -m pid.train.export {}", state.step,
                    run_dir)
    return EXIT_OK


def open_validation(plan: TrainPlan, net: PiDNet, encoders: Encoders, device: torch.device) -> Validator | None:
    """The validator when `val_manifest=` is set (on every rank: each decodes its share of the set): the
    held-out set encoded once, the init's scores made (the net still holds the init weights) or read from the
    run folder. With a prepare cache the VAE and Gemma-2 are loaded for this only, then dropped."""
    if plan.val is None:
        return None
    from pid.training.validation import open_validator

    own = encoders.encode_lq is None or encoders.encode_captions is None
    full = load_encoders(plan, device) if own else encoders
    validator = open_validator(plan.val, plan.run_dir, plan.backbone, net, full.encode_lq, full.encode_captions,
                               device)
    if own:
        del full
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return validator


def network_config_of_run(run_dir: Path) -> PiDNetConfig:
    from pid.models.configs import net_config_from_value

    saved = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    return net_config_from_value(saved["identity"]["net_config"])


__all__ = ["build_network", "init_fresh_adapter", "load_init", "net_config_to_dict", "run"]
