"""pid.report without a browser: every item listed once, every referenced file present, valid HTML, atomic and
resumable rebuilds, previews made once, runs matched by identity, one-line errors."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pid.errors import InputError
from pid.report import compare_runs, write_report
from pid.report.runs import load_run

from report_runs import (
    add_ldm_item,
    clean_rows_for,
    finish_ldm_run,
    make_clean_run,
    make_ldm_run,
    noise_image,
    parse_report,
    referenced_files,
    save_png,
    source_images,
    write_metrics_csv,
)

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pid.report", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def _assert_files_exist(report, parser):
    files = referenced_files(report, parser)
    assert files, "the page references no file"
    missing = [str(f) for f in files if not f.is_file()]
    assert not missing, missing


def _card_keys(parser):
    return [c["data-key"] for c in parser.cards]


# ------------------------------------------------------------------------------------------------------------
# One run


def test_ldm_report_lists_every_capture_once_with_its_facts(tmp_path):
    failure = {"index": 2, "prompt": "a cat", "error": "CUDA out of memory"}
    run = make_ldm_run(tmp_path, ("a red fox in snow", "a <b>lighthouse</b> & \"dusk\""), failures=[failure])
    report = write_report(run)
    assert report == run / "report.html"
    parser = parse_report(report)
    metadata = [json.loads(line) for line in (run / "metadata.jsonl").read_text().splitlines()]
    assert sorted(_card_keys(parser)) == sorted(f"{m['index']}|{m['step']}" for m in metadata)
    assert len(set(_card_keys(parser))) == len(metadata) == 4
    # per prompt, captures in step order (24xt before x0), prompts in index order
    assert _card_keys(parser) == ["0|24xt", "0|x0", "1|24xt", "1|x0"]
    _assert_files_exist(report, parser)
    text = " ".join(parser.text)
    assert 'a <b>lighthouse</b> & "dusk"' in text  # the prompt verbatim (escaped, not interpreted)
    for fact in ("0.4123", "LDM 0, PiD 7", "checkpoints/sd3/PiD_sd3_2k.safetensors", "pid 0.52 s", "CUDA out of memory",
                 "64\u00d748 \u2192 PiD 128\u00d796"):
        assert fact in text, fact
    # the step filter offers each label once, in step order
    html = report.read_text()
    assert html.index('value="24xt"') < html.index('value="x0"')
    # left: the VAE decode (shown at PiD's size by the page), right: PiD; previews are JPEGs, full files PNGs
    panel = json.loads(parser.cards[0]["data-panels"])
    assert [p["label"] for p in panel] == ["VAE", "PiD"]
    assert panel[1]["full"] == "pid/step_24xt/00000000.png" and panel[1]["src"] == "previews/pid/step_24xt/00000000.jpg"
    assert (panel[0]["w"], panel[0]["h"], panel[1]["w"], panel[1]["h"]) == (64, 48, 128, 96)
    assert parser.cards[0]["data-w"] == "128"
    assert "<script>" in html and "<style>" in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")


def test_clean_report_lists_every_metrics_row_once_with_plots_and_failures(tmp_path):
    sources = source_images(tmp_path / "src", ["cat", "my photo #1 \u00e9t\u00e9"])  # names need URL-encoding
    failures = [{"image": "imgs/corrupt.png", "reason": "image imgs/corrupt.png cannot be decoded"}]
    run = make_clean_run(tmp_path, sources, sigmas=(0.0, 0.3, 0.6), failures=failures, perfect_first=True)
    report = write_report(run)
    parser = parse_report(report)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    table = [r["data-key"] for r in parser.rows]
    assert sorted(table) == sorted(f"{r['sample_id']}|{float(r['sigma']):.3f}|{r['decoder']}" for r in rows)
    assert len(set(table)) == len(rows) == 12
    assert sorted(_card_keys(parser)) == sorted({f"{r['sample_id']}|{float(r['sigma']):.3f}" for r in rows})
    assert len(parser.cards) == 6
    _assert_files_exist(report, parser)
    html = report.read_text()
    assert "00000001_my%20photo%20%231%20%C3%A9t%C3%A9.png" in html
    assert html.count("<svg") == 3 and "PSNR (dB)" in html and "\u0394E2000" in html  # one plot per metric
    assert 'data-v="Infinity">inf<' in html  # a perfect PSNR sorts as the largest and reads "inf"
    text = " ".join(parser.text)
    assert "cannot be decoded" in text and "imgs/corrupt.png" in text
    labels = [p["label"] for p in json.loads(parser.cards[0]["data-panels"])]
    assert labels == ["input", "VAE", "PiD"] and parser.cards[0]["data-a"] == "1" and parser.cards[0]["data-b"] == "2"
    # each table value is the CSV value
    first = next(r for r in parser.rows if r["data-key"] == f"{rows[3]['sample_id']}|0.000|pid")
    assert first is not None and rows[3]["decoder"] == "pid"
    assert f'data-v="{float(rows[3]["psnr"])!r}"' in html


def test_previews_are_made_once_and_remade_only_for_changed_files(tmp_path):
    run = make_ldm_run(tmp_path, ("a red fox in snow",), ldm_size=(150, 200), scale=4)  # PiD 800x600
    first = write_report(run, preview_max_side=256).read_bytes()
    previews = sorted((run / "previews").rglob("*.jpg"))
    assert len(previews) == 4  # pid + vae for two steps; never the comparison image (the page does not show it)
    for preview in previews:
        with Image.open(preview) as image:
            assert image.format == "JPEG" and max(image.size) <= 256
    stamps = {p: p.stat().st_mtime_ns for p in previews}
    report_stamp = (run / "report.html").stat().st_mtime_ns
    time.sleep(0.01)
    assert write_report(run, preview_max_side=256).read_bytes() == first  # idempotent
    assert {p: p.stat().st_mtime_ns for p in previews} == stamps
    assert (run / "report.html").stat().st_mtime_ns == report_stamp  # unchanged page: not even rewritten
    changed = run / "pid" / "step_x0" / "00000000.png"
    save_png(changed, noise_image("other", "content", (600, 800)))
    write_report(run, preview_max_side=256)
    remade = [p for p in previews if p.stat().st_mtime_ns != stamps[p]]
    assert remade == [run / "previews" / "pid" / "step_x0" / "00000000.jpg"]
    # a different preview size remakes them all
    write_report(run, preview_max_side=128)
    with Image.open(previews[0]) as image:
        assert max(image.size) == 128


def test_report_of_a_run_in_progress_then_killed_then_resumed(tmp_path):
    prompts = ("a red fox in snow", "a lighthouse at dusk", "a bowl of ramen")
    run = make_ldm_run(tmp_path, (), finished=False)
    (run / "metadata.jsonl").touch()  # started, nothing finished yet
    parser = parse_report(write_report(run))
    assert parser.cards == [] and "No finished items yet." in " ".join(parser.text)
    run = make_ldm_run(tmp_path, prompts[:1], finished=False)
    # killed while writing the next line: a torn last line and no summary.json
    with (run / "metadata.jsonl").open("a") as handle:
        handle.write('{"index": 1, "prompt": "a lighthouse at du')
    report = write_report(run)
    parser = parse_report(report)
    assert _card_keys(parser) == ["0|24xt", "0|x0"]
    text = " ".join(parser.text)
    assert "in progress or interrupted" in text and "not valid JSON" in text
    # the resumed run terminates the torn line and writes the rest; the page follows item by item
    with (run / "metadata.jsonl").open("a") as handle:
        handle.write("\n")
    for index, prompt in enumerate(prompts[1:], start=1):
        for step, ldm_step, sigma in (("24xt", 24, 0.41), ("x0", None, 0.0)):
            add_ldm_item(run, index, prompt, step, ldm_step, sigma)
            keys = _card_keys(parse_report(write_report(run)))
            assert keys[-1] == f"{index}|{step}" and len(keys) == len(set(keys))
    finish_ldm_run(run, 6)
    parser = parse_report(write_report(run))
    assert _card_keys(parser) == [f"{i}|{s}" for i in range(3) for s in ("24xt", "x0")]
    assert "finished" in " ".join(parser.text)
    _assert_files_exist(run / "report.html", parser)


def test_clean_report_in_progress_reads_the_rank_files(tmp_path):
    sources = source_images(tmp_path / "src", ["cat", "dog"])
    run = make_clean_run(tmp_path, sources, finished=False)  # rows only in metrics.rank0.jsonl so far
    parser = parse_report(write_report(run))
    assert len(parser.rows) == 8 and len(parser.cards) == 4
    assert "in progress" in " ".join(parser.text)
    # at the end the CLI writes metrics.csv with the same rows: still listed once
    rows = [json.loads(line) for line in (run / "metrics.rank0.jsonl").read_text().splitlines()]
    write_metrics_csv(run, rows)
    parser = parse_report(write_report(run))
    assert len(parser.rows) == 8 and len({r["data-key"] for r in parser.rows}) == 8


KILL_LOOP = """
import sys, time
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from report_runs import add_ldm_item
from pid.report import write_report
run = Path(sys.argv[1])
index = 100
while True:
    add_ldm_item(run, index, f"prompt {index}", "x0", None, 0.0)
    write_report(run)
    index += 1
    print(index, flush=True)
