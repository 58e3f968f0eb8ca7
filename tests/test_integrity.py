"""Finished work is never lost or corrupted (issue 16, points 1-5), driven through the CLIs as a user drives them:
bad settings are refused before a finished run folder changes, two settings never share a file, outputs show the
current inputs only, damaged or half-written files are redone, and a full disk, a read-only folder or an
unexpected exception end as one line per item and an honest exit code."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pid.inference import from_clean, from_ldm

from cli_driver import run_module
from tiny_pipelines import tiny_call_overrides

LDM = "pid.inference.from_ldm"
CLEAN = "pid.inference.from_clean"
TINY = ["backbone=zimage-turbo", "resolution=256", "ldm_steps=2", "pid_steps=1", "device=cpu", "dtype=fp32"]
PROMPTS = "a red fox in snow\na quiet harbour at dawn\n"


def _ldm_kwargs() -> str:
    return "ldm_kwargs=" + json.dumps({k: list(v) if isinstance(v, tuple) else v
                                       for k, v in tiny_call_overrides("zimage-turbo").items()})


def _cli(env, cwd, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path -> sha256."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(done) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, done.stderr[-3000:]
    return next(line for line in lines if line.startswith("error: "))


@pytest.fixture(scope="module")
def finished_ldm(hub_cache_env, tmp_path_factory):
    """A from_ldm run folder of two prompts, finished by the CLI (built once per module)."""
    root = tmp_path_factory.mktemp("finished")
    (root / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    done = _cli(hub_cache_env, root, LDM, *TINY, "prompt_file=prompts.txt", "output_dir=out", _ldm_kwargs())
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.fixture()
def ldm_run(finished_ldm, tmp_path):
    """A private copy of the finished run: (working folder, run folder, the command's arguments)."""
    shutil.copytree(finished_ldm, tmp_path / "w")
    work = tmp_path / "w"
    [run_dir] = (work / "out").iterdir()
    return work, run_dir, [LDM, *TINY, "prompt_file=prompts.txt", "output_dir=out", _ldm_kwargs()]


# ------------------------------------------------------------------------------------------------------------
# 1. A bad setting on a rerun changes nothing in the finished folder


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["pid_tile=-16", 'ldm_kwargs={"max_seq_len": 32}', "scale=0"])
def test_refused_rerun_leaves_a_finished_folder_byte_identical(ldm_run, hub_cache_env, bad):
    work, run_dir, args = ldm_run
    before = snapshot(run_dir)
    assert (run_dir / "failures.jsonl").read_text() == ""  # a clean run lists no failures, in an empty file
    done = _cli(hub_cache_env, work, *args, bad)
    assert done.returncode == 2
    line = _one_error_line(done)
    assert bad.split("=")[0].split("{")[0] in line or "max_seq_len" in line, line
    assert snapshot(run_dir) == before


def test_a_failed_redo_keeps_the_previous_result(tmp_path, monkeypatch):
    """The item's redo fails half-way (after its first image was written): the previous files and record stay."""
    from test_from_ldm import tiny_pid
    from test_front_door import _tiny_settings

    from tiny_pipelines import make_tiny_pipeline

    pipe, decoder = make_tiny_pipeline("sd3"), tiny_pid("sd3")
    assert from_ldm.run(_tiny_settings(tmp_path), pipe=pipe, decoder=decoder)["failed"] == []
    [run_dir] = tmp_path.iterdir()
    before = snapshot(run_dir)
    real_write, calls = from_ldm.write_image, []

    def full_disk_after_one(path, image, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real_write(path, image, **kw)

    monkeypatch.setattr(from_ldm, "write_image", full_disk_after_one)
    summary = from_ldm.run(_tiny_settings(tmp_path, "overwrite=true"), pipe=pipe, decoder=decoder)
    assert summary["exit_code"] == 1 and "no space left" in summary["failed"][0]["error"]
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k.startswith(("pid/", "vae/", "compare/", "records/"))} == \
        {k: v for k, v in before.items() if k.startswith(("pid/", "vae/", "compare/", "records/"))}
    assert not [p for p in run_dir.rglob("*.tmp")]


# ------------------------------------------------------------------------------------------------------------
# 2. Settings checked before any model loads, by --dry_run too


