"""Which parameters each training mode updates (spec §a)."""

from __future__ import annotations

from typing import Literal

from torch import nn

TrainMode = Literal["teacher", "full"]

# The adapter-only teacher ("train_lq_proj_only"): the latent adapter and the PiT-stage gate.
TEACHER_TRAINABLE_PREFIXES = ("lq_proj.", "pit_lq_gate.")
# The last MMDiT block's text-stream output is never used: its output-only text branch stays frozen.
LAST_BLOCK_FROZEN = ("attn.proj_y.", "norm_y2.", "mlp_y.")


def is_trainable(name: str, mode: TrainMode, patch_depth: int) -> bool:
    """Whether parameter `name` (a PiDNet state-dict name) is trained in `mode`."""
    if mode == "teacher":
        return name.startswith(TEACHER_TRAINABLE_PREFIXES)
    if mode == "full":
        last = f"patch_blocks.{patch_depth - 1}."
        return not any(name.startswith(last + part) for part in LAST_BLOCK_FROZEN)
    raise ValueError(f"unknown training mode {mode!r}; use 'teacher' or 'full'")


def set_trainable(net: nn.Module, mode: TrainMode) -> list[str]:
    """Set requires_grad on `net` for `mode`; returns the trainable parameter names."""
    depth = net.cfg.patch_depth
    names = []
    for name, param in net.named_parameters():
        train = is_trainable(name, mode, depth)
        param.requires_grad_(train)
        if train:
            names.append(name)
    return names
