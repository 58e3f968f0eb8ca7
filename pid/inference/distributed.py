"""Data-parallel helpers for torchrun launches (spec/inference.md §11, with its gaps fixed).

- Work is split by the *global* RANK, so multi-node runs do not repeat shards (the reference used LOCAL_RANK).
- Every flow gets a process group when WORLD_SIZE > 1, so ranks can gather results and meet at a barrier.
- The device comes from LOCAL_RANK: `cuda:<local_rank>` when CUDA is available, else the CPU.

Everything degrades to single-process no-ops when WORLD_SIZE is 1 or unset.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from loguru import logger

from pid.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def dist_env() -> DistEnv:
    """Rank, world size and local rank: from the live process group if any, else torchrun's env vars."""
    local_rank = _env_int("LOCAL_RANK", 0)
    if _group_active():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank)
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistEnv(rank, world, local_rank)


def get_rank() -> int:
    return dist_env().rank


def get_world_size() -> int:
    return dist_env().world_size


def get_local_rank() -> int:
    return dist_env().local_rank


def is_main() -> bool:
    """True on global rank 0 (the process that logs summaries and writes run-level files)."""
    return get_rank() == 0


def rank_device(local_rank: int | None = None) -> torch.device:
    """This rank's device: `cuda:<local_rank>` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        index = get_local_rank() if local_rank is None else local_rank
        return torch.device("cuda", index)
    return torch.device("cpu")


def _group_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str | None = None) -> DistEnv:
    """Create the process group for a torchrun launch (env:// rendezvous); a no-op for a single process.

    The backend defaults to nccl when CUDA is available, gloo otherwise. With nccl the current CUDA device is
    set to LOCAL_RANK first, so collectives and `rank_device()` agree.
    """
    env = dist_env()
    if env.world_size <= 1 or _group_active():
        return env
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    kwargs: dict[str, Any] = {"backend": backend, "rank": env.rank, "world_size": env.world_size}
    if backend == "nccl":
        device = rank_device(env.local_rank)
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    logger.debug(f"process group ready: rank {env.rank}/{env.world_size} ({backend})")
    return dist_env()


def shard(items: Iterable[T], rank: int | None = None, world_size: int | None = None) -> list[tuple[int, T]]:
    """Round-robin slice `items[rank::world_size]` as (global_index, item) pairs.

    Global indices keep seeds and file names independent of the number of ranks.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"cannot shard for rank {rank} of world size {world_size}")
    return list(enumerate(items))[rank::world_size]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` without a process group). Must be
    picklable."""
    if not _group_active() or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if _group_active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup() -> None:
    """Destroy the process group if this process created one."""
    if _group_active():
        dist.destroy_process_group()
