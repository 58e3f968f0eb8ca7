"""Training data: sources -> an index of (image, captions, bucket) -> shape-uniform, rank-sharded, resumable batches.

The trainer's entry over every source kind, prepare caches included, is `pid.training.loaders.open_loader`.
By hand:

    from pid.training.data import TrainLoader, build_index
    index = build_index("photos/", BucketSpec(resolution=512), skip_log=SkipLog(run_dir / "skipped.jsonl"))
    loader = TrainLoader(index, global_batch=8, seed=0, rank=rank, world_size=world)
    loader.load_state_dict(saved)            # optional: continue exactly where a run stopped
    for batch in loader:                     # endless; one TrainBatch per step on every rank
        batch.pixels                         # [B,3,H,W] float32 in [-1,1], B = global_batch / world_size
        state = loader.state_dict()          # {"epoch", "index", ...}: the next batch this rank will yield

The batch type every training step reads (the cached path fills the last three fields):

    @dataclass TrainBatch:
        pixels: Tensor                 [B,3,H,W] float32 in [-1,1] (Lanczos adaptive resize + centre crop)
        captions: list[str]            the caption picked for each image (uniformly among its non-empty fields)
        keys: list[str]                each image's key in the index (file stem, manifest path, tar sample key)
        bucket: str                    the shared bucket: "4,3" (fixed) or "L2304_4,3" (multires)
        caption_fields: list[str]      which field each caption came from: prompt / prompt_medium / prompt_short
        lq_latent: Tensor | None       [B,C,h,w] cached normalised VAE latent of downsample(pixels) (prepare cache)
        caption_embeds: Tensor | None  [B,L,D] cached embedding of `captions` (prepare cache)
        null_caption_embed: Tensor | None  [L,D] cached embedding of "" (what a dropped caption becomes)
        skipped: list[dict]            images replaced in this batch because they could not be loaded

Sources (`pid.training.sources`): a folder of images with same-name `.txt` captions; a JSONL manifest
(`image`, `prompt`, optional `prompt_medium`, `prompt_short`; relative paths against the manifest's folder, then
the working folder); or the reference's WebDataset layout (`aspect_ratio_W_H/{image,caption}/part_*/*.tar` with a
`wdinfo.json` per sub-root; only the 7 trained aspect ratios), read with the `webdataset` library.

Batching (no flip, no random crop, as the reference): every epoch is a seeded permutation of the index; walking it,
images collect per bucket and each bucket emits a *global* batch when it holds `global_batch` images (leftovers
wait for the next epoch's shuffle). Rank r takes the r-th slice of every global batch, so 2 ranks x b images see
exactly what 1 rank x 2b sees. The caption field is drawn per (seed, epoch, image), independent of ranks.

A corrupt, unreadable, caption-less or too-small image never ends a run: at indexing it is left out, at loading it
is replaced by the next image of its bucket in this epoch's order; either way it is counted and listed once
(`SkipLog`, e.g. `<run>/skipped.jsonl`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger
from PIL import Image
from torch import Tensor

from pid.errors import ConfigError, InputError, PiDError
from pid.inference.io import append_jsonl, decode_image
from pid.training.buckets import BucketSpec, Placement, center_crop_offset
from pid.training.sources import (
    CAPTION_FIELDS,
    Item,
    caption_fields,
    caption_rng,
    pick_caption_field,
    read_item_bytes,
    scan_source,
    skip_record,
    source_kind,
)

_MAX_REPLACEMENTS = 8  # images tried in place of one that fails to load


# ------------------------------------------------------------------------------------------------------------
# Batches and skipped images


@dataclass
class TrainBatch:
    """See the module docstring."""

    pixels: Tensor
    captions: list[str]
    keys: list[str]
    bucket: str
    caption_fields: list[str]
    lq_latent: Tensor | None = None
    caption_embeds: Tensor | None = None
    null_caption_embed: Tensor | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str) -> TrainBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return replace(self, pixels=move(self.pixels), lq_latent=move(self.lq_latent),
                       caption_embeds=move(self.caption_embeds), null_caption_embed=move(self.null_caption_embed))


class SkipLog:
    """Counts and lists images left out: each key once, appended to `path` (JSONL) when given."""

    def __init__(self, path: str | Path | None = None, callback: Callable[[dict[str, Any]], None] | None = None):
        self.path = Path(path) if path is not None else None
        self.callback = callback
        self.records: list[dict[str, Any]] = []
        self._seen: set[str] = set()

    def __call__(self, record: Mapping[str, Any]) -> None:
        ident = f"{record.get('key')}\0{record.get('image')}"
        if ident in self._seen:
            return
        self._seen.add(ident)
        self.records.append(dict(record))
        logger.warning("skipped {}: {}", record.get("image"), record.get("reason"))
        if self.path is not None:
            append_jsonl(self.path, record)
        if self.callback is not None:
            self.callback(dict(record))

    def remember(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Count records listed elsewhere (e.g. by rank 0) without listing them again."""
        for record in records:
            ident = f"{record.get('key')}\0{record.get('image')}"
            if ident not in self._seen:
                self._seen.add(ident)
                self.records.append(dict(record))

    @property
    def count(self) -> int:
        return len(self.records)


