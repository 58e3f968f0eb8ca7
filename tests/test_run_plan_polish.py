"""Plans as a user meets them: a 2k decoder asked for 4K warns; an early-stopped LDM gets its own run folder."""

from __future__ import annotations

import json

import pytest

from cli_driver import run_module


def _plan(tmp_path, *args):
    done = run_module("pid.inference.from_ldm", "backbone=flux", "prompt=a red fox", *args, "--dry_run",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


@pytest.mark.slow
def test_a_2k_decoder_at_4096_warns_once(tmp_path):
    plan, stderr = _plan(tmp_path, "resolution=4096x3072")
    assert plan["ckpt_type"] == "2k" and plan["output_size"] == [3072, 4096]
    warnings = [line for line in stderr.splitlines() if "above the 2k decoder's 2048 px" in line]
    assert len(warnings) == 1 and "pid_ckpt_type=2kto4k" in warnings[0]
    _, quiet = _plan(tmp_path, "resolution=2048")
    assert "above the" not in quiet
    _, trained = _plan(tmp_path, "resolution=4096x3072", "pid_ckpt_type=2kto4k")
    assert "above the" not in trained


@pytest.mark.slow
def test_ldm_stop_at_and_save_xt_steps_do_not_share_a_run_folder(tmp_path):
    stopped, _ = _plan(tmp_path, "ldm_stop_at=24")
    captured, _ = _plan(tmp_path, "save_xt_steps=24,26")
    full, _ = _plan(tmp_path)
    assert stopped["capture_steps"] == [24] and captured["capture_steps"] == [24, 26]
    assert stopped["output_dir"] != captured["output_dir"]
    assert captured["output_dir"] == full["output_dir"]  # same LDM trajectory: captures add to one folder
