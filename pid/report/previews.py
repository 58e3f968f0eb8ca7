"""JPEG previews of a run's images, made once and reused while the source file is unchanged.

Previews live in `<run>/previews/`, mirroring the run's own layout (`previews/pid/step_x0/00000000.jpg` for
`pid/step_x0/00000000.png`), so globs over the output folders (`pid/step_x0/*.png`, FID tools, ...) never pick
them up and `rm -r previews` is always safe. `previews/index.json` remembers each source's size, mtime and
dimensions, so calling the report after every item stats files instead of decoding them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

DEFAULT_MAX_SIDE = 1024
JPEG_QUALITY = 85
INDEX_NAME = "index.json"


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; reports and previews get the usual permissions instead.
FILE_MODE = 0o666 & ~_current_umask()


@dataclass(frozen=True)
class ImageRef:
    """A full-size image and the preview the page shows for it (the full file is loaded only on zoom)."""

    full: Path
    preview: Path
    width: int  # of the full image
    height: int


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same folder + os.replace: readers see the old file or the new one, never a torn one,
    and concurrent writers (torchrun ranks) cannot interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, FILE_MODE)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


class PreviewCache:
    """Previews for the images of one run folder."""

    def __init__(self, run_dir: Path, max_side: int = DEFAULT_MAX_SIDE) -> None:
        self.run_dir = run_dir
        self.folder = run_dir / "previews"
        self.max_side = int(max_side)
        self.made = 0  # previews written by this instance (tests and logs)
        self.failed: list[str] = []
        self._index: dict[str, Any] = self._read_index()
        self._dirty = False

    def _read_index(self) -> dict[str, Any]:
        try:
            data = json.loads((self.folder / INDEX_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def preview_path(self, source: Path) -> Path:
        try:
            relative = source.resolve().relative_to(self.run_dir.resolve())
        except ValueError:  # an image outside the run folder (old absolute paths): a stable hashed name
            digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:16]
            return self.folder / "_external" / f"{source.stem}_{digest}.jpg"
        return self.folder / relative.with_suffix(".jpg")

    def get(self, source: Path | None) -> ImageRef | None:
        """The preview of `source` (made now if missing or stale); None when the source is missing/unreadable."""
        if source is None:
            return None
        try:
            stat = source.stat()
        except OSError:
            return None
        preview = self.preview_path(source)
        key = str(preview.relative_to(self.folder))
        entry = self._index.get(key)
        signature = [stat.st_size, stat.st_mtime_ns, self.max_side]
        if isinstance(entry, dict) and entry.get("source") == signature and preview.is_file():
            return ImageRef(source, preview, int(entry["width"]), int(entry["height"]))
        try:
            width, height = self._make(source, preview)
        except OSError as exc:  # unreadable image (or a read-only run folder): show the full file instead
            self.failed.append(f"{source}: {exc}")
            try:
                with Image.open(source) as image:
                    return ImageRef(source, source, *image.size)
            except OSError:
                return None
        self._index[key] = {"source": signature, "width": width, "height": height}
        self._dirty = True
        return ImageRef(source, preview, width, height)

    def _make(self, source: Path, preview: Path) -> tuple[int, int]:
        with Image.open(source) as image:
            size = image.size
            image.draft("RGB", (self.max_side, self.max_side))  # JPEG sources: decode at reduced scale
            rgb = image.convert("RGB")
        rgb.thumbnail((self.max_side, self.max_side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        atomic_write_bytes(preview, buffer.getvalue())
        self.made += 1
        return size

    def save(self) -> None:
        if self._dirty:
            # Re-read first: another rank may have added entries since we loaded the index.
            merged = self._read_index() | self._index
            try:
                atomic_write_bytes(self.folder / INDEX_NAME, json.dumps(merged, indent=0, sort_keys=True).encode())
            except OSError as exc:
                self.failed.append(f"{self.folder / INDEX_NAME}: {exc}")
            self._dirty = False
