"""Adapter between the trainer and the data pipeline (`pid.training.data`, branch `data`).

Until that pipeline is merged this holds a minimal stand-in with the same contract: a folder of images with
same-name .txt captions or a JSONL manifest, every image resized (Lanczos) and centre-cropped to one square
bucket of `resolution`, sharded round-robin by global rank over a per-epoch shuffle, resumable from
`state_dict()`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pid.errors import ConfigError
from pid.train.plan import DataSummary

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Item:
    key: str
    image: Path
    caption: str


@dataclass
class Batch:
    pixels: Tensor  # [B, 3, H, W] in [-1, 1]
    captions: list[str]
    keys: list[str]
    bucket: str


def list_items(source: str | Path) -> tuple[str, list[Item]]:
    """(format, items) of a folder of images + .txt captions or a JSONL manifest."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"data {path} does not exist; give a folder of images or a JSONL manifest")
    if path.is_file():
        if path.suffix != ".jsonl":
            raise ConfigError(f"data file {path} must be a JSONL manifest (.jsonl)")
        items = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = Path(row["image"]).expanduser()
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"{path}:{n + 1}: not a JSON object with an \"image\" path") from None
            image = image if image.is_absolute() else path.parent / image
            items.append(Item(f"{n:08d}_{image.stem}", image, str(row.get("prompt") or "")))
        return "manifest", items
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    items = []
    for image in images:
        text = image.with_suffix(".txt")
        items.append(Item(str(image.relative_to(path).with_suffix("")), image,
                          text.read_text(encoding="utf-8").strip() if text.is_file() else ""))
    return "folder", items


def summarize_data(source: str | Path, resolution: int) -> DataSummary:
    kind, items = list_items(source)
    if not items:
        raise ConfigError(f"data {source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return DataSummary(str(Path(source).expanduser().absolute()), kind, len(items),
                       {f"{resolution}x{resolution}": len(items)})


def load_pixels(path: Path, size: int) -> Tensor:
    """[3, size, size] in [-1, 1]: Lanczos resize of the shorter side, centre crop."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = size / min(img.size)
        width, height = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((width, height), Image.LANCZOS)
        left, top = (width - size) // 2, (height - size) // 2
        img = img.crop((left, top, left + size, top + size))
        array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1) * 2.0 - 1.0


class Batches:
    """Endless batches for one rank: epoch e visits a seeded permutation; rank r takes every world-th item."""

    def __init__(self, source: str | Path, resolution: int, batch_size: int, rank: int, world_size: int,
                 seed: int) -> None:
        _, self.items = list_items(source)
        self.resolution, self.batch_size = resolution, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.position = 0, 0
        self.skipped: list[dict[str, str]] = []

    def _order(self) -> list[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.items)).tolist()
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            order = self._order()
            pixels, captions, keys = [], [], []
            while len(pixels) < self.batch_size:
                if self.position >= len(order):
                    self.epoch, self.position = self.epoch + 1, 0
                    order = self._order()
                item = self.items[order[self.position]]
                self.position += 1
                try:
                    pixels.append(load_pixels(item.image, self.resolution))
                except (OSError, ValueError) as exc:
                    self.skipped.append({"key": item.key, "image": str(item.image), "reason": str(exc)})
                    continue
                captions.append(item.caption)
                keys.append(item.key)
            yield Batch(torch.stack(pixels), captions, keys, f"{self.resolution}x{self.resolution}")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
