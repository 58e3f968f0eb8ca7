"""Watching a distillation (`python -m pid.train mode=distill val_manifest=...`): the student's EMA weights decode
the held-out set with the distilled sampler and are scored against the teacher's many-step decode (made once,
cached in the run folder) and the ground truth; a rerun after a kill neither re-scores nor duplicates rows; the
run's report.html shows the distillation curves. Tiny stand-ins throughout (tests/train_harness.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from cli_driver import cli_env, run_module
from train_harness import make_images, prepare, train

HARNESS = str(Path(__file__).resolve().parent / "train_harness.py")
METRICS = ("psnr", "ssim", "delta_e2000")
VS_TEACHER = ("psnr_vs_teacher", "ssim_vs_teacher", "delta_e2000_vs_teacher")
DISTILL = ["mode=distill", "batch_size=2", "warmup_steps=0", "lr=1e-3", "fake_score_lr=1e-3",
           "discriminator_lr=1e-3", "student_update_freq=2"]


def _held_out(work: Path, count: int = 2) -> Path:
    make_images(work / "held", count=count)
    manifest = work / "val.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"held/img{i}.png", "prompt": "a red fox in snow"}) + "\n"
                                for i in range(count)))
    return manifest


def _validation(manifest: Path) -> list[str]:
    return [f"val_manifest={manifest}", "val_every=2", "val_sigmas=0,0.3", "val_images=1", "val_teacher_steps=3"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "val.jsonl").read_text().splitlines()]


def _png(path: Path) -> torch.Tensor:
    from PIL import Image

    array = torch.tensor(list(Image.open(path).convert("RGB").getdata()), dtype=torch.float32) / 255.0
    width, height = Image.open(path).size
    return array.reshape(height, width, 3).permute(2, 0, 1).unsqueeze(0)


def _checkpoint(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's latest checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pid.training.checkpoint import _dcp_load, latest_checkpoint

    folder = latest_checkpoint(run_dir)
    items = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in items.items()
               if isinstance(v, TensorStorageMetadata)}
    _dcp_load(tensors, folder)
    return tensors


class _Charts(HTMLParser):
    """Each SVG chart's title (aria-label) -> {series label: number of polyline points}."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict[str, int]] = {}
        self.current: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "svg" and values.get("aria-label"):
            self.current = str(values["aria-label"])
            self.charts[self.current] = {}
        if tag == "polyline" and self.current is not None:
            self.charts[self.current][str(values.get("data-label"))] = len(str(values.get("points")).split())


def _charts(report: Path) -> dict[str, dict[str, int]]:
    parser = _Charts()
    parser.feed(report.read_text(encoding="utf-8"))
    return parser.charts


