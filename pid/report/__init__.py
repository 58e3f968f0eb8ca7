"""HTML reports of PiD runs: look at the results instead of reading file names.

    from pid.report import write_report, compare_runs
    write_report("outputs/flux_..._seed0")                      # -> outputs/flux_..._seed0/report.html
    compare_runs(["outputs/run_2k", "outputs/run_2kto4k"], "compare.html")

    python -m pid.report RUN_DIR                  # rebuild RUN_DIR/report.html
    python -m pid.report RUN_A RUN_B -o cmp.html  # line up runs of the same prompts / images

A report is one self-contained HTML file (CSS and JS inline, images by relative path) that opens from file://
with no network. It shows JPEG previews (made once into `<run>/previews/`) and loads full-size files only when
the magnifier needs them. `write_report` is cheap enough to call after every finished item and writes
atomically, so the page is valid while a run is in progress and after a crash.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from pid.errors import InputError
from pid.report.build import clean_page, compare_page, ldm_page
from pid.report.page import render
from pid.report.previews import DEFAULT_MAX_SIDE, PreviewCache, atomic_write_bytes
from pid.report.runs import Run, load_run

REPORT_NAME = "report.html"


STALE_TEMP_S = 600.0


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic replace; skipped when the page is byte-identical (idempotent, and no needless rewrites)."""
    data = text.encode("utf-8")
    try:
        unchanged = path.read_bytes() == data
    except OSError:
        unchanged = False
    if not unchanged:
        atomic_write_bytes(path, data)
    # A process killed mid-write leaves its temp file; one older than any write in progress can go.
    now = time.time()
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if now - stale.stat().st_mtime > STALE_TEMP_S:
                stale.unlink()
        except OSError:
            pass


def write_report(run_dir: str | Path, out_path: str | Path | None = None, *,
                 preview_max_side: int = DEFAULT_MAX_SIDE) -> Path:
    """(Re)build the report of one run folder; returns its path (`<run_dir>/report.html` by default).

    Idempotent and atomic; previews are made once and reused while their source file is unchanged. Raises
    InputError (one line) when `run_dir` is not a from_ldm / from_clean run folder.
    """
    from pid.report.training import is_training_run, write_training_report

    if is_training_run(run_dir):  # a python -m pid.train run folder: curves and validation images
        return write_training_report(run_dir, out_path)
    run = load_run(run_dir)
    out = Path(out_path) if out_path is not None else run.path / REPORT_NAME
    cache = PreviewCache(run.path, preview_max_side)
    page = ldm_page(run, cache) if run.kind == "from_ldm" else clean_page(run, cache)
    _write_if_changed(out, render(page, out.parent))
    cache.save()
    return out


def compare_runs(run_dirs: Sequence[str | Path], out_path: str | Path, *,
                 preview_max_side: int = DEFAULT_MAX_SIDE) -> Path:
    """One page lining up several runs of the same prompts (from_ldm) or images (from_clean), matched by
    identity (prompt + LDM seed, or the image's SHA-256), never by index; metric deltas for from_clean runs."""
    if not run_dirs:
        raise InputError("no run folders given: pass one run folder, or several to compare")
    if len(run_dirs) == 1:
        return write_report(run_dirs[0], out_path, preview_max_side=preview_max_side)
    runs: list[Run] = [load_run(d) for d in run_dirs]
    seen: dict[Path, Path] = {}
    for given, run in zip(run_dirs, runs):
        if run.path in seen:
            raise InputError(f"{given} is given twice (same folder as {seen[run.path]}): pass different runs")
        seen[run.path] = Path(given)
    out = Path(out_path)
    caches = [PreviewCache(r.path, preview_max_side) for r in runs]
    page = compare_page(runs, caches, out.parent)
    _write_if_changed(out, render(page, out.parent))
    for cache in caches:
        cache.save()
    return out


# run folder -> (when its last rebuild ended, how long it took), for update_report's throttle
_last_rebuild: dict[Path, tuple[float, float]] = {}
THROTTLE_FACTOR = 10.0


def update_report(run_dir: str | Path, *, final: bool = False) -> Path | None:
    """What the CLIs call after every finished item (and with `final=True` at the end of a run).

    Never raises: a report problem is logged and the run goes on. Keeps the report's share of a run's time
    small: unless `final`, a rebuild is skipped while less than 10x the previous rebuild's duration has passed
    (a 100-item report takes ~0.1 s, so in practice every item of a GPU run is shown).
    """
    key = Path(run_dir).resolve()
    start = time.monotonic()
    previous = _last_rebuild.get(key)
    if not final and previous is not None and start - previous[0] < THROTTLE_FACTOR * previous[1]:
        return None
    try:
        path = write_report(run_dir)
    except Exception as exc:  # the report must never stop a long GPU run
        from loguru import logger

        logger.warning("report of {} not updated: {}", run_dir, exc)
        return None
    end = time.monotonic()
    _last_rebuild[key] = (end, end - start)
    return path


__all__ = ["REPORT_NAME", "Run", "compare_runs", "load_run", "update_report", "write_report"]
