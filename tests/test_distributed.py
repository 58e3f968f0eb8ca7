"""Rank/world lookup, sharding, and a real 2-process gloo run."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pid.errors import ConfigError
from pid.inference import distributed as pdist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def single_process(monkeypatch):
    for name in _TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("count", [0, 1, 4, 11])
def test_shard_covers_every_item_once(world, count):
    items = [f"prompt {i}" for i in range(count)]
    shards = [pdist.shard(items, rank, world) for rank in range(world)]
    indices = sorted(index for shard in shards for index, _ in shard)
    assert indices == list(range(count))
    for rank, shard in enumerate(shards):
        assert all(items[index] == item and index % world == rank for index, item in shard)
        assert [i for i, _ in shard] == sorted(i for i, _ in shard)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shard_rejects_bad_rank():
    with pytest.raises(ConfigError):
        pdist.shard([1, 2], rank=2, world_size=2)


def test_single_process_defaults(single_process):
    env = pdist.dist_env()
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0)
    assert pdist.init_distributed() == env  # no-op
    assert not torch.distributed.is_initialized()
    assert pdist.is_main()
    assert pdist.gather_objects({"a": 1}) == [{"a": 1}]
    pdist.barrier()
    pdist.cleanup()
    assert pdist.shard("abc") == [(0, "a"), (1, "b"), (2, "c")]
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pdist.rank_device().type == expected


def test_env_is_read_with_global_rank(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = pdist.dist_env()
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert not pdist.is_main()
    assert [i for i, _ in pdist.shard(range(20))] == [5, 13]
    monkeypatch.setenv("RANK", "8")
    with pytest.raises(ConfigError, match="RANK=8"):
        pdist.dist_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="not an integer"):
        pdist.dist_env()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    env = pdist.init_distributed(backend="gloo")
    assert torch.distributed.is_initialized() and env.world_size == world
    prompts = [f"p{i}" for i in range(7)]
    mine = pdist.shard(prompts)
    gathered = pdist.gather_objects({"rank": env.rank, "done": [index for index, _ in mine]})
    pdist.barrier()
    if pdist.is_main():
        with open(os.path.join(out_dir, "gathered.json"), "w") as handle:
            json.dump(gathered, handle)
    pdist.cleanup()
    assert not torch.distributed.is_initialized()


def test_two_process_gloo_gather(tmp_path, single_process):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    gathered = json.loads((tmp_path / "gathered.json").read_text())
    assert [g["rank"] for g in gathered] == [0, 1]
    assert gathered[0]["done"] == [0, 2, 4, 6] and gathered[1]["done"] == [1, 3, 5]
