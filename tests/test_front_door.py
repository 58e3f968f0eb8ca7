"""The CLIs' front door, driven as a user drives it: verbatim text in both spellings, sizes, --help, exit codes,
file modes, early one-line errors, and reruns that never serve stale results."""

import csv
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pid.inference import from_clean, from_ldm
from pid.inference.cli import Settings
from pid.inference.io import read_image

from cli_driver import REPO, cli_env, dry_run, run_module
from tiny_pipelines import tiny_call_overrides

HARD = "a, b 'c' \"d\" (e) [f] {g} h=i \\j ${k} #l 100% café 🦊 東京"
HARD_PROMPTS = ["a, b", "it's", 'say "hi"', "(x) [y] {z}", "a=b", "back\\slash", "${oc.env:HOME}", "#hash",
                "100%", "-leading dash", "--double dash", "emoji 🦊", "naïve café 東京", "null", "a\\,b", "[1,2]"]


# ------------------------------------------------------------------------------------------------------------
# Verbatim text and sizes


@pytest.mark.parametrize("prompt", HARD_PROMPTS)
def test_every_hard_prompt_parses_verbatim_in_both_spellings(prompt):
    assert from_ldm.load_config([f"prompt={prompt}"]).prompt == prompt
    assert from_ldm.load_config(["--prompt", prompt]).prompt == prompt
    assert from_clean.load_config(["--prompt", prompt, "input_path=x.png"]).prompt == prompt


@pytest.mark.parametrize("spelling", ["key", "flag"])
def test_hard_text_through_a_subprocess_in_both_spellings(spelling, tmp_path):
    weird_dir = tmp_path / "out, (1) ${x} café"
    args = ([f"prompt={HARD}", f"output_dir={weird_dir}", "note=a,b"] if spelling == "key"
            else ["--prompt", HARD, "--output_dir", str(weird_dir), "--note", "a,b"])
    plan = dry_run("pid.inference.from_ldm", *args)
    assert plan["prompts"] == [HARD] and plan["output_dir"].startswith(str(weird_dir))
    dashed = dry_run("pid.inference.from_ldm", "--prompt", "-a prompt that starts with a dash")
    assert dashed["prompts"] == ["-a prompt that starts with a dash"]


@pytest.mark.parametrize("value", ["4096,3072", "'4096,3072'", "4096x3072", "[4096,3072]", "[4096, 3072]"])
def test_sizes_in_every_spelling(value):
    plan = from_ldm.plan_run(from_ldm.load_config(["prompt=x", f"resolution={value}", "pid_ckpt_type=2kto4k"]))
    assert plan.output_size == (3072, 4096)
    flagged = from_ldm.plan_run(from_ldm.load_config(["--prompt", "x", "--resolution", value.strip("'")]))
    assert flagged.output_size == (3072, 4096)