"""


def test_report_write_is_atomic_when_the_process_is_killed(tmp_path):
    """SIGKILL a process that appends items and rebuilds the report in a loop: the page left behind is always
    complete and valid (the old or the new one), and a rebuild lists every item once."""
    run = make_ldm_run(tmp_path, ("a red fox in snow",), finished=False)
    write_report(run)
    script = tmp_path / "loop.py"
    script.write_text(KILL_LOOP)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in (0.7, 1.1, 1.6):
        proc = subprocess.Popen([sys.executable, str(script), str(run), str(Path(__file__).parent)], env=env,
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one rebuild done
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        html = (run / "report.html").read_text()
        assert html.rstrip().endswith("</html>")
        parse_report(run / "report.html")
    # temp files of killed writes: old ones are cleared by the next rebuild, a fresh one may be a live write
    old, fresh = run / ".report.html.killed.tmp", run / ".report.html.writing.tmp"
    old.write_text("partial")
    fresh.write_text("partial")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    parser = parse_report(write_report(run))
    assert not old.exists() and fresh.exists()
    keys = _card_keys(parser)
    assert len(keys) == len(set(keys)) == len(load_run(run).ldm_items) > 5
    _assert_files_exist(run / "report.html", parser)


def test_old_metadata_paths_relative_to_the_cwd_still_resolve(tmp_path, monkeypatch):
    run = make_ldm_run(tmp_path / "outputs", ("a red fox in snow",))
    lines = []
    for line in (run / "metadata.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in ("pid", "vae", "compare"):
            record[key] = f"outputs/{run.name}/{record[key]}"  # as written by a run started in tmp_path
        lines.append(json.dumps(record))
    (run / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    parser = parse_report(write_report(run))
    _assert_files_exist(run / "report.html", parser)
    assert json.loads(parser.cards[0]["data-panels"])[1]["full"] == "pid/step_24xt/00000000.png"


# ------------------------------------------------------------------------------------------------------------
# Several runs


def test_compare_ldm_runs_matches_items_by_prompt_and_seed_not_index(tmp_path):
    run_a = make_ldm_run(tmp_path, ("a red fox in snow", "a lighthouse at dusk", "a bowl of ramen"),
                         name="sd3_PiD_sd3_2k_pidsteps4_seed0")
    # B: other order and seed offset, so "a lighthouse at dusk" has index 0 in B but LDM seed 1 in both;
    # "a red fox in snow" has seed 2 in B (seed 0 in A): not the same item.
    run_b = make_ldm_run(tmp_path, ("a lighthouse at dusk", "a red fox in snow"), seed=1, scale=4,
                         name="sd3_PiD_sd3_2kto4k_v1pt5_pidsteps4_seed1")
    out = compare_runs([run_a, run_b], tmp_path / "cmp" / "compare.html")
    parser = parse_report(out)
    keys = _card_keys(parser)
    assert keys == [json.dumps(["a lighthouse at dusk", 1]) + f"|{s}" for s in ("24xt", "x0")]
    panels = json.loads(parser.cards[0]["data-panels"])
    labels = [p["label"] for p in panels]
    assert labels[:2] == ["A: 2k_pidsteps4_seed0 \u00b7 PiD", "B: 2kto4k_v1pt5_pidsteps4_seed1 \u00b7 PiD"]
    # A's item is index 1, B's is index 0: the files prove the match is by identity
    assert panels[0]["full"] == f"../{run_a.name}/pid/step_24xt/00000001.png"
    assert panels[1]["full"] == f"../{run_b.name}/pid/step_24xt/00000000.png"
    assert (panels[0]["w"], panels[1]["w"]) == (128, 256)
    assert parser.cards[0]["data-a"] == "0" and parser.cards[0]["data-b"] == "1"  # slider: PiD A vs PiD B
    _assert_files_exist(out, parser)
    text = " ".join(parser.text)
    assert "a red fox in snow" not in text and "prompts in common" in text


def test_compare_clean_runs_matches_by_image_hash_and_shows_metric_deltas(tmp_path):
    sources = source_images(tmp_path / "src", ["cat", "dog", "car"])
    run_a = make_clean_run(tmp_path, sources, name="sd3_PiD_sd3_2k_pidsteps4_x2_seed0")
    run_b = make_clean_run(tmp_path, [sources[2], sources[0]], name="sd3_PiD_sd3_2kto4k_pidsteps4_x4_seed0", variant=1)
    out = compare_runs([run_a, run_b], tmp_path / "compare.html")
    parser = parse_report(out)
    rows_a = {(r["image_sha256"], f"{float(r['sigma']):.3f}", r["decoder"]): r
              for r in csv.DictReader((run_a / "metrics.csv").open())}
    rows_b = {(r["image_sha256"], f"{float(r['sigma']):.3f}", r["decoder"]): r
              for r in csv.DictReader((run_b / "metrics.csv").open())}
    shared = sorted(set(rows_a) & set(rows_b))
    assert len(shared) == 8  # cat and car (dog is only in A) x 2 sigmas x 2 decoders
    assert sorted(r["data-key"] for r in parser.rows) == sorted("|".join(k) for k in shared)
    html = out.read_text()
    for key in shared:  # the delta column holds B - A exactly
        delta = float(rows_b[key]["psnr"]) - float(rows_a[key]["psnr"])
        row_html = html[html.index(f'data-key="{"|".join(key)}"'):]
        row_html = row_html[: row_html.index("</tr>")]
        assert f'data-v="{delta!r}"' in row_html
    # in the cards the B row shows its value and its difference to A
    key = shared[0]
    delta = float(rows_b[key]["psnr"]) - float(rows_a[key]["psnr"])
    assert f"{float(rows_b[key]['psnr']):.2f} ({delta:+.2f})" in html
    assert html.count("<svg") == 3
    assert "only here" in html
    _assert_files_exist(out, parser)


# ------------------------------------------------------------------------------------------------------------
# Command line and errors


def test_cli_rebuilds_and_compares(tmp_path):
    run_a = make_ldm_run(tmp_path / "outputs", name="sd3_PiD_sd3_2k_pidsteps4_seed0")
    run_b = make_ldm_run(tmp_path / "outputs", name="sd3_PiD_sd3_2kto4k_pidsteps4_seed0", scale=4)
    done = _cli(run_a)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(run_a / "report.html")
    done = _cli(run_a, run_b)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "outputs" / "compare.html")
    parse_report(tmp_path / "outputs" / "compare.html")
    done = _cli(run_a, run_b, "-o", tmp_path / "elsewhere" / "x.html")
    assert done.returncode == 0 and len(parse_report(tmp_path / "elsewhere" / "x.html").cards) == 4


def _one_line_error(done, *fragments):
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(_cli(tmp_path / "empty"), "is not a PiD run folder", "metadata.jsonl")
    _one_line_error(_cli(tmp_path / "nope"), "does not exist")
    run = make_ldm_run(tmp_path / "outputs", ("a red fox in snow",))
    _one_line_error(_cli(tmp_path / "outputs"), "holds runs", run.name)
    other = make_ldm_run(tmp_path / "outputs", ("a different prompt",), name="other_seed0")
    _one_line_error(_cli(run, other), "share no prompt", "same prompts")
    sources = source_images(tmp_path / "src", ["cat"])
    clean = make_clean_run(tmp_path / "outputs", sources)
    _one_line_error(_cli(run, clean), "cannot line up a from_ldm run", "same CLI")
    clean_other = make_clean_run(tmp_path / "outputs", source_images(tmp_path / "src2", ["dog"]), name="clean_b")
    _one_line_error(_cli(clean, clean_other), "share no input image")
    _one_line_error(_cli(run, run), "given twice")
    with pytest.raises(InputError, match="not a PiD run folder"):
        write_report(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------------------
# Runs made by the real CLIs (tiny models)


def test_report_of_a_real_from_ldm_run_then_resume(tmp_path):
    from test_from_ldm import tiny_cfg, tiny_pid

    from pid.inference.from_ldm import run as run_from_ldm

    from tiny_pipelines import make_tiny_pipeline

    cfg = tiny_cfg("sd3", tmp_path, f"prompt_file={_prompts(tmp_path)}", prompt=None)
    pipe, decoder = make_tiny_pipeline("sd3"), tiny_pid("sd3")
    run_from_ldm(cfg, pipe=pipe, decoder=decoder)
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    parser = parse_report(write_report(run_dir))
    metadata = [json.loads(line) for line in (run_dir / "metadata.jsonl").read_text().splitlines()]
    assert sorted(_card_keys(parser)) == sorted(f"{m['index']}|{m['step']}" for m in metadata)
    assert len(metadata) == 4
    _assert_files_exist(run_dir / "report.html", parser)
    # a crash lost the last prompt: its files and lines are gone; the report still builds, then the resumed
    # run redoes that prompt and the rebuilt report lists everything once
    kept = [m for m in metadata if m["index"] == 0]
    (run_dir / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))
    for m in metadata:
        if m["index"] == 1:
            for key in ("pid", "vae", "compare"):
                if m.get(key):
                    (run_dir / m[key] if not Path(m[key]).is_absolute() else Path(m[key])).unlink()
    (run_dir / "summary.json").unlink(missing_ok=True)
    assert len(parse_report(write_report(run_dir)).cards) == 2
    run_from_ldm(cfg, pipe=pipe, decoder=decoder)
    parser = parse_report(write_report(run_dir))
    assert sorted(_card_keys(parser)) == sorted(f"{m['index']}|{m['step']}" for m in metadata)
    _assert_files_exist(run_dir / "report.html", parser)


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red fox in snow\na lighthouse at dusk\n")
    return path


def test_report_of_a_real_from_clean_run(tmp_path):
    from pid.inference.from_clean import load_config
    from pid.inference.from_clean import run as run_from_clean
    from pid.latents import get as get_space

    from tiny import tiny_decoder
    from tiny_vaes import tiny_autoencoder_kl

    images = tmp_path / "data"
    source_images(images, ["cat", "dog"], shape=(32, 48))
    (images / "broken.png").write_bytes(b"not a png")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(images / n), "prompt": "a photo"}) + "\n"
                                for n in ("cat.png", "dog.png", "broken.png")))
    cfg = load_config(["backbone=sd3", f"manifest={manifest}", "degrade_sigmas=[0,0.4]", "pid_steps=1",
                       f"output_dir={tmp_path / 'out'}", "device=cpu"])
    space = get_space("sd3").attach(tiny_autoencoder_kl(latent_channels=16))
    run_from_clean(cfg, decoder=tiny_decoder("sd3", "2k"), latent_space=space)
    run_dir = next((tmp_path / "out").iterdir())
    report = write_report(run_dir)
    parser = parse_report(report)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert len(rows) == 8
    assert sorted(r["data-key"] for r in parser.rows) == sorted(
        f"{r['sample_id']}|{float(r['sigma']):.3f}|{r['decoder']}" for r in rows)
    assert len(parser.cards) == 4
    _assert_files_exist(report, parser)
    assert "broken.png" in " ".join(parser.text)  # the failure and its reason are on the page


def test_clean_rows_helper_matches_the_contract(tmp_path):
    """The generated runs the tests build follow the metrics.csv columns of the run-folder contract."""
    source = source_images(tmp_path / "src", ["cat"])[0]
    rows = clean_rows_for(tmp_path / "run", 0, source, 0.3)
    assert [r["decoder"] for r in rows] == ["vae", "pid"]
    for row in rows:
        for key in ("input", "output", "grid"):
            assert (tmp_path / "run" / row[key]).is_file()


def test_update_report_never_raises_and_throttles(tmp_path, monkeypatch):
    import pid.report as report_module

    assert report_module.update_report(tmp_path / "missing") is None  # logged, not raised
    run = make_ldm_run(tmp_path, ("a red fox in snow",), finished=False)
    assert report_module.update_report(run) == run / "report.html"
    # pretend the last rebuild took an hour: the next ones are skipped until the run's end
    monkeypatch.setitem(report_module._last_rebuild, run.resolve(), (time.monotonic(), 3600.0))
    add_ldm_item(run, 1, "a lighthouse at dusk", "x0", None, 0.0)
    assert report_module.update_report(run) is None
    assert "a lighthouse at dusk" not in (run / "report.html").read_text()
    assert report_module.update_report(run, final=True) == run / "report.html"
    assert "a lighthouse at dusk" in (run / "report.html").read_text()


# ------------------------------------------------------------------------------------------------------------
# Wording, units and links that stay true


def _runs_table(html):
    """Runs table of a compare page: column letter -> (items, matched, only here), and the unit's header."""
    import re

    section = html[html.index('id="runs"'):]
    section = section[: section.index("</section>")]
    header = re.findall(r"<th>([^<]+)</th>", section)
    rows = re.findall(r'<tr><td class="text">([A-Z]): .*?<td>(\d+)</td><td>(\d+)</td><td>(\d+)</td>', section)
    return header, {letter: tuple(map(int, numbers)) for letter, *numbers in rows}


