"""`python -m pid.train mode=distill` driven as a user drives it: the dry run (the four networks' counts, the DMD
options, the memory table), bad input, a tiny distillation run through the CLI, kill -9 then rerun equals an
uninterrupted run, 2 gloo ranks equal 1, and the exported student decodes in from_clean with pid_steps=4 (tiny
stand-ins throughout; tests/train_harness.py). The tiny-problem quality check is benchmarks/distill_tiny.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_driver import cli_env, run_module
from train_harness import make_images, make_init, prepare, train

HARNESS = str(Path(__file__).resolve().parent / "train_harness.py")
DISTILL = ["mode=distill", "batch_size=2", "warmup_steps=0"]


def _checkpoint(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the latest checkpoint (student, fake score, discriminator, EMA, three optimisers)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pid.training.checkpoint import _dcp_load, latest_checkpoint

    folder = latest_checkpoint(run_dir)
    assert folder is not None, f"no checkpoint in {run_dir}"
    items = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in items.items()
               if isinstance(v, TensorStorageMetadata)}
    _dcp_load(tensors, folder)
    return tensors


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------------
# The plan


def test_dry_run_distill_counts_options_and_memory_table(tmp_path):
    images = make_images(tmp_path / "images")
    empty_cache = tmp_path / "hf"
    env = cli_env(HF_HUB_CACHE=str(empty_cache), HF_HOME=str(tmp_path / "home"))
    done = run_module("pid.train", "mode=distill", "init=released", f"data={images}", "resolution=64",
                      f"output_dir={tmp_path}/runs", "--dry_run", env=env)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["mode"] == "distill" and plan["init"]["ckpt_type"] == "undistilled"
    # spec §a.3 (flux): student 1,400,199,315 of which 1,378,962,579 trainable; discriminator 18,877,441
    nets = plan["networks"]
    assert nets["student"] == nets["fake_score"] == nets["teacher_frozen"] == 1_400_199_315
    assert nets["student_trainable"] == 1_378_962_579 and nets["discriminator"] == 18_877_441
    assert plan["trainable_params"] == 2 * 1_378_962_579 + 18_877_441
    assert plan["trainable_params"] + plan["frozen_params"] == 3 * 1_400_199_315 + 18_877_441
    # the shipped recipe: 3000 iterations, 1 image per GPU, student lr 1e-5 wd 0 with 100 student warm-up steps
    assert (plan["steps"], plan["batch_size_per_gpu"], plan["lr"], plan["weight_decay"]) == (3000, 1, 1e-5, 0.0)
    d = plan["distill"]
    assert d["student_steps"] == 500 and d["student_optimizer"]["warmup_student_steps"] == 100
    assert (d["student_update_freq"], d["fake_score_lr"], d["fake_score_weight_decay"], d["discriminator_lr"]) == (
        6, 1e-5, 1e-3, 1e-5)
    assert (d["teacher_cfg"], d["gan_weight"], d["gan_warmup"], d["r1_weight"], d["r1_alpha"]) == (
        3.0, 0.05, 100, 200.0, 0.1)
    assert d["feature_block"] == 7 and d["student_input"] == "teacher_forcing"
    memory = plan["estimated_peak_memory_per_gpu"]
    assert "not measured" in memory["how"]
    table = memory["by_gpu_count"]
    assert sorted(table) == ["1_gpu", "2_gpu", "4_gpu", "8_gpu"]
    sharded = [table[f"{n}_gpu"]["fsdp2_sharded"]["total_gib"] for n in (1, 2, 4, 8)]
    assert sharded == sorted(sharded, reverse=True) and sharded[0] > sharded[-1]
    assert table["1_gpu"]["ddp"]["total_gib"] == table["8_gpu"]["ddp"]["total_gib"] == sharded[0]
    assert not (tmp_path / "runs").exists() and not empty_cache.exists()


@pytest.mark.parametrize("args, words", [
    (["init=pixeldit"], "mode=distill needs a teacher"),
    (["init=released", "feature_block=14"], "feature_block must be in [0, 13]"),
    (["init=released", "student_input=rollout"], "student_input must be one of teacher_forcing, self_rollout"),
    (["init=released", f"val_manifest={Path(__file__).resolve().parents[1] / 'assets' / 'clean_image_manifest.jsonl'}",
      "val_steps=5"], "val_steps must be 1..4 with mode=distill"),
])
def test_distill_bad_input_is_one_line_and_exit_2(tmp_path, args, words):
    images = make_images(tmp_path / "images")
    done = run_module("pid.train", "mode=distill", f"data={images}", "resolution=64", f"output_dir={tmp_path}/runs",
                      *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], done.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------------------
# Distillation runs


@pytest.mark.slow
def test_tiny_distillation_run_through_the_cli(tmp_path):
    """12 iterations (2 student steps, 10 fake-score + discriminator steps) as a user launches them: every network
    the phase trains moves, the teacher's file is untouched, metrics carry the distillation curves."""
    prepare(tmp_path)
    done = subprocess.run([sys.executable, HARNESS, str(tmp_path), *DISTILL, "steps=12", "ckpt_every=12",
                           "log_every=6", "lr=1e-3", "fake_score_lr=1e-3", "discriminator_lr=1e-3"],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "flux_distill"
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [6, 12] and records[-1]["student_steps"] == 2
    for key in ("loss_vsd", "loss_gan_gen", "loss_dsm", "loss_gan_disc", "loss_r1", "discriminator_accuracy",
                "grad_norm_student", "grad_norm_fake_score", "lr", "lr_fake_score", "lr_discriminator", "ema_beta",
                "gan_weight", "images_per_s", "peak_memory_gib"):
        assert key in records[-1], key
    assert 0.0 <= records[-1]["discriminator_accuracy"] <= 1.0 and records[-1]["loss_dsm"] > 0
    assert records[-1]["gan_weight"] == pytest.approx(0.05 * 11 / 100)
    saved = _checkpoint(run_dir)
    from pid.training.checkpoint import read_init_weights

    init = {k: v.float() for k, v in read_init_weights(tmp_path / "init.pth").items()}
    for prefix in ("model.student.", "model.fake_score.", "ema.net."):
        moved = [k for k, v in saved.items() if k.startswith(prefix) and not torch.equal(v, init[k[len(prefix):]])]
        assert moved, prefix
    assert any(k.startswith("model.discriminator.") for k in saved)
    assert not any("teacher" in k for k in saved)  # the frozen teacher is reloaded from init, never saved
    assert {k.split(".")[1] for k in saved if k.startswith("optim.")} >= {"student", "fake_score", "discriminator"}
    meta = json.loads((run_dir / "checkpoints" / "step_000000012" / "meta.json").read_text())
    assert set(meta["schedulers"]) == {"student", "fake_score", "discriminator"}


@pytest.mark.slow
def test_distill_ctrl_c_checkpoints_the_current_iteration_exits_130_and_a_rerun_resumes(tmp_path):
    """Ctrl-C mid-distillation: the iteration finishes, a checkpoint of it is written, the exit code is 130 and
    the log names the signal; the same command again resumes at that iteration."""
    from pid.training.checkpoint import latest_step

    prepare(tmp_path)
    run_dir = tmp_path / "runs" / "flux_distill"
    args = [*DISTILL, "log_every=1", "ckpt_every=1000", "lr=1e-3"]
    proc = subprocess.Popen([sys.executable, HARNESS, str(tmp_path), *args, "steps=1000"], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").is_file():  # distillation has started (iteration 1 logged)
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    stopped = re.search(r"stopped by SIGINT at iteration (\d+)", stderr)
    assert stopped, stderr[-2000:]
    step = int(stopped.group(1))
    assert 1 <= step < 1000 and latest_step(run_dir) == step
    assert not list((run_dir / "checkpoints").glob("*.partial"))
    rerun = subprocess.run([sys.executable, HARNESS, str(tmp_path), *args, f"steps={step + 1}"], env=cli_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"at step {step}" in rerun.stderr and latest_step(run_dir) == step + 1


@pytest.mark.slow
def test_distill_kill_then_rerun_equals_an_uninterrupted_run_bit_for_bit(tmp_path):
    args = [*DISTILL, "steps=14", "ckpt_every=4", "log_every=7", "keep_checkpoints=2", "lr=1e-3"]
    prepare(tmp_path)
    env = cli_env()
    run_dir = tmp_path / "runs" / "flux_distill"
    proc = subprocess.Popen([sys.executable, HARNESS, str(tmp_path), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "latest").is_file():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from pid.training.checkpoint import latest_step

    killed_at = latest_step(run_dir)
    assert killed_at is not None and 0 < killed_at < 14
    rerun = subprocess.run([sys.executable, HARNESS, str(tmp_path), *args], env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"at step {killed_at}" in rerun.stderr
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    os.symlink(tmp_path / "images", fresh / "images")
    os.symlink(tmp_path / "init.pth", fresh / "init.pth")
    assert train(fresh, *args) == 0
    resumed, straight = _checkpoint(run_dir), _checkpoint(fresh / "runs" / "flux_distill")
    assert resumed.keys() == straight.keys() and len(resumed) > 50
    different = [k for k in resumed if not torch.equal(resumed[k], straight[k])]
    assert not different, different[:5]


@pytest.mark.slow
def test_distill_two_gloo_ranks_equal_one_rank_with_the_same_global_batch(tmp_path):
    """2 ranks x 1 image (FSDP2, as several processes run) against 1 rank x 1 image x grad_accum 2, over a student
    and a fake-score iteration: the same student EMA, fake score and discriminator to fp32 rounding."""
    prepare(tmp_path)
    common = ["mode=distill", "warmup_steps=0", "steps=2", "ckpt_every=2", "log_every=2", "batch_size=1",
              "lr=1e-3", "fake_score_lr=1e-3", "discriminator_lr=1e-3"]
    env = cli_env(OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           HARNESS, str(tmp_path), *common, "run_name=two"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert train(tmp_path, *common, "grad_accum=2", "run_name=one") == 0
    two, one = _checkpoint(tmp_path / "runs" / "two"), _checkpoint(tmp_path / "runs" / "one")
    keys = [k for k in one if k.startswith(("ema.", "model."))]
    assert len(keys) > 50 and set(keys) <= set(two)
    for key in keys:
        scale = float(one[key].abs().max()) + 1e-8
        assert float((two[key] - one[key]).abs().max()) <= 1e-4 * scale, key
    m2, m1 = _metrics(tmp_path / "runs" / "two")[-1], _metrics(tmp_path / "runs" / "one")[-1]
    for key in ("loss_vsd", "loss_dsm", "loss_gan_disc"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5), key


@pytest.mark.slow
def test_exported_student_runs_in_from_clean_with_4_steps(tmp_path, hub_cache_env):
    make_images(tmp_path / "images")
    make_init(tmp_path / "init.pth")
    assert train(tmp_path, *DISTILL, "steps=7", "ckpt_every=7", "lr=1e-3") == 0
    run_dir = tmp_path / "runs" / "flux_distill"
    exported = tmp_path / "student.safetensors"
    done = run_module("pid.train.export", str(run_dir), "--out", str(exported))
    assert done.returncode == 0, done.stderr
    from safetensors import safe_open

    with safe_open(str(exported), framework="pt") as handle:
        meta = handle.metadata()
        keys = list(handle.keys())
    assert meta["pid.train.mode"] == "distill" and meta["pid.sampler"] == "distilled"
    assert meta["pid.distilled_steps"] == "4" and meta["pid.ckpt_type"] == "2kto4k_v1pt5"
    assert not any("aux_rgb" in k for k in keys)  # the student has no training-only head, like a released one
    out = tmp_path / "fc"
    done = run_module("pid.inference.from_clean", "backbone=flux", "pid_ckpt_type=2kto4k_v1pt5", "pid_steps=4",
                      f"pid_checkpoint={exported}", f"input_path={tmp_path / 'images' / 'img0.png'}",
                      "prompt=a photo of cat", f"output_dir={out}", "plot=false", "report=false", env=hub_cache_env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(out.rglob("pid/sigma_0.000/*.png"))) == 1
    # without pid_ckpt_type= the file's own type is used, at any of the distilled sampler's 1..4 steps
    done = run_module("pid.inference.from_clean", "backbone=flux", "pid_steps=1", f"pid_checkpoint={exported}",
                      f"input_path={tmp_path / 'images' / 'img0.png'}", "prompt=a photo of cat",
                      f"output_dir={tmp_path / 'fc1'}", "plot=false", "report=false", env=hub_cache_env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "is a 2kto4k_v1pt5 decoder (its metadata)" in done.stderr
    assert len(list((tmp_path / "fc1").rglob("pid/sigma_0.000/*.png"))) == 1
    # from_ldm: a Z-Image-Turbo pipeline (FLUX.1's latent space) decoded by the student, as a released one
    from tiny_pipelines import tiny_call_overrides

    ldm_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in tiny_call_overrides("zimage-turbo").items()}
    done = run_module("pid.inference.from_ldm", "backbone=zimage-turbo", "prompt=a red fox", "resolution=256",
                      "ldm_steps=2", "pid_steps=2", "device=cpu", "dtype=fp32", f"pid_checkpoint={exported}",
                      f"output_dir={tmp_path / 'ldm'}", f"ldm_kwargs={json.dumps(ldm_kwargs)}", "report=false",
                      env=hub_cache_env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "is a 2kto4k_v1pt5 decoder (its metadata)" in done.stderr
    assert len(list((tmp_path / "ldm").rglob("pid/step_x0/*.png"))) == 1


@pytest.mark.slow
def test_an_exported_student_decodes_exactly_as_a_released_student_with_its_weights_and_attaches(tmp_path):
    """The export is a released student in all but its weights: `PiDDecoder.from_pretrained(checkpoint=...)`
    reads its type from the file and decodes at 1..4 steps exactly as the released 2kto4k_v1pt5 record over the
    same network does; `pid.attach` takes it for a pipeline of its latent space."""
    import pid
    from pid.checkpoints import lookup
    from pid.decoder import PiDDecoder

    from tiny import tiny_caption_encoder
    from tiny_pipelines import TINY_SIZE, make_tiny_pipeline, tiny_call_overrides

    prepare(tmp_path)
    assert train(tmp_path, *DISTILL, "steps=3", "ckpt_every=3", "lr=1e-3") == 0
    exported = tmp_path / "student.safetensors"
    done = run_module("pid.train.export", str(tmp_path / "runs" / "flux_distill"), "--out", str(exported),
                      "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    text = tiny_caption_encoder()
    student = PiDDecoder.from_pretrained(checkpoint=exported, device="cpu", text_encoder=text)
    assert (student.record.backbone, student.record.ckpt_type, student.record.sampler) == \
        ("flux", "2kto4k_v1pt5", "distilled")
    released = PiDDecoder(student.net, lookup("flux", "2kto4k_v1pt5"), text)
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    decodes = []
    for steps in (1, 2, 3, 4):
        mine = student.decode(latent, "a red fox", steps=steps, seed=3)
        assert torch.equal(mine, released.decode(latent, "a red fox", steps=steps, seed=3)), steps
        assert mine.shape == (1, 3, 256, 256) and torch.isfinite(mine).all()
        decodes.append(mine)
    assert all(not torch.equal(a, b) for a, b in zip(decodes, decodes[1:]))  # each step count samples anew
    piped = pid.attach(make_tiny_pipeline("zimage-turbo"), student, backbone="zimage-turbo")
    kwargs = {**tiny_call_overrides("zimage-turbo"), "height": TINY_SIZE, "width": TINY_SIZE,
              "num_inference_steps": 2, "generator": torch.Generator("cpu").manual_seed(0)}
    image = piped("a red fox", output_type="pt", pid_steps=4, **kwargs).images
    assert image.shape == (1, 3, TINY_SIZE * 4, TINY_SIZE * 4) and torch.isfinite(image).all()

