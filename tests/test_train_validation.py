"""Watching a training run: validation on a held-out manifest (EMA beside the init), the run's report.html,
and a stop by SIGTERM (checkpoint at the current step, exit 143, a rerun resumes). Tiny stand-ins throughout
(tests/train_harness.py; the CLI runs use the tiny hub cache)."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from cli_driver import cli_env, run_module
from train_harness import make_images, make_init, prepare, train

METRICS = ("psnr", "ssim", "delta_e2000")


def _held_out(work: Path, count: int = 2) -> Path:
    """A from_clean manifest of `count` held-out images (relative paths, as users write them)."""
    make_images(work / "held", count=count)
    manifest = work / "val.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"held/img{i}.png", "prompt": "a red fox in snow"}) + "\n"
                                for i in range(count)))
    return manifest


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class _Page(HTMLParser):
    """The referenced files (src / href) and the SVG series labels of a report."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.series: list[str] = []
        self.svgs = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for key in ("src", "href"):
            if values.get(key):
                self.links.append(values[key])
        if tag == "svg":
            self.svgs += 1
        if tag == "polyline" and values.get("data-label"):
            self.series.append(values["data-label"])


def _parse(report: Path) -> _Page:
    page = _Page()
    page.feed(report.read_text(encoding="utf-8"))
    page.close()
    return page


