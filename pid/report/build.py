"""Build the page model of one run (from_ldm or from_clean) or of several runs lined up by item identity."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pid.errors import InputError
from pid.report.page import (
    PALETTE,
    Card,
    Column,
    Group,
    Page,
    Panel,
    Series,
    cell,
    esc,
    fmt_number,
    line_plot,
    plural,
    render_facts,
    sortable_table,
    text_cell,
)
from pid.report.previews import PreviewCache
from pid.report.runs import METRICS, CleanItem, LdmItem, Run, to_float

METRIC_TITLES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "delta_e2000": "\u0394E2000"}
METRIC_DIGITS = {"psnr": 2, "ssim": 4, "delta_e2000": 3}
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "delta_e2000": False}
DECODER_LABELS = {"vae": "VAE", "pid": "PiD"}
FOOTER = ("Made by pid.report from the run folder; rebuild with <code>python -m pid.report RUN_DIR</code>. "
          "Drag on an image or use the slider to compare; hover to magnify at 1:1 (full-size files load then).")


def _size(value: Any) -> str:
    """[H, W] (metadata) or "WxH" (metrics.csv) as W\u00d7H."""
    if isinstance(value, list | tuple) and len(value) == 2:
        return f"{value[1]}\u00d7{value[0]}"
    return str(value).replace("x", "\u00d7") if value else ""


def _seconds(value: Any) -> str:
    number = to_float(value)
    return "" if number is None else f"{number:.2f} s"


def _sigma(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _status(runs: Sequence[Run]) -> tuple[str, bool]:
    unfinished = [r.name for r in runs if not r.finished]
    if not unfinished:
        return "finished", False
    if len(runs) == 1:
        return (f"in progress or interrupted: {plural(runs[0].item_count, 'item')} so far (no summary.json yet). "
                "The page is rebuilt as items finish: reload to update."), True
    return f"not finished (no summary.json): {', '.join(unfinished)}", True


def _failures_block(runs: Sequence[Run], labels: Sequence[str] | None = None) -> str:
    rows = []
    for position, run in enumerate(runs):
        for failure in run.failures:
            what = failure.get("image") or f"#{failure.get('index', '?')} {failure.get('prompt', '')}".strip()
            reason = failure.get("reason") or failure.get("error") or ""
            prefix = f"{labels[position]}: " if labels else ""
            rows.append(f'<tr><td class="text">{esc(prefix + str(what))}</td><td class="text">{esc(reason)}</td></tr>')
    if not rows:
        return ""
    body = "\n".join(rows)
    return (f'<section class="block" id="failures"><h2>Failures ({len(rows)})</h2><div class="tablewrap"><table>'
            f'<thead><tr><th class="text">item</th><th class="text">reason</th></tr></thead><tbody>{body}</tbody>'
            "</table></div></section>")


def _warnings_block(runs: Sequence[Run], extra: Sequence[str] = ()) -> str:
    notes = [f"{run.name}: {w}" for run in runs for w in run.warnings] + list(extra)
    if not notes:
        return ""
    items = "".join(f"<li>{esc(n)}</li>" for n in notes[:50])
    more = f"<li>... and {len(notes) - 50} more</li>" if len(notes) > 50 else ""
    return f'<section class="block" id="warnings"><h2>Warnings</h2><ul class="warnings">{items}{more}</ul></section>'


def _panel(label: str, cache: PreviewCache, source: Path | None) -> Panel:
    return Panel(label, cache.get(source), source)


def _first(records: Sequence[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in records if r.get(key) not in (None, "")), None)


# ------------------------------------------------------------------------------------------------------------
# from_ldm


def _ldm_facts(item: LdmItem) -> list[tuple[str, str]]:
    record = item.record
    ldm_step = record.get("ldm_step")
    seconds = record.get("seconds") or {}
    denoiser = record.get("denoiser_steps") or {}
    facts = [
        ("step", item.step + (f" (after LDM step {ldm_step})" if ldm_step is not None else "")),
        ("sigma", _sigma(item.sigma)),
        ("seeds", f"LDM {item.ldm_seed}, PiD {record.get('pid_seed', '')}"),
        ("checkpoint", str(record.get("checkpoint", ""))),
        ("sizes", f"LDM {_size(record.get('ldm_size'))} \u2192 PiD {_size(record.get('output_size'))}"),
        ("steps", f"LDM {record.get('ldm_steps', '')}, PiD {record.get('pid_steps', '')}"),
        ("timings", ", ".join(f"{k} {_seconds(v)}" for k, v in seconds.items()) if isinstance(seconds, dict) else ""),
    ]
    if denoiser:
        facts.append(("denoiser steps", ", ".join(f"{k} {v}" for k, v in denoiser.items())))
    return [(k, v) for k, v in facts if v]


def _ldm_step_tags(items: Sequence[LdmItem]) -> list[str]:
    order: dict[str, float] = {}
    for item in items:
        order.setdefault(item.step, item.step_order)
    return sorted(order, key=lambda s: (order[s], s))


def ldm_page(run: Run, cache: PreviewCache) -> Page:
    records = [i.record for i in run.ldm_items]
    groups: dict[int, Group] = {}
    for item in run.ldm_items:
        group = groups.get(item.index)
        if group is None:
            group = groups[item.index] = Group(
                anchor=f"prompt-{item.index}", heading=item.prompt,
                facts=f"#{item.index} \u00b7 LDM seed {item.ldm_seed} \u00b7 PiD seed {item.record.get('pid_seed', '')}",
                cards=[],
            )
        group.cards.append(Card(
            anchor=f"item-{item.index}-{item.step}",
            key=f"{item.index}|{item.step}",
            title=f"step {item.step} \u00b7 sigma {_sigma(item.sigma)}",
            tag=item.step,
            text=f"{item.prompt} {item.step} #{item.index}",
            panels=[_panel("VAE", cache, item.vae), _panel("PiD", cache, item.pid)],
            a=0, b=1,
            facts=_ldm_facts(item),
            links=[("PiD full size", item.pid), ("VAE full size", item.vae), ("comparison image", item.compare)],
        ))
    summary = run.summary or {}
    facts = [
        ("run folder", str(run.path)),
        ("backbone", str(summary.get("backbone") or _first(records, "backbone") or "")),
        ("checkpoint type", str(summary.get("ckpt_type") or _first(records, "pid_ckpt_type") or "")),
        ("checkpoint", str(_first(records, "checkpoint") or "")),
        ("LDM model", str(_first(records, "ldm_model") or "")),
        ("items", f"{plural(len(run.ldm_items), 'capture')} of {plural(len(groups), 'prompt')}, "
                  f"{len(run.failures)} failed"),
    ]
    status, in_progress = _status([run])
    return Page(
        title=f"PiD from_ldm \u00b7 {run.name}", status=status, in_progress=in_progress,
        facts=[(k, v) for k, v in facts if v], tag_name="step", tags=_ldm_step_tags(run.ldm_items),
        blocks=[b for b in (_failures_block([run]), _warnings_block([run], cache.failed)) if b],
        groups=list(groups.values()), footer=FOOTER,
    )


# ------------------------------------------------------------------------------------------------------------
# from_clean


def _metric(row: dict[str, Any] | None, name: str) -> float | None:
    return None if row is None else to_float(row.get(name))


def _means(items: Sequence[CleanItem], cap: float) -> dict[str, dict[str, dict[str, float]]]:
    """sigma -> decoder -> metric -> mean (PSNR capped, as summary.json does, so a perfect image cannot make it inf)."""
    sums: dict[str, dict[str, dict[str, list[float]]]] = {}
    for item in items:
        for decoder, row in item.rows.items():
            for metric in METRICS:
                value = _metric(row, metric)
                if value is not None:
                    if metric == "psnr":
                        value = min(value, cap)
                    sums.setdefault(item.sigma_key, {}).setdefault(decoder, {}).setdefault(metric, []).append(value)
    return {s: {d: {m: sum(v) / len(v) for m, v in per.items()} for d, per in dec.items()} for s, dec in sums.items()}


def _plots_block(series_of: Callable[[str], list[Series]], caption: str) -> str:
    plots = "".join(line_plot(METRIC_TITLES[m], "degrade sigma", series_of(m)) for m in METRICS)
    if not plots:
        return ""
    return f'<section class="block" id="plots"><h2>{esc(caption)}</h2><div class="plots">{plots}</div></section>'


def _clean_card(item: CleanItem, panels: list[Panel], a: int, b: int, extra_html: str,
                facts: list[tuple[str, str]], anchor: str, key: str) -> Card:
    return Card(
        anchor=anchor, key=key, title=f"sigma {item.sigma_key}", tag=item.sigma_key,
        text=f"{item.sample_id} {item.image} {item.prompt} sigma {item.sigma_key}",
        panels=panels, a=a, b=b, facts=facts, extra_html=extra_html,
        links=[("input", item.input), ("VAE full size", item.vae), ("PiD full size", item.pid), ("grid", item.grid)],
    )


def _clean_item_facts(item: CleanItem) -> list[tuple[str, str]]:
    row = item.rows.get("pid") or item.rows.get("vae") or {}
    vae, pid = item.rows.get("vae") or {}, item.rows.get("pid") or {}
    return [(k, v) for k, v in [
        ("source", item.image),
        ("sizes", f"input {_size(row.get('input_size'))}, VAE {_size(vae.get('output_size'))}, "
                  f"PiD {_size(pid.get('output_size'))}"),
        ("timings", f"VAE {_seconds(vae.get('seconds'))}, PiD {_seconds(pid.get('seconds'))}"),
    ] if v]


def _mini_metrics(rows: Sequence[tuple[str, dict[str, Any] | None, dict[str, Any] | None]]) -> str:
    """Small table, one line per (label, metrics row, baseline row): with a baseline, values show the difference."""
    head = "".join(f"<th>{esc(METRIC_TITLES[m])}</th>" for m in METRICS)
    lines = []
    for label, row, base_row in rows:
        cells = []
        for metric in METRICS:
            value, base = _metric(row, metric), _metric(base_row, metric)
            text, css = fmt_number(value, METRIC_DIGITS[metric]), ""
            if value is not None and base is not None:
                delta = value - base
                css = _delta_class(metric, delta)
                text += f" ({_signed(delta, METRIC_DIGITS[metric])})"
            cells.append(f'<td class="{css}">{esc(text)}</td>' if css else f"<td>{esc(text)}</td>")
        lines.append(f'<tr><td class="text">{esc(label)}</td>{"".join(cells)}</tr>')
    return (f'<table class="mini"><thead><tr><th class="text">decoder</th>{head}</tr></thead>'
            f'<tbody>{"".join(lines)}</tbody></table>')


def _signed(delta: float, digits: int) -> str:
    if math.isnan(delta):
        return "n/a"
    if math.isinf(delta):
        return "+inf" if delta > 0 else "-inf"
    return f"{delta:+.{digits}f}"


def _delta_class(metric: str, delta: float) -> str:
    if math.isnan(delta) or delta == 0:
        return ""
    return "better" if (delta > 0) == HIGHER_IS_BETTER[metric] else "worse"


def clean_page(run: Run, cache: PreviewCache) -> Page:
    groups: dict[str, Group] = {}
    for item in run.clean_items:
        group = groups.get(item.sample_id)
        if group is None:
            group = groups[item.sample_id] = Group(
                anchor=f"image-{item.sample_id}", heading=f"{item.sample_id} \u00b7 {item.image}",
                facts=f"caption: {item.prompt}" if item.prompt else "no caption", cards=[])
        panels = [_panel("input", cache, item.input), _panel("VAE", cache, item.vae), _panel("PiD", cache, item.pid)]
        mini = _mini_metrics([(DECODER_LABELS[d], item.rows.get(d), None) for d in ("vae", "pid")])
        group.cards.append(_clean_card(item, panels, 1, 2, mini, _clean_item_facts(item),
                                       anchor=f"item-{item.sample_id}-{item.sigma_key}",
                                       key=f"{item.sample_id}|{item.sigma_key}"))
    summary = run.summary or {}
    cap = to_float(summary.get("psnr_cap_db")) or 100.0
    means = _means(run.clean_items, cap)
    sigmas = sorted(means, key=float)

    def series_of(metric: str) -> list[Series]:
        return [Series(DECODER_LABELS[d], [(float(s), means[s][d][metric]) for s in sigmas if metric in means[s].get(d, {})],
                       PALETTE[i], dashed=d == "vae") for i, d in enumerate(("vae", "pid"))]

    table_rows = []
    for row in run.clean_rows:
        sigma = to_float(row.get("sigma")) or 0.0
        sample_id = str(row.get("sample_id", ""))
        decoder = str(row.get("decoder", ""))
        row_key = f"{sample_id}|{sigma:.3f}|{decoder}"
        row_text = f"{sample_id} {row.get('image', '')} {row.get('prompt', '')}".lower()
        table_rows.append(
            f'<tr data-key="{esc(row_key)}" data-tag="{sigma:.3f}" data-text="{esc(row_text)}">'
            + text_cell(sample_id, f"#item-{sample_id}-{sigma:.3f}") + cell(sigma, 3)
            + text_cell(DECODER_LABELS.get(decoder, decoder))
            + "".join(cell(to_float(row.get(m)), METRIC_DIGITS[m]) for m in METRICS)
            + cell(to_float(row.get("seconds")), 2) + text_cell(_size(row.get("output_size"))) + "</tr>"
        )
    columns = [Column("image", False), Column("sigma"), Column("decoder", False)] + [
        Column(METRIC_TITLES[m]) for m in METRICS] + [Column("seconds"), Column("output size", False)]
    table = (f'<section class="block" id="metrics"><h2>Metrics ({plural(len(table_rows), "row")}; click a column to sort)</h2>'
             f'{sortable_table("metrics per image, sigma and decoder", columns, table_rows, "metrics-table")}</section>')
    facts = [
        ("run folder", str(run.path)),
        ("backbone", str(summary.get("backbone") or _first(run.clean_rows, "backbone") or "")),
        ("checkpoint type", str(summary.get("ckpt_type") or "")),
        ("scale", f"x{summary['scale']}" if summary.get("scale") else ""),
        ("sigmas", ", ".join(sigmas)),
        ("items", f"{plural(len(groups), 'image')} \u00d7 {plural(len(sigmas), 'sigma')} = "
                  f"{plural(len(run.clean_items), 'item')}, {len(run.failures)} failed"),
    ]
    status, in_progress = _status([run])
    blocks = [_plots_block(series_of, f"Means per sigma (PSNR capped at {cap:g} dB)"), table,
              _failures_block([run]), _warnings_block([run], cache.failed)]
    return Page(
        title=f"PiD from_clean \u00b7 {run.name}", status=status, in_progress=in_progress,
        facts=[(k, v) for k, v in facts if v], tag_name="sigma", tags=sigmas,
        blocks=[b for b in blocks if b], groups=list(groups.values()), footer=FOOTER,
    )


# ------------------------------------------------------------------------------------------------------------
# several runs


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Short column names: a letter plus the part of the run folder's name that differs between the runs
    (run tags share backbone, steps and seed; "A: 2k" / "B: 2kto4k_v1pt5" is what a reader needs)."""
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        names = [f"{r.path.parent.name}/{r.name}" for r in runs]
    tokens = [n.split("_") for n in names]
    head = 0
    while all(len(t) > head + 1 for t in tokens) and len({t[head] for t in tokens}) == 1:
        head += 1
    tail = 0
    while all(len(t) > head + tail + 1 for t in tokens) and len({t[-1 - tail] for t in tokens}) == 1:
        tail += 1
    labels = []
    for letter, parts in zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", tokens):
        middle = "_".join(parts[head: len(parts) - tail] if tail else parts[head:])
        labels.append(f"{letter}: {middle or '_'.join(parts)}")
    return labels


