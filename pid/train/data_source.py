"""The trainer's view of the data pipeline (`pid.training.data`, `pid.training.cache`): a source or a prepare
cache -> an index summary for the plan, and the rank's resumable loader for the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pid.errors import ConfigError, InputError
from pid.train.plan import DataSummary
from pid.training.buckets import BucketSpec
from pid.training.data import SkipLog, TrainIndex, TrainLoader, build_index


def is_cache(source: str | Path) -> bool:
    """A folder `python -m pid.train.prepare` made (its index.json says so)."""
    return (Path(source).expanduser() / "index.json").is_file()


def open_index(source: str | Path, resolution: int, bucket_mode: str,
               skip_log: Any = None) -> tuple[TrainIndex, Any]:
    """(index, LatentCache or None) of `data=`. Reads image headers only; one-line errors for bad sources."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"data {path} does not exist; give a folder of images, a JSONL manifest, a WebDataset "
                          "root or a prepare cache")
    try:
        if is_cache(path):
            from pid.training.cache import LatentCache

            cache = LatentCache(path)
            return cache.train_index(), cache
        return build_index(path, BucketSpec(mode=bucket_mode, resolution=int(resolution)), skip_log), None
    except InputError as exc:
        raise ConfigError(str(exc)) from None


def summarize_data(source: str | Path, resolution: int, bucket_mode: str = "fixed") -> DataSummary:
    index, cache = open_index(source, resolution, bucket_mode)
    described = index.describe()
    return DataSummary(str(Path(source).expanduser().absolute()), "prepare cache" if cache else "images",
                       len(index), described["buckets"])


def open_loader(source: str | Path, resolution: int, bucket_mode: str, global_batch: int, seed: int, rank: int,
                world_size: int, skipped_file: Path | None) -> TrainLoader:
    """This rank's loader: batches of `global_batch / world_size` images, one bucket per step."""
    skip_log = SkipLog(skipped_file)
    index, cache = open_index(source, resolution, bucket_mode, skip_log)
    return TrainLoader(index, global_batch, seed=seed, rank=rank, world_size=world_size, skip_log=skip_log,
                       cache=cache)
