"""One entry over every training source: a folder of images, a JSONL manifest, a WebDataset root or a prepare
cache (`pid.training.cache`) -> the rank's resumable `TrainLoader`, or the dry run's summary of it.

    spec = source_geometry(data, resolution=None, buckets=None)   # a cache's own buckets, else 2048 / fixed
    loader = open_loader(data, batch_size, resolution=2048, seed=0, rank=rank, world_size=world,
                         skipped_path=run_dir / "skipped.jsonl")
    describe_data(data, resolution=2048)     # images, buckets, skipped; reads headers only, writes nothing
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pid.errors import ConfigError
from pid.training.buckets import BucketSpec
from pid.training.data import SkipLog, TrainIndex, TrainLoader, build_index
from pid.training.sources import source_kind

DEFAULT_RESOLUTION = 2048
DEFAULT_BUCKETS = "fixed"


def source_geometry(data: str | Path, resolution: int | None = None, buckets: str | None = None) -> BucketSpec:
    """The buckets `data` is read at: a prepare cache's own (it was encoded at them; asking for another
    resolution or bucket mode is a one-line error), else the asked ones (default 2048, fixed)."""
    return _open_source(data, resolution, buckets)[0]


def _open_source(data: str | Path, resolution: int | None, buckets: str | None) -> tuple[BucketSpec, Any]:
    """(the buckets `data` is read at, its opened LatentCache or None): a cache is opened once, here."""
    if source_kind(data) != "cache":
        return BucketSpec(buckets or DEFAULT_BUCKETS, int(resolution or DEFAULT_RESOLUTION)), None
    from pid.training.cache import LatentCache

    cache = LatentCache(data)
    spec = cache.spec
    for name, asked, have in (("resolution", resolution, spec.resolution), ("buckets", buckets, spec.mode)):
        if asked is not None and asked != have:
            raise ConfigError(f"the prepare cache {data} was made with {name}={have}, not {asked}; drop {name}= "
                              f"(a cache is read at its own) or prepare another cache")
    return spec, cache


def _cache_index(cache: Any) -> TrainIndex:
    index = cache.train_index()
    index.kind = "cache"
    return index


def open_loader(data: str | Path, batch_size: int, *, resolution: int | None = None, buckets: str | None = None,
                seed: int = 0, rank: int = 0, world_size: int = 1, skipped_path: str | Path | None = None,
                num_workers: int = 0) -> TrainLoader:
    """A TrainLoader of `batch_size` images per rank over a folder, manifest, WebDataset root or prepare cache
    (whose batches then carry `lq_latent` / `caption_embeds`). Index-time skips are listed in `skipped_path` by
    rank 0 only; every rank lists the images it fails to load."""
    spec, cache = _open_source(data, resolution, buckets)
    log = SkipLog(skipped_path)
    if cache is not None:
        return TrainLoader(_cache_index(cache), batch_size * world_size, seed=seed, rank=rank,
                           world_size=world_size, skip_log=log, cache=cache, num_workers=num_workers)
    first = SkipLog(skipped_path if rank == 0 else None)
    index = build_index(data, spec, skip_log=first)
    log.remember(first.records)
    return TrainLoader(index, batch_size * world_size, seed=seed, rank=rank, world_size=world_size, skip_log=log,
                       num_workers=num_workers)


def describe_data(data: str | Path, *, resolution: int | None = None, buckets: str | None = None) -> dict[str, Any]:
    """What a dry run shows: source, kind, usable images, buckets (count, W x H) and the images left out.
    Reads image headers only; writes nothing."""
    spec, cache = _open_source(data, resolution, buckets)
    if cache is not None:
        return {**_cache_index(cache).describe(), "skipped": []}
    skips: list[dict[str, Any]] = []
    index = build_index(data, spec, skip_log=skips.append)
    return {**index.describe(), "skipped": skips}


__all__ = ["DEFAULT_BUCKETS", "DEFAULT_RESOLUTION", "describe_data", "open_loader", "source_geometry"]