def test_sizes_unquoted_in_bash():
    # what a user types in a shell, quotes and all, through bash itself
    out = subprocess.run(["bash", "-c", f"{sys.executable} -m pid.inference.from_ldm prompt=x resolution=4096,3072 "
                          "--dry_run"], env=cli_env(), capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["output_size"] == [3072, 4096]


def test_suggested_sizes_are_in_the_unit_typed(capsys):
    assert from_ldm.main(["prompt=x", "--resolution", "2000"]) == 2
    err = capsys.readouterr().err
    assert "resolution 2000x2000" in err and "1984 or 2048" in err and "496" not in err


# ------------------------------------------------------------------------------------------------------------
# Help


def _console_script(name):
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    return found if Path(found).is_file() else None


@pytest.mark.parametrize("module", ["pid.inference.from_ldm", "pid.inference.from_clean"])
def test_help_pages(module):
    pages = [run_module(module, flag) for flag in ("--help", "-h", "help")]
    for page in pages:
        assert page.returncode == 0 and page.stderr == "", page.stderr
        assert page.stdout == pages[0].stdout
    text = pages[0].stdout
    assert text.startswith("usage: python -m " + module)
    for group in ("inputs:", "decoder:", "outputs:", "performance:"):
        assert group in text
    assert text.count(f"python -m {module}") >= 3 or text.count("-m pid.inference") >= 3  # examples
    entry = from_ldm.FROM_LDM if module.endswith("from_ldm") else from_clean.FROM_CLEAN
    from pid.inference.cli import entry_options

    options, _ = entry_options(entry)
    for option in options:  # every option, its default and upstream spelling
        assert f"  {option.key}=" in text
        for flag in option.flags:
            assert flag in text
    assert "exit codes" in text


@pytest.mark.parametrize("script", ["pid-from-ldm", "pid-from-clean"])
def test_console_scripts_help(script):
    path = _console_script(script)
    if path is None:
        pytest.skip(f"{script} is not installed in this environment")
    done = subprocess.run([path, "--help"], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout


def test_help_is_not_taken_from_a_prompt():
    plan = dry_run("pid.inference.from_ldm", "--prompt", "help")
    assert plan["prompts"] == ["help"]


# ------------------------------------------------------------------------------------------------------------
# One-line errors before any model loads


@pytest.mark.parametrize(("args", "expected"), [
    (["prompt=x", "output_dir=README.md"], "is a file, not a folder"),
    (["prompt=x", "pid_checkpoint=/nonexistent/decoder.pth"], "pid_checkpoint /nonexistent/decoder.pth does not exist"),
    (["prompt_file=/nonexistent/prompts.txt"], "does not exist"),
    (["prompt=x", "--cfg_scale"], "--cfg_scale needs a value"),
    (["prompt=x", "pid_steps=four"], "pid_steps must be an integer"),
    (["prompt=x", "colour=red"], "unknown option colour"),
    (["prompt=x", "--save_format", "gif"], "must be one of png, jpg"),
])
def test_bad_input_is_one_line_exit_2_before_loading(args, expected, tmp_path):
    start = time.perf_counter()
    done = run_module("pid.inference.from_ldm", *args)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and expected in lines[-1], done.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in done.stderr
    assert done.stdout == ""
    assert time.perf_counter() - start < 60  # nothing heavy was loaded


def test_model_folder_of_the_wrong_pipeline_class_fails_first(tmp_path):
    folder = tmp_path / "sd3-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    done = run_module("pid.inference.from_ldm", "backbone=flux", "prompt=x", f"model_id={folder}", "--dry_run")
    assert done.returncode == 2 and "StableDiffusion3Pipeline" in done.stderr and "Traceback" not in done.stderr


def test_corrupt_image_reason_names_the_problem_in_words(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(Exception, match="not in an image format") as info:
        read_image(bad)
    assert "0x" not in str(info.value) and "BytesIO" not in str(info.value)


def test_ignored_sampler_flags_do_not_change_the_run_folder():
    base = from_ldm.plan_run(from_ldm.load_config(["prompt=x"]))
    ignored = from_ldm.plan_run(from_ldm.load_config(["prompt=x", "--cfg_scale", "3", "--shift", "2"]))
    assert base.out_dir == ignored.out_dir


def test_from_clean_accepts_dtype():
    assert from_clean.load_config(["--dtype", "fp32", "input_path=a.png"]).dtype == "fp32"


# ------------------------------------------------------------------------------------------------------------
# Real runs from the hub cache of tiny stand-ins: exit codes, modes, Ctrl-C, reruns, verbatim captions

TINY = ["backbone=zimage-turbo", "resolution=256", "ldm_steps=2", "pid_steps=1", "device=cpu", "dtype=fp32"]


def _ldm_kwargs() -> str:
    return "ldm_kwargs=" + json.dumps({k: list(v) if isinstance(v, tuple) else v
                                       for k, v in tiny_call_overrides("zimage-turbo").items()})


def _run(args, env, cwd, umask=None, timeout=600):
    return subprocess.run([sys.executable, "-m", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout, preexec_fn=(lambda: os.umask(umask)) if umask else None)


@pytest.mark.slow
def test_from_ldm_real_run_reruns_modes_and_verbatim_captions(hub_cache_env, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{HARD}\na quiet harbour at dawn\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["pid.inference.from_ldm", *TINY, f"prompt_file={prompts}", f"output_dir={out}", _ldm_kwargs()]
    first = _run(args, hub_cache_env, tmp_path, umask=0o077)
    assert first.returncode == 0, first.stderr[-3000:]
    [run_dir] = out.iterdir()
    meta = [json.loads(line) for line in (run_dir / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m["prompt"] for m in meta] == [HARD, "a quiet harbour at dawn"]  # the captions PiD was given
    for path in run_dir.rglob("*"):  # umask 077: nothing readable by others
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.png")}

    # edit one line: exactly that item is redone; the summary says why
    prompts.write_text(f"{HARD}\na stormy harbour at night\n", encoding="utf-8")
    second = _run(args, hub_cache_env, tmp_path, umask=0o022)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "changed: prompt" in second.stdout and "(1)" in second.stdout
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.png")}
    item0 = [p for p in before if p.name.startswith("00000000")]
    item1 = [p for p in before if p.name.startswith("00000001")]
    assert all(before[p] == after[p] for p in item0) and all(before[p] != after[p] for p in item1)
    assert stat.S_IMODE((run_dir / "pid" / "step_x0" / "00000001.png").stat().st_mode) == 0o644  # umask 022
    meta = [json.loads(line) for line in (run_dir / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m["prompt"] for m in meta] == [HARD, "a stormy harbour at night"]

    # nothing changed: nothing is redone, exit 0
    third = _run(args, hub_cache_env, tmp_path)
    assert third.returncode == 0 and re.search(r"images written\s+0\n", third.stdout), third.stdout


@pytest.mark.slow
def test_from_clean_exit_1_with_failures_listed_and_verbatim_caption(hub_cache_env, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / "ok.png")
    (images / "broken.png").write_bytes(b"garbage")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in [
        {"image": "imgs/ok.png", "prompt": HARD}, {"image": "imgs/broken.png", "prompt": "x"}]) + "\n",
        encoding="utf-8")
    out = tmp_path / "out"
    done = _run(["pid.inference.from_clean", "backbone=flux", f"manifest={manifest}", f"output_dir={out}",
                 "device=cpu", "pid_steps=1", "plot=false"], hub_cache_env, tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    [run_dir] = out.iterdir()
    [failure] = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert "broken.png" in failure["image"] and "not in an image format" in failure["reason"]
    rows = list(csv.DictReader((run_dir / "metrics.csv").open(encoding="utf-8")))
    assert len(rows) == 2 and {r["prompt"] for r in rows} == {HARD}
    assert "FAILED" in done.stdout and "broken.png" in done.stdout


# ------------------------------------------------------------------------------------------------------------
# Records and metadata, in-process with tiny objects (kill between captures, overwrite, every kind of change)


def _tiny_settings(tmp_path, *extra, prompt="a red fox in snow"):
    from test_from_ldm import tiny_cfg

    return tiny_cfg("sd3", tmp_path, *extra, prompt=prompt)


def _meta(run_dir):
    return [json.loads(line) for line in (run_dir / "metadata.jsonl").read_text().splitlines()]


def test_kill_between_two_captures_then_resume_keeps_one_record_per_image(tmp_path, monkeypatch):
    from test_from_ldm import tiny_pid

    from tiny_pipelines import make_tiny_pipeline

    pipe, decoder = make_tiny_pipeline("sd3"), tiny_pid("sd3")
    settings = _tiny_settings(tmp_path)
    real_write = from_ldm.write_image
    calls = []

    def dying_write(path, image, **kw):
        calls.append(path)
        if len(calls) == 4:  # the first capture's three images are on disk; the process dies now
            raise KeyboardInterrupt
        return real_write(path, image, **kw)

    monkeypatch.setattr(from_ldm, "write_image", dying_write)
    with pytest.raises(KeyboardInterrupt):
        from_ldm.run(settings, pipe=pipe, decoder=decoder)
    monkeypatch.setattr(from_ldm, "write_image", real_write)
    summary = from_ldm.run(settings, pipe=pipe, decoder=decoder)
    assert summary["redone"] == {"new": 1}
    [run_dir] = tmp_path.iterdir()
    assert [(m["index"], m["step"]) for m in _meta(run_dir)] == [(0, "02xt"), (0, "x0")]
    # a rerun finds it done; overwrite with a changed prompt replaces images and records
    assert from_ldm.run(settings, pipe=pipe, decoder=decoder)["images"] == 0
    changed = _tiny_settings(tmp_path, "overwrite=true", prompt="a blue whale")
    assert from_ldm.run(changed, pipe=pipe, decoder=decoder)["images"] == 2
    assert [m["prompt"] for m in _meta(run_dir)] == ["a blue whale", "a blue whale"]


def test_every_kind_of_change_redoes_only_its_item(tmp_path):
    from test_from_ldm import tiny_pid

    from tiny_pipelines import make_tiny_pipeline

    pipe, decoder = make_tiny_pipeline("sd3"), tiny_pid("sd3")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    ckpt_a, ckpt_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ckpt_a.write_bytes(b"a")
    ckpt_b.write_bytes(b"bb")
    out = tmp_path / "out"

    def settings(*extra):
        return _tiny_settings(out, f"prompt_file={prompts}", "save_xt_steps=[]", *extra, prompt=None)

    assert from_ldm.run(settings(f"pid_checkpoint={ckpt_a}"), pipe=pipe, decoder=decoder)["images"] == 2
    prompts.write_text("one\nTWO\n")
    again = from_ldm.run(settings(f"pid_checkpoint={ckpt_a}"), pipe=pipe, decoder=decoder)
    assert again["images"] == 1 and again["redone"] == {"changed: prompt": 1}
    # another decoder file: a different run folder names it, so both results stay side by side
    other = from_ldm.plan_run(settings(f"pid_checkpoint={ckpt_b}"))
    assert other.out_dir != from_ldm.plan_run(settings(f"pid_checkpoint={ckpt_a}")).out_dir
    # the same path with new content is a changed decoder: everything is redone
    ckpt_a.write_bytes(b"retrained")
    redo = from_ldm.run(settings(f"pid_checkpoint={ckpt_a}"), pipe=pipe, decoder=decoder)
    assert redo["images"] == 2 and list(redo["redone"]) == ["changed: decoder.file"]
    rows = _meta(next(out.iterdir()))
    assert [r["checkpoint"] for r in rows] == [str(ckpt_a)] * 2


def test_from_clean_reruns_on_content_caption_and_max_side(tmp_path):
    from test_from_clean import setup as _unused  # noqa: F401  (fixture module)

    from pid.latents import get as get_space

    from tiny import tiny_decoder
    from tiny_vaes import tiny_autoencoder_kl

    space = get_space("sd3").attach(tiny_autoencoder_kl(latent_channels=16))
    decoder = tiny_decoder("sd3", "2k")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / name)
    manifest = tmp_path / "m.jsonl"

    def write_manifest(caption_b):
        manifest.write_text(json.dumps({"image": "imgs/a.png", "prompt": "a"}) + "\n"
                            + json.dumps({"image": "imgs/b.png", "prompt": caption_b}) + "\n")

    write_manifest("b")
    base = ["backbone=sd3", f"manifest={manifest}", "pid_steps=1", f"output_dir={tmp_path / 'out'}", "device=cpu",
            "plot=false"]

    def run(*extra):
        return from_clean.run(from_clean.load_config(base + list(extra)), decoder=decoder, latent_space=space)

    assert run()["redone"] == {"new": 2}
    write_manifest("b, with a new caption")
    assert run()["redone"] == {"changed: prompt": 1}
    # a different image under the same file name
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / "a.png")
    assert run()["redone"] == {"changed: image_sha256": 1}
    assert run("max_side=32")["redone"] == {"changed: max_side": 2}
    assert run("max_side=32")["redone"] == {}
    assert run("max_side=32", "degrade_sigmas=0,0.5")["redone"] == {"new sigma": 2}
    run_dir = next((tmp_path / "out").iterdir())
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert len(rows) == 8 and {r["input_size"] for r in rows} == {"32x32"}


def test_earlier_layout_is_refused_not_mixed(tmp_path):
    from test_from_ldm import tiny_pid

    from tiny_pipelines import make_tiny_pipeline

    settings = _tiny_settings(tmp_path)
    plan = from_ldm.plan_run(settings)
    (plan.out_dir / "pid").mkdir(parents=True)
    (plan.out_dir / "metadata.jsonl").write_text("{}\n")
    with pytest.raises(Exception, match="earlier pid version"):
        from_ldm.run(settings, pipe=make_tiny_pipeline("sd3"), decoder=tiny_pid("sd3"))


def test_settings_round_trip_and_are_plain():
    settings = from_ldm.load_config(["prompt=x", "save_xt_steps=22,24", "ldm_kwargs={a: 1}"])
    assert isinstance(settings, Settings) and settings.save_xt_steps == [22, 24] and settings.ldm_kwargs == {"a": 1}
    assert Settings(settings.to_dict()).to_dict() == settings.to_dict()


def test_records_keep_non_finite_metrics_and_see_other_ranks_on_reload(tmp_path):
    import math

    from pid.inference.runs import RecordStore

    mine, other = RecordStore(tmp_path, "from_clean"), RecordStore(tmp_path, "from_clean")
    mine.check_layout(overwrite=False)
    mine.save("a", {"item_key": "k", "rows": [{"sample_id": "a", "psnr": math.inf}]})
    assert math.isinf(mine.rows()[0]["psnr"])  # identical images: +inf, a float as when read back
    other.save("b", {"item_key": "k", "rows": [{"sample_id": "b", "psnr": 30.0}]})  # another rank's item
    assert [r["sample_id"] for r in mine.rows()] == ["a"]
    assert [r["sample_id"] for r in mine.rows(reload=True)] == ["a", "b"]
    assert math.isinf(mine.rows()[0]["psnr"])
    mine.forget("a")
    assert not (tmp_path / "records" / "a.json").exists() and [r["sample_id"] for r in mine.rows()] == ["b"]
