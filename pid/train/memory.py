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

    teacher_bytes: int  # frozen teacher weights on the GPU (bf16 on CUDA); with offload only the units in use
    trained_bytes: int  # student + fake score + discriminator: weights, grads, AdamW moments, student EMA
    gathered_bytes: int  # FSDP2: the units all-gathered at one time (weights and their unsharded gradients)
    activation_bytes: int  # the larger phase's autograd activations

    @property
    def total_bytes(self) -> int:
        return self.teacher_bytes + self.trained_bytes + self.gathered_bytes + self.activation_bytes

    def describe(self) -> dict[str, float | str]:
        gib = lambda n: round(n / GiB, 2)
        return {"total_gib": gib(self.total_bytes), "teacher_gib": gib(self.teacher_bytes),
                "student_fake_score_discriminator_gib": gib(self.trained_bytes),
                "fsdp2_gathered_gib": gib(self.gathered_bytes), "activations_gib": gib(self.activation_bytes)}


@dataclass(frozen=True)
class DistillNetworkSizes:
    """Parameter counts the distillation estimate needs (from a meta-device build)."""

    network: int  # one PiD network (student, fake score and teacher alike)
    network_trainable: int  # its parameters trained as mode=full
    outside_blocks: int  # its parameters outside the transformer blocks (embedders, adapter, final layer)
    largest_block: int  # its largest transformer block
    discriminator: int


def estimate_distill_memory(cfg: PiDNetConfig, sizes: DistillNetworkSizes, height: int, width: int, batch: int,
                            cuda: bool, checkpointing: bool = False, world_size: int = 1, sharded: bool = False,
                            teacher_offload: bool = False) -> DistillMemoryEstimate:
    """Peak bytes of one distillation iteration per GPU (N = world_size, b = 2 bytes on CUDA (bf16) else 4):

        teacher  = P * b                                      replicated on every GPU
                 = (P_outside + 2 * P_block) * b              teacher_offload: the parts outside the blocks for the
                                                              whole call, the running block, and one block's weights
                                                              copied back for the GAN term's backward pass
        trained  = student (4 P + 16 T: fp32 weights; grad, AdamW moments, EMA of the trainable T)
                   + fake score (4 P + 12 T) + discriminator (16 D)
                 / N when sharded (FSDP2 splits all of it)
        gathered = 2 * 4 * (P_outside + 2 * P_block + D)      sharded and N > 1: one network's root, its running and
                                                              prefetched block and the discriminator unsharded, their
                                                              unsharded gradients as large in the backward pass
        activations = 1.5 x one training forward's            the student phase keeps the student's training forward
                                                              plus the teacher's blocks up to the feature block

    Not split by sharding: activations, the teacher (replicated or offloaded, pid.training.distill_parallel).
    """
    b = BF16 if cuda else FP32
    p, t, d = sizes.network, sizes.network_trainable, sizes.discriminator
    units = sizes.outside_blocks + 2 * sizes.largest_block
    teacher = units * b if teacher_offload else p * b
    trained = (p * FP32 + t * FP32 * 4) + (p * FP32 + t * FP32 * 3) + d * FP32 * 4
    gathered = 0
    if sharded and world_size > 1:
        trained //= world_size
        gathered = 2 * FP32 * (units + d)
    one = estimate_train_memory(cfg, 0, 0, height, width, batch, cuda, checkpointing)
    return DistillMemoryEstimate(int(teacher), int(trained), int(gathered), int(one.activation_bytes * 1.5))
