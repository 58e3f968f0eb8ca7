"""One preflight (pid/preflight.py) for verify_env.py and the CLIs' --dry_run: every file a command needs,
as present / would download / gated / missing, listed at once against a tiny hub cache with pieces removed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import hub_cache
from cli_driver import REPO, run_module

hub_cache_env = hub_cache.hub_cache_env  # the session fixture (a no-op once conftest.py registers it)
VERIFY_ENV = REPO / "verify_env.py"
GEMMA = hub_cache.GEMMA_REPO
FLUX_LDM = hub_cache.PIPELINE_REPOS["flux"]


def _snapshot(cache: Path, repo: str) -> Path:
    root = cache / f"models--{repo.replace('/', '--')}"
    return root / "snapshots" / (root / "refs" / "main").read_text().strip()


def _cache_without_pieces(hub_cache_env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], list[str]]:
    """A copy of the tiny hub cache lacking the flux 2k decoder, Gemma-2's config and FLUX.1-dev's VAE folder."""
    cache = tmp_path / "cache"
    shutil.copytree(hub_cache_env["HF_HUB_CACHE"], cache, symlinks=True)
    from pid.checkpoints import lookup

    (_snapshot(cache, hub_cache.PID_REPO) / lookup("flux", "2k").hub_path).unlink()
    (_snapshot(cache, GEMMA) / "config.json").unlink()
    shutil.rmtree(_snapshot(cache, FLUX_LDM) / "vae")
    return dict(hub_cache_env, HF_HUB_CACHE=str(cache)), ["PiD 2k", f"Gemma {GEMMA}", f"LDM {FLUX_LDM}"]


def _verify(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(VERIFY_ENV), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_verify_env_lists_every_missing_piece_at_once_and_fails(hub_cache_env, tmp_path):
    env, removed = _cache_without_pieces(hub_cache_env, tmp_path)
    proc = _verify(env, tmp_path, "--backbone", "flux", "--json")
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines()) if r["group"] in ("all", "flux")}
    for name in removed:
        assert rows[name]["status"] == "missing", rows[name]
        assert "hf download" in rows[name]["detail"]
    assert "vae" in rows[f"LDM {FLUX_LDM}"]["detail"]  # names the incomplete component
    assert rows["VAE/RAE ae.safetensors"]["status"] == "present"
    assert rows["PiD 2kto4k"]["status"] == "present"
    assert "3 needed files are missing" in proc.stderr


def test_verify_env_fits_100_columns_and_passes_when_a_backbone_is_complete(hub_cache_env, tmp_path):
    proc = _verify(hub_cache_env, tmp_path, "--backbone", "zimage-turbo")
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 100, max(lines, key=len)
    assert any(line.startswith("present") and "Z-Image-Turbo" in line for line in lines)
    assert not any("flux2" in line.split()[1:2] for line in lines if line.strip())  # only the backbone asked for


def test_dry_run_json_lists_the_files_of_the_command(hub_cache_env, tmp_path):
    env, removed = _cache_without_pieces(hub_cache_env, tmp_path)
    done = run_module("pid.inference.from_ldm", "backbone=flux", "prompt=a red fox", "--dry_run", cwd=tmp_path,
                      env=env)
    assert done.returncode == 0, done.stderr
    files = {f["what"]: f for f in json.loads(done.stdout)["files"]}
    assert {files[w]["status"] for w in ("PiD decoder", f"Gemma {GEMMA}", f"LDM {FLUX_LDM}")} == {"missing"}
    assert files["VAE/RAE ae.safetensors"]["status"] == "present"
    assert files["VAE/RAE ae.safetensors"]["size_bytes"] > 100_000_000  # the full-size FLUX.1 VAE stand-in

    clean = run_module("pid.inference.from_clean", "backbone=flux", f"manifest={REPO / 'assets/clean_image_manifest.jsonl'}",
                       "--dry_run", cwd=tmp_path, env=hub_cache_env)
    assert clean.returncode == 0, clean.stderr
    files = {f["what"]: f for f in json.loads(clean.stdout)["files"]}
    assert files["PiD decoder"]["status"] == "present" and files["PiD decoder"]["size_bytes"] > 0
    assert files[f"Gemma {GEMMA}"]["status"] == "present"
    assert not any(w.startswith("LDM") for w in files)  # from_clean loads no LDM


def test_gated_ldm_online_names_its_licence(hub_cache_env, tmp_path):
    env = dict(hub_cache_env, HF_HUB_OFFLINE="0")  # nothing contacts the hub either way
    done = run_module("pid.inference.from_ldm", "backbone=sd3", "prompt=a red fox", "--dry_run", cwd=tmp_path,
                      env=env)
    assert done.returncode == 0, done.stderr
    (ldm,) = [f for f in json.loads(done.stdout)["files"] if f["what"].startswith("LDM")]
    assert ldm["status"] == "gated"
    assert ldm["licence"] == "https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers"
