"""Run folders: item identity, per-item records, and the files rebuilt from them.

Every output item (a prompt of from_ldm, an image of from_clean) has an identity: everything that decides its
pixels (prompt or image content, seeds, LDM and decoder settings, the decoder file). Its record,
`records/<name>.json`, is written atomically after its images and names that identity, its rows and its files.
A re-run compares identities: an item whose identity changed, or whose files are missing, is redone (its old
record and files are removed first, so nothing stale survives a failure); the rest are kept. `metadata.jsonl`
(from_ldm) and `metrics.csv` (from_clean) are rebuilt atomically from the records, so they always hold exactly
one current entry per item, whatever sequence of kills, resumes and overwrites came before.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pid.errors import CheckpointNotFoundError, ConfigError, InputError, PiDError
from pid.inference.io import (
    atomic_write_text,
    build_run_tag,
    read_json_file,
    restore_non_finite_values,
    to_json,
    write_json,
)

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
    """A local file by path, size and modification time; a hub file (or its cached copy) by hub path and
    revision, so the first download does not make a finished run look changed."""
    local = checkpoint.get("local_file")
    if local and not _in_hub_cache(Path(local)):
        stat = Path(local).stat()
        return {"path": str(Path(local).absolute()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
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


def describe_failure(exc: BaseException) -> str:
    """One line for failures.jsonl and the summary: our own errors as they read, others with their type."""
    return str(exc) if isinstance(exc, PiDError) else f"{type(exc).__name__}: {first_line(exc)}"


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
        out = []
        for row in record.get("rows", []):
            for key in FILE_KEYS:
                if row.get(key):
                    out.append(self.run_dir / row[key])
        return out

    def needs_redo(self, name: str, key: str, identity: Mapping[str, Any]) -> str | None:
        """None when the item is done and current; else why it must be (re)done."""
        record = self.load(name)
        if record is None:
            return "new"
        if record.get("item_key") != key:
            changed = _changed(record.get("identity", {}), dict(identity))
            return "changed: " + ", ".join(changed[:3]) if changed else "changed"
        if not all(p.is_file() and p.stat().st_size > 0 for p in self.files(record)):
            return "files missing"
        return None

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
        """Every record's rows, by record name (sorted); `reload` rereads the folder (other ranks' records)."""
        records = self._records_by_name(reload)
        return [row for name in sorted(records) for row in records[name].get("rows", [])]

    def write_metadata(self, reload: bool = False) -> None:
        """from_ldm's metadata.jsonl: one line per image, rebuilt from the records (sorted by index, step)."""
        lines = [to_json(row, indent=None) for row in self.rows(reload)]
        atomic_write_text(self.run_dir / "metadata.jsonl", "".join(line + "\n" for line in lines))


def write_failures(run_dir: Path, failures: list[dict[str, Any]]) -> None:
    """failures.jsonl lists the latest run's failed items with their reasons (removed when none failed)."""
    path = Path(run_dir) / "failures.jsonl"
    if failures:
        atomic_write_text(path, "".join(to_json(f, indent=None) + "\n" for f in failures))
    else:
        path.unlink(missing_ok=True)


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> None:
    write_json(Path(run_dir) / "summary.json", summary)


def refresh_report(run_dir: Path, final: bool = False) -> None:
    """Rebuild report.html (throttled while a run goes on, always when `final`); never fails the run."""
    from pid.report import update_report

    update_report(run_dir, final=final)