def test_compare_runs_table_counts_items_matched_and_only_here_in_one_unit(tmp_path):
    # A: 3 prompts x (24xt, x0); B: the lighthouse with A's seed, the fox with another, and an extra step 20xt
    run_a = make_ldm_run(tmp_path, ("a red fox in snow", "a lighthouse at dusk", "a bowl of ramen"), name="a_seed0")
    run_b = make_ldm_run(tmp_path, ("a lighthouse at dusk", "a red fox in snow"), seed=1, name="b_seed1",
                         steps=(("20xt", 20, 0.5), ("24xt", 24, 0.4123), ("x0", None, 0.0)))
    header, table = _runs_table(compare_runs([run_a, run_b], tmp_path / "ldm.html").read_text())
    assert header[:3] == ["captures", "matched", "only here"]
    # the lighthouse's 24xt and x0 are in both; everything else is in one run only
    assert table == {"A": (6, 2, 4), "B": (6, 2, 4)}

    sources = source_images(tmp_path / "src", ["cat", "dog", "car"])
    clean_a = make_clean_run(tmp_path, sources, name="ca_seed0", sigmas=(0.0, 0.3))
    clean_b = make_clean_run(tmp_path, [sources[0]], name="cb_seed0", sigmas=(0.3, 0.6))
    header, table = _runs_table(compare_runs([clean_a, clean_b], tmp_path / "clean.html").read_text())
    assert header[:3] == ["items", "matched", "only here"]
    assert table == {"A": (6, 1, 5), "B": (2, 1, 1)}  # only (cat, 0.3) is in both
    for items, matched, only in table.values():
        assert items == matched + only


