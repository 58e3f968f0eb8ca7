"""The report of a training run (`python -m pid.train`): loss curves, validation curves, validation images.
A distillation run (mode=distill) shows each network's losses, the discriminator's accuracy, the three learning
rates and the student scored against the teacher's many-step decode and the ground truth.

    python -m pid.report runs/flux_teacher          # rebuild runs/flux_teacher/report.html

Read from the run folder only: `run.json` (the plan), `metrics.jsonl` (loss parts, lr, grad norm),
`val.jsonl` (the EMA weights' PSNR / SSIM / CIEDE2000 beside the init's, per validation and σ) and the images
validation saved under `val/`. One self-contained HTML file like the inference reports: CSS inline, plots as
inline SVG, images by relative path. The trainer rewrites it (rank 0, atomically) after each validation, after
metric logs (throttled) and at the end.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pid.report.page import PALETTE, _nice_ticks, esc, render_facts, url_for
from pid.report.previews import atomic_write_bytes
from pid.report.static import CSS

RUN_FILE = "run.json"
REPORT_NAME = "report.html"
METRIC_LABELS = {"psnr": "PSNR (dB, higher is better)", "ssim": "SSIM (higher is better)",
                 "delta_e2000": "CIEDE2000 (lower is better)"}
LOSS_KEYS = ("loss_total", "loss_diffusion", "loss_align")

EXTRA_CSS = """
.curves { display:flex; flex-wrap:wrap; gap:12px; }
.curves svg { background:#fff; border:1px solid var(--line); border-radius:6px; }
.curves text { font:11px system-ui, sans-serif; fill:var(--fg); }
table.steps { width:auto; }
table.steps td { vertical-align:top; text-align:center; }
table.steps img { display:block; height:var(--thumb, 160px); width:auto; background:#222; border:1px solid var(--line); }
table.steps figcaption { color:var(--muted); font-size:12px; }
.stripwrap { overflow-x:auto; }
"""


def is_training_run(run_dir: str | Path) -> bool:
    """True when `run_dir` was written by `python -m pid.train` (its run.json holds a training plan)."""
    path = Path(run_dir) / RUN_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and (saved.get("plan") or {}).get("entry") == "train"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every parseable JSON object of a JSONL file (a torn last line of a killed run is left out)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def latest_per(records: Sequence[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    """The last record of each key (a resumed run may log a step twice), in key order."""
    kept: dict[tuple, dict[str, Any]] = {}
    for record in records:
        kept[tuple(record.get(k) for k in keys)] = record
    return [kept[k] for k in sorted(kept, key=lambda k: tuple(float(v) for v in k))]


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# ------------------------------------------------------------------------------------------------------------
# Curves


def curve_plot(title: str, series: Sequence[tuple[str, list[tuple[float, float]], bool]], *, log_y: bool = False,
               width: int = 420, height: int = 250) -> str:
    """An inline SVG chart of y over training steps; series are (label, points, dashed). A few axis ticks (a
    run logs many points), markers only on short series."""
    points = [(x, y) for _, pts, _ in series for x, y in pts if y is not None and (not log_y or y > 0)]
    if not points:
        return ""
    transform = (lambda v: math.log10(v)) if log_y else (lambda v: v)  # noqa: E731
    left, right, top, bottom = 58, 12, 26, 58
    xs, ys = [p[0] for p in points], [transform(p[1]) for p in points]
    x0, x1 = min(xs), max(xs)
    x0, x1 = (x0 - 0.5, x1 + 0.5) if x1 - x0 < 1e-9 else (x0, x1)
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or abs(y0) * 0.05 or 0.01  # a flat series (constant lr): a band around it
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (1 - (transform(y) - y0) / (y1 - y0)) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
             f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" font-weight="600">{esc(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#c9ced6"/>']
    for tick in _nice_ticks(y0, y1):
        y = top + (1 - (tick - y0) / (y1 - y0)) * plot_h
        label = f"{10 ** tick:.3g}" if log_y else f"{tick:g}"
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eceef1"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for tick in _nice_ticks(x0, x1):
        parts.append(f'<text x="{sx(tick):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 28}" text-anchor="middle">step</text>')
    legend_x = left
    for index, (label, pts, dashed) in enumerate(series):
        color = PALETTE[index % len(PALETTE)]
        finite = [(x, y) for x, y in pts if y is not None and (not log_y or y > 0)]
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        if finite:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in finite)
            parts.append(f'<polyline class="series" data-label="{esc(label)}" points="{coords}" fill="none" '
                         f'stroke="{color}" stroke-width="1.6"{dash}/>')
            if len(finite) <= 40:
                parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"><title>{esc(label)}: '
                          f'step {x:g} = {y:.4g}</title></circle>' for x, y in finite]
        ly = top + plot_h + 46
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" '
                     f'stroke-width="2"{dash}/><text x="{legend_x + 22}" y="{ly}">{esc(label)}</text>')
        legend_x += 7 * len(label) + 34
    parts.append("</svg>")
    return "".join(parts)


def _series(records: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), v) for r in records if (v := _number(r.get(key))) is not None]


def loss_block(metrics: Sequence[dict[str, Any]]) -> str:
    if not metrics:
        return '<section class="block" id="losses"><h2>Training</h2><p class="note">No metrics logged yet.</p></section>'
    losses = curve_plot("loss (mean over log_every steps)",
                        [(key.removeprefix("loss_"), _series(metrics, key), False) for key in LOSS_KEYS],
                        log_y=all((v := _number(r.get(k))) is None or v > 0 for r in metrics for k in LOSS_KEYS))
    lr = curve_plot("learning rate", [("lr", _series(metrics, "lr"), False)])
    grad = curve_plot("gradient norm (before the clip)", [("grad norm", _series(metrics, "grad_norm"), False)])
    speed = curve_plot("images / s", [("images/s", _series(metrics, "images_per_s"), False)])
    return (f'<section class="block" id="losses"><h2>Training</h2><div class="curves">{losses}{lr}{grad}{speed}'
            "</div></section>")


# mode=distill: each network's curves (metrics.jsonl keys of pid.training.distill_loop)
DISTILL_LOSS_PLOTS = (
    ("student: VSD loss", "loss_vsd"),
    ("student: GAN generator loss", "loss_gan_gen"),
    ("fake score: DSM loss", "loss_dsm"),
    ("discriminator: GAN loss", "loss_gan_disc"),
    ("discriminator: R1 penalty", "loss_r1"),
)
DISTILL_LRS = (("student", "lr"), ("fake score", "lr_fake_score"), ("discriminator", "lr_discriminator"))
VS_TEACHER_LABELS = {"psnr": "PSNR (dB, higher is closer)", "ssim": "SSIM (higher is closer)",
                     "delta_e2000": "CIEDE2000 (lower is closer)"}


def _positive(points: Sequence[tuple[float, float]]) -> bool:
    return bool(points) and all(y > 0 for _, y in points)


def distill_loss_block(metrics: Sequence[dict[str, Any]]) -> str:
    """A distillation run's curves: each loss, the discriminator's accuracy, the three learning rates, the
    gradient norms, the GAN weight's warm-up and the speed."""
    if not metrics:
        return ('<section class="block" id="losses"><h2>Distillation</h2><p class="note">No metrics logged yet.'
                "</p></section>")
    plots = []
    for title, key in DISTILL_LOSS_PLOTS:
        points = _series(metrics, key)
        plots.append(curve_plot(f"{title} (mean over log_every iterations)", [(key, points, False)],
                                log_y=_positive(points)))
    plots.append(curve_plot("discriminator accuracy (real > 0, fake < 0)",
                            [("accuracy", _series(metrics, "discriminator_accuracy"), False)]))
    lrs = [(label, _series(metrics, key), False) for label, key in DISTILL_LRS]
    plots.append(curve_plot("learning rates", lrs, log_y=all(_positive(p) or not p for _, p, _ in lrs)))
    plots.append(curve_plot("gradient norm (before the clip)",
                            [("student", _series(metrics, "grad_norm_student"), False),
                             ("fake score", _series(metrics, "grad_norm_fake_score"), False)]))
    plots.append(curve_plot("GAN generator weight", [("gan_weight", _series(metrics, "gan_weight"), False)]))
    plots.append(curve_plot("images / s", [("images/s", _series(metrics, "images_per_s"), False)]))
    return (f'<section class="block" id="losses"><h2>Distillation</h2><p class="note">The student learns every '
            f'student_update_freq-th iteration, the fake score and the discriminator on the others; x: iteration.'
            f'</p><div class="curves">{"".join(plots)}</div></section>')


NO_VALIDATION_YET = ('<section class="block" id="validation"><h2>Validation</h2><p class="note">No validation yet '
                     "(set val_manifest= and val_every=).</p></section>")


def distill_validation_block(val: Sequence[dict[str, Any]]) -> str:
    """The student's EMA (distilled sampler) against the teacher's many-step decode and the ground truth."""
    if not val:
        return NO_VALIDATION_YET
    plots = []
    for sigma in sorted({float(r["sigma"]) for r in val}):
        rows = [r for r in val if float(r["sigma"]) == sigma]
        for metric, title in VS_TEACHER_LABELS.items():
            versus = [(float(r["step"]), _number(r.get("ema", {}).get(f"{metric}_vs_teacher"))) for r in rows]
            plots.append(curve_plot(f"student vs teacher: {title}, σ={sigma:g}", [("student vs teacher", versus,
                                                                                   False)]))
        for metric, title in METRIC_LABELS.items():
            ema = [(float(r["step"]), _number(r.get("ema", {}).get(metric))) for r in rows]
            teacher = [(float(r["step"]), _number(r.get("teacher", {}).get(metric))) for r in rows]
            plots.append(curve_plot(f"vs ground truth: {title}, σ={sigma:g}",
                                    [("student", ema, False), ("teacher", teacher, True)]))
    last = val[-1]
    keys = [f"{m}_vs_teacher" for m in VS_TEACHER_LABELS]
    table = "".join(
        f"<tr><td>{r['step']}</td><td>{float(r['sigma']):g}</td>"
        + "".join(f"<td>{_fmt(r.get('ema', {}).get(k))}</td>" for k in keys)
        + "".join(f"<td>{_fmt(r.get('ema', {}).get(m))}</td><td>{_fmt(r.get('teacher', {}).get(m))}</td>"
                  for m in METRIC_LABELS) + "</tr>" for r in val)
    head = "".join(f"<th>{k}</th>" for k in keys) + "".join(f"<th>{m} student</th><th>{m} teacher</th>"
                                                           for m in METRIC_LABELS)
    return (f'<section class="block" id="validation"><h2>Validation</h2><p class="note">The student\'s EMA '
            f'weights at {esc(str(last.get("student_steps")))} steps against the frozen teacher\'s '
            f'{esc(str(last.get("teacher_steps")))}-step decode, and both against the ground truth (teacher dashed); '
            f'mean over {len(last.get("per_image", []))} held-out images.</p>'
            f'<div class="curves">{"".join(plots)}</div>'
            f'<div class="tablewrap"><table id="val-table"><thead><tr><th>iteration</th><th>σ</th>{head}</tr>'
            f"</thead><tbody>{table}</tbody></table></div></section>")


def validation_block(val: Sequence[dict[str, Any]]) -> str:
    if not val:
        return NO_VALIDATION_YET
    plots = []
    for sigma in sorted({float(r["sigma"]) for r in val}):
        rows = [r for r in val if float(r["sigma"]) == sigma]
        for metric, title in METRIC_LABELS.items():
            ema = [(float(r["step"]), _number(r.get("ema", {}).get(metric))) for r in rows]
            init = [(float(r["step"]), _number(r.get("init", {}).get(metric))) for r in rows]
            plots.append(curve_plot(f"{title}, σ={sigma:g}", [("EMA", ema, False), ("init", init, True)]))
    last = val[-1]
    table = "".join(
        f"<tr><td>{r['step']}</td><td>{float(r['sigma']):g}</td>"
        + "".join(f"<td>{_fmt(r.get('ema', {}).get(m))}</td><td>{_fmt(r.get('init', {}).get(m))}</td>"
                  for m in METRIC_LABELS) + "</tr>" for r in val)
    head = "".join(f"<th>{m} EMA</th><th>{m} init</th>" for m in METRIC_LABELS)
    return (f'<section class="block" id="validation"><h2>Validation</h2><p class="note">The EMA weights (solid) '
            f'beside the init (dashed), mean over {len(last.get("per_image", []))} held-out images.</p>'
            f'<div class="curves">{"".join(plots)}</div>'
            f'<div class="tablewrap"><table id="val-table"><thead><tr><th>step</th><th>σ</th>{head}</tr></thead>'
            f"<tbody>{table}</tbody></table></div></section>")


def _fmt(value: Any) -> str:
    number = _number(value)
    return "—" if number is None else f"{number:.4g}"


# ------------------------------------------------------------------------------------------------------------
# Images over steps


def _figure(run_dir: Path, relative: str | None, caption: str, page_dir: Path) -> str:
    if not relative:
        return f"<td><figure><p class='missing'>—</p><figcaption>{esc(caption)}</figcaption></figure></td>"
    path = run_dir / relative
    if not path.is_file():
        return f"<td><figure><p class='missing'>missing</p><figcaption>{esc(caption)}</figcaption></figure></td>"
    url = url_for(path, page_dir)
    return (f'<td><figure><a href="{url}"><img src="{url}" loading="lazy" alt="{esc(caption)}"></a>'
            f"<figcaption>{esc(caption)}</figcaption></figure></td>")


def images_block(run_dir: Path, val: Sequence[dict[str, Any]], page_dir: Path) -> str:
    """Per σ and held-out image: the target, the init's decode, then the EMA's decode at every validation."""
    if not val:
        return ""
    sections = []
    for sigma in sorted({float(r["sigma"]) for r in val}):
        rows = [r for r in val if float(r["sigma"]) == sigma]
        ids = list(dict.fromkeys(i for r in rows for i in r.get("images", {})))
        for item in ids:
            first = next(r for r in rows if item in r.get("images", {}))
            # the reference beside the target: the init's decode (teacher runs) or the teacher's (distillation)
            reference, label = (("teacher_images", f"teacher, {first.get('teacher_steps')} steps")
                                if "teacher_images" in first else ("init_images", "init"))
            cells = [_figure(run_dir, first.get("targets", {}).get(item), "target", page_dir),
                     _figure(run_dir, first.get(reference, {}).get(item), label, page_dir)]
            cells += [_figure(run_dir, r.get("images", {}).get(item), f"EMA step {r['step']}", page_dir)
                      for r in rows]
            sections.append(f'<h3>{esc(item)} · σ={sigma:g}</h3><div class="stripwrap"><table class="steps">'
                            f'<tr>{"".join(cells)}</tr></table></div>')
    return (f'<section class="block" id="val-images"><h2>Validation images over steps</h2>{"".join(sections)}'
            "</section>")


# ------------------------------------------------------------------------------------------------------------
# The page


def training_page(run_dir: Path, page_dir: Path) -> str:
    saved = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    plan = saved.get("plan", {})
    metrics = latest_per(read_jsonl(run_dir / "metrics.jsonl"), "step")
    val = latest_per(read_jsonl(run_dir / "val.jsonl"), "step", "sigma")
    steps = int(plan.get("steps") or 0)
    done = max([int(r["step"]) for r in metrics] + [0])
    title = f"pid.train · {run_dir.name}"
    status = (f"finished: {done} of {steps} steps" if steps and done >= steps else
              f"step {done} of {steps} (in progress, or stopped: rerun the command to resume)")
    facts = [("mode", str(plan.get("mode"))), ("backbone", str(plan.get("backbone"))),
             ("init", str(saved.get("init_file"))), ("data", str((plan.get("data") or {}).get("source"))),
             ("global batch", str(plan.get("global_batch"))), ("lr", str(plan.get("lr"))),
             ("resolution", str(plan.get("resolution"))), ("updated", time.strftime("%Y-%m-%d %H:%M:%S"))]
    distill = plan.get("mode") == "distill"
    blocks = (distill_loss_block(metrics), distill_validation_block(val)) if distill else (
        loss_block(metrics), validation_block(val))
    body = "\n".join([*blocks, images_block(run_dir, val, page_dir)])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="pid.report">
<title>{esc(title)}</title>
<style>{CSS}{EXTRA_CSS}</style>
</head>
<body>
<header class="top">
<h1>{esc(title)}</h1>
<p class="status">{esc(status)}</p>
{render_facts(facts)}
</header>
<main>
{body}
</main>
<footer>Made by pid.report from {esc(run_dir.name)}/metrics.jsonl and val.jsonl; rebuild with
<code>python -m pid.report {esc(run_dir.name)}</code>.</footer>
</body>
</html>
"""


def write_training_report(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """(Re)build the report of a training run folder; atomic. Returns its path (`<run>/report.html`)."""
    run_dir = Path(run_dir).resolve()
    out = Path(out_path) if out_path is not None else run_dir / REPORT_NAME
    atomic_write_bytes(out, training_page(run_dir, out.parent.resolve()).encode("utf-8"))
    return out


_last_rebuild: dict[Path, tuple[float, float]] = {}  # run folder -> (end of the last rebuild, its duration)
THROTTLE_FACTOR = 20.0


def update_training_report(run_dir: str | Path, *, final: bool = False) -> Path | None:
    """What the trainer calls (rank 0): skipped while less than 20x the last rebuild's duration has passed,
    unless `final`. Never raises: a report problem is logged and training goes on."""
    key = Path(run_dir).resolve()
    start = time.monotonic()
    previous = _last_rebuild.get(key)
    if not final and previous is not None and start - previous[0] < THROTTLE_FACTOR * previous[1]:
        return None
    try:
        path = write_training_report(key)
    except Exception as exc:  # noqa: BLE001 - the report must never stop a training run
        from loguru import logger

        logger.warning("report of {} not updated: {}", run_dir, exc)
        return None
    end = time.monotonic()
    _last_rebuild[key] = (end, end - start)
    return path


__all__ = ["curve_plot", "is_training_run", "update_training_report", "write_training_report"]