# ------------------------------------------------------------------------------------------------------------
# Pixels


def to_signed(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> [3, H, W] float32 in [-1, 1], as the reference's Normalize (to_tensor, then (x-0.5)/0.5)."""
    unit = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0)
    return (unit - 0.5) / 0.5


def place_pixels(image: np.ndarray, placement: Placement) -> Tensor:
    """Lanczos adaptive resize (PIL, antialiased), Normalize, then the tensor centre crop -> [3, Hc, Wc]."""
    if placement.resize is not None and placement.resize != (image.shape[1], image.shape[0]):
        image = np.asarray(Image.fromarray(image).resize(placement.resize, Image.Resampling.LANCZOS))
    crop_w, crop_h = placement.crop
    left, top = center_crop_offset(image.shape[1], crop_w), center_crop_offset(image.shape[0], crop_h)
    return to_signed(image[top : top + crop_h, left : left + crop_w])  # elementwise: crop first, same values


def load_pixels(item: Item, placement: Placement) -> Tensor:
    """The item's training pixels [3, Hc, Wc] in [-1, 1]; InputError when it cannot be decoded as indexed."""
    image = decode_image(read_item_bytes(item), item.where)
    if image.shape[1] != item.width or image.shape[0] != item.height:
        raise InputError(f"image {item.where} decodes to {image.shape[1]}x{image.shape[0]}, "
                         f"its header said {item.width}x{item.height}")
    return place_pixels(image, placement)


# ------------------------------------------------------------------------------------------------------------
# The index: items that fit a bucket


@dataclass
class TrainIndex:
    """The usable items, each with its placement, and what the buckets are."""

    items: list[Item]
    placements: list[Placement]
    spec: BucketSpec
    source: str = ""
    kind: str = ""  # folder | manifest | webdataset | cache

    def __len__(self) -> int:
        return len(self.items)

    def bucket_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for placement in self.placements:
            counts[placement.bucket] = counts.get(placement.bucket, 0) + 1
        return dict(sorted(counts.items()))

    def describe(self) -> dict[str, Any]:
        sizes = self.spec.buckets()
        return {"source": self.source, "kind": self.kind, "images": len(self.items), **self.spec.to_dict(),
                "buckets": {b: {"count": n, "size_wh": list(sizes[b])} for b, n in self.bucket_counts().items()}}


def index_items(items: Sequence[Item], spec: BucketSpec, skip: Callable[[dict[str, Any]], None],
                source: str = "") -> TrainIndex:
    kept, placements = [], []
    for item in items:
        placement = spec.place(item.width, item.height)
        if placement is None:
            smallest = min(spec.buckets().values(), key=lambda s: s[0] * s[1])
            skip(skip_record(item.key, item.where, f"image {item.width}x{item.height} is too small for the "
                                             f"{spec.mode} {spec.resolution} buckets (smallest "
                                             f"{smallest[0]}x{smallest[1]})", "index"))
            continue
        kept.append(item)
        placements.append(placement)
    return TrainIndex(kept, placements, spec, source)