def _capture_rows(html, key):
    """(run letter, status) of each row in the table of the card with this data-key."""
    import re
    from html import escape

    card = html[html.index(f'data-key="{escape(key)}"'):]
    card = card[: card.index("</article>")]
    return re.findall(r'<tr><td class="text">([A-Z]): [^<]*</td><td class="text[^"]*">([^<]*)</td>', card)


def test_ldm_compare_tables_show_each_runs_status(tmp_path):
    prompts = ("a red fox in snow", "a lighthouse at dusk")
    run_a = make_ldm_run(tmp_path, prompts, name="a_2k_seed0")
    run_b = make_ldm_run(tmp_path, prompts, name="b_4k_seed0")
    (run_b / "pid" / "step_24xt" / "00000000.png").unlink()  # deleted after the run
    failure = {"index": 1, "prompt": "a lighthouse at dusk", "error": "CUDA out of memory"}
    run_c = make_ldm_run(tmp_path, prompts[:1], name="c_8k_seed0", steps=(("x0", None, 0.0),), finished=False,
                         failures=[failure])
    out = compare_runs([run_a, run_b, run_c], tmp_path / "compare.html")
    parser = parse_report(out)
    html = out.read_text()
    fox, lighthouse = json.dumps([prompts[0], 0]), json.dumps([prompts[1], 1])
    assert _capture_rows(html, f"{fox}|24xt") == [
        ("A", "done"), ("B", "PiD file missing"), ("C", "not yet (run in progress)")]
    assert _capture_rows(html, f"{fox}|x0") == [("A", "done"), ("B", "done"), ("C", "done")]
    assert _capture_rows(html, f"{lighthouse}|24xt") == [
        ("A", "done"), ("B", "done"), ("C", "failed: CUDA out of memory")]
    _assert_files_exist(out, parser)  # B's deleted PiD image is neither shown nor linked


