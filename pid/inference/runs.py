"""Run folders: item identity, per-item records, and the files rebuilt from them.

Every output item (a prompt of from_ldm, an image of from_clean) has an identity: everything that decides its
pixels (prompt or image content, seeds, LDM and decoder settings, the decoder file). Its record,
`records/<name>.json`, is written atomically after its images and names that identity, its rows, its files and
their sizes. A re-run compares identities: an item whose identity changed, or whose files are missing or of
another size (truncated), is redone; the rest are kept.

Nothing finished is lost to a failed redo: the new files of an item are staged under temporary names and renamed
into place together once all are written (`StagedFiles`), then its record is replaced, and only then are the
previous files it no longer names removed. An item whose redo fails keeps its previous record and files.

`metadata.jsonl` (from_ldm) and `metrics.csv` (from_clean) are rebuilt atomically from the records of the
current items only (`RecordStore.current`: an item removed from the inputs, or whose redo failed, is not shown),
so they always hold exactly one current entry per item, whatever sequence of kills, resumes, edits and
overwrites came before. Records of items no longer current stay in `records/`, so restoring an input line finds
its result again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from loguru import logger

from pid.errors import CheckpointNotFoundError, ConfigError, InputError, PiDError
from pid.inference.atomic import (
    StagedFiles,
    atomic_write_text,
    read_json_file,
    remove_stale_temps,
    restore_non_finite_values,
    to_json,
    write_json,
)
from pid.inference.io import build_run_tag

RECORDS = "records"
LAYOUT_VERSION = 2
# Row keys that name files of the item, relative to the run folder.
FILE_KEYS = ("pid", "vae", "compare", "input", "output", "grid")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def relative(path: Path, run_dir: Path) -> str:
    return Path(os.path.relpath(path, run_dir)).as_posix()


# ------------------------------------------------------------------------------------------------------------
# The decoder file and identities


def _in_hub_cache(path: Path) -> bool:
    from huggingface_hub import constants

    try:
        return Path(path).resolve().is_relative_to(Path(constants.HF_HUB_CACHE).resolve())
    except OSError:
        return False


def describe_decoder_file(record: Any, settings: Any) -> dict[str, Any]:
    """{"folder", "hub_file", "local_file"} of the decoder a command would load; downloads nothing.

    An explicit `pid_checkpoint` must exist (one-line error otherwise)."""
    from pid import checkpoints

    explicit = settings.get("pid_checkpoint")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise CheckpointNotFoundError(f"pid_checkpoint {path} does not exist; give an existing .pth or "
                                          f".safetensors file, or leave it unset for the released decoder")
        return {"folder": record.folder, "hub_file": None, "local_file": str(path.absolute()),
                "download_command": None}
    info = checkpoints.describe_checkpoint(record, checkpoint_dir=settings.get("checkpoint_dir"),
                                           revision=settings.get("pid_revision"))
    return {key: info.get(key) for key in ("folder", "hub_file", "local_file", "download_command")}


def require_decoder_file(checkpoint: Mapping[str, Any]) -> None:
    """Offline and absent: stop before anything loads, with the download command."""
    from huggingface_hub import constants

    from pid.hub import offline_reason

    if checkpoint.get("local_file") or not constants.HF_HUB_OFFLINE:
        return
    raise CheckpointNotFoundError(
        f"the decoder {checkpoint['hub_file']} is not on this machine and {offline_reason()}; download it "
        f"with: {checkpoint['download_command']}"
    )


def file_identity(checkpoint: Mapping[str, Any], revision: str | None = None) -> dict[str, Any]:
    """A local file by its real path (however it was spelled: `../x/f` and `/abs/x/f` are one file), size and
    modification time; a hub file (or its cached copy) by hub path and revision, so the first download does not
    make a finished run look changed."""
    local = checkpoint.get("local_file")
    if local and not _in_hub_cache(Path(local)):
        stat = Path(local).stat()
        return {"path": str(Path(local).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"hub_file": checkpoint.get("hub_file"), "revision": revision or "main"}


def decoder_identity(settings: Any, record: Any, checkpoint: Mapping[str, Any], scale: int,
                     output_size: tuple[int, int] | None, pid_steps: int, pid_seed: int | None) -> dict[str, Any]:
    """The decoder settings that decide PiD's pixels (knobs the sampler ignores are left out)."""
    undistilled = record.sampler != "distilled"
    return {
        "ckpt_type": record.ckpt_type, "net_config": record.net_config,
        "file": file_identity(checkpoint, settings.get("pid_revision")), "scale": scale,
        "output_size": list(output_size) if output_size else None, "pid_steps": pid_steps, "pid_seed": pid_seed,
        "cfg_scale": settings.get("pid_cfg_scale") if undistilled else None,
        "shift": settings.get("pid_shift") if undistilled else None,
        "pid_batch": settings.get("pid_batch"), "pid_tile": settings.get("pid_tile"),
        "pid_tile_overlap": settings.get("pid_tile_overlap") if settings.get("pid_tile") else None,
        "text_encoder": settings.get("text_encoder"), "text_encoder_revision": settings.get("text_encoder_revision"),
    }