def _match_counts(keys_per_run: Sequence[set[str]]) -> tuple[list[int], list[int]]:
    """Per run, of its items: how many another run also has (matched) and how many it alone has (only here);
    the two add up to its items, so the Runs table counts one unit throughout."""
    counts = Counter(key for keys in keys_per_run for key in keys)
    matched = [sum(1 for key in keys if counts[key] >= 2) for keys in keys_per_run]
    return matched, [len(keys) - n for keys, n in zip(keys_per_run, matched)]


def _runs_block(runs: Sequence[Run], labels: Sequence[str], page_dir: Path, keys_per_run: Sequence[set[str]],
                unit: str, unit_meaning: str) -> str:
    from pid.report.page import url_for

    matched, only = _match_counts(keys_per_run)
    rows = []
    for run, label, keys, n_matched, n_only in zip(runs, labels, keys_per_run, matched, only):
        report = run.path / "report.html"
        link = f'<a href="{esc(url_for(report, page_dir))}">{esc(run.name)}</a>' if report.is_file() else esc(run.name)
        summary = run.summary or {}
        rows.append(f'<tr><td class="text">{esc(label)}</td><td class="text">{link}</td>'
                    f'<td class="text">{esc(summary.get("backbone", ""))}</td><td class="text">{esc(summary.get("ckpt_type", ""))}</td>'
                    f"<td>{len(keys)}</td><td>{n_matched}</td><td>{n_only}</td>"
                    f'<td class="text">{"finished" if run.finished else "not finished"}</td></tr>')
    note = (f'<p class="note">Counted in {esc(unit)} ({esc(unit_meaning)}): matched = another run has it too, '
            "only here = no other run has it.</p>")
    return ('<section class="block" id="runs"><h2>Runs</h2>' + note + '<div class="tablewrap"><table><thead><tr>'
            '<th class="text">column</th><th class="text">run folder</th><th class="text">backbone</th>'
            f'<th class="text">checkpoint type</th><th>{esc(unit)}</th><th>matched</th><th>only here</th>'
            f'<th class="text">status</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div></section>')


