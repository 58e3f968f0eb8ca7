"""The trainer's view of the data pipeline (`pid.training.loaders`): `data=` and its buckets -> the summary the
plan shows, and the rank's resumable loader for the run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pid.errors import ConfigError, InputError
from pid.training.buckets import BucketSpec
from pid.training.data import TrainLoader


@dataclass(frozen=True)
class DataSummary:
    source: str
    format: str
    size: int
    buckets: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"count", "size_wh"}


def data_geometry(source: str | Path, resolution: int | None, bucket_mode: str | None) -> BucketSpec:
    """The buckets of `data=`: a prepare cache's own, else `resolution` / `buckets` (default 2048, fixed)."""
    from pid.training.loaders import source_geometry

    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"data {path} does not exist; give a folder of images, a JSONL manifest, a WebDataset "
                          "root or a prepare cache")
    try:
        return source_geometry(path, resolution, bucket_mode)
    except InputError as exc:
        raise ConfigError(str(exc)) from None


def summarize_data(source: str | Path, spec: BucketSpec) -> DataSummary:
    """What the plan shows of `data=` read at `spec` (image headers only); one-line errors for bad sources."""
    from pid.training.loaders import describe_data

    path = Path(source).expanduser()
    try:
        described = describe_data(path, resolution=spec.resolution, buckets=spec.mode)
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    return DataSummary(str(path.absolute()), "prepare cache" if described["kind"] == "cache" else "images",
                       described["images"], described["buckets"])


def open_loader(source: str | Path, spec: BucketSpec, batch_size: int, seed: int, rank: int, world_size: int,
                skipped_file: Path | None, num_workers: int) -> TrainLoader:
    """This rank's loader: batches of `batch_size` images, one bucket per step; `skipped_file` on rank 0."""
    from pid.training.loaders import open_loader as open_source

    return open_source(source, batch_size, resolution=spec.resolution, buckets=spec.mode, seed=seed, rank=rank,
                       world_size=world_size, skipped_path=skipped_file, num_workers=num_workers)
