"""Distillation memory: FSDP2 sharding of student / fake score / discriminator on several processes, and
`teacher_offload=true` (the teacher on the CPU between uses). Driven as a user drives them: torchrun over
tests/train_harness.py (gloo, CPU), the trainer's CLI arguments, `python -m pid.train.export`, the dry run."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_driver import cli_env, run_module
from train_harness import make_images, prepare, train

HARNESS = str(Path(__file__).resolve().parent / "train_harness.py")
# 3 iterations with a student step on each side of iteration 1 (student, fake score + discriminator, student)
COMMON = ["mode=distill", "warmup_steps=0", "steps=3", "student_update_freq=2", "ckpt_every=1", "log_every=1",
          "batch_size=1", "lr=1e-3", "fake_score_lr=1e-3", "discriminator_lr=1e-3"]


def _torchrun(work: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           HARNESS, str(work), *args], env=cli_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every tensor of the latest checkpoint, and how many chunks (one per rank holding a shard) each has."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pid.training.checkpoint import _dcp_load, latest_checkpoint

    folder = latest_checkpoint(run_dir)
    assert folder is not None, f"no checkpoint in {run_dir}"
    items = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    items = {k: v for k, v in items.items() if isinstance(v, TensorStorageMetadata)}
    tensors = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in items.items()}
    _dcp_load(tensors, folder)
    return tensors, {k: len(v.chunks) for k, v in items.items()}


def _export(run_dir: Path, out: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    done = run_module("pid.train.export", str(run_dir), "--out", str(out), "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    with safe_open(str(out), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


# ------------------------------------------------------------------------------------------------------------
# FSDP2


@pytest.mark.slow
def test_fsdp2_two_ranks_equal_one_rank_and_export_the_same_student(tmp_path):
    """2 ranks x 1 image under FSDP2 against 1 rank x 1 image x grad_accum 2 (the single-process run DDP would
    equal): the blocks are stored as 2 shards, every trained network and the student EMA agree to fp32 rounding,
    and the exported students hold the same tensors and metadata. With a held-out set the teacher's reference
    decodes and the student's (from an unsharded copy of its sharded EMA) are split over the ranks, and
    val.jsonl holds what one process writes."""
    from val_records import assert_same_validation, held_out_with_an_unreadable_image

    prepare(tmp_path)
    validation = [f"val_manifest={held_out_with_an_unreadable_image(tmp_path)}", "val_every=2",
                  "val_sigmas=0,0.3", "val_images=2", "val_teacher_steps=3"]
    _torchrun(tmp_path, *COMMON, *validation, "run_name=two")
    assert train(tmp_path, *COMMON, *validation, "grad_accum=2", "run_name=one") == 0
    two_dir, one_dir = tmp_path / "runs" / "two", tmp_path / "runs" / "one"
    rows = assert_same_validation(two_dir, one_dir, ("ema", "teacher"), saved=2)
    assert [(r["step"], r["sigma"]) for r in rows] == [(2, 0.0), (2, 0.3), (3, 0.0), (3, 0.3)]
    assert rows[0]["ema"]["psnr_vs_teacher"] != rows[2]["ema"]["psnr_vs_teacher"]  # the student moved
    teacher = sorted(p.name for p in (two_dir / "val" / "teacher").iterdir())
    assert teacher == [f"{i}_sigma_{s}.png" for i in ("000_img0", "002_img1", "003_img2") for s in ("0.000", "0.300")]
    for name in teacher:  # the same frozen teacher on both: the same 8-bit decodes, rank 1's among them
        assert (two_dir / "val" / "teacher" / name).read_bytes() == (one_dir / "val" / "teacher" / name).read_bytes()
    (two, chunks), (one, _) = _checkpoint(tmp_path / "runs" / "two"), _checkpoint(tmp_path / "runs" / "one")
    sharded = [k for k, n in chunks.items() if n == 2 and ".patch_blocks." in k]
    assert any(k.startswith("model.fake_score.") for k in sharded) and any(k.startswith("ema.") for k in sharded)
    assert any(k.startswith("model.student.") for k in sharded)
    keys = [k for k in one if k.startswith(("ema.", "model."))]
    assert len(keys) > 50 and set(keys) == {k for k in two if k.startswith(("ema.", "model."))}
    assert any(k.startswith("model.discriminator.") for k in keys)
    for key in keys:
        scale = float(one[key].abs().max()) + 1e-8
        assert float((two[key] - one[key]).abs().max()) <= 1e-4 * scale, key
    exported_two, meta_two = _export(tmp_path / "runs" / "two", tmp_path / "two.safetensors")
    exported_one, meta_one = _export(tmp_path / "runs" / "one", tmp_path / "one.safetensors")
    assert meta_two == meta_one and meta_two["pid.train.mode"] == "distill"
    assert exported_two.keys() == exported_one.keys() and len(exported_one) > 50
    for key, tensor in exported_one.items():
        assert exported_two[key].dtype == tensor.dtype and exported_two[key].shape == tensor.shape, key
        scale = float(tensor.abs().max()) + 1e-8
        assert float((exported_two[key] - tensor).abs().max()) <= 1e-4 * scale, key


@pytest.mark.slow
def test_fsdp2_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path):
    """Stopped after a student iteration that followed a discriminator update, then resumed from its sharded
    checkpoint (three networks, three optimisers, the DTensor EMA), 2 ranks under FSDP2 reach exactly the
    uninterrupted run's state (iterations: student, fake score, student | fake score, student). The resumed run
    validates (the unsharded copy, the all-gathered EMA, the split decodes) and the uninterrupted one does not:
    validation changes nothing in training."""
    from val_records import held_out_with_an_unreadable_image, val_rows

    prepare(tmp_path)
    validation = [f"val_manifest={held_out_with_an_unreadable_image(tmp_path)}", "val_every=2", "val_images=1",
                  "val_teacher_steps=2"]
    _torchrun(tmp_path, *COMMON, "steps=5", "run_name=straight")
    _torchrun(tmp_path, *COMMON, *validation, "steps=3", "run_name=resumed")
    assert any(k.startswith("model.discriminator.") for k in _checkpoint(tmp_path / "runs" / "resumed")[0])
    _torchrun(tmp_path, *COMMON, *validation, "steps=5", "run_name=resumed")
    assert [r["step"] for r in val_rows(tmp_path / "runs" / "resumed")] == [2, 3, 4, 5]
    (resumed, _), (straight, _) = _checkpoint(tmp_path / "runs" / "resumed"), _checkpoint(tmp_path / "runs" / "straight")
    assert resumed.keys() == straight.keys() and len(resumed) > 50
    assert any(k.startswith("optim.") for k in resumed)
    different = [k for k in resumed if not torch.equal(resumed[k], straight[k])]
    assert not different, different[:5]
    start, _ = _checkpoint_at(tmp_path / "runs" / "straight", 3)
    for prefix in ("model.discriminator.", "ema."):  # the resumed iterations trained both: not a vacuous comparison
        assert any(not torch.equal(straight[k], start[k]) for k in straight if k.startswith(prefix)), prefix


def _checkpoint_at(run_dir: Path, step: int):
    from pid.training.checkpoint import LATEST, checkpoint_root, step_name

    (checkpoint_root(run_dir) / LATEST).write_text(step_name(step) + "\n")
    return _checkpoint(run_dir)


# ------------------------------------------------------------------------------------------------------------
# Teacher offload


@pytest.mark.parametrize("checkpointed", [False, True])
def test_offloaded_teacher_computes_what_the_resident_one_does_bit_for_bit(checkpointed):
    """The offload hooks (per block, CPU -> device -> CPU, here CPU both ways) change no number of a grad-mode
    call's output or input gradient; weights autograd saved come back from their CPU tensors, or, with activation
    checkpointing, recomputed blocks are moved in again in the backward pass."""
    from torch.distributed._composable import checkpoint

    from pid.training.distill_parallel import TeacherOffload

    from tiny import tiny_net

    resident = tiny_net("v1pt5_latent16ch").eval().requires_grad_(False)
    blocks = len(resident.patch_blocks) + len(resident.pixel_blocks)
    if checkpointed:
        for block in [*resident.patch_blocks, *resident.pixel_blocks]:
            checkpoint(block)
    offloaded = copy.deepcopy(resident)
    weights = {name: p for name, p in offloaded.named_parameters()}
    offload = TeacherOffload(offloaded, torch.device("cpu"), checkpointed=checkpointed)
    generator = torch.Generator().manual_seed(0)
    x, caption = torch.randn(1, 3, 32, 32, generator=generator), torch.randn(1, 4, 32, generator=generator)
    lq_latent = torch.randn(1, 16, 4, 4, generator=generator)
    results = []
    for net in (resident, offloaded):
        x_in = x.clone().requires_grad_(True)
        out = net(x_in, torch.tensor([500.0]), caption, lq_latent, 0.0, train_outputs=True, feature_blocks=(1,))
        loads_after_forward = offload.loads
        (out.velocity.square().mean() + out.block_features[0].mean()).backward()
        results.append((out.velocity, x_in.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert loads_after_forward == 1 + blocks  # the network's rest once, each block once
    if checkpointed:
        assert offload.loads > loads_after_forward and offload.packed == 0
    else:
        assert offload.loads == loads_after_forward and offload.packed > blocks
    assert all(weights[name] is p for name, p in offloaded.named_parameters())  # the CPU weights are back


@pytest.mark.slow
def test_teacher_offload_run_equals_a_resident_teacher_run_bit_for_bit(tmp_path):
    prepare(tmp_path)
    args = [*COMMON, "batch_size=2"]
    assert train(tmp_path, *args, "run_name=resident") == 0
    assert train(tmp_path, *args, "teacher_offload=true", "run_name=offload") == 0
    saved = json.loads((tmp_path / "runs" / "offload" / "run.json").read_text())
    assert saved["plan"]["distill"]["teacher_offload"] is True
    assert "teacher_offload" not in saved["identity"]["distill"]  # where the teacher lives: not another run
    (offload, _), (resident, _) = _checkpoint(tmp_path / "runs" / "offload"), _checkpoint(tmp_path / "runs" / "resident")
    assert offload.keys() == resident.keys() and len(offload) > 50
    different = [k for k in offload if not torch.equal(offload[k], resident[k])]
    assert not different, different[:5]


def test_dry_run_shows_teacher_offload_and_its_smaller_memory(tmp_path):
    """The option is in the plan and lowers the teacher's share of every row of the memory table; on 2 processes
    the plan says FSDP2 and its total is the sharded column's."""
    images = make_images(tmp_path / "images")
    env = cli_env(HF_HUB_CACHE=str(tmp_path / "hf"), HF_HOME=str(tmp_path / "home"))
    plans = {}
    for offload in ("false", "true"):
        done = run_module("pid.train", "mode=distill", "init=released", f"data={images}", "resolution=64",
                          f"output_dir={tmp_path}/runs", f"teacher_offload={offload}", "--dry_run",
                          env={**env, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
        assert done.returncode == 0, done.stderr
        plans[offload] = json.loads(done.stdout)
    assert plans["true"]["distill"]["teacher_offload"] is True and plans["false"]["distill"]["teacher_offload"] is False
    assert "fsdp2" in plans["true"]["parallelism"] and "offloaded" in plans["true"]["parallelism"]
    on, off = (plans[k]["estimated_peak_memory_per_gpu"] for k in ("true", "false"))
    assert on["teacher_offload"] and not off["teacher_offload"]
    assert on["total_gib"] == on["by_gpu_count"]["2_gpu"]["fsdp2_sharded"]["total_gib"]
    for gpus in ("1_gpu", "2_gpu", "4_gpu", "8_gpu"):
        for column in ("ddp", "fsdp2_sharded"):
            a, b = on["by_gpu_count"][gpus][column], off["by_gpu_count"][gpus][column]
            assert a["teacher_gib"] < b["teacher_gib"] / 4 and a["total_gib"] < b["total_gib"], (gpus, column)
            assert a["activations_gib"] == b["activations_gib"]
    sharded = [off["by_gpu_count"][f"{n}_gpu"]["fsdp2_sharded"]["total_gib"] for n in (1, 2, 4, 8)]
    assert sharded == sorted(sharded, reverse=True) and sharded[-1] < sharded[0]
    assert not (tmp_path / "runs").exists()
