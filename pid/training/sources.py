"""Where training images come from: a folder of images with same-name `.txt` captions, a JSONL manifest, or the
reference's WebDataset layout (read with the `webdataset` library) -> a list of `Item`s (key, where the bytes are,
upright native size, caption fields). Image headers only are read; a source's unusable images go to `skip`.
See docs/training-data.md for the formats.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from pid.errors import ConfigError, InputError
from pid.inference.io import read_json_file, read_manifest
from pid.training.buckets import WDS_ASPECT_DIRS

CAPTION_FIELDS: tuple[str, ...] = ("prompt", "prompt_medium", "prompt_short")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Item:
    """One training image: where its bytes are, its upright native size and its caption fields."""

    key: str
    path: str  # the image file, or the tar holding it
    member: str | None  # the tar member name (None for a plain file)
    width: int
    height: int
    captions: tuple[tuple[str, str], ...]  # (field, text) of the non-empty caption fields, in CAPTION_FIELDS order

    @property
    def caption_dict(self) -> dict[str, str]:
        return dict(self.captions)

    @property
    def where(self) -> str:
        return f"{self.path}#{self.member}" if self.member else self.path

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "path": self.path, "member": self.member, "width": self.width,
                "height": self.height, "captions": dict(self.captions)}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Item:
        return cls(record["key"], record["path"], record.get("member"), int(record["width"]), int(record["height"]),
                   caption_fields(record["captions"]))


def skip_record(key: str, image: str, reason: str, stage: str) -> dict[str, Any]:
    return {"key": key, "image": image, "reason": reason, "stage": stage}


# ------------------------------------------------------------------------------------------------------------
# Captions


def caption_fields(data: Any) -> tuple[tuple[str, str], ...]:
    """The non-empty caption fields of a caption record (`CaptionExtractor`): a string is the `prompt`; a dict may
    nest its fields under `caption` / `captions`."""
    while isinstance(data, Mapping) and isinstance(data.get("caption", data.get("captions")), Mapping):
        data = data["caption"] if isinstance(data.get("caption"), Mapping) else data["captions"]
    if isinstance(data, str):
        return (("prompt", data),) if data.strip() else ()
    if not isinstance(data, Mapping):
        return ()
    return tuple((name, data[name]) for name in CAPTION_FIELDS if isinstance(data.get(name), str) and data[name])


def pick_caption_field(captions: Sequence[tuple[str, str]], rng: random.Random) -> str:
    """One field name, uniformly among the present ones (the reference's 1:1:1 `random.choices`)."""
    names = [name for name, _ in captions]
    (name,) = rng.choices(names, weights=[1.0] * len(names), k=1)
    return name


def caption_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The caption draw of one image in one epoch: the same on every rank and after a resume."""
    return random.Random(f"{seed}/{epoch}/{key}")


# ------------------------------------------------------------------------------------------------------------
# Image bytes and pixels


def upright_size(source: bytes | Path, name: str) -> tuple[int, int]:
    """(width, height) from the image header (file or bytes), after the EXIF orientation (as `read_image`
    decodes it). Reads the header only."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            width, height = img.size
            try:
                orientation = img.getexif().get(0x0112)
            except (OSError, SyntaxError, ValueError):  # EXIF past a truncation: decoding will tell
                orientation = None
            return (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # 90-degree rotations
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"image {name} cannot be read ({type(err).__name__})") from None


class _TarReader:
    """Random access to tar members (a process-local handle cache: each DataLoader worker opens its own)."""

    def __init__(self, max_open: int = 16) -> None:
        self.max_open = max_open
        self._open: OrderedDict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = OrderedDict()
        self._pid = os.getpid()

    def read(self, path: str, member: str) -> bytes:
        if os.getpid() != self._pid:  # a forked worker: inherited handles share file offsets with the parent
            self._open, self._pid = OrderedDict(), os.getpid()
        if path not in self._open:
            archive = tarfile.open(path, "r:")
            self._open[path] = (archive, {m.name: m for m in archive.getmembers()})
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1][0].close()
        self._open.move_to_end(path)
        archive, members = self._open[path]
        info = members.get(member)
        handle = archive.extractfile(info) if info is not None else None
        if handle is None:
            raise InputError(f"tar {path} has no member {member}")
        return handle.read()