def _check_comparable(runs: Sequence[Run]) -> None:
    kinds = {r.kind for r in runs}
    if len(kinds) > 1:
        ldm = next(r for r in runs if r.kind == "from_ldm")
        clean = next(r for r in runs if r.kind == "from_clean")
        raise InputError(f"cannot line up a from_ldm run ({ldm.path}) with a from_clean run ({clean.path}): "
                         "compare runs of the same CLI")


def compare_page(runs: Sequence[Run], caches: Sequence[PreviewCache], page_dir: Path) -> Page:
    _check_comparable(runs)
    labels = run_labels(runs)
    if runs[0].kind == "from_ldm":
        return _compare_ldm(runs, caches, labels, page_dir)
    return _compare_clean(runs, caches, labels, page_dir)


def _shared(keys_per_run: Sequence[set[str]], runs: Sequence[Run], what: str, fix: str) -> set[str]:
    """Identities present in at least two runs; a one-line error when there are none."""
    counts: dict[str, int] = {}
    for keys in keys_per_run:
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
    shared = {k for k, n in counts.items() if n >= 2}
    if not shared:
        names = ", ".join(str(r.path) for r in runs)
        raise InputError(f"the runs share no {what} ({names}): {fix}")
    return shared


def _capture_status(run: Run, item: LdmItem | None, prompt: str) -> str:
    """The status cell of one run's row in a capture's table: done, its file gone, failed (and why), still to
    come, or not part of the run."""
    if item is not None:
        if item.pid is not None and item.pid.is_file():
            return '<td class="text">done</td>'
        return '<td class="text missing">PiD file missing</td>'
    failure = next((f for f in run.failures if f.get("prompt") == prompt), None)
    if failure is not None:
        reason = failure.get("error") or failure.get("reason") or ""
        return f'<td class="text missing">failed{": " if reason else ""}{esc(reason)}</td>'
    if not run.finished:
        return '<td class="text">not yet (run in progress)</td>'
    return '<td class="text missing">not in this run</td>'


