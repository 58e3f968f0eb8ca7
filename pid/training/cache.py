"""The prepare cache on disk, and its reader: LQ latents and caption embeddings computed once, so a training run
holds neither the VAE nor Gemma-2.

    <out>/cache.json                  what made the cache (backbone, buckets, text encoder, data): reruns check it
    <out>/items.jsonl                 the indexed images (key, file or tar member, native size, caption fields)
    <out>/shards/shard_NNNNNN.safetensors   per image j of the shard: "j.lq_latent" [C,h,w] and "j.<field>" [L,D]
                                      for each caption field; metadata "keys" (JSON list) and "identity"
    <out>/null_caption.safetensors    "embed" [L,D]: the empty caption (what caption dropout feeds)
    <out>/index.json                  the JSON index: shards and their keys (written when every shard is done)
    <out>/skipped.jsonl               images left out, one JSON line each

Every file is written to a temporary name and renamed, so a killed prepare leaves only whole shards; a rerun
skips the shards already done.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pid.errors import ConfigError, InputError
from pid.inference.io import read_json_file, read_jsonl
from pid.training.buckets import BucketSpec
from pid.training.data import Item, TrainBatch, TrainIndex, index_items

CACHE_FORMAT = "pid-train-cache/1"


def shard_name(number: int) -> str:
    return f"shards/shard_{number:06d}.safetensors"


def identity_digest(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def read_shard_metadata(path: Path) -> dict[str, str] | None:
    """A finished shard's metadata, or None when the file is absent or unreadable (then it is redone)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # noqa: BLE001 - a torn or foreign file is simply redone
        return None


def spec_from_dict(record: Mapping[str, Any]) -> BucketSpec:
    return BucketSpec(record["mode"], int(record["resolution"]), record.get("rescue_threshold"))


class LatentCache:
    """Reads a finished prepare cache; `fill(batch)` adds `lq_latent`, `caption_embeds` (of each image's picked
    caption field) and `null_caption_embed` to a `TrainBatch`.

        cache = LatentCache("cache/")
        loader = TrainLoader(cache.train_index(), global_batch=8, cache=cache)   # pixels still come from data
    """

    def __init__(self, folder: str | Path, max_open: int = 8) -> None:
        self.folder = Path(folder).expanduser()
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise InputError(f"{self.folder} is not a finished prepare cache (no index.json); run "
                             f"python -m pid.train.prepare out={self.folder} ... (a rerun finishes it)")
        self.index = read_json_file(index_path)
        if self.index.get("format") != CACHE_FORMAT:
            raise InputError(f"{index_path} is not a {CACHE_FORMAT} index")
        self.identity: dict[str, Any] = self.index["identity"]
        self.spec = spec_from_dict(self.identity["buckets"])
        self.where: dict[str, tuple[str, int]] = {}
        for shard in self.index["shards"]:
            for slot, key in enumerate(shard["keys"]):
                self.where[key] = (shard["file"], slot)
        self.max_open = max_open
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._null: Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get their own file handles
        return {**self.__dict__, "_open": OrderedDict()}

    @property
    def backbone(self) -> str:
        return str(self.identity["backbone"])

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def train_index(self) -> TrainIndex:
        """The cached images as a `TrainIndex` (no rescan of the data source)."""
        items = [Item.from_json(r) for r in read_jsonl(self.folder / "items.jsonl")]
        return index_items([item for item in items if item.key in self.where], self.spec, lambda record: None,
                           source=str(self.identity.get("data", "")))

    def _handle(self, file: str) -> Any:
        from safetensors import safe_open

        if file not in self._open:
            self._open[file] = safe_open(str(self.folder / file), framework="pt")
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        self._open.move_to_end(file)
        return self._open[file]

    def tensor(self, key: str, name: str) -> Tensor:
        """One stored tensor of image `key`: "lq_latent", or a caption field name."""
        if key not in self.where:
            raise InputError(f"image {key} is not in the prepare cache {self.folder}; rerun prepare on this data")
        file, slot = self.where[key]
        return self._handle(file).get_tensor(f"{slot}.{name}")

    def null_caption_embed(self) -> Tensor:
        if self._null is None:
            from safetensors.torch import load_file

            self._null = load_file(str(self.folder / "null_caption.safetensors"))["embed"]
        return self._null

    def fill(self, batch: TrainBatch) -> TrainBatch:
        batch.lq_latent = torch.stack([self.tensor(k, "lq_latent") for k in batch.keys]).float()
        batch.caption_embeds = torch.stack(
            [self.tensor(k, name) for k, name in zip(batch.keys, batch.caption_fields)]).float()
        batch.null_caption_embed = self.null_caption_embed().float()
        return batch


def check_identity(folder: Path, identity: Mapping[str, Any], overwrite: bool) -> None:
    """A cache folder made with other settings is an error (before anything is written), unless `overwrite`."""
    path = folder / "cache.json"
    if not path.is_file() or overwrite:
        return
    old = read_json_file(path).get("identity", {})
    if old != dict(identity):
        changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        raise ConfigError(f"out={folder} holds a cache made with other settings ({', '.join(changed)} differ); "
                          "choose another out= folder, or overwrite=true to rebuild it")


__all__ = ["CACHE_FORMAT", "LatentCache", "check_identity", "identity_digest", "read_shard_metadata",
           "shard_name", "spec_from_dict"]