_TARS = _TarReader()


def read_item_bytes(item: Item) -> bytes:
    try:
        return _TARS.read(item.path, item.member) if item.member else Path(item.path).read_bytes()
    except (OSError, tarfile.TarError) as err:
        raise InputError(f"image {item.where} cannot be read ({type(err).__name__}: {err})") from None


# ------------------------------------------------------------------------------------------------------------
# Sources -> items


def _unique(key: str, seen: set[str]) -> str:
    if key not in seen:
        seen.add(key)
        return key
    n = 2
    while f"{key}#{n}" in seen:
        n += 1
    seen.add(f"{key}#{n}")
    return f"{key}#{n}"


def scan_folder(folder: Path, skip: Callable[[dict[str, Any]], None]) -> list[Item]:
    """Images under `folder` (recursively, sorted) with a same-name `.txt` caption beside each."""
    items: list[Item] = []
    seen: set[str] = set()
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        key = _unique(path.relative_to(folder).with_suffix("").as_posix(), seen)  # a.png + a.jpg: "a", "a#2"
        text_path = path.with_suffix(".txt")
        text = text_path.read_text(encoding="utf-8", errors="replace").strip() if text_path.is_file() else ""
        if not text:
            skip(skip_record(key, str(path), f"no caption: write one into {text_path.name}", "index"))
            continue
        try:
            width, height = upright_size(path, str(path))
        except InputError as err:
            skip(skip_record(key, str(path), str(err), "index"))
            continue
        items.append(Item(key, str(path), None, width, height, (("prompt", text),)))
    return items


def scan_manifest(manifest: Path, skip: Callable[[dict[str, Any]], None]) -> list[Item]:
    """The lines of a JSONL manifest (`image`, `prompt`, optional `prompt_medium`, `prompt_short`)."""
    items: list[Item] = []
    seen: set[str] = set()
    for entry in read_manifest(manifest):
        key = _unique(str(entry.image), seen)
        captions = caption_fields({"prompt": entry.prompt or "", "prompt_medium": entry.prompt_medium or "",
                                   "prompt_short": entry.prompt_short or ""})
        if (missing := entry.missing_reason()) is not None:
            skip(skip_record(key, str(entry.image), missing, "index"))
            continue
        if not captions:
            skip(skip_record(key, str(entry.image), f"manifest line {entry.line} has no caption (prompt)", "index"))
            continue
        try:
            width, height = upright_size(entry.image, str(entry.image))
        except InputError as err:
            skip(skip_record(key, str(entry.image), str(err), "index"))
            continue
        items.append(Item(key, str(entry.image), None, width, height, captions))
    return items


def webdataset_subroots(root: Path) -> list[Path]:
    """Folders under `root` holding a `wdinfo.json` whose path names one of the 7 trained aspect ratios."""
    found = sorted(p.parent for p in root.rglob("wdinfo.json"))
    return [p for p in found if any(part in WDS_ASPECT_DIRS for part in p.resolve().parts)]


def _tar_path(subroot: Path, info: Mapping[str, Any], data_key: str, relative: str) -> Path:
    local = subroot / data_key / relative
    if local.is_file() or not info.get("root"):
        return local
    return Path(str(info["root"])) / data_key / relative  # the absolute root the shards were written under