def _compare_ldm(runs: Sequence[Run], caches: Sequence[PreviewCache], labels: Sequence[str], page_dir: Path) -> Page:
    per_run: list[dict[tuple[str, str], LdmItem]] = [{(i.identity, i.step): i for i in r.ldm_items} for r in runs]
    identities = [{i.identity for i in r.ldm_items} for r in runs]
    shared = _shared(identities, runs, "prompt with the same LDM seed",
                     "compare runs made from the same prompts and seed")
    steps: dict[str, float] = {}
    order: dict[str, tuple[int, int]] = {}  # identity -> (first run that has it, its index there): page order
    for position, run in enumerate(runs):
        for item in run.ldm_items:
            if item.identity in shared:
                steps.setdefault(item.step, item.step_order)
                order.setdefault(item.identity, (position, item.index))
    tags = sorted(steps, key=lambda s: (steps[s], s))
    groups = []
    for group_number, identity in enumerate(sorted(shared, key=lambda k: order[k])):
        cards = []
        example: LdmItem | None = None
        for step in tags:
            present = [(p, per_run[p].get((identity, step))) for p in range(len(runs))]
            if not any(item for _, item in present):
                continue
            example = example or next(item for _, item in present if item)
            panels = [_panel(f"{labels[p]} \u00b7 PiD", caches[p], item.pid if item else None) for p, item in present]
            panels += [_panel(f"{labels[p]} \u00b7 VAE", caches[p], item.vae if item else None) for p, item in present]
            with_pid = [p for p, item in present if item is not None]
            a, b = (with_pid[0], with_pid[1]) if len(with_pid) >= 2 else (with_pid[0], len(runs) + with_pid[0])
            rows = "".join(
                f'<tr><td class="text">{esc(labels[p])}</td>{_capture_status(runs[p], item, example.prompt)}'
                + (f'<td>{esc(_sigma(item.sigma))}</td><td class="text">{esc(item.record.get("checkpoint", ""))}</td>'
                   f'<td class="text">{esc(_size(item.record.get("output_size")))}</td>'
                   f'<td>{esc(_seconds((item.record.get("seconds") or {}).get("pid")))}</td>'
                   if item else '<td colspan="4"></td>') + "</tr>"
                for p, item in present
            )
            table = ('<table class="mini"><thead><tr><th class="text">run</th><th class="text">status</th><th>sigma</th>'
                     '<th class="text">checkpoint</th><th class="text">PiD size</th><th>PiD time</th></tr></thead>'
                     f"<tbody>{rows}</tbody></table>")
            links = [(f"{labels[p]} PiD", item.pid) for p, item in present if item]
            cards.append(Card(
                anchor=f"item-{group_number}-{step}", key=f"{identity}|{step}", title=f"step {step}", tag=step,
                text=f"{example.prompt} {step}", panels=panels, a=a, b=b, extra_html=table, links=links,
            ))
        assert example is not None
        groups.append(Group(anchor=f"prompt-{group_number}", heading=example.prompt,
                            facts=f"LDM seed {example.ldm_seed}", cards=cards))
    captures = [{f"{identity}|{step}" for identity, step in items} for items in per_run]
    status, in_progress = _status(runs)
    return Page(
        title="PiD comparison \u00b7 " + " vs ".join(labels), status=status, in_progress=in_progress,
        facts=[("prompts in common", str(len(shared)))], tag_name="step", tags=tags,
        blocks=[b for b in (_runs_block(runs, labels, page_dir, captures, "captures", "prompt \u00d7 step"),
                            _failures_block(runs, labels),
                            _warnings_block(runs, [f for c in caches for f in c.failed])) if b],
        groups=groups, footer=FOOTER,
    )


