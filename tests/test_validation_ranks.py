"""Validation on several processes: every rank decodes its share of the held-out set (with FSDP2, from an
unsharded copy holding the all-gathered EMA) and rank 0 writes what one process would. Driven as a user runs
it: torchrun over tests/train_harness.py (2 gloo ranks on CPU) against one process with the same global batch
(grad_accum 2), whose EMA equals the 2-rank run's to fp32 rounding (tests/test_train.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_driver import cli_env
from train_harness import make_images, prepare, train

HARNESS = str(Path(__file__).resolve().parent / "train_harness.py")
METRICS = ("psnr", "ssim", "delta_e2000")
DISTILL = ["mode=distill", "warmup_steps=0", "student_update_freq=2", "lr=1e-3", "fake_score_lr=1e-3",
           "discriminator_lr=1e-3", "val_teacher_steps=3"]


def _held_out(work: Path) -> Path:
    """Three readable held-out images and, second in the manifest, one that is not (rank 1's first share; a
    truncated file, skipped with a warning): the images' places in the set, their decode seeds, differ from
    their manifest lines."""
    make_images(work / "held", count=3)
    (work / "held" / "gone.png").write_bytes((work / "held" / "img0.png").read_bytes()[:40])
    lines = [{"image": "held/img0.png", "prompt": "a red fox"}, {"image": "held/gone.png", "prompt": "gone"},
             {"image": "held/img1.png", "prompt": "a blue lake, 湖"}, {"image": "held/img2.png", "prompt": ""}]
    manifest = work / "val.jsonl"
    manifest.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return manifest


def _torchrun(work: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           HARNESS, str(work), *args], env=cli_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "val.jsonl").read_text(encoding="utf-8").splitlines()]


def _same_scores(two: dict, one: dict, where: str) -> None:
    assert two.keys() == one.keys(), where
    for key, value in one.items():  # PSNR in dB, SSIM, ΔE: the EMAs agree to fp32 rounding
        assert two[key] == pytest.approx(value, abs=0.02), f"{where} {key}"


def _compare(two_dir: Path, one_dir: Path, weights: tuple[str, ...]) -> list[dict]:
    """The 2-rank run's val.jsonl holds what the 1-rank run's does: the same rows, images in the same order,
    the same saved files, scores equal to rounding."""
    two, one = _rows(two_dir), _rows(one_dir)
    assert [(r["step"], r["sigma"]) for r in two] == [(r["step"], r["sigma"]) for r in one] and len(one) >= 2
    for row_two, row_one in zip(two, one):
        where = f"step {row_one['step']} σ {row_one['sigma']}"
        assert [e["id"] for e in row_two["per_image"]] == ["000_img0", "002_img1", "003_img2"], where
        assert [e["id"] for e in row_one["per_image"]] == ["000_img0", "002_img1", "003_img2"], where
        for name in weights:
            _same_scores(row_two[name], row_one[name], f"{where} {name}")
            for a, b in zip(row_two["per_image"], row_one["per_image"]):
                _same_scores(a[name], b[name], f"{where} {name} {a['id']}")
        assert row_two["images"].keys() == row_one["images"].keys() == {"000_img0", "002_img1"}, where
        for path in row_two["images"].values():
            assert (two_dir / path).is_file(), path
    return two


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["teacher", "full"])
def test_two_ranks_validate_as_one_process_does(tmp_path, mode):
    """mode=teacher (DDP: the EMA swapped into each replica) and mode=full (FSDP2: an unsharded copy): each rank
    decodes its share; val.jsonl, the init's cached scores and the saved images are those of one process."""
    prepare(tmp_path)
    manifest = _held_out(tmp_path)
    common = [f"mode={mode}", "steps=2", "ckpt_every=2", "log_every=1", "batch_size=1", "lr=1e-3",
              f"val_manifest={manifest}", "val_every=1", "val_steps=2", "val_sigmas=0,0.3", "val_images=2"]
    done = _torchrun(tmp_path, *common, "run_name=two")
    assert "validation is not run" not in done.stderr
    assert train(tmp_path, *common, "grad_accum=2", "run_name=one") == 0
    two_dir, one_dir = tmp_path / "runs" / "two", tmp_path / "runs" / "one"
    rows = _compare(two_dir, one_dir, ("ema", "init"))
    assert rows[-1]["ema"]["psnr"] != rows[-1]["init"]["psnr"]  # the EMA moved: not the init scored twice
    for name in ("000_img0", "002_img1"):  # written by rank 0 and rank 1
        assert (two_dir / "val" / "target" / f"{name}.png").is_file()
        assert (two_dir / "val" / "init" / f"{name}_sigma_0.300.png").is_file()
    assert not (two_dir / "val" / "target" / "003_img2.png").exists()  # val_images=2
    init_two = json.loads((two_dir / "val" / "init.json").read_text(encoding="utf-8"))
    init_one = json.loads((one_dir / "val" / "init.json").read_text(encoding="utf-8"))
    assert init_two["identity"] == init_one["identity"]
    # a resumed 2-rank run reuses the cached init scores
    cached_at = (two_dir / "val" / "init.json").stat().st_mtime_ns
    _torchrun(tmp_path, *[a for a in common if a != "steps=2"], "steps=3", "run_name=two")
    assert (two_dir / "val" / "init.json").stat().st_mtime_ns == cached_at
    assert [r["step"] for r in _rows(two_dir)][-2:] == [3, 3]


