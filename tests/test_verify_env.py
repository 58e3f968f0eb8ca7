"""verify_env.py as users run it: against the tiny hub cache, an empty cache and empty folders."""

import json
import subprocess
import sys
from pathlib import Path

import hub_cache

hub_cache_env = hub_cache.hub_cache_env  # the session fixture (a no-op once conftest.py registers it)
VERIFY_ENV = Path(__file__).resolve().parents[1] / "verify_env.py"


def _verify(env, cwd, *args):
    proc = subprocess.run([sys.executable, str(VERIFY_ENV), "--json", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    rows = {(r["group"], r["name"]): r for r in map(json.loads, proc.stdout.splitlines())}
    return proc, rows


def test_statuses_against_the_hub_cache_online(hub_cache_env, tmp_path):
    env = dict(hub_cache_env, HF_HUB_OFFLINE="0")  # verify_env never contacts the hub either way
    proc, rows = _verify(env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = {key: r["status"] for key, r in rows.items()}
    assert status[("flux", "PiD 2k")] == "present"
    assert status[("zimage-turbo", "PiD 2kto4k")] == "present"  # found under checkpoints_deprecated/
    assert "superseded by 2kto4k_v1pt5" in rows[("zimage-turbo", "PiD 2kto4k")]["detail"]
    assert status[("flux", "VAE/RAE ae.safetensors")] == "present"
    assert status[("all", "Gemma Efficient-Large-Model/gemma-2-2b-it")] == "present"
    assert status[("flux", "LDM black-forest-labs/FLUX.1-dev")] == "present"
    assert status[("zimage-turbo", "LDM Tongyi-MAI/Z-Image-Turbo")] == "present"
    assert status[("sd3", "LDM stabilityai/stable-diffusion-3-medium-diffusers")] == "gated"
    assert "https://huggingface.co/black-forest-labs/FLUX.2-dev" in rows[("flux2", "LDM black-forest-labs/FLUX.2-dev")]["detail"]
    assert status[("sdxl", "LDM stabilityai/stable-diffusion-xl-base-1.0")] == "would download"
    assert status[("qwenimage", "PiD 2kto4k")] == "would download"
    assert "checkpoints_deprecated/PiD_res2kto4k_sr4x_official_qwenimage" in rows[("qwenimage", "PiD 2kto4k")]["detail"]
    assert {b for b, _ in rows if b not in ("import", "optional", "diffusers", "device", "all")} == {
        "flux", "flux2", "flux2-klein-4b", "flux2-klein-9b", "sd3", "sdxl", "zimage", "zimage-turbo",
        "qwenimage", "qwenimage-2512", "dinov2", "siglip"}  # fmt: skip


def test_offline_empty_folders_and_wrong_ldm_folders_are_missing(hub_cache_env, tmp_path):
    (tmp_path / "checkpoints" / "PiD_res2k_sr4x_official_sd3_distill_4step").mkdir(parents=True)  # EMPTY
    (tmp_path / "empty_ldm").mkdir()
    wrong = tmp_path / "wrong_ldm"
    wrong.mkdir()
    (wrong / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    proc, rows = _verify(hub_cache_env, tmp_path, "--backbone", "sd3", "flux", "flux2",
                         "--model_id", f"sd3={tmp_path / 'empty_ldm'}", "--model_id", f"flux={wrong}")  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]  # files these backbones need are missing
    sd3 = rows[("sd3", "PiD 2k")]
    assert sd3["status"] == "missing" and "empty folder" in sd3["detail"] and "HF_HUB_OFFLINE" in sd3["detail"]
    assert rows[("sd3", f"LDM {tmp_path / 'empty_ldm'}")]["status"] == "missing"
    assert "EMPTY" in rows[("sd3", f"LDM {tmp_path / 'empty_ldm'}")]["detail"]
    flux_ldm = rows[("flux", f"LDM {wrong}")]
    assert flux_ldm["status"] == "missing" and "ZImagePipeline" in flux_ldm["detail"]
    assert rows[("flux2", "LDM black-forest-labs/FLUX.2-dev")]["status"] == "missing"  # gated, offline, not cached
    assert rows[("flux", "PiD 2k")]["status"] == "present"


def test_an_empty_cache_reports_everything_missing_offline(hub_cache_env, tmp_path):
    env = dict(hub_cache_env, HF_HUB_CACHE=str(tmp_path / "empty_cache"))
    (tmp_path / "empty_cache").mkdir()
    proc, rows = _verify(env, tmp_path, "--backbone", "flux")
    assert proc.returncode == 1
    file_rows = [r for (group, _), r in rows.items() if group in ("all", "flux")]
    assert file_rows and all(r["status"] == "missing" for r in file_rows), file_rows
    assert "hf download nvidia/PiD checkpoints/ae.safetensors" in rows[("flux", "VAE/RAE ae.safetensors")]["detail"]
