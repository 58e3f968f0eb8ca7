"""Read a run folder written by `pid.inference.from_ldm` or `pid.inference.from_clean` into plain records.

Only the standard library and the run's own files: no torch, so `python -m pid.report` starts fast. Readers are
tolerant of a run that is still going or was killed: a torn last JSONL line is skipped (and reported), a missing
summary.json means "in progress", and from_clean rows still only in `metrics.rank<N>.jsonl` are included.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pid.errors import InputError

RunKind = Literal["from_ldm", "from_clean"]
METRICS = ("psnr", "ssim", "delta_e2000")
DECODERS = ("vae", "pid")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class LdmItem:
    """One (prompt, captured step) of a from_ldm run: a line of metadata.jsonl."""

    index: int
    prompt: str
    step: str
    step_order: float  # LDM step the capture was taken after; x0 (the final latent) sorts last
    sigma: float | None
    ldm_seed: Any
    pid: Path | None
    vae: Path | None
    compare: Path | None
    record: dict[str, Any]

    @property
    def identity(self) -> str:
        """Same prompt and LDM seed = same item in another run (indices may differ between runs)."""
        return json.dumps([self.prompt, self.ldm_seed])


@dataclass
class CleanItem:
    """One (image, sigma) of a from_clean run: the vae and pid rows of metrics.csv for it."""

    index: int
    sample_id: str
    image: str
    identity: str  # image_sha256, else the source path as given
    prompt: str
    sigma: float
    input: Path | None
    vae: Path | None
    pid: Path | None
    grid: Path | None
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # decoder -> metrics row

    @property
    def sigma_key(self) -> str:
        return f"{self.sigma:.3f}"


@dataclass
class Run:
    path: Path
    kind: RunKind
    summary: dict[str, Any] | None
    ldm_items: list[LdmItem] = field(default_factory=list)
    clean_items: list[CleanItem] = field(default_factory=list)
    clean_rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def finished(self) -> bool:
        """summary.json is written when a run ends; before that the report shows the run as in progress."""
        return self.summary is not None

    @property
    def item_count(self) -> int:
        return len(self.ldm_items) if self.kind == "from_ldm" else len(self.clean_items)


def resolve_path(run_dir: Path, value: Any) -> Path | None:
    """A path from metadata: relative to the run folder (the contract), else as given (older runs wrote paths
    relative to the CWD of the run, or absolute ones)."""
    if value in (None, ""):
        return None
    given = Path(str(value))
    inside = run_dir / given
    if not given.is_absolute() and inside.exists():
        return inside
    if given.exists():
        return given.resolve()
    return inside if not given.is_absolute() else given


def _read_json_lines(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for number, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            # A run killed mid-write can leave a torn last line; the rest of the file is still good.
            warnings.append(f"{path.name} line {number} is not valid JSON (an interrupted write?); skipped")
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_summary(run_dir: Path, warnings: list[str]) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        warnings.append("summary.json is not valid JSON; ignored")
        return None
    return summary if isinstance(summary, dict) else None


def to_float(value: Any) -> float | None:
    """CSV/JSON metric value as a float ("inf" stays infinite); None when absent or not a number."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def step_order(label: str, ldm_step: Any) -> float:
    if isinstance(ldm_step, int | float) and not isinstance(ldm_step, bool):
        return float(ldm_step)
    match = re.fullmatch(r"(\d+)xt", str(label))
    return float(match.group(1)) if match else math.inf


def detect_kind(run_dir: Path) -> RunKind:
    """Which CLI wrote `run_dir`; InputError (one line, with the fix) when it is not a run folder."""
    if not run_dir.exists():
        raise InputError(f"{run_dir} does not exist: give a run folder (<output_dir>/<run tag>) of from_ldm or from_clean")
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} is a file, not a run folder: give the folder that holds metadata.jsonl or metrics.csv")
    summary = _read_summary(run_dir, [])
    entry = (summary or {}).get("entry")
    if entry in ("from_ldm", "from_clean"):
        return entry
    if (run_dir / "metadata.jsonl").is_file():
        return "from_ldm"
    if (run_dir / "metrics.csv").is_file() or any(run_dir.glob("metrics.rank*.jsonl")):
        return "from_clean"
    runs_inside = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and _looks_like_run(p))
    if runs_inside:
        shown = ", ".join(runs_inside[:3]) + (", ..." if len(runs_inside) > 3 else "")
        raise InputError(f"{run_dir} holds runs, it is not one: give a run folder inside it ({shown})")
    raise InputError(
        f"{run_dir} is not a PiD run folder (no metadata.jsonl, metrics.csv or summary.json): "
        "give <output_dir>/<run tag> as written by pid.inference.from_ldm or from_clean"
    )