@pytest.mark.slow
def test_two_ranks_validate_a_distillation_as_one_process_does(tmp_path):
    """mode=distill under FSDP2: the teacher's reference decodes split over the ranks and cached once, the
    student's EMA (sharded) scored from an unsharded copy; the records equal one process's."""
    prepare(tmp_path)
    manifest = _held_out(tmp_path)
    common = [*DISTILL, "steps=3", "ckpt_every=3", "log_every=1", "batch_size=1", f"val_manifest={manifest}",
              "val_every=2", "val_sigmas=0,0.3", "val_images=2"]
    _torchrun(tmp_path, *common, "run_name=two")
    assert train(tmp_path, *common, "grad_accum=2", "run_name=one") == 0
    two_dir, one_dir = tmp_path / "runs" / "two", tmp_path / "runs" / "one"
    rows = _compare(two_dir, one_dir, ("ema", "teacher"))
    assert [(r["step"], r["sigma"]) for r in rows] == [(2, 0.0), (2, 0.3), (3, 0.0), (3, 0.3)]
    assert set(rows[0]["ema"]) == {*METRICS, *(f"{m}_vs_teacher" for m in METRICS)}
    teacher = sorted(p.name for p in (two_dir / "val" / "teacher").iterdir())
    assert teacher == [f"{i}_sigma_{s}.png" for i in ("000_img0", "002_img1", "003_img2") for s in ("0.000", "0.300")]
    for name in teacher:  # the teacher is the same network on both: the same 8-bit decodes
        assert (two_dir / "val" / "teacher" / name).read_bytes() == (one_dir / "val" / "teacher" / name).read_bytes()
    assert rows[0]["ema"]["psnr_vs_teacher"] != rows[2]["ema"]["psnr_vs_teacher"]  # the student moved


def test_on_device_moves_a_network_for_the_block_and_repins_an_offloaded_teacher_after():
    import torch

    from pid.training.val_ranks import on_device

    class Recorded(torch.nn.Linear):
        def to(self, *args, **kwargs):
            events.append(torch.device(args[0]).type)
            return self

    class Offload:  # TeacherOffload's part on_device uses
        def repin(self) -> None:
            events.append("repin")

    events: list[str] = []
    net = Recorded(2, 2)
    with on_device(net, torch.device("meta")):  # a CPU copy: to the device for the block, back after
        assert events == ["meta"]
    assert events == ["meta", "cpu"]
    events.clear()
    with on_device(net, torch.device("cpu")):  # already there: nothing moves
        pass
    assert events == []
    net.offload = Offload()  # what TeacherOffload sets on the teacher
    with on_device(net, torch.device("meta")):
        pass
    assert events == ["meta", "cpu", "repin"]


def test_teacher_offload_repin_pins_every_weight_of_every_unit_again(monkeypatch):
    """After the whole teacher went to the GPU and back its CPU weights are unpinned: repin pins each one again
    (pinning needs CUDA: `pin_memory` is stood in for here)."""
    import torch

    from pid.training.distill_parallel import TeacherOffload

    from tiny import tiny_net

    teacher = tiny_net("v1pt5_latent16ch").eval().requires_grad_(False)
    offload = TeacherOffload(teacher, torch.device("cpu"))
    assert not offload.pin  # no CUDA: nothing to pin
    weights = [t for unit in offload.units for *_, t in unit.entries]
    assert len(weights) == len(list(teacher.parameters())) + len(list(teacher.buffers()))
    pinned: set[int] = set()

    def pin_memory(tensor):
        copy = tensor.clone()
        pinned.add(copy.data_ptr())
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda tensor: tensor.data_ptr() in pinned)
    offload.pin = True
    offload.repin()
    assert all(t.is_pinned() for t in weights if t.numel())
    again = {t.data_ptr() for t in weights}
    offload.repin()  # already pinned: nothing is copied again
    assert {t.data_ptr() for t in weights} == again
