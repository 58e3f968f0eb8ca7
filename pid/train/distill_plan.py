"""The `mode=distill` part of a `TrainPlan`: the DMD2 options (spec §d), their checks, the parameter counts of the
four networks and the dry run's memory table for 1, 2, 4 and 8 GPUs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pid.errors import ConfigError
from pid.models.configs import PiDNetConfig
from pid.train.memory import DistillNetworkSizes, estimate_distill_memory

if TYPE_CHECKING:
    from pid.inference.cli import Settings
    from pid.train.plan import InitSource, TrainPlan

MEMORY_WORLD_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class DistillPlan:
    """The distillation hyper-parameters (defaults: the shipped experiment_pid_v1pt5_<bb>/distillation.py)."""

    student_update_freq: int = 6
    fake_score_lr: float = 1e-5
    fake_score_weight_decay: float = 1e-3
    discriminator_lr: float = 1e-5
    teacher_cfg: float = 3.0
    gan_weight: float = 0.05
    gan_warmup: int = 100
    r1_weight: float = 200.0
    r1_alpha: float = 0.1
    student_input: str = "teacher_forcing"
    feature_block: int = 7
    teacher_offload: bool = False  # the teacher on the CPU between uses, each block copied in as it runs

    def identity(self) -> dict[str, Any]:
        """The options a resumed run must share (where the teacher lives changes no number: not among them)."""
        return {k: v for k, v in self.__dict__.items() if k != "teacher_offload"}

    def dmd_config(self):
        """The `pid.training.DMDConfig` of these options."""
        from pid.training import DMDConfig

        return DMDConfig(student_update_freq=self.student_update_freq, teacher_cfg=self.teacher_cfg,
                         gan_weight=self.gan_weight, gan_warmup_iterations=self.gan_warmup,
                         r1_weight=self.r1_weight, r1_alpha=self.r1_alpha, feature_blocks=(self.feature_block,),
                         student_input_mode=self.student_input)


def resolve_distill(settings: Settings, init: InitSource, cfg: PiDNetConfig) -> DistillPlan:
    """Check the distillation options; the teacher must be an undistilled decoder (released or a file)."""
    if init.kind == "pixeldit":
        raise ConfigError("mode=distill needs a teacher to distil: init=released (the backbone's undistilled "
                          "decoder) or init=<your teacher export .safetensors>")
    if init.kind == "released" and init.ckpt_type != "undistilled":
        raise ConfigError(f"the released {init.ckpt_type} decoder is already a distilled student; distil the "
                          "undistilled teacher: pid_ckpt_type=undistilled")
    for key in ("student_update_freq", "gan_warmup"):
        if settings.get(key) is None or int(settings.get(key)) < (1 if key == "student_update_freq" else 0):
            raise ConfigError(f"{key} must be >= {1 if key == 'student_update_freq' else 0}, got {settings.get(key)}")
    for key in ("fake_score_lr", "discriminator_lr"):
        if not float(settings.get(key)) > 0:
            raise ConfigError(f"{key} must be > 0, got {settings.get(key)}")
    for key in ("fake_score_weight_decay", "teacher_cfg", "gan_weight", "r1_weight", "r1_alpha"):
        if not float(settings.get(key)) >= 0:
            raise ConfigError(f"{key} must be >= 0, got {settings.get(key)}")
    block = settings.get("feature_block")
    block = cfg.patch_depth // 2 if block is None else int(block)
    if not 0 <= block < cfg.patch_depth:
        raise ConfigError(f"feature_block must be in [0, {cfg.patch_depth - 1}] (the teacher has {cfg.patch_depth} "
                          f"blocks), got {block}")
    return DistillPlan(
        student_update_freq=int(settings.student_update_freq), fake_score_lr=float(settings.fake_score_lr),
        fake_score_weight_decay=float(settings.fake_score_weight_decay),
        discriminator_lr=float(settings.discriminator_lr), teacher_cfg=float(settings.teacher_cfg),
        gan_weight=float(settings.gan_weight), gan_warmup=int(settings.gan_warmup),
        r1_weight=float(settings.r1_weight), r1_alpha=float(settings.r1_alpha),
        student_input=str(settings.student_input), feature_block=block,
        teacher_offload=bool(settings.get("teacher_offload") or False))


def network_counts(cfg: PiDNetConfig) -> dict[str, int]:
    """Parameter counts from weightless meta-device builds: one network, its trainable part (as mode=full),
    and the discriminator."""
    import torch

    from pid.models import build_pid_net
    from pid.training.discriminator import FeatureDiscriminator
    from pid.training.trainable import is_trainable

    net = build_pid_net(cfg, device="meta")
    named = list(net.named_parameters())
    blocks = [sum(p.numel() for p in block.parameters()) for block in [*net.patch_blocks, *net.pixel_blocks]]
    with torch.device("meta"):
        discriminator = FeatureDiscriminator((0,), cfg.hidden_size)
    total = sum(p.numel() for _, p in named)
    return {"network": total,
            "network_trainable": sum(p.numel() for n, p in named if is_trainable(n, "full", cfg.patch_depth)),
            "outside_blocks": total - sum(blocks), "largest_block": max(blocks, default=0),
            "discriminator": sum(p.numel() for p in discriminator.parameters())}


def distill_parameter_counts(cfg: PiDNetConfig) -> tuple[int, int]:
    """(trainable, frozen): student and fake score as mode=full plus the discriminator; the teacher and the
    last block's output-only text branch of student and fake score are frozen."""
    n = network_counts(cfg)
    trainable = 2 * n["network_trainable"] + n["discriminator"]
    return trainable, 3 * n["network"] - 2 * n["network_trainable"]


