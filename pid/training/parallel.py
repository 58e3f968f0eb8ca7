"""What FSDP2 cannot do for us: 0-d parameters (the gates' log_alpha) cannot be sharded, so they stay replicated
on every rank and their gradients are averaged over ranks by a hook, as DDP would (mode=full and mode=distill)."""

from __future__ import annotations

import torch
from torch import nn

from pid.inference import distributed as dist


def average_replicated_gradients(params: set[nn.Parameter]) -> None:
    """Sum-then-divide each replicated parameter's gradient over ranks once autograd has accumulated it."""
    world = dist.get_world_size()

    def average(param: nn.Parameter) -> None:
        torch.distributed.all_reduce(param.grad)
        param.grad.div_(world)

    for param in params:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(average)
