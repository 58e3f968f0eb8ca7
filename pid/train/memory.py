"""Estimated peak memory of one training step per GPU (the dry run's figure; no GPU was measured for it).

Resident: the network's weights (teacher mode: the frozen backbone in bf16 on CUDA, the adapter in fp32), the
trainable parameters' gradients, AdamW's two moments and the EMA copy (all fp32). Transient: the activations
autograd keeps for the backward pass, per image, built from the same per-token figures as the decode estimate
(`pid.memory.estimate_decode_memory`) times the number of blocks (each block's tensors stay alive until the
backward pass reaches it), or one block's worth plus the block inputs with activation checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pid.memory import GiB, estimate_decode_memory
from pid.models.configs import PiDNetConfig

FP32, BF16 = 4, 2


@dataclass(frozen=True)
class TrainMemoryEstimate:
    weights_bytes: int
    optimizer_bytes: int  # gradients + AdamW moments + EMA of the trainable parameters
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.optimizer_bytes + self.activation_bytes

    def describe(self) -> dict[str, float | str]:
        gib = lambda n: round(n / GiB, 2)
        return {"total_gib": gib(self.total_bytes), "weights_gib": gib(self.weights_bytes),
                "grads_adamw_ema_gib": gib(self.optimizer_bytes), "activations_gib": gib(self.activation_bytes),
                "how": "estimated from the network config (not measured)"}


def estimate_train_memory(cfg: PiDNetConfig, trainable: int, frozen: int, height: int, width: int,
                          batch: int, cuda: bool, checkpointing: bool = False, world_size: int = 1,
                          sharded: bool = False) -> TrainMemoryEstimate:
    """Peak bytes of one training step of `batch` images of height x width on one GPU.

    cuda: bf16 autocast (and a bf16 frozen backbone); else fp32 throughout (CPU). sharded: FSDP2 splits
    weights, gradients and optimizer state over `world_size` GPUs (activations are not split).
    """
    activation_dtype = torch.bfloat16 if cuda else torch.float32
    frozen_bytes = frozen * (BF16 if cuda else FP32)
    weights = trainable * FP32 + frozen_bytes
    optimizer = trainable * FP32 * 4  # grad, exp_avg, exp_avg_sq, EMA
    if sharded and world_size > 1:
        weights, optimizer = weights // world_size, optimizer // world_size
    one = estimate_decode_memory(cfg, height, width, batch=batch, activation_dtype=activation_dtype)
    phases = {k.removeprefix("phase:"): v for k, v in one.breakdown.items() if k.startswith("phase:")}
    trunk, pixel = phases["trunk"], phases["pixel"]
    blocks = cfg.patch_depth + cfg.pixel_depth
    if checkpointing:
        tokens = height * width // cfg.patch_size**2
        inputs = blocks * batch * (tokens + cfg.text_max_length) * cfg.hidden_size * FP32
        kept = inputs + max(trunk, pixel)
    else:
        kept = cfg.patch_depth * trunk + cfg.pixel_depth * pixel
    # adapter features, the aux RGB head, noisy image / target / loss images (a few fp32 [B,3,H,W])
    extra = phases["adapter"] * 2 + 8 * batch * 3 * height * width * FP32
    return TrainMemoryEstimate(int(weights), int(optimizer), int(kept + extra))


@dataclass(frozen=True)
class DistillMemoryEstimate:
    """Peak bytes per GPU of a distillation iteration: four networks at once (spec §d)."""

    teacher_bytes: int  # frozen teacher weights (bf16 on CUDA)
    trained_bytes: int  # student + fake score + discriminator: fp32 weights, grads, AdamW moments, student EMA
    activation_bytes: int  # the larger phase's autograd activations

    @property
    def total_bytes(self) -> int:
        return self.teacher_bytes + self.trained_bytes + self.activation_bytes

    def describe(self) -> dict[str, float | str]:
        gib = lambda n: round(n / GiB, 2)
        return {"total_gib": gib(self.total_bytes), "teacher_gib": gib(self.teacher_bytes),
                "student_fake_score_discriminator_gib": gib(self.trained_bytes),
                "activations_gib": gib(self.activation_bytes)}


def estimate_distill_memory(cfg: PiDNetConfig, network_params: int, network_trainable: int,
                            discriminator_params: int, height: int, width: int, batch: int, cuda: bool,
                            checkpointing: bool = False, world_size: int = 1,
                            sharded: bool = False) -> DistillMemoryEstimate:
    """Peak bytes of one distillation iteration per GPU.

    Resident: the teacher (bf16 on CUDA, never sharded); the student (fp32 weights, grads and AdamW moments of its
    trainable parameters, EMA), the fake score (the same without EMA) and the discriminator (weights, grads,
    AdamW). sharded: FSDP2 splits the three trained networks' states over `world_size` GPUs (an estimate of what
    sharding would give; the trainer runs DDP, which replicates them). Transient: the student phase keeps one
    training forward of the student plus the teacher's blocks up to the discriminator's feature block (the GAN
    term backpropagates through them): about 1.5 networks' activations, the larger of the two phases.
    """
    teacher = network_params * (BF16 if cuda else FP32)
    student = network_params * FP32 + network_trainable * FP32 * 4
    fake_score = network_params * FP32 + network_trainable * FP32 * 3
    discriminator = discriminator_params * FP32 * 4
    trained = student + fake_score + discriminator
    if sharded and world_size > 1:
        trained //= world_size
    one = estimate_train_memory(cfg, 0, 0, height, width, batch, cuda, checkpointing)
    return DistillMemoryEstimate(int(teacher), int(trained), int(one.activation_bytes * 1.5))
