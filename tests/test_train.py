"""The trainer driven as a user drives it: `python -m pid.train` (help, dry run, bad input), a tiny run that
overfits, kill -9 then rerun equals an uninterrupted run bit for bit, 2 gloo ranks equal 1, and an exported
file decodes in from_clean (tiny stand-ins throughout; tests/train_harness.py)."""

from __future__ import annotations

import json
import os
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


def _ema(run_dir: Path) -> dict[str, torch.Tensor]:
    from pid.training.checkpoint import latest_checkpoint, read_ema

    folder = latest_checkpoint(run_dir)
    assert folder is not None, f"no checkpoint in {run_dir}"
    return read_ema(folder)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------------
# The front door


def test_help_lists_the_options_and_exit_codes():
    done = run_module("pid.train", "--help")
    assert done.returncode == 0, done.stderr
    for word in ("mode={teacher|full|distill}", "init=<text>", "data=<path>", "grad_accum=<int>", "ckpt_every=<int>",
                 "130 interrupted", "--dry_run"):
        assert word in done.stdout


def test_dry_run_prints_the_plan_and_loads_nothing(tmp_path):
    images = make_images(tmp_path / "images")
    empty_cache = tmp_path / "hf"  # offline with an empty hub cache: any load or download would fail
    env = cli_env(HF_HUB_CACHE=str(empty_cache), HF_HOME=str(tmp_path / "home"))
    out = tmp_path / "runs"
    done = run_module("pid.train", "backbone=flux", f"data={images}", "resolution=64", f"output_dir={out}",
                      "batch_size=2", "grad_accum=3", "--dry_run", env=env)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["mode"] == "teacher" and plan["init"]["kind"] == "pixeldit"
    assert plan["init"].get("path") is None and "hf download nvidia/PiD" in plan["init"]["download_command"]
    # the shipped flux v1.5 teacher (spec §a.2): 98,829,376 trainable of 1,401,300,163
    assert plan["trainable_params"] == 98_829_376
    assert plan["trainable_params"] + plan["frozen_params"] == 1_401_300_163
    assert plan["data"]["size"] == 4 and plan["data"]["buckets"]["1,1"]["count"] == 4
    assert plan["global_batch"] == 6 and plan["steps"] == 30000
    assert plan["estimated_peak_memory_per_gpu"]["total_gib"] > 0
    assert plan["output_dir"] == str(out / "flux_teacher")
    assert not out.exists() and not empty_cache.exists()


def test_dry_run_full_mode_counts(tmp_path):
    images = make_images(tmp_path / "images")
    done = run_module("pid.train", "mode=full", f"data={images}", "resolution=64", f"output_dir={tmp_path}/runs",
                      "--dry_run")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    # everything but the last block's output-only text branch (spec §a.3 count + the aux RGB head)
    assert plan["trainable_params"] == 1_378_962_579 + 1_100_848
    assert plan["lr"] == 1e-5 and plan["weight_decay"] == 0.0


