"""How a CLI run ends, driven as a user drives it: stop signals (Ctrl-C, SIGTERM), failed items printed as one
line, no network, failed starts, torchrun exit codes, and quiet library use (no bars, no stray warnings, nothing
left in the temp folder)."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pid.inference import lifecycle
from pid.inference.cli import run_cli
from pid.inference.from_ldm import FROM_LDM

from cli_driver import REPO
from tiny_pipelines import tiny_call_overrides

TINY = ["backbone=zimage-turbo", "resolution=256", "ldm_steps=2", "pid_steps=1", "device=cpu", "dtype=fp32"]
# loguru's `diagnose` frames: the variable-value dump a failure must never print
DIAGNOSE_MARKS = ("│", "└ ")


def _ldm_kwargs() -> str:
    return "ldm_kwargs=" + json.dumps({k: list(v) if isinstance(v, tuple) else v
                                       for k, v in tiny_call_overrides("zimage-turbo").items()})


def _default_sigint() -> None:
    """In the child, before exec: SIGINT as a fresh terminal would give it, whatever the test runner inherited
    (a shell's background job ignores SIGINT, and an ignored signal stays ignored across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(args, env, cwd):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worst parent: one that ignores SIGINT
    try:
        return subprocess.Popen([sys.executable, "-m", *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, encoding="utf-8", preexec_fn=_default_sigint)
    finally:
        signal.signal(signal.SIGINT, previous)


def _manifest(tmp_path: Path) -> Path:
    """One good image and one truncated PNG (its header is fine, its data stops short)."""
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / "ok.png")
    whole = (images / "ok.png").read_bytes()
    (images / "truncated.png").write_bytes(whole[: len(whole) // 3])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "imgs/ok.png", "prompt": "a cat"}) + "\n"
                        + json.dumps({"image": "imgs/truncated.png", "prompt": "a dog"}) + "\n")
    return manifest


# ------------------------------------------------------------------------------------------------------------
# Stop signals


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl_c", "sigterm"])
def test_stop_signal_keeps_finished_items_and_exits_128_plus_signal(hub_cache_env, tmp_path, signum, code):
    """Ctrl-C and SIGTERM (Slurm preemption) stop alike: finished items kept, one line, 128 + signal. A burst of
    further signals during the cleanup (an impatient user, a scheduler repeating itself) changes nothing, and
    neither does how the test runner was started (the child's SIGINT is reset). (This is the Ctrl-C test that
    lived in test_front_door.py, made deterministic.)"""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(40)) + "\n")
    out = tmp_path / "out"
    proc = _popen(["pid.inference.from_ldm", *TINY, f"prompt_file={prompts}", f"output_dir={out}", _ldm_kwargs()],
                  hub_cache_env, tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(out.rglob("records/*.json")):
        time.sleep(0.1)
    proc.send_signal(signum)
    end = time.time() + 5
    while time.time() < end and proc.poll() is None:  # more of the same while it stops
        time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert err.count("interrupted") == 1 and f"interrupted ({signum.name})" in err, err[-2000:]
    assert "Traceback" not in err
    [run_dir] = out.iterdir()
    records = list((run_dir / "records").glob("*.json"))
    assert 1 <= len(records) < 40
    for record in records:  # every record on disk is complete: its images exist
        for row in json.loads(record.read_text())["rows"]:
            assert (run_dir / row["pid"]).is_file()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers can only be set from the main thread")
def test_stop_signals_raise_once_then_ignore_and_respect_an_ignored_signal():
    # pytest started from `cmd &` or nohup inherits SIGINT ignored, which stop_signals rightly keeps ignored:
    # give this test Python's default Ctrl-C handler so it checks the same thing wherever it runs
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _check_stop_signals()
    finally:
        signal.signal(signal.SIGINT, inherited)


def _check_stop_signals() -> None:
    before = signal.getsignal(signal.SIGTERM)
    state = lifecycle.StopState()
    with pytest.raises(lifecycle.Interrupted) as info:
        with lifecycle.stop_signals(state):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert info.value.signum == signal.SIGTERM and state.exit_code == 143
    state = lifecycle.StopState()
    with lifecycle.stop_signals(state):  # a second signal while stopping is ignored
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert state.exit_code == 130
    assert signal.getsignal(signal.SIGTERM) == before  # restored
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with lifecycle.stop_signals(lifecycle.StopState()):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # nohup / `cmd &`: stays ignored
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------------------------------------
# Failures print as one line


@pytest.mark.slow
def test_failed_item_is_one_line_and_the_traceback_needs_debug(hub_cache_env, tmp_path):
    manifest = _manifest(tmp_path)
    base = ["pid.inference.from_clean", "backbone=flux", f"manifest={manifest}", "device=cpu", "pid_steps=1",
            "plot=false"]
    done = subprocess.run([sys.executable, "-m", *base, f"output_dir={tmp_path / 'a'}"], env=hub_cache_env,
                          cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    failing = [line for line in done.stderr.splitlines() if "truncated.png" in line]
    assert len(failing) == 1 and "image file is truncated" in failing[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not any(mark in done.stderr for mark in DIAGNOSE_MARKS)
    # quiet: no transformers loading bar, no diffusers warning about an empty list of fp32 modules
    assert "Loading weights" not in done.stderr and "kept in float32" not in done.stderr, done.stderr[-3000:]

    debug = subprocess.run([sys.executable, "-m", *base, f"output_dir={tmp_path / 'b'}", "debug=true"],
                           env=hub_cache_env, cwd=tmp_path, capture_output=True, text=True, encoding="utf-8",
                           timeout=300)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "InputError" in debug.stderr
    assert not any(mark in debug.stderr for mark in DIAGNOSE_MARKS)  # never local variable values


def test_unexpected_error_is_one_line_with_the_debug_hint(capsys):
    def crash(command):
        raise RuntimeError("deep inside\nsecond line")

    assert run_cli(FROM_LDM, "pid.inference.from_ldm", crash, ["prompt=x"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: unexpected RuntimeError: deep inside (run again with debug=true for the traceback)"]
    assert run_cli(FROM_LDM, "pid.inference.from_ldm", crash, ["prompt=x", "debug=true"]) == 1
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# First contact without the files: offline, no network, failed starts


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # free, and nobody listens once the socket closes


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE", "unreachable"])
def test_missing_files_offline_are_one_fast_line_and_leave_no_run_folder(hub_cache_env, tmp_path, network):
    env = {k: v for k, v in hub_cache_env.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HUB_CACHE"] = str(tmp_path / "empty-cache")
    if network == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    else:  # no network: the hub's address refuses connections (the libraries would retry each file 5 times)
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    out = tmp_path / "results" / "new"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pid.inference.from_ldm", *TINY, "prompt=x", f"output_dir={out}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", timeout=120)
    elapsed = time.perf_counter() - start
    assert done.returncode == 2, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "cannot be reached" in line or "HF_HUB_OFFLINE" in line]
    assert len(said) == 1 and said[0].startswith("error: ") and "hf download nvidia/PiD" in said[0], done.stderr
    assert "Retry" not in done.stderr and "Traceback" not in done.stderr
    assert elapsed < 60, f"{elapsed:.0f} s before the one useful line"  # retrying: 46 s of back-off alone
    assert not (tmp_path / "results").exists()  # a failed start leaves no (empty) run folder behind


# ------------------------------------------------------------------------------------------------------------
# torchrun


@pytest.mark.slow
def test_torchrun_with_a_failed_item_is_not_reported_as_a_crash(hub_cache_env, tmp_path):
    manifest = _manifest(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "pid.inference.from_clean", "backbone=flux", f"manifest={manifest}", "device=cpu", "pid_steps=1",
         "plot=false", f"output_dir={tmp_path / 'out'}"],
        env=hub_cache_env, cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ChildFailedError" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    [run_dir] = (tmp_path / "out").iterdir()
    [failure] = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert "truncated.png" in failure["image"]
    assert len(json.loads((run_dir / "summary.json").read_text())["failures"]) == 1
    assert done.stderr.count("exit status 0 under torchrun") == 1  # said once, by rank 0


# ------------------------------------------------------------------------------------------------------------
# Quiet library use


def test_library_loading_prints_nothing(hub_cache_env, tmp_path):
    code = ("from pid import PiDDecoder\n"
            "from pid.latents import get\n"
            "PiDDecoder.from_pretrained('flux', ckpt_type='2k', device='cpu')\n"
            "get('flux').load(device='cpu')\n")
    done = subprocess.run([sys.executable, "-c", code], env=hub_cache_env, cwd=tmp_path, capture_output=True,
                          text=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "" and done.stderr == "", done.stderr[-3000:]


def test_test_helpers_leave_nothing_in_the_temp_folder(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    code = "from tiny_pipelines import clip_tokenizer, qwen_tokenizer\nclip_tokenizer(); qwen_tokenizer()\n"
    env = dict(os.environ, TMPDIR=str(temp), PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in temp.iterdir()) == []


def test_benchmark_writes_outside_the_checkout_by_default(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pid_decode_benchmark_default_out",
                                                  REPO / "benchmarks" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    bench.main(["--device", "cpu", "--config", "tiny", "--sizes", "64x64", "--runs", "1", "--warmup", "1",
                "--no-vae"])
    [written] = (tmp_path / "cache" / "pid" / "benchmarks").iterdir()
    assert (written / "decode_benchmark.json").is_file() and (written / "decode_benchmark.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing in the working folder


def test_remove_empty_tree_keeps_any_file(tmp_path):
    (tmp_path / "a" / "records").mkdir(parents=True)
    assert lifecycle.remove_empty_tree(tmp_path / "a") and not (tmp_path / "a").exists()
    (tmp_path / "b" / "records").mkdir(parents=True)
    (tmp_path / "b" / "records" / "x.json").write_text("{}")
    assert not lifecycle.remove_empty_tree(tmp_path / "b") and (tmp_path / "b" / "records" / "x.json").is_file()
    assert lifecycle.first_missing(tmp_path / "c" / "d") == tmp_path / "c"
    assert lifecycle.first_missing(tmp_path) is None


def _cli_imports(module: str, args: list[str], env: dict[str, str], cwd: Path) -> dict[str, object]:
    """Run `python -m module args` as the process's own CLI and report its exit code and which model libraries
    it imported."""
    code = ("import json, runpy, sys\n"
            f"sys.argv = [{module!r}, *{args!r}]\n"
            "try:\n"
            f"    runpy.run_module({module!r}, run_name='__main__')\n"
            "except SystemExit as exc:\n"
            "    code = exc.code\n"
            "print(json.dumps({'code': code, 'imported': sorted({'diffusers', 'transformers'} & set(sys.modules))}))\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_dry_runs_and_bad_settings_import_no_model_library(hub_cache_env, tmp_path):
    """Quieting diffusers / transformers must not import them: a dry run or a one-line refusal loads no model
    library (importing diffusers' utilities alone costs about a second)."""
    manifest = str(REPO / "assets" / "clean_image_manifest.jsonl")
    cases = [("pid.inference.from_clean", ["backbone=flux", f"manifest={manifest}", "--dry_run"], 0),
             ("pid.inference.from_clean", ["backbone=flux", f"manifest={manifest}", "scale=0"], 2),
             ("pid.inference.from_ldm", ["backbone=zimage-turbo", "prompt=a red fox", "--dry_run"], 0),
             ("pid.train", ["data=/nonexistent", "--dry_run"], 2)]
    for module, args, expected in cases:
        found = _cli_imports(module, args, hub_cache_env, tmp_path)
        assert found == {"code": expected, "imported": []}, (module, args, found)


def test_a_cli_run_quiets_the_model_libraries_once_it_starts(tmp_path):
    code = ("import json, os, sys\n"
            "from pid.inference import lifecycle\n"
            "lifecycle.configure_cli_logging(debug=sys.argv[1] == 'debug')\n"
            "before = sorted({'diffusers', 'transformers'} & set(sys.modules))\n"
            "lifecycle.quiet_libraries_for_run()\n"
            "import diffusers.utils.logging as d, transformers.utils.logging as t\n"
            "print(json.dumps({'before': before, 'env': os.environ.get('TRANSFORMERS_VERBOSITY'),\n"
            "                  'levels': [d.get_verbosity(), t.get_verbosity()],\n"
            "                  'bars': [d.is_progress_bar_enabled(), t.is_progress_bar_enabled()]}))\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    runs = {}
    for mode in ("quiet", "debug"):
        done = subprocess.run([sys.executable, "-c", code, mode], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    error = logging.ERROR
    assert runs["quiet"] == {"before": [], "env": "error", "levels": [error, error], "bars": [False, False]}
    assert runs["debug"]["env"] is None and runs["debug"]["bars"] == [True, True]
    assert error not in runs["debug"]["levels"]