def run_tag(backbone: str, checkpoint: Mapping[str, Any], *, pid_steps: int, cfg_scale: float | None,
            shift: float | None, note: str) -> str:
    """Readable run folder name, naming the decoder file actually used."""
    path = checkpoint.get("local_file") if checkpoint.get("hub_file") is None else checkpoint["hub_file"]
    return build_run_tag(backbone, path, pid_steps=pid_steps, cfg_scale=cfg_scale, shift=shift, note=note)


def item_key(identity: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(hex digest, JSON-normalised identity)."""
    plain = json.loads(to_json(identity, indent=None))
    text = json.dumps(plain, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32], plain


def _changed(old: Any, new: Any, prefix: str = "", depth: int = 0) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict) and depth < 2:
        keys = sorted(set(old) | set(new))
        out: list[str] = []
        for key in keys:
            out += _changed(old.get(key), new.get(key), f"{prefix}{key}.", depth + 1)
        return out
    return [] if old == new else [prefix.rstrip(".")]


def count_reasons(reasons: Iterable[str]) -> dict[str, int]:
    return dict(Counter(reasons))


def merge_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Per-rank {reason: count} summed."""
    return dict(sum((Counter(c) for c in counts), Counter()))


_WRITE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "permission denied"}


def describe_failure(exc: BaseException) -> str:
    """One line for failures.jsonl and the summary: our own errors as they read, a full disk or a read-only
    folder in words with the file, others with their type."""
    if isinstance(exc, PiDError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRORS:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"{_WRITE_ERRORS[exc.errno]}{where}"
    return f"{type(exc).__name__}: {first_line(exc)}"


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise InputError(f"image {path} cannot be read ({exc.strerror or exc})") from None
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Records


class RecordStore:
    """`records/<name>.json` of one run folder, and the summary files rebuilt from them."""

    def __init__(self, run_dir: Path, entry: str) -> None:
        self.run_dir, self.entry = Path(run_dir), entry
        self.folder = self.run_dir / RECORDS
        # name -> record, read from disk once and kept in step by save/forget, so rebuilding metadata.jsonl or
        # metrics.csv after every item does not reread every record; `reload` picks up other ranks' records.
        self._records: dict[str, dict[str, Any]] | None = None
        # name -> item key of every item of the current inputs (None where another rank knows it); only their
        # records are shown. None: every record.
        self.current: dict[str, str | None] | None = None

    def check_layout(self, overwrite: bool) -> None:
        """Refuse to mix with results of the earlier layout (outputs without records/), then mark the folder as
        this layout's (records/ exists from the start, so a run killed before its first item is not mistaken)."""
        if self.run_dir.is_dir() and not self.folder.is_dir() and not overwrite:
            legacy = [p for p in ("metadata.jsonl", "metrics.csv") if (self.run_dir / p).exists()]
            legacy += [p.name for p in self.run_dir.glob("metrics.rank*.jsonl")]
            if legacy:
                raise ConfigError(f"{self.run_dir} holds results of an earlier pid version ({legacy[0]} without "
                                  f"records/); choose another output_dir, or pass overwrite=true to redo them")
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in remove_stale_temps(self.run_dir):  # left by a killed write
            logger.info("removed {}, left by an interrupted write", relative(path, self.run_dir))

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def _records_by_name(self, reload: bool = False) -> dict[str, dict[str, Any]]:
        if self._records is None or reload:
            self._records = {}
            for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
                try:
                    self._records[path.stem] = read_json_file(path)
                except InputError:
                    pass  # a damaged record is the same as none: the item is redone
        return self._records

    def load(self, name: str) -> dict[str, Any] | None:
        return self._records_by_name().get(name)

    def files(self, record: Mapping[str, Any]) -> list[Path]:
        out: dict[Path, None] = {}
        for row in record.get("rows", []):
            for key in FILE_KEYS:
                if row.get(key):
                    out[self.run_dir / row[key]] = None
        return list(out)

    def needs_redo(self, name: str, key: str, identity: Mapping[str, Any]) -> str | None:
        """None when the item is done and current; else why it must be (re)done."""
        record = self.load(name)
        if record is None:
            return "new"
        if record.get("item_key") != key:
            changed = _changed(record.get("identity", {}), dict(identity))
            return "changed: " + ", ".join(changed[:3]) if changed else "changed"
        sizes = record.get("sizes", {})
        for path in self.files(record):
            if not path.is_file():
                return "files missing"
            size = path.stat().st_size
            if size == 0 or size != sizes.get(relative(path, self.run_dir), size):
                return "files damaged"  # truncated or rewritten since the record was made
        return None

    def replace(self, name: str, record: Mapping[str, Any], staged: StagedFiles) -> None:
        """Finish an item: its staged files go into place, its record (with their sizes) replaces the previous
        one, and only then are the previous files it no longer names removed."""
        previous = self.load(name)
        staged.commit()
        sizes = {relative(p, self.run_dir): p.stat().st_size for p in self.files(record)}
        self.save(name, {**record, "sizes": sizes})
        if previous is not None:
            keep = set(self.files(record))
            for path in self.files(previous):
                if path not in keep:
                    path.unlink(missing_ok=True)

    def forget(self, name: str) -> None:
        """Remove an item's record, then its files (an item being redone leaves nothing stale behind)."""
        record = self._records_by_name().pop(name, None)
        self.path(name).unlink(missing_ok=True)
        if record is not None:
            for path in self.files(record):
                path.unlink(missing_ok=True)

    def save(self, name: str, record: Mapping[str, Any]) -> None:
        full = {"layout": LAYOUT_VERSION, "entry": self.entry, **record}
        write_json(self.path(name), full)
        self._records_by_name()[name] = restore_non_finite_values(json.loads(to_json(full)))  # as read back

    def rows(self, reload: bool = False) -> list[dict[str, Any]]:
        """The rows of the current items' records, by record name (sorted); `reload` rereads the folder (other
        ranks' records)."""
        records = self._records_by_name(reload)
        current = self.current
        shown = sorted(name for name, record in records.items()
                       if current is None or (name in current and current[name] in (None, record.get("item_key"))))
        return [row for name in shown for row in records[name].get("rows", [])]

    def write_metadata(self, reload: bool = False) -> None:
        """from_ldm's metadata.jsonl: one line per image, rebuilt from the records (sorted by index, step)."""
        lines = [to_json(row, indent=None) for row in self.rows(reload)]
        write_if_changed(self.run_dir / "metadata.jsonl", "".join(line + "\n" for line in lines))


def current_items(names: Iterable[str], known: Iterable[Mapping[str, str]]) -> dict[str, str | None]:
    """Every current item name, with the item keys the ranks computed (gathered); None where none came back."""
    current: dict[str, str | None] = dict.fromkeys(names)
    for keys in known:
        current.update(keys)
    return current


def write_if_changed(path: Path, text: str) -> None:
    """Atomic write, skipped when the file already holds `text` (a finished run rerun changes nothing)."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)


def write_failures(run_dir: Path, failures: list[dict[str, Any]]) -> None:
    """failures.jsonl lists the latest run's failed items with their reasons (empty when none failed)."""
    write_if_changed(Path(run_dir) / "failures.jsonl", "".join(to_json(f, indent=None) + "\n" for f in failures))


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> None:
    write_json(Path(run_dir) / "summary.json", summary)


def try_write(what: str, write: Callable[[], Any]) -> str | None:
    """Run one of the end-of-run writes; a full disk or a read-only folder becomes one printed line (returned)
    instead of a traceback, so the rest of the summary still appears and the exit code can say so."""
    try:
        write()
    except OSError as exc:
        line = f"could not write {what}: {describe_failure(exc)}"
        print(f"error: {line}", file=sys.stderr)
        return line
    return None


def refresh_report(run_dir: Path, final: bool = False) -> None:
    """Rebuild report.html (throttled while a run goes on, always when `final`); never fails the run."""
    from pid.report import update_report

    update_report(run_dir, final=final)