def _compare_clean(runs: Sequence[Run], caches: Sequence[PreviewCache], labels: Sequence[str], page_dir: Path) -> Page:
    per_run: list[dict[tuple[str, str], CleanItem]] = [{(i.identity, i.sigma_key): i for i in r.clean_items} for r in runs]
    identities = [{i.identity for i in r.clean_items} for r in runs]
    shared = _shared(identities, runs, "input image (same SHA-256)", "compare runs made from the same images")
    sigma_keys = sorted({i.sigma_key for r in runs for i in r.clean_items if i.identity in shared}, key=float)
    order: dict[str, tuple[int, int]] = {}
    for position, run in enumerate(runs):
        for item in run.clean_items:
            if item.identity in shared:
                order.setdefault(item.identity, (position, item.index))
    groups, table_rows = [], []
    matched_items: list[list[CleanItem]] = [[] for _ in runs]
    for group_number, identity in enumerate(sorted(shared, key=lambda k: order[k])):
        cards = []
        example: CleanItem | None = None
        for sigma_key in sigma_keys:
            present = [(p, per_run[p].get((identity, sigma_key))) for p in range(len(runs))]
            if not any(item for _, item in present):
                continue
            example = example or next(item for _, item in present if item)
            complete = all(item is not None for _, item in present)
            for p, item in present:
                if item is not None and complete:
                    matched_items[p].append(item)
            input_owner = next((p, item) for p, item in present if item)
            panels = [_panel("input", caches[input_owner[0]], input_owner[1].input)]
            panels += [_panel(f"{labels[p]} \u00b7 PiD", caches[p], item.pid if item else None) for p, item in present]
            panels += [_panel(f"{labels[p]} \u00b7 VAE", caches[p], item.vae if item else None) for p, item in present]
            with_pid = [1 + p for p, item in present if item is not None]
            a, b = (with_pid[0], with_pid[1]) if len(with_pid) >= 2 else (0, with_pid[0])
            # deltas against the first run that has this item, decoder by decoder
            base_item = input_owner[1]
            mini = _mini_metrics([
                (f"{labels[p]} \u00b7 {DECODER_LABELS[d]}", item.rows.get(d) if item else None,
                 base_item.rows.get(d) if item is not base_item else None)
                for d in ("pid", "vae") for p, item in present
            ])
            cards.append(Card(
                anchor=f"item-{group_number}-{sigma_key}", key=f"{identity}|{sigma_key}", title=f"sigma {sigma_key}",
                tag=sigma_key, text=f"{example.sample_id} {example.image} {example.prompt} sigma {sigma_key}",
                panels=panels, a=a, b=b, extra_html=mini,
                links=[(f"{labels[p]} PiD", item.pid) for p, item in present if item],
            ))
            for decoder in ("pid", "vae"):
                values = [(item.rows.get(decoder) if item else None) for _, item in present]
                cells = []
                for metric in METRICS:
                    base = _metric(values[0], metric)
                    for position, row in enumerate(values):
                        cells.append(cell(_metric(row, metric), METRIC_DIGITS[metric]))
                        if position > 0:
                            value = _metric(row, metric)
                            delta = value - base if value is not None and base is not None else None
                            css = _delta_class(metric, delta) if delta is not None else ""
                            cells.append(cell(delta, METRIC_DIGITS[metric], css))
                row_key = f"{identity}|{sigma_key}|{decoder}"
                row_text = f"{example.sample_id} {example.image} {example.prompt}".lower()
                table_rows.append(
                    f'<tr data-key="{esc(row_key)}" data-tag="{sigma_key}" data-text="{esc(row_text)}">'
                    + text_cell(example.sample_id, f"#item-{group_number}-{sigma_key}") + cell(float(sigma_key), 3)
                    + text_cell(DECODER_LABELS[decoder]) + "".join(cells) + "</tr>")
        assert example is not None
        groups.append(Group(anchor=f"image-{group_number}", heading=f"{example.sample_id} \u00b7 {example.image}",
                            facts=f"caption: {example.prompt}" if example.prompt else "", cards=cards))
    columns = [Column("image", False), Column("sigma"), Column("decoder", False)]
    short = [label.split(":")[0] for label in labels]
    for metric in METRICS:
        for position, letter in enumerate(short):
            columns.append(Column(f"{METRIC_TITLES[metric]} {letter}"))
            if position > 0:
                columns.append(Column(f"\u0394 {METRIC_TITLES[metric]} {letter}\u2212{short[0]}"))
    table = (f'<section class="block" id="metrics"><h2>Metrics side by side (\u0394 = run minus run {short[0]}; '
             f"green is better)</h2>{sortable_table('metrics per image, sigma and decoder for each run', columns, table_rows, 'metrics-table')}"
             "</section>")
    caps = [to_float((r.summary or {}).get("psnr_cap_db")) or 100.0 for r in runs]
    means = [_means(items, cap) for items, cap in zip(matched_items, caps)]

    def series_of(metric: str) -> list[Series]:
        out = []
        for p, label in enumerate(labels):
            for decoder in ("pid", "vae"):
                points = [(float(s), means[p][s][decoder][metric]) for s in sigma_keys
                          if metric in means[p].get(s, {}).get(decoder, {})]
                out.append(Series(f"{label.split(':')[0]} {DECODER_LABELS[decoder]}", points,
                                  PALETTE[p % len(PALETTE)], dashed=decoder == "vae"))
        return out

    items = [{f"{identity}|{sigma_key}" for identity, sigma_key in per} for per in per_run]
    status, in_progress = _status(runs)
    blocks = [_runs_block(runs, labels, page_dir, items, "items", "image \u00d7 sigma"),
              _plots_block(series_of, "Means per sigma over the images every run has"), table,
              _failures_block(runs, labels), _warnings_block(runs, [f for c in caches for f in c.failed])]
    return Page(
        title="PiD comparison \u00b7 " + " vs ".join(labels), status=status, in_progress=in_progress,
        facts=[("images in common", str(len(shared)))], tag_name="sigma", tags=sigma_keys,
        blocks=[b for b in blocks if b], groups=groups, footer=FOOTER,
    )


__all__ = ["clean_page", "compare_page", "ldm_page", "render_facts", "run_labels"]