def describe_distill(plan: TrainPlan, largest: tuple[int, int]) -> dict[str, Any]:
    """The dry run's distillation entries: the networks, the DMD options, the memory per GPU count."""
    n = network_counts(plan.net_config)
    sizes = DistillNetworkSizes(n["network"], n["network_trainable"], n["outside_blocks"], n["largest_block"],
                                n["discriminator"])
    height, width = largest
    offload = plan.distill.teacher_offload

    def estimate(world: int, sharded: bool):
        return estimate_distill_memory(plan.net_config, sizes, height, width, plan.batch_size, cuda=True,
                                       checkpointing=plan.activation_checkpointing, world_size=world,
                                       sharded=sharded, teacher_offload=offload)

    # "ddp": every network whole on each GPU (what one GPU runs); "fsdp2_sharded": what several GPUs run
    table = {f"{world}_gpu": {name: estimate(world, sharded).describe()
                              for name, sharded in (("ddp", False), ("fsdp2_sharded", True))}
             for world in MEMORY_WORLD_SIZES}
    return {
        "mode": "distill",
        "networks": {"student": n["network"], "student_trainable": n["network_trainable"],
                     "fake_score": n["network"], "teacher_frozen": n["network"],
                     "discriminator": n["discriminator"]},
        "distill": {**plan.distill.__dict__,
                    "student_steps": (plan.steps + plan.distill.student_update_freq - 1)
                    // plan.distill.student_update_freq,
                    "student_optimizer": {"lr": plan.lr, "weight_decay": plan.weight_decay,
                                          "warmup_student_steps": plan.warmup_steps},
                    "grad_clip": f"{plan.grad_clip} on student and on fake score separately; discriminator only "
                                 "NaN-zeroed"},
        "parallelism": "fsdp2 (student, fake score, discriminator sharded; teacher "
                       f"{'offloaded' if offload else 'replicated'})" if plan.world_size > 1 else "single",
        "estimated_peak_memory_per_gpu": {
            "how": "estimated from the network config (not measured); bf16 autocast, teacher in bf16 "
                   f"({'on the CPU between uses, teacher_offload=true' if offload else 'on every GPU'}); "
                   "ddp: every network whole on each GPU (what one GPU runs); fsdp2_sharded: student / fake "
                   "score / discriminator split over the GPUs (what several GPUs run)",
            "image": f"{width}x{height}", "batch_per_gpu": plan.batch_size,
            "activation_checkpointing": plan.activation_checkpointing, "teacher_offload": offload,
            "by_gpu_count": table,
            "total_gib": estimate(plan.world_size, plan.world_size > 1).describe()["total_gib"]},
    }