def scan_webdataset(root: Path, skip: Callable[[dict[str, Any]], None]) -> list[Item]:
    """Every sample of the reference's WebDataset layout: image and caption tars walked in step (aligned by
    position, checked by key) with `webdataset`'s tar iterator."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    subroots = webdataset_subroots(root)
    if not subroots:
        raise ConfigError(f"{root} holds no aspect_ratio_W_H/ folder with a wdinfo.json "
                          f"(the reference's layout; trained ratios: {', '.join(WDS_ASPECT_DIRS)})")
    items: list[Item] = []
    seen: set[str] = set()
    for subroot in subroots:
        info = read_json_file(subroot / "wdinfo.json")
        keys = list(info.get("data_keys") or ["caption", "image"])
        if "image" not in keys or "caption" not in keys:
            raise ConfigError(f"{subroot / 'wdinfo.json'}: data_keys must include image and caption, got {keys}")
        for relative in info.get("data_list", []):
            image_tar = _tar_path(subroot, info, "image", relative)
            caption_tar = _tar_path(subroot, info, "caption", relative)
            try:
                with open(image_tar, "rb") as images, open(caption_tar, "rb") as captions:
                    pairs = zip(tar_file_iterator(images), tar_file_iterator(captions))
                    for image_file, caption_file in pairs:
                        items += _wds_sample(image_file, caption_file, image_tar, seen, skip, base_plus_ext)
            except (OSError, tarfile.TarError) as err:
                skip(skip_record(relative, str(image_tar), f"shard cannot be read ({type(err).__name__}: {err})", "index"))
    return items


def _wds_sample(image_file: Mapping[str, Any], caption_file: Mapping[str, Any], image_tar: Path, seen: set[str],
                skip: Callable[[dict[str, Any]], None], split: Callable[[str], tuple[Any, Any]]) -> list[Item]:
    key, _ = split(image_file["fname"])
    caption_key, _ = split(caption_file["fname"])
    where = f"{image_tar}#{image_file['fname']}"
    if key is None or key != caption_key:
        skip(skip_record(str(key), where, f"image and caption tars out of step ({image_file['fname']} vs "
                                    f"{caption_file['fname']})", "index"))
        return []
    try:
        captions = caption_fields(json.loads(caption_file["data"]))
    except (json.JSONDecodeError, UnicodeDecodeError):
        captions = ()
    if not captions:
        skip(skip_record(key, where, "no caption (prompt) in its caption JSON", "index"))
        return []
    try:
        width, height = upright_size(image_file["data"], where)
    except InputError as err:
        skip(skip_record(key, where, str(err), "index"))
        return []
    return [Item(_unique(key, seen), str(image_tar), image_file["fname"], width, height, captions)]


def source_kind(data: str | Path) -> str:
    """"manifest", "webdataset", "cache" (a prepare cache folder) or "folder"; ConfigError when it is none."""
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix.lower() not in (".jsonl", ".json"):
            raise ConfigError(f"data={data}: a file must be a JSONL manifest (.jsonl); or give a folder")
        return "manifest"
    if not path.is_dir():
        raise ConfigError(f"data={data} does not exist; give a folder of images + .txt captions, a .jsonl "
                          "manifest, a WebDataset root or a prepare cache")
    if (path / "cache.json").is_file():
        return "cache"
    if next(path.rglob("wdinfo.json"), None) is not None:
        return "webdataset"
    return "folder"


def scan_source(data: str | Path, skip: Callable[[dict[str, Any]], None]) -> list[Item]:
    """Items of a folder, a `.jsonl` manifest or a WebDataset root (one with `wdinfo.json` files below it)."""
    path = Path(data).expanduser()
    kind = source_kind(path)
    if kind == "cache":
        raise ConfigError(f"data={data} is a prepare cache: open it with pid.training.cache.LatentCache")
    return {"manifest": scan_manifest, "webdataset": scan_webdataset, "folder": scan_folder}[kind](path, skip)


__all__ = [
    "CAPTION_FIELDS", "IMAGE_SUFFIXES", "Item", "caption_fields", "caption_rng", "pick_caption_field",
    "read_item_bytes", "scan_folder", "scan_manifest", "scan_source", "scan_webdataset", "skip_record",
    "source_kind", "upright_size", "webdataset_subroots",
]