def test_student_is_scored_against_the_teacher_and_the_ground_truth_and_the_report_shows_the_curves(tmp_path):
    from pid.metrics import summarize

    prepare(tmp_path)
    manifest = _held_out(tmp_path)
    assert train(tmp_path, *DISTILL, "steps=5", "ckpt_every=5", "log_every=1", *_validation(manifest)) == 0
    run_dir = tmp_path / "runs" / "flux_distill"
    rows = _rows(run_dir)
    # every val_every iterations and at the end, one row per σ
    assert [(r["step"], r["sigma"]) for r in rows] == [(2, 0.0), (2, 0.3), (4, 0.0), (4, 0.3), (5, 0.0), (5, 0.3)]
    for row in rows:
        assert (row["student_steps"], row["teacher_steps"]) == (4, 3)  # a released student's 4 steps by default
        assert set(row["ema"]) == {*METRICS, *VS_TEACHER} and set(row["teacher"]) == set(METRICS)
        assert all(math.isfinite(v) for v in [*row["ema"].values(), *row["teacher"].values()])
        assert len(row["per_image"]) == 2 and list(row["images"]) == ["000_img0"]
        for path in (*row["images"].values(), *row["teacher_images"].values(), *row["targets"].values()):
            assert (run_dir / path).is_file(), path
    # the student moved between its updates (iterations 0, 2, 4): its scores change over validations
    assert rows[0]["ema"]["psnr_vs_teacher"] != rows[4]["ema"]["psnr_vs_teacher"]
    # the teacher's decodes are made once: one reference per held-out image and σ, the same in every row
    teacher_files = sorted(p.name for p in (run_dir / "val" / "teacher").iterdir())
    assert teacher_files == [f"{i:03d}_img{i}_sigma_{s}.png" for i in range(2) for s in ("0.000", "0.300")]
    assert rows[0]["teacher"] == rows[4]["teacher"]
    # the scores are of those images: the teacher's against the ground truth, the student's against the teacher
    last = rows[4]["per_image"][0]
    truth = _png(tmp_path / "held" / "img0.png")
    teacher = _png(run_dir / rows[4]["teacher_images"]["000_img0"])
    student = _png(run_dir / rows[4]["images"]["000_img0"])
    assert last["teacher"]["psnr"] == pytest.approx(summarize(teacher, truth)["psnr"][0], abs=1e-3)
    assert last["ema"]["psnr_vs_teacher"] == pytest.approx(summarize(student, teacher)["psnr"][0], abs=0.05)
    assert last["ema"]["psnr"] == pytest.approx(summarize(student, truth)["psnr"][0], abs=0.05)
    assert abs(last["ema"]["psnr_vs_teacher"] - last["ema"]["psnr"]) > 0.1  # two different references

    charts = _charts(run_dir / "report.html")
    for title, series in [("student: VSD loss", "loss_vsd"), ("student: GAN generator loss", "loss_gan_gen"),
                          ("fake score: DSM loss", "loss_dsm"), ("discriminator: GAN loss", "loss_gan_disc"),
                          ("discriminator: R1 penalty", "loss_r1")]:
        chart = next(v for k, v in charts.items() if k.startswith(title))
        assert chart[series] >= 2, (title, chart)
    # log_every=1, a student update every 2nd iteration: the student's curves have 3 points, the critics' 2
    assert charts["student: VSD loss (mean over log_every iterations)"]["loss_vsd"] == 3
    assert charts["discriminator accuracy (real > 0, fake < 0)"]["accuracy"] == 2
    assert set(charts["learning rates"]) == {"student", "fake score", "discriminator"}
    for sigma in ("0", "0.3"):
        for metric in ("PSNR (dB, higher is closer)", "CIEDE2000 (lower is closer)"):
            assert charts[f"student vs teacher: {metric}, σ={sigma}"] == {"student vs teacher": 3}
        assert charts[f"vs ground truth: PSNR (dB, higher is better), σ={sigma}"] == {"student": 3, "teacher": 3}
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "teacher, 3 steps" in html and "loss_total" not in html

    # validating changes nothing in training: the same checkpoint as a run without validation
    assert train(tmp_path, *DISTILL, "steps=5", "ckpt_every=5", "log_every=1", "run_name=plain") == 0
    validated, plain = _checkpoint(run_dir), _checkpoint(tmp_path / "runs" / "plain")
    assert validated.keys() == plain.keys() and len(plain) > 50
    assert not [k for k in plain if not torch.equal(validated[k], plain[k])]

    # python -m pid.report rebuilds the same page from the run folder
    (run_dir / "report.html").unlink()
    done = run_module("pid.report", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert set(_charts(run_dir / "report.html")) == set(charts)


def test_a_rerun_after_a_kill_between_a_validation_and_its_checkpoint_neither_rescores_nor_duplicates(tmp_path):
    """A kill after the validation of iteration 4 but before its checkpoint: the rerun resumes at iteration 2,
    redoes iterations 3-4, and leaves val.jsonl and the cached teacher decodes as they were."""
    prepare(tmp_path)
    manifest = _held_out(tmp_path)
    args = [*DISTILL, "steps=4", "ckpt_every=2", "log_every=2", *_validation(manifest)]
    assert train(tmp_path, *args) == 0
    run_dir = tmp_path / "runs" / "flux_distill"
    before = (run_dir / "val.jsonl").read_text()
    teacher_json = run_dir / "val" / "teacher.json"
    stamp = teacher_json.stat().st_mtime_ns
    # the state a kill -9 leaves after validating iteration 4 and before checkpointing it
    checkpoints = run_dir / "checkpoints"
    for path in sorted((checkpoints / "step_000000004").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (checkpoints / "step_000000004").rmdir()
    (checkpoints / "latest").write_text("step_000000002\n")
    assert train(tmp_path, *args) == 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000000004"  # iterations were redone
    assert (run_dir / "val.jsonl").read_text() == before  # ... their validation was not
    assert [(r["step"], r["sigma"]) for r in _rows(run_dir)] == [(2, 0.0), (2, 0.3), (4, 0.0), (4, 0.3)]
    assert teacher_json.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_another_validation_set_on_a_resumed_run_remakes_the_teacher_decodes(tmp_path):
    """val_sigmas changed on a rerun: the cached teacher decodes were made for another set, so the teacher
    decodes the new σ at the next validation; earlier rows stay as they were."""
    prepare(tmp_path)
    manifest = _held_out(tmp_path)
    base = [*DISTILL, "ckpt_every=2", "log_every=2", f"val_manifest={manifest}", "val_every=2", "val_images=1",
            "val_teacher_steps=3"]
    assert train(tmp_path, *base, "steps=2", "val_sigmas=0,0.3") == 0
    run_dir = tmp_path / "runs" / "flux_distill"
    assert train(tmp_path, *base, "steps=4", "val_sigmas=0.5") == 0
    rows = _rows(run_dir)
    assert [(r["step"], r["sigma"]) for r in rows] == [(2, 0.0), (2, 0.3), (4, 0.5)]
    assert sorted(p.name for p in (run_dir / "val" / "teacher").iterdir() if "0.500" in p.name) == [
        "000_img0_sigma_0.500.png", "001_img1_sigma_0.500.png"]
    cached = json.loads((run_dir / "val" / "teacher.json").read_text())
    assert list(cached["scores"]) == ["0.5"] and rows[2]["teacher"] == cached["scores"]["0.5"]["mean"]


@pytest.mark.slow
def test_kill_9_mid_distillation_then_rerun_leaves_one_row_per_validation(tmp_path):
    """As a user: the harness process killed -9 once validation has begun, then the same command again."""
    prepare(tmp_path)
    manifest = _held_out(tmp_path)
    args = [*DISTILL, "steps=8", "ckpt_every=4", "log_every=2", *_validation(manifest)]
    run_dir = tmp_path / "runs" / "flux_distill"
    env = cli_env()
    proc = subprocess.Popen([sys.executable, HARNESS, str(tmp_path), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "val.jsonl").is_file():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run([sys.executable, HARNESS, str(tmp_path), *args], env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    pairs = [(r["step"], r["sigma"]) for r in _rows(run_dir)]
    assert pairs == [(s, sigma) for s in (2, 4, 6, 8) for sigma in (0.0, 0.3)], pairs


def test_distill_validation_options_in_help_and_the_dry_run(tmp_path):
    helped = run_module("pid.train", "--help")
    assert helped.returncode == 0 and "val_teacher_steps" in helped.stdout and "psnr_vs_teacher" in helped.stdout
    images = make_images(tmp_path / "images")
    manifest = _held_out(tmp_path)
    common = ["mode=distill", "init=released", f"data={images}", "resolution=64", f"output_dir={tmp_path}/runs",
              f"val_manifest={manifest}"]
    env = cli_env(HF_HUB_CACHE=str(tmp_path / "hf"), HF_HOME=str(tmp_path / "home"))
    dry = run_module("pid.train", *common, "--dry_run", env=env)
    assert dry.returncode == 0, dry.stderr
    validation = json.loads(dry.stdout)["validation"]
    assert (validation["steps"], validation["teacher_steps"]) == (4, 25)
    assert not (tmp_path / "runs").exists()  # (val_steps=5 with mode=distill: tests/test_train_distill.py)
