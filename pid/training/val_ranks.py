"""Validation on several processes (mode=teacher under DDP, mode=full and mode=distill under FSDP2).

Every rank validates: the held-out image at manifest position i is read, encoded and decoded by rank
i % world, each rank writes the PNGs of its own images into the shared run folder (as the DCP checkpoints
already require), and the scores are gathered (`all_gather_object`) and put back in manifest order, so the
records rank 0 writes equal a single process's. The decode seeds are the images' positions in the whole set,
not in a rank's share, for the same reason. A rank waits at the gather for at most one image's decodes of
another, where a rank-0-only validation would hold every other rank in a collective (under its timeout) for
the whole validation.

The weights being scored must be whole on every rank. DDP replicas already are (the EMA is swapped in, as on
one process). FSDP2 shards them: `plain_copy` makes an unsharded copy of the network on the CPU once, when the
validator opens (all-gathering every parameter, so it holds the init weights for the init's scores), and
`scored_weights` all-gathers the EMA into it before each validation and moves it to the device for the decodes
only. The copy costs one network in host memory per rank and one on the device while validating.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


@dataclass(frozen=True)
class ValRanks:
    """This process's place in the validation: rank `rank` of `world`."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> ValRanks:
        from pid.inference import distributed as dist

        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def writer(self) -> bool:
        """The rank that writes the shared records (val.jsonl, the cached scores)."""
        return self.rank == 0

    def mine(self, position: int) -> bool:
        return position % self.world == self.rank

    def gather(self, part: list[tuple[int, T]]) -> list[tuple[int, T]]:
        """Every rank's (position, value) pairs, in position order, on every rank."""
        if self.world == 1:
            return sorted(part, key=lambda pair: pair[0])
        parts: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(parts, part)
        return sorted((pair for chunk in parts for pair in chunk), key=lambda pair: pair[0])

    def decide(self, value: T) -> T:
        """Rank 0's `value` on every rank (what a cached file says, read once)."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def _whole(tensor: Tensor) -> Tensor:
    """A DTensor's full value (a collective: every rank calls it, in the same order); a plain tensor as it is."""
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor


def is_sharded(net: nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in net.parameters())


def plain_copy(net: nn.Module) -> nn.Module | None:
    """An unsharded CPU copy of an FSDP2-sharded PiD network (None when `net` is whole). Collective."""
    if not is_sharded(net):
        return None
    from pid.models import build_pid_net

    with torch.random.fork_rng(devices=[]):  # its throwaway random init must not move the training's RNG
        copy = build_pid_net(net.cfg, device="cpu")
    with torch.no_grad():
        state = {name: _whole(tensor.detach()).cpu() for name, tensor in net.state_dict().items()}
    copy.load_state_dict(state)
    copy.requires_grad_(False)
    return copy.eval()


@contextmanager
def on_device(net: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """`net` on `device` for the block, back where it was after: an FSDP2 run's CPU copy; a teacher offloaded
    with `teacher_offload=true` for its one-time reference decodes (the decoder runs where the parameters are),
    whose CPU weights are pinned again after (the move back allocates them unpinned)."""
    home = next(net.parameters()).device
    moved = home != device
    if moved:
        net.to(device)
    try:
        yield net
    finally:
        if moved:
            net.to(home)
            offload = getattr(net, "offload", None)
            if offload is not None:
                offload.repin()


@contextmanager
def ema_weights(net: nn.Module, ema: dict[str, Tensor]) -> Iterator[None]:
    """The EMA tensors in place of the trainable parameters (by reference, no copy), the net in eval mode."""
    params = dict(net.named_parameters())
    saved = {name: params[name].data for name in ema}
    was_training = net.training
    try:
        for name, tensor in ema.items():
            params[name].data = tensor.to(dtype=saved[name].dtype)
        net.eval()
        yield
    finally:
        for name, data in saved.items():
            params[name].data = data
        net.train(was_training)


@contextmanager
def scored_weights(net: nn.Module, ema: dict[str, Tensor], copy: nn.Module | None,
                   device: torch.device) -> Iterator[nn.Module]:
    """The network to decode with, holding the EMA weights: `net` itself with the EMA swapped in (one process,
    DDP), or the plain `copy` with the all-gathered EMA loaded (FSDP2), on `device` for the block."""
    if copy is None:
        with ema_weights(net, ema):
            yield net
        return
    params = dict(copy.named_parameters())
    with torch.no_grad():
        for name, tensor in ema.items():  # the same order on every rank: the gathers pair up
            params[name].copy_(_whole(tensor).to(params[name].dtype).cpu())
    with on_device(copy, device):
        yield copy


__all__ = ["ValRanks", "ema_weights", "is_sharded", "on_device", "plain_copy", "scored_weights"]