def build_index(data: str | Path, spec: BucketSpec | None = None,
                skip_log: Callable[[dict[str, Any]], None] | None = None) -> TrainIndex:
    """Scan a source and bucket its images; left-out images go to `skip_log`. Raises InputError if none fit."""
    spec = spec or BucketSpec()
    skip = skip_log or SkipLog()
    index = index_items(scan_source(data, skip), spec, skip, source=str(data))
    index.kind = source_kind(data)
    if not index.items:
        raise InputError(f"data={data}: no usable image (every image was skipped; see the skipped list)")
    return index


# ------------------------------------------------------------------------------------------------------------
# Batching


def epoch_plan(buckets: Sequence[str], global_batch: int, seed: int, epoch: int) -> list[tuple[str, list[int]]]:
    """The global batches of one epoch: (bucket, item indices) in order. A seeded permutation of all items,
    walked once; a bucket emits a batch each time it holds `global_batch` items."""
    order = list(range(len(buckets)))
    random.Random(f"pid-train/{seed}/{epoch}").shuffle(order)
    pending: dict[str, list[int]] = {}
    plan = []
    for index in order:
        group = pending.setdefault(buckets[index], [])
        group.append(index)
        if len(group) == global_batch:
            plan.append((buckets[index], group))
            pending[buckets[index]] = []
    return plan


def rank_slice(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    per_rank = len(indices) // world_size
    return list(indices[rank * per_rank : (rank + 1) * per_rank])


class _PlannedBatches(torch.utils.data.Dataset):
    """Map-style view of one epoch's planned batches for one rank (what DataLoader workers load)."""

    def __init__(self, loader: TrainLoader, epoch: int, plan: list[tuple[str, list[int]]]) -> None:
        self.loader, self.epoch, self.plan = loader, epoch, plan
        self.bucket_order: dict[str, list[int]] = {}
        for index in self._epoch_order():
            self.bucket_order.setdefault(loader.buckets[index], []).append(index)

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.loader.buckets)))
        random.Random(f"pid-train/{self.loader.seed}/{self.epoch}").shuffle(order)
        return order

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, j: int) -> TrainBatch:
        bucket, indices = self.plan[j]
        return self.loader.load_batch(bucket, rank_slice(indices, self.loader.rank, self.loader.world_size),
                                      self.epoch, self.bucket_order[bucket])


def _identity(batch: TrainBatch) -> TrainBatch:
    return batch