@pytest.mark.parametrize("args, words", [
    (["mode=student"], "mode must be one of teacher, full"),
    (["steps=0"], "steps must be >= 1"),
    (["caption_dropout=1.5"], "caption_dropout must be in [0, 1]"),
    (["init=/nonexistent/weights.pth"], "init '/nonexistent/weights.pth' is neither"),
    (["--no_such_flag", "1"], "unknown flag --no_such_flag"),
    (["resolution=100"], "multiple of 64"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, words):
    images = make_images(tmp_path / "images")
    done = run_module("pid.train", f"data={images}", f"output_dir={tmp_path}/runs", *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], done.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_data_is_one_line(tmp_path):
    done = run_module("pid.train", f"output_dir={tmp_path}/runs")
    assert done.returncode == 2 and "data=" in done.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.slow
def test_tiny_network_overfits_four_images(tmp_path):
    """The teacher recipe (losses, draws, AdamW, EMA) on 4 images: the loss falls >= 5x in 200 steps."""
    assert train(tmp_path, "mode=full", "lr=3e-3", "batch_size=4", "steps=200", "log_every=10",
                 "ckpt_every=1000") == 0
    records = _metrics(tmp_path / "runs" / "flux_full")
    first, last = records[0]["loss_total"], records[-1]["loss_total"]
    assert first / last >= 5.0, (first, last)
    assert records[-1]["step"] == 200 and all(r["skipped_steps"] == 0 for r in records)
    assert {"loss_diffusion", "loss_align", "lr", "grad_norm", "ema_beta", "images_per_s", "peak_memory_gib",
            "skipped_items"} <= set(records[-1])


@pytest.mark.slow
def test_kill_then_rerun_equals_an_uninterrupted_run_bit_for_bit(tmp_path):
    args = ["steps=16", "ckpt_every=2", "log_every=4", "keep_checkpoints=2"]
    prepare(tmp_path)
    env = cli_env()
    run_dir = tmp_path / "runs" / "flux_teacher"
    # a process killed with SIGKILL as soon as its first checkpoint is complete
    proc = subprocess.Popen([sys.executable, HARNESS, str(tmp_path), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "latest").is_file():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    from pid.training.checkpoint import latest_step

    killed_at = latest_step(run_dir)
    assert killed_at is not None and 0 < killed_at < 16
    # the same command again resumes
    rerun = subprocess.run([sys.executable, HARNESS, str(tmp_path), *args], env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"at step {killed_at}" in rerun.stderr
    # an uninterrupted run in a fresh folder
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    os.symlink(tmp_path / "images", fresh / "images")
    os.symlink(tmp_path / "init.pth", fresh / "init.pth")
    assert train(fresh, *args) == 0
    resumed, straight = _ema(run_dir), _ema(fresh / "runs" / "flux_teacher")
    assert resumed.keys() == straight.keys() and len(resumed) > 10
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)
    first = _ema(fresh / "runs" / "flux_teacher")
    assert not all(torch.equal(first[k], v) for k, v in make_init_state(tmp_path).items() if k in first)


def make_init_state(work: Path) -> dict[str, torch.Tensor]:
    from pid.training.checkpoint import read_init_weights

    return {k: v.float() for k, v in read_init_weights(work / "init.pth").items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["teacher", "full"])
def test_two_gloo_ranks_equal_one_rank_with_the_same_global_batch(tmp_path, mode):
    """2 ranks x 1 image (teacher: DDP; full: FSDP2) against 1 rank x 1 image x grad_accum 2: same images, same
    draws, the same EMA to float rounding. With a held-out set every rank validates its share (DDP: the EMA
    swapped into each replica; FSDP2: an unsharded copy) and val.jsonl holds what one process writes."""
    from val_records import assert_same_validation, held_out_with_an_unreadable_image

    prepare(tmp_path)
    manifest = held_out_with_an_unreadable_image(tmp_path)
    common = ["steps=2", "ckpt_every=2", "log_every=2", "batch_size=1", f"mode={mode}", f"val_manifest={manifest}",
              "val_every=1", "val_steps=2", "val_sigmas=0,0.3", "val_images=2"]
    done = _torchrun(tmp_path, *common, "run_name=two")
    assert "validation is not run" not in done.stderr
    assert train(tmp_path, *common, "grad_accum=2", "run_name=one") == 0
    two_dir, one_dir = tmp_path / "runs" / "two", tmp_path / "runs" / "one"
    two, one = _ema(two_dir), _ema(one_dir)
    assert two.keys() == one.keys() and len(one) > 10
    for key in one:  # gradient sums in another order: equal to fp32 rounding, relative to each tensor's scale
        scale = float(one[key].abs().max()) + 1e-8
        assert float((two[key] - one[key]).abs().max()) <= 1e-4 * scale, key
    losses_two, losses_one = _metrics(two_dir), _metrics(one_dir)
    assert losses_two[-1]["loss_total"] == pytest.approx(losses_one[-1]["loss_total"], rel=1e-5)

    rows = assert_same_validation(two_dir, one_dir, ("ema", "init"), saved=2)
    assert rows[-1]["ema"]["psnr"] != rows[-1]["init"]["psnr"]  # the EMA moved: not the init scored twice
    for name in ("000_img0", "002_img1"):  # saved by rank 0 and by rank 1
        assert (two_dir / "val" / "target" / f"{name}.png").is_file()
        assert (two_dir / "val" / "init" / f"{name}_sigma_0.300.png").is_file()
    assert not (two_dir / "val" / "target" / "003_img2.png").exists()  # val_images=2
    cached = two_dir / "val" / "init.json"
    assert json.loads(cached.read_text())["identity"] == json.loads((one_dir / "val" / "init.json").read_text())["identity"]


def _torchrun(work: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           HARNESS, str(work), *args], env=cli_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_export_loads_in_from_clean_and_decodes_differently(tmp_path, hub_cache_env):
    make_images(tmp_path / "images")
    make_init(tmp_path / "init.pth")
    assert train(tmp_path, "steps=3", "ckpt_every=3", "lr=1e-3") == 0
    run_dir = tmp_path / "runs" / "flux_teacher"
    done = run_module("pid.train.export", str(run_dir), "--out", str(tmp_path / "mine.safetensors"))
    assert done.returncode == 0, done.stderr
    exported = tmp_path / "mine.safetensors"
    from safetensors import safe_open

    with safe_open(str(exported), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["pid.backbone"] == "flux" and meta["pid.train.step"] == "3" and "pid.net_config" in meta
    again = run_module("pid.train.export", str(run_dir), "--out", str(exported))
    assert again.returncode == 2 and "--overwrite" in again.stderr

    # it loads in from_clean as a user passes it (pid_checkpoint=), with the undistilled sampler of a teacher
    out = tmp_path / "fc"
    done = run_module("pid.inference.from_clean", "backbone=flux", "pid_ckpt_type=undistilled", "pid_steps=2",
                      f"pid_checkpoint={exported}", f"input_path={tmp_path / 'images' / 'img0.png'}",
                      "prompt=a photo of cat", f"output_dir={out}", "plot=false", "report=false", env=hub_cache_env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(out.rglob("pid/sigma_0.000/*.png"))) == 1
    # and decodes differently from its init (same latent, caption and seed)
    from pid.checkpoints import load_network_weights, lookup
    from pid.decoder import PiDDecoder
    from pid.models import build_pid_net

    from tiny import tiny_caption_encoder

    record = lookup("flux", "undistilled")
    latent = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(0))
    images = {}
    for name, weights in (("exported", exported), ("init", tmp_path / "init.pth")):
        cfg, state = load_network_weights(weights, record)
        decoder = PiDDecoder(build_pid_net(cfg, state_dict=state), record, tiny_caption_encoder(num_tokens=16))
        images[name] = decoder.decode(latent, caption="a photo of cat", steps=2, seed=0)
    assert images["exported"].shape == images["init"].shape == (1, 3, 64, 64)
    assert (images["exported"] - images["init"]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["teacher", "full"])
def test_activation_checkpointing_trains_exactly_as_without(tmp_path, mode):
    """Recomputing each block's activations in the backward changes memory, not numbers: same losses, gradient
    norms and EMA weights, bit for bit on the CPU."""
    from torch.distributed._composable import checkpoint

    from pid.train.run import build_network
    from pid.training.checkpoint import read_init_weights

    from train_harness import plan_for

    prepare(tmp_path)
    common = [f"mode={mode}", "steps=3", "log_every=1", "ckpt_every=3", "lr=1e-3"]
    # the option reaches every transformer block (else the comparison below would be trivially equal)
    plan = plan_for(tmp_path, *common, "activation_checkpointing=true")
    init = tmp_path / "init.pth"
    net = build_network(plan, read_init_weights(init), str(init), torch.device("cpu"))
    blocks = [*net.patch_blocks, *net.pixel_blocks]
    assert blocks and all(checkpoint.state(block) is not None for block in blocks)
    assert train(tmp_path, *common, "run_name=plain") == 0
    assert train(tmp_path, *common, "activation_checkpointing=true", "run_name=checkpointed") == 0
    plain, checkpointed = tmp_path / "runs" / "plain", tmp_path / "runs" / "checkpointed"
    keys = ("loss_total", "grad_norm")
    assert [{k: r[k] for k in keys} for r in _metrics(plain)] == [{k: r[k] for k in keys} for r in _metrics(checkpointed)]
    ema, ema_checkpointed = _ema(plain), _ema(checkpointed)
    assert ema.keys() == ema_checkpointed.keys()
    assert all(torch.equal(ema[k], ema_checkpointed[k]) for k in ema)


def test_data_loading_workers_change_no_number_and_the_dry_run_shows_them(tmp_path):
    """num_workers=2 decodes the images in two worker processes: the run's EMA is bit for bit the in-process
    run's (the default on the CPU, 0); the dry run shows the value, or the automatic default."""
    prepare(tmp_path)
    common = ["steps=3", "ckpt_every=3", "lr=1e-3"]
    assert train(tmp_path, *common, "num_workers=2", "run_name=workers") == 0
    assert train(tmp_path, *common, "run_name=inline") == 0
    from pid.train.setup import open_data

    from train_harness import plan_for

    assert open_data(plan_for(tmp_path, "num_workers=2"), 0, 1).num_workers == 2  # what the run above used
    assert open_data(plan_for(tmp_path), 0, 1).num_workers == 0  # the CPU's default
    workers, inline = _ema(tmp_path / "runs" / "workers"), _ema(tmp_path / "runs" / "inline")
    assert workers.keys() == inline.keys() and all(torch.equal(workers[k], inline[k]) for k in inline)
    args = [f"data={tmp_path / 'images'}", f"init={tmp_path / 'init.pth'}", "resolution=64",
            f"output_dir={tmp_path / 'runs'}", "--dry_run"]
    assert json.loads(run_module("pid.train", *args, "num_workers=3").stdout)["num_workers"] == 3
    assert json.loads(run_module("pid.train", *args).stdout)["num_workers"].startswith("auto")
    done = run_module("pid.train", *args, "num_workers=-1")
    assert done.returncode == 2 and done.stderr.strip() == "error: num_workers must be >= 0, got -1"