@pytest.mark.parametrize(("module", "bad", "expected"), [
    (LDM, "scale=0", "scale must be a positive integer"),
    (LDM, "scale=-2", "scale must be a positive integer"),
    (LDM, "pid_tile=-16", "pid_tile must be >= 1"),
    (LDM, "pid_chunk=-3", "pid_chunk must be >= 1"),
    (LDM, "seed=99999999999999999999999", "generator's range"),
    (LDM, "device=banana", "device must be cpu, cuda or cuda:N"),
    (LDM, 'ldm_kwargs={"max_seq_len": 32}', "did you mean max_sequence_length"),
    (LDM, "ldm_kwargs={height: 32}", "use resolution="),
    (LDM, "text_encoder=./no/such/gemma", "text_encoder no/such/gemma does not exist"),
    (LDM, "output_dir=/proc/pid-results", "cannot create files in /proc"),
    (CLEAN, "scale=0", "scale must be a positive integer"),
    (CLEAN, "pid_tile=0", "pid_tile must be >= 1"),
    (CLEAN, "degrade_sigmas=0.2,0.2001", "sigma_0.200"),
])
def test_bad_settings_fail_the_dry_run_in_one_line(module, bad, expected, tmp_path):
    inputs = ["prompt=x"] if module == LDM else ["input_path=x.png"]
    out = [] if "output_dir" in bad else [f"output_dir={tmp_path / 'out'}"]
    done = run_module(module, *inputs, *out, bad, "--dry_run", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert expected in _one_error_line(done)
    assert not (tmp_path / "out").exists()


def test_device_cuda_without_cuda_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = run_module(LDM, "prompt=x", "device=cuda", f"output_dir={tmp_path}", "--dry_run")
    assert done.returncode == 2 and "sees no CUDA device" in _one_error_line(done)


# ------------------------------------------------------------------------------------------------------------
# 3. Two settings never share an output file


@pytest.mark.slow
def test_notes_that_differ_only_in_non_ascii_or_punctuation_get_their_own_folders(tmp_path):
    folders = set()
    for note in ("猫", "犬"):
        done = run_module(LDM, "prompt=x", f"note={note}", f"output_dir={tmp_path}", "--dry_run")
        assert done.returncode == 0, done.stderr
        folders.add(json.loads(done.stdout)["output_dir"])
    for note in ("a,b", "a-b", "a b"):
        settings = from_clean.load_config(["input_path=x.png", f"note={note}", f"output_dir={tmp_path}"])
        folders.add(str(from_clean.plan_run(settings).out_dir))
    assert len(folders) == 5


# ------------------------------------------------------------------------------------------------------------
# 4. Outputs reflect the current inputs; damaged files are redone; leftovers of killed writes are removed


@pytest.mark.slow
def test_removed_prompts_leave_metadata_and_report(ldm_run, hub_cache_env):
    work, run_dir, args = ldm_run
    (work / "prompts.txt").write_text(PROMPTS.splitlines()[0] + "\n", encoding="utf-8")
    done = _cli(hub_cache_env, work, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = [json.loads(line) for line in (run_dir / "metadata.jsonl").read_text().splitlines()]
    assert {m["index"] for m in meta} == {0}
    assert "harbour" not in (run_dir / "report.html").read_text(encoding="utf-8")
    # restoring the line finds the kept result again: nothing is redone
    (work / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    again = _cli(hub_cache_env, work, *args)
    assert again.returncode == 0 and "images written           0" in again.stdout, again.stdout
    assert len((run_dir / "metadata.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_truncated_image_is_redone_and_killed_writes_leave_no_temp_files(ldm_run, hub_cache_env):
    work, run_dir, args = ldm_run
    image = run_dir / "pid" / "step_x0" / "00000001.png"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # a half-written file
    # what a killed writer leaves: a temp file of a process that is gone, and an old one of an earlier version
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from pid.inference.atomic import _host

    leftover = image.parent / f".00000000.png.~{_host()}~{int(gone.stdout)}~abc123.tmp"
    leftover.write_bytes(b"partial")
    old = run_dir / "records" / ".00000000.json.xyz.tmp"
    old.write_bytes(b"{")
    os.utime(old, (1, 1))
    done = _cli(hub_cache_env, work, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 files damaged" in done.stdout, done.stdout
    assert not leftover.exists() and not old.exists()
    Image.open(image).load()  # whole again
    record = json.loads((run_dir / "records" / "00000001.json").read_text())
    assert record["sizes"]["pid/step_x0/00000001.png"] == image.stat().st_size


@pytest.mark.slow
def test_kill_while_a_temp_file_exists_then_rerun_cleans_and_completes(hub_cache_env, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(f"prompt {i}" for i in range(6)) + "\n")
    args = [sys.executable, "-m", LDM, *TINY, "prompt_file=p.txt", "output_dir=out", _ldm_kwargs(), "report=false"]
    proc = subprocess.Popen(args, env=hub_cache_env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(300_000):  # kill on the first temp file seen
            if proc.poll() is not None or any((tmp_path / "out").rglob(".*.tmp")):
                break
        proc.kill()
    finally:
        proc.wait()
    done = _cli(hub_cache_env, tmp_path, *args[2:])
    assert done.returncode == 0, done.stderr[-3000:]
    [run_dir] = (tmp_path / "out").iterdir()
    assert not list(run_dir.rglob("*.tmp"))
    assert len((run_dir / "metadata.jsonl").read_text().splitlines()) == 6


def test_one_decoder_file_however_spelled(tmp_path, monkeypatch):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "good.safetensors").write_bytes(b"weights")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    plans = [from_ldm.plan_run(from_ldm.load_config(["prompt=a", f"pid_checkpoint={path}",
                                                     f"output_dir={tmp_path / 'out'}"]))
             for path in ("../x/good.safetensors", str(tmp_path / "x" / "good.safetensors"))]
    assert plans[0].identity == plans[1].identity and plans[0].out_dir == plans[1].out_dir


def test_from_clean_tables_follow_the_manifest(tmp_path):
    from pid.latents import get as get_space

    from tiny import tiny_decoder
    from tiny_vaes import tiny_autoencoder_kl

    space, decoder = get_space("sd3").attach(tiny_autoencoder_kl(latent_channels=16)), tiny_decoder("sd3", "2k")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    manifest = tmp_path / "m.jsonl"
    args = ["backbone=sd3", f"manifest={manifest}", "pid_steps=1", f"output_dir={tmp_path / 'out'}", "device=cpu",
            "plot=false"]
    manifest.write_text('{"image": "a.png", "prompt": "a"}\n{"image": "b.png", "prompt": "b"}\n')
    from_clean.run(from_clean.load_config(args), decoder=decoder, latent_space=space)
    manifest.write_text('{"image": "a.png", "prompt": "a"}\n')
    summary = from_clean.run(from_clean.load_config(args), decoder=decoder, latent_space=space)
    [run_dir] = (tmp_path / "out").iterdir()
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert {r["image"] for r in rows} == {str(tmp_path / "a.png")}
    assert summary["means"]["0.000"]["pid"]["count"] == 1
    assert json.loads((run_dir / "summary.json").read_text())["means"]["0.000"]["vae"]["count"] == 1
    assert "b.png" not in (run_dir / "report.html").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------------------
# 5. Full disk, read-only folder, unexpected exceptions: one line per item, an honest exit code


@contextlib.contextmanager
def _mounted(*commands: list[str], target: Path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount")
    try:
        for command in commands:
            if subprocess.run(command, capture_output=True).returncode != 0:
                pytest.skip(f"cannot run {' '.join(command)} here")
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


@pytest.mark.slow
def test_full_disk_ends_as_one_line_per_item_and_exit_1(hub_cache_env, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "p.txt").write_text(PROMPTS)
    with _mounted(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], target=disk):
        done = _cli(hub_cache_env, tmp_path, LDM, *TINY, "prompt_file=p.txt", f"output_dir={disk}", _ldm_kwargs())
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stdout.count("FAILED [") == 2 and "no space left on the device" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr  # one line per item, no traceback without debug=true
    assert "failed                   2" in done.stdout


@pytest.mark.slow
def test_read_only_run_folder_is_refused_untouched(ldm_run, hub_cache_env):
    work, run_dir, args = ldm_run
    before = snapshot(run_dir)
    (work / "prompts.txt").write_text("a changed prompt\n")
    with _mounted(["mount", "--bind", str(run_dir), str(run_dir)],
                  ["mount", "-o", "remount,ro,bind", str(run_dir)], target=run_dir):
        done = _cli(hub_cache_env, work, *args)
    assert done.returncode == 2 and "not writable" in _one_error_line(done)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), PermissionError(13, "Permission denied"),
                                   IsADirectoryError(21, "Is a directory")])
def test_an_end_of_run_file_that_cannot_be_written_is_one_error_line(error, capsys):
    """When even failures.jsonl / summary.json cannot be written (point 5), the run says so in one line and goes
    on to print the rest of its summary; the caller turns the returned line into a failing exit code."""
    from pid.inference import runs

    def write() -> None:
        raise error

    line = runs.try_write("failures.jsonl", write)
    err = capsys.readouterr().err
    assert line is not None and line.startswith("could not write failures.jsonl: ")
    assert err == f"error: {line}\n" and "Traceback" not in err
    assert runs.try_write("summary.json", lambda: None) is None


def test_an_unexpected_exception_ends_only_its_item(tmp_path):
    from test_from_ldm import tiny_pid
    from test_front_door import _tiny_settings

    from tiny_pipelines import make_tiny_pipeline

    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    settings = _tiny_settings(tmp_path / "out", f"prompt_file={prompts}", prompt=None)
    plan = from_ldm.plan_run(settings)
    source = from_ldm.make_source(settings, plan, from_ldm.torch.device("cpu"), make_tiny_pipeline("sd3"))
    real = source.generate

    def diffusers_index_error(index, prompt):
        if index == 0:
            raise IndexError("index 3 is out of bounds for dimension 0 with size 3")
        return real(index, prompt)

    source.generate = diffusers_index_error
    summary = from_ldm.run(settings, decoder=tiny_pid("sd3"), source=source, plan=plan)
    assert summary["exit_code"] == 1 and summary["images"] == 2
    [failure] = [json.loads(line) for line in (plan.out_dir / "failures.jsonl").read_text().splitlines()]
    assert failure["index"] == 0 and failure["error"].startswith("IndexError: index 3")
    assert (plan.out_dir / "summary.json").is_file()