def _looks_like_run(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("metadata.jsonl", "metrics.csv", "summary.json"))


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    kind = detect_kind(run_dir)
    warnings: list[str] = []
    run = Run(path=run_dir.resolve(), kind=kind, summary=_read_summary(run_dir, warnings), warnings=warnings)
    if kind == "from_ldm":
        _load_ldm(run)
    else:
        _load_clean(run)
    return run


def _load_ldm(run: Run) -> None:
    by_key: dict[tuple[int, str], LdmItem] = {}
    for record in _read_json_lines(run.path / "metadata.jsonl", run.warnings):
        try:
            index, step = int(record["index"]), str(record["step"])
        except (KeyError, TypeError, ValueError):
            run.warnings.append("metadata.jsonl has a line without index/step; skipped")
            continue
        # A rerun with overwrite=true may append the same (index, step) again: the last line wins.
        by_key[(index, step)] = LdmItem(
            index=index,
            prompt=str(record.get("prompt", "")),
            step=step,
            step_order=step_order(step, record.get("ldm_step")),
            sigma=to_float(record.get("sigma")),
            ldm_seed=record.get("ldm_seed"),
            pid=resolve_path(run.path, record.get("pid")),
            vae=resolve_path(run.path, record.get("vae")),
            compare=resolve_path(run.path, record.get("compare")),
            record=record,
        )
    run.ldm_items = sorted(by_key.values(), key=lambda item: (item.index, item.step_order, item.step))
    run.failures = _dedupe(_read_json_lines(run.path / "failures.jsonl", run.warnings))


def _row_key(row: dict[str, Any]) -> tuple[str, str, str]:
    sigma = to_float(row.get("sigma"))
    return (str(row.get("sample_id", "")), f"{sigma or 0.0:.3f}", str(row.get("decoder", "")))


def _load_clean(run: Run) -> None:
    csv_path = run.path / "metrics.csv"
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    if csv_path.is_file():
        with csv_path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                rows[_row_key(row)] = dict(row)
    # Rows of a run in progress (or killed) are only in the per-rank files until the run's end writes
    # metrics.csv; rank files newer than metrics.csv (a resumed run) win over it.
    csv_mtime = csv_path.stat().st_mtime_ns if csv_path.is_file() else -1
    for rank_file in sorted(run.path.glob("metrics.rank*.jsonl")):
        newer = rank_file.stat().st_mtime_ns > csv_mtime
        for row in _read_json_lines(rank_file, run.warnings):
            key = _row_key(row)
            if newer or key not in rows:
                rows[key] = row
    ordered = sorted(rows.values(), key=lambda r: (int(to_float(r.get("index")) or 0), to_float(r.get("sigma")) or 0.0,
                                                   DECODERS.index(r["decoder"]) if r.get("decoder") in DECODERS else 9))
    run.clean_rows = ordered
    items: dict[tuple[str, str], CleanItem] = {}
    for row in ordered:
        sample_id = str(row.get("sample_id", ""))
        sigma = to_float(row.get("sigma")) or 0.0
        key = (sample_id, f"{sigma:.3f}")
        item = items.get(key)
        if item is None:
            item = items[key] = CleanItem(
                index=int(to_float(row.get("index")) or 0),
                sample_id=sample_id,
                image=str(row.get("image", "")),
                identity=str(row.get("image_sha256") or "") or f"path:{row.get('image', sample_id)}",
                prompt=str(row.get("prompt") or ""),
                sigma=sigma,
                input=resolve_path(run.path, row.get("input")) or _find_output(run.path, "input", sample_id),
                vae=None,
                pid=None,
                grid=resolve_path(run.path, row.get("grid")) or _find_output(run.path, f"grid/sigma_{sigma:.3f}", sample_id),
            )
        decoder = str(row.get("decoder", ""))
        if decoder not in DECODERS:
            continue
        item.rows[decoder] = row
        output = resolve_path(run.path, row.get("output")) or _find_output(run.path, f"{decoder}/sigma_{sigma:.3f}", sample_id)
        setattr(item, decoder, output)
    run.clean_items = list(items.values())
    failures = _read_json_lines(run.path / "failures.jsonl", run.warnings)
    failures += [f for f in (run.summary or {}).get("failures", []) if isinstance(f, dict)]
    run.failures = _dedupe(failures)


def _find_output(run_dir: Path, folder: str, sample_id: str) -> Path | None:
    """Runs written before metrics.csv named its files: find `<folder>/<sample_id>.<png|jpg>`."""
    for suffix in IMAGE_SUFFIXES:
        candidate = run_dir / folder / f"{sample_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for record in records:
        seen.setdefault(json.dumps(record, sort_keys=True, default=str), record)
    return list(seen.values())