def test_validation_scores_the_ema_beside_the_init_and_the_report_shows_it(tmp_path):
    prepare(tmp_path)
    manifest = _held_out(tmp_path)
    common = ["ckpt_every=4", "log_every=2", "lr=1e-3", "val_every=2", f"val_manifest={manifest}", "val_steps=2",
              "val_sigmas=0,0.3", "val_images=1"]
    assert train(tmp_path, "steps=4", *common) == 0
    run_dir = tmp_path / "runs" / "flux_teacher"
    rows = _lines(run_dir / "val.jsonl")
    assert [(r["step"], r["sigma"]) for r in rows] == [(2, 0.0), (2, 0.3), (4, 0.0), (4, 0.3)]
    for row in rows:
        for weights in ("ema", "init"):
            assert set(row[weights]) == set(METRICS) and all(math.isfinite(v) for v in row[weights].values())
        assert len(row["per_image"]) == 2  # every held-out image is scored ...
        assert list(row["images"]) == ["000_img0"]  # ... the first val_images are saved
        for path in (*row["images"].values(), *row["init_images"].values(), *row["targets"].values()):
            assert (run_dir / path).is_file(), path
    # the init is scored once and cached: the same numbers in every row; the EMA moves away from it
    assert rows[0]["init"] == rows[2]["init"] and rows[1]["init"] == rows[3]["init"]
    assert rows[2]["ema"]["psnr"] != rows[2]["init"]["psnr"]
    assert rows[0]["images"] != rows[2]["images"]
    init_file = run_dir / "val" / "init.json"
    cached_at = init_file.stat().st_mtime_ns

    # a rerun with more steps resumes and reuses the cached init scores
    assert train(tmp_path, "steps=6", *common) == 0
    rows = _lines(run_dir / "val.jsonl")
    assert [r["step"] for r in rows][-2:] == [6, 6] and rows[-1]["init"] == rows[1]["init"]
    assert init_file.stat().st_mtime_ns == cached_at

    # validating (the EMA swapped in and out, decodes, RNG draws of its own) leaves training bit for bit as is
    assert train(tmp_path, "steps=4", *common[:3], "run_name=no_val") == 0
    import torch

    from pid.training.checkpoint import latest_checkpoint, read_ema

    with_val = read_ema(run_dir / "checkpoints" / "step_000000004")
    without = read_ema(latest_checkpoint(tmp_path / "runs" / "no_val"))
    assert with_val.keys() == without.keys() and all(torch.equal(with_val[k], without[k]) for k in without)

    # report.html: loss, lr and grad-norm curves, EMA and init curves per metric and sigma, images over steps
    report = run_dir / "report.html"
    page = _parse(report)
    assert {"total", "diffusion", "align", "lr", "grad norm"} <= set(page.series)
    assert page.series.count("EMA") == page.series.count("init") == len(METRICS) * 2
    html = report.read_text(encoding="utf-8")
    for step in (2, 4, 6):
        assert f"EMA step {step}" in html
    local = [link for link in page.links if not re.match(r"^[a-z]+:", link)]
    assert len(local) >= 3 * 2  # target, init and three EMA steps per sigma, as links and images
    for link in local:
        assert not link.startswith("/") and (report.parent / unquote(link)).is_file(), link

    # python -m pid.report rebuilds it for a training run folder
    report.unlink()
    done = run_module("pid.report", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(report) and _parse(report).series == page.series


def test_bad_validation_options_are_one_line_and_exit_2(tmp_path):
    images = make_images(tmp_path / "images")
    manifest = _held_out(tmp_path)
    done = run_module("pid.train", f"data={images}", f"output_dir={tmp_path}/runs", f"val_manifest={manifest}",
                      "val_sigmas=0,1.5")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "val_sigmas must be values in [0, 1]" in lines[0]
    assert not (tmp_path / "runs").exists()
    # the same checks in the plan (no process start): a missing manifest or image, a zero step count
    from pid.errors import ConfigError, InputError

    from train_harness import plan_for

    make_init(tmp_path / "init.pth")
    with pytest.raises(InputError, match="val_manifest: manifest /nonexistent/val.jsonl does not exist"):
        plan_for(tmp_path, "val_manifest=/nonexistent/val.jsonl")
    (tmp_path / "held" / "img1.png").unlink()
    with pytest.raises(InputError, match="img1.png does not exist"):
        plan_for(tmp_path, f"val_manifest={manifest}")
    with pytest.raises(ConfigError, match="val_steps must be >= 1"):
        plan_for(tmp_path, f"val_manifest={manifest}", "val_steps=0")


def test_dry_run_shows_the_validation(tmp_path):
    prepare(tmp_path)
    manifest = _held_out(tmp_path)
    common = [f"data={tmp_path / 'images'}", f"init={tmp_path / 'init.pth'}", "resolution=64",
              f"output_dir={tmp_path}/runs", "--dry_run"]
    done = run_module("pid.train", *common, f"val_manifest={manifest}", "val_every=500", "val_sigmas=0.2,0")
    assert done.returncode == 0, done.stderr
    val = json.loads(done.stdout)["validation"]
    assert val["every"] == 500 and val["sigmas"] == [0.0, 0.2] and val["manifest"] == str(manifest)
    assert val["steps"] == 25 and val["cfg_scale"] == 5.0
    from train_harness import plan_for

    assert plan_for(tmp_path, f"val_manifest={manifest}", "val_every=0").val is None
    assert plan_for(tmp_path).val is None


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_exits_143_and_a_rerun_resumes(tmp_path, hub_cache_env):
    """As a scheduler preempts a job: `python -m pid.train` gets SIGTERM mid-run, finishes its step, writes a
    checkpoint of that step, exits 143; the same command again resumes there."""
    from pid.training.checkpoint import latest_step

    prepare(tmp_path)
    run_dir = tmp_path / "runs" / "flux_teacher"
    args = ["-m", "pid.train", f"data={tmp_path / 'images'}", f"init={tmp_path / 'init.pth'}", "resolution=64",
            f"output_dir={tmp_path / 'runs'}", "warmup_steps=0", "progress=false", "batch_size=2", "log_every=1",
            "ckpt_every=1000"]
    env = cli_env(**{k: v for k, v in hub_cache_env.items() if k.startswith("HF_")})
    proc = subprocess.Popen([sys.executable, *args, "steps=1000"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").is_file():  # training has started (step 1 logged)
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    stopped = re.search(r"stopped by SIGTERM at step (\d+)", stderr)
    assert stopped, stderr[-2000:]
    step = int(stopped.group(1))
    assert 1 <= step < 1000 and latest_step(run_dir) == step  # the checkpoint holds the step it stopped at
    assert max(r["step"] for r in _lines(run_dir / "metrics.jsonl")) == step
    assert not list((run_dir / "checkpoints").glob("*.partial"))

    rerun = subprocess.run([sys.executable, *args, f"steps={step + 1}"], env=env, capture_output=True, text=True,
                           timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"at step {step}" in rerun.stderr and latest_step(run_dir) == step + 1


def test_help_documents_the_validation_options_and_the_signal_exit_codes():
    done = run_module("pid.train", "--help")
    assert done.returncode == 0, done.stderr
    for word in ("val_manifest=<path>", "val_every=<int>", "val_sigmas=", "val_steps=<int>", "130 interrupted",
                 "143 by SIGTERM"):
        assert word in done.stdout, word


@pytest.mark.slow
def test_validation_of_a_run_on_a_prepare_cache_loads_the_encoders_for_the_held_out_set(tmp_path, hub_cache_env):
    """data= a prepare cache: training needs neither the VAE nor Gemma-2; validation loads them to encode the
    held-out set once, as a user runs both commands."""
    prepare(tmp_path)
    manifest = _held_out(tmp_path)
    cache = tmp_path / "cache"
    done = run_module("pid.train.prepare", "backbone=flux", f"data={tmp_path / 'images'}", f"out={cache}",
                      "resolution=64", env=hub_cache_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    done = run_module("pid.train", f"data={cache}", f"init={tmp_path / 'init.pth'}", "resolution=64",
                      f"output_dir={tmp_path / 'runs'}", "warmup_steps=0", "progress=false", "steps=2",
                      "val_every=2", f"val_manifest={manifest}", "val_steps=1", "val_cfg_scale=1",
                      env=hub_cache_env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = tmp_path / "runs" / "flux_teacher"
    rows = _lines(run_dir / "val.jsonl")
    assert [r["step"] for r in rows] == [2] and len(rows[0]["per_image"]) == 2
    assert "caption encoder" in done.stderr  # loaded for the held-out set only
    assert "No validation yet" not in (run_dir / "report.html").read_text(encoding="utf-8")