class TrainLoader:
    """Endless, deterministic, rank-sharded, resumable batches of one bucket each (see the module docstring).

    `cache`: a `pid.training.cache.LatentCache` adds the prepared `lq_latent` / `caption_embeds` to each batch.
    `num_workers`: DataLoader worker processes that decode ahead (0: in this process).
    """

    def __init__(self, index: TrainIndex, global_batch: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 skip_log: SkipLog | Callable[[dict[str, Any]], None] | None = None, cache: Any = None,
                 num_workers: int = 0, prefetch_factor: int = 2) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in a world of {world_size}")
        if global_batch < 1 or global_batch % world_size:
            raise ConfigError(f"the global batch ({global_batch}) must be a positive multiple of the number of "
                              f"ranks ({world_size})")
        self.index, self.global_batch, self.seed = index, int(global_batch), int(seed)
        self.rank, self.world_size = rank, world_size
        self.skip_log = skip_log if isinstance(skip_log, SkipLog) else SkipLog(callback=skip_log)
        self.cache = cache
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.buckets = [p.bucket for p in index.placements]
        self.epoch, self.position = 0, 0
        if not epoch_plan(self.buckets, self.global_batch, self.seed, 0):
            counts = ", ".join(f"{b}: {n}" for b, n in index.bucket_counts().items())
            raise ConfigError(f"no bucket holds a full global batch of {global_batch} images ({counts}); lower "
                              "the batch size, or add images of one aspect ratio")

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Every image this loader left out so far (at indexing, when it shares the SkipLog, and at loading)."""
        return self.skip_log.records

    @property
    def batch_size(self) -> int:
        """Images per batch on this rank."""
        return self.global_batch // self.world_size

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        return len(epoch_plan(self.buckets, self.global_batch, self.seed, self.epoch if epoch is None else epoch))

    # --- position ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The next batch to yield: `epoch` and `index` (global batches of that epoch already yielded)."""
        return {"epoch": self.epoch, "index": self.position, "seed": self.seed, "global_batch": self.global_batch,
                "num_items": len(self.index)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, mine in (("seed", self.seed), ("global_batch", self.global_batch), ("num_items", len(self.index))):
            if name in state and int(state[name]) != mine:
                raise ConfigError(f"the saved data position was made with {name}={state[name]}, this run has "
                                  f"{mine}; resume with the same data and batch, or start a new run")
        self.epoch, self.position = int(state["epoch"]), int(state["index"])

    # --- loading -------------------------------------------------------------------------------------------

    def load_batch(self, bucket: str, indices: Sequence[int], epoch: int,
                   bucket_order: Sequence[int] = ()) -> TrainBatch:
        """Load one rank's images of a planned batch; an image that fails is replaced by the next one of its
        bucket in this epoch's order (`bucket_order`)."""
        pixels, captions, keys, fields, skipped = [], [], [], [], []
        failed: set[int] = set()
        for index in indices:
            candidates = [index] + _after(bucket_order, index)[:_MAX_REPLACEMENTS]
            for candidate in candidates:
                if candidate in failed:
                    continue
                item = self.index.items[candidate]
                try:
                    pixels.append(load_pixels(item, self.index.placements[candidate]))
                except (PiDError, OSError, ValueError) as err:
                    failed.add(candidate)
                    skipped.append(skip_record(item.key, item.where, str(err), "load"))
                    continue
                name = pick_caption_field(item.captions, caption_rng(self.seed, epoch, item.key))
                fields.append(name)
                captions.append(item.caption_dict[name])
                keys.append(item.key)
                break
        if not keys:
            raise InputError(f"every image tried for a {bucket} batch failed to load: "
                             f"{'; '.join(s['reason'] for s in skipped[:3])}")
        batch = TrainBatch(torch.stack(pixels), captions, keys, bucket, fields, skipped=skipped)
        if self.cache is not None:
            self.cache.fill(batch)
        return batch

    def __iter__(self) -> Iterator[TrainBatch]:
        while True:
            plan = epoch_plan(self.buckets, self.global_batch, self.seed, self.epoch)
            start = self.position
            if start >= len(plan):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            dataset = _PlannedBatches(self, self.epoch, plan)
            positions = range(start, len(plan))
            if self.num_workers > 0:
                batches: Iterator[TrainBatch] = iter(torch.utils.data.DataLoader(
                    dataset, batch_size=None, sampler=positions, num_workers=self.num_workers,
                    collate_fn=_identity, prefetch_factor=self.prefetch_factor))
            else:
                batches = (dataset[j] for j in positions)
            for j, batch in zip(positions, batches):
                for record in batch.skipped:
                    self.skip_log(record)
                self.position = j + 1  # what a checkpoint taken after this step must resume from
                yield batch
            self.epoch, self.position = self.epoch + 1, 0


def _after(order: Sequence[int], index: int) -> list[int]:
    """The items after `index` in `order`, wrapping around (replacement candidates)."""
    if index not in order:
        return []
    at = list(order).index(index)
    return list(order[at + 1 :]) + list(order[:at])


__all__ = [
    "CAPTION_FIELDS", "Item", "SkipLog", "TrainBatch", "TrainIndex", "TrainLoader", "build_index", "caption_fields",
    "caption_rng", "epoch_plan", "index_items", "load_pixels", "pick_caption_field",
    "place_pixels", "rank_slice", "source_kind",
]
