"""Atomic, attributable writes: every output file appears whole under its final name or not at all.

A write goes to a temporary file beside its target, is fsynced, then renamed over the target with `os.replace`.
Temporary names say who wrote them, `.<name>.~<host>~<pid>~<random>.tmp`, so a later run can tell the leftovers
of a killed writer (its process is gone) from the files of a writer still at work, and remove only the former
(`remove_stale_temps`). `StagedFiles` extends this to several files: an item's files are all written under
temporary names first and renamed into place together, only once every one of them was written.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pid.errors import InputError

try:
    import fcntl  # advisory locks for append_jsonl; absent on Windows
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

TEMP_SUFFIX = ".tmp"
# Temporary files of writers on other machines (shared file systems) or of earlier versions carry no pid this host
# can check: they count as abandoned once older than any write could take.
STALE_TEMP_S = 600.0
_TEMP_OWNER = re.compile(r"\.~(?P<host>[A-Za-z0-9-]*)~(?P<pid>\d+)~[^/]*\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:32]


def temp_prefix(target: Path) -> str:
    """`.<name>.~<host>~<pid>~`: the start of every temporary name written for `target` by this process."""
    return f".{target.name}.~{_host()}~{os.getpid()}~"


def _writer_is_gone(name: str, age_s: float) -> bool:
    match = _TEMP_OWNER.search(name)
    if match is None or match["host"] != _host():
        return age_s > STALE_TEMP_S
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files (`.*.tmp`, anywhere under `folder`) whose writer was killed; returns them.

    A temporary file of a live process on this machine (another rank, a concurrent run) is left alone."""
    removed = []
    now = time.time()
    for path in Path(folder).rglob(f".*{TEMP_SUFFIX}"):
        try:
            if path.is_file() and _writer_is_gone(path.name, now - path.stat().st_mtime):
                path.unlink()
                removed.append(path)
        except OSError:
            pass  # gone meanwhile, or not ours to remove: the next run tries again
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported (e.g. Windows); the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UMASK_LOCK = threading.Lock()


def _current_umask() -> int:
    with _UMASK_LOCK:  # reading the umask means setting it: keep other threads out meanwhile
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def read_json_file(path: str | os.PathLike[str]) -> Any:
    """A JSON file's value, with the "inf"/"nan" strings `to_json` writes turned back into floats; unreadable or
    invalid JSON is an InputError naming the file."""
    path = Path(path)
    try:
        return restore_non_finite_values(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not a readable JSON file ({type(err).__name__})") from None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path in `path`'s folder to write to; on success it is fsynced and renamed over `path` with the
    mode any new file of the user gets (0644 under umask 022), on failure removed. Creates parent folders.

        with atomic_output("model.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file 0600; writers that replace the file (safetensors, torch.save) keep that mode
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_safe_floats(value: Any) -> Any:
    # JSON has no inf/nan: write them as strings ("inf") so every reader can parse the file.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _json_safe_floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe_floats(v) for v in value]
    return value


def to_json(obj: Any, *, indent: int | None = 2) -> str:
    """JSON text with Paths, tensors and numpy values converted, and inf/nan written as strings."""
    plain = json.loads(json.dumps(obj, default=_json_default))
    return json.dumps(_json_safe_floats(plain), indent=indent, ensure_ascii=False, allow_nan=False)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write `obj` as indented JSON."""
    return atomic_write_text(path, to_json(obj) + "\n")


def write_csv(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str] | None = None
) -> Path:
    """Atomically write rows as CSV; columns are `fieldnames` or every key in first-seen order."""
    if fieldnames is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        fieldnames = list(seen)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def append_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    """Append one JSON line to `path` (e.g. metadata.jsonl) so concurrent writers never interleave or tear
    lines.

    One `write` on an O_APPEND descriptor under an exclusive `flock` (where available), then fsync. A line
    left without its newline by an earlier crash is terminated first, so the new record stays parseable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = to_json(record, indent=None).encode("utf-8") + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close()
        size = os.fstat(fd).st_size
        if size > 0:
            with open(path, "rb") as reader:
                reader.seek(size - 1)
                if reader.read(1) != b"\n":
                    line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def restore_non_finite_values(value: Any) -> Any:
    """The strings "inf", "-inf" and "nan" (how `to_json` writes non-finite floats) as floats again."""
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {k: restore_non_finite_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [restore_non_finite_values(v) for v in value]
    return value


class StagedFiles:
    """The files of one item, written under temporary names and renamed into place together by `commit`.

    Until `commit`, the previous files of the item stay untouched, so a failure half-way (a full disk, an error
    after the first image) leaves the last complete result as it was. Leaving the `with` block without
    `commit` (an error, Ctrl-C) removes the temporary files.

        with StagedFiles() as staged:
            write_image(staged.path(final), image, fmt=final.suffix)
            staged.commit()
    """

    def __init__(self) -> None:
        self._pending: dict[Path, Path] = {}  # final path -> temporary path

    def path(self, final: str | os.PathLike[str]) -> Path:
        """The temporary path to write `final` to (its folder is created)."""
        final = Path(final)
        if final not in self._pending:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=final.parent, prefix=temp_prefix(final), suffix=TEMP_SUFFIX)
            os.close(fd)
            self._pending[final] = Path(name)
        return self._pending[final]

    @property
    def finals(self) -> list[Path]:
        return list(self._pending)

    def commit(self) -> list[Path]:
        """Rename every staged file over its final path (renames need no space); returns the final paths."""
        done = []
        for final, tmp in self._pending.items():
            os.replace(tmp, final)
            done.append(final)
        for folder in {final.parent for final in done}:
            _fsync_dir(folder)
        self._pending.clear()
        return done

    def discard(self) -> None:
        for tmp in self._pending.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._pending.clear()

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()