def test_counts_read_right_in_the_singular(tmp_path):
    run = make_ldm_run(tmp_path, ("a red fox in snow",), steps=(("x0", None, 0.0),), finished=False)
    text = " ".join(parse_report(write_report(run)).text)
    assert "1 capture of 1 prompt, 0 failed" in text and "1 item so far" in text
    assert "captures" not in text and "prompts" not in text and "1 items" not in text
    finish_ldm_run(run, 1)
    add_ldm_item(run, 1, "a lighthouse at dusk", "x0", None, 0.0)
    assert "2 captures of 2 prompts" in " ".join(parse_report(write_report(run)).text)

    clean = make_clean_run(tmp_path, source_images(tmp_path / "src", ["cat"]), sigmas=(0.3,))
    text = " ".join(parse_report(write_report(clean)).text)
    assert "1 image \u00d7 1 sigma = 1 item, 0 failed" in text and "Metrics (2 rows;" in text


def test_mean_plots_keep_every_marker_inside_the_frame(tmp_path):
    import re

    run = make_clean_run(tmp_path, source_images(tmp_path / "src", ["cat", "dog"]), sigmas=(0.0, 0.3, 0.6))
    html = write_report(run).read_text()
    plots = re.findall(r"<svg.*?</svg>", html)
    assert len(plots) == 3
    for svg in plots:
        x, y, width, height = map(float, re.search(
            r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"', svg).groups())
        markers = [tuple(map(float, m)) for m in re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="([\d.]+)"', svg)]
        assert len(markers) == 6  # VAE and PiD at three sigmas
        for cx, cy, r in markers:
            assert x + r < cx < x + width - r and y + r < cy < y + height - r, (cx, cy, (x, y, width, height))


def test_a_rebuilt_report_links_only_files_that_exist(tmp_path):
    run = make_ldm_run(tmp_path, ("a red fox in snow", "a lighthouse at dusk"))
    write_report(run)
    for gone in ("pid/step_24xt/00000000.png", "compare/step_24xt/00000000.png", "vae/step_x0/00000001.png"):
        (run / gone).unlink()
    report = write_report(run)
    parser = parse_report(report)
    _assert_files_exist(report, parser)
    html = report.read_text()
    assert "pid/step_24xt/00000000.png" not in html and "compare/step_24xt/00000000.png" not in html
    card = html[html.index('data-key="0|24xt"'):]
    assert "missing file: PiD, comparison image</p>" in card[: card.index("</article>")]
    assert len(parser.cards) == 4  # the items stay listed (the run still records them), without dead links

    clean = make_clean_run(tmp_path, source_images(tmp_path / "src", ["cat"]), sigmas=(0.3,))
    write_report(clean)
    sample = "00000000_cat"
    for gone in (f"grid/sigma_0.300/{sample}.png", f"input/{sample}.png"):
        (clean / gone).unlink()
    report = write_report(clean)
    _assert_files_exist(report, parse_report(report))
    assert "missing file: input, grid</p>" in report.read_text()
