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
    # online, but the endpoint is a closed local port: no size is known, nothing leaves the machine
    env = dict(hub_cache_env, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    done = run_module("pid.inference.from_ldm", "backbone=sd3", "prompt=a red fox", "--dry_run", cwd=tmp_path,
                      env=env)
    assert done.returncode == 0, done.stderr
    (ldm,) = [f for f in json.loads(done.stdout)["files"] if f["what"].startswith("LDM")]
    assert ldm["status"] == "gated"
    assert ldm["licence"] == "https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers"


# --- download sizes, asked of a hub on this machine's loopback (HF_ENDPOINT), as a user online would see them --

GEMMA_FILES = {"config.json": 1_000, "model-00001-of-00002.safetensors": 4_000_000_000,
               "model-00002-of-00002.safetensors": 1_000_000_000, "pytorch_model.bin": 9_000_000_000,
               "README.md": 10, "gemma.gguf": 3_000_000_000}
FLUX_LDM_FILES = {"model_index.json": 500, "flux1-dev.safetensors": 23_800_000_000, "ae.safetensors": 335_000_000,
                  "transformer/diffusion_pytorch_model-00001-of-00002.safetensors": 10_000_000_000,
                  "transformer/diffusion_pytorch_model-00002-of-00002.safetensors": 13_800_000_000,
                  "transformer/diffusion_pytorch_model.fp16.safetensors": 11_900_000_000,
                  "vae/diffusion_pytorch_model.safetensors": 168_000_000, "vae/config.json": 800,
                  "text_encoder_2/model.safetensors": 9_500_000_000, "tokenizer/vocab.json": 1_000_000,
                  "dev_grid.jpg": 1_000_000}
# what from_pretrained fetches: the pipeline's folders (no root checkpoints, no fp16 copy, no image) / the model's
# safetensors, config and tokenizer files at its root (no .bin, .gguf, README)
FLUX_LDM_LOADED = 500 + 10_000_000_000 + 13_800_000_000 + 168_000_000 + 800 + 9_500_000_000 + 1_000_000
GEMMA_LOADED = 1_000 + 4_000_000_000 + 1_000_000_000


def _pid_file_size(path: str) -> int:
    return 2_000_000_000 + len(path)  # a distinct size per nvidia/PiD file


def _pid_files() -> dict[str, int]:
    """nvidia/PiD as listed by the hub: the flux decoders, the FLUX.1 VAE and a README."""
    from pid.checkpoints import ckpt_types, lookup

    paths = [p for t in ckpt_types("flux") for p in lookup("flux", t).hub_paths] + ["checkpoints/ae.safetensors"]
    return {**{p: _pid_file_size(p) for p in paths}, "README.md": 100}


class _FakeHub:
    """The hub API call the preflight makes (a repo's model info with its file sizes), served from fixed
    listings on 127.0.0.1; every request is recorded."""

    def __init__(self):
        import http.server
        import threading
        from urllib.parse import unquote, urlsplit

        hub = self
        self.requests: list[str] = []
        listings = {GEMMA: GEMMA_FILES, FLUX_LDM: FLUX_LDM_FILES, hub_cache.PID_REPO: _pid_files()}

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # /api/models/<org>/<name>[/revision/<rev>]
                hub.requests.append(f"GET {self.path}")
                parts = unquote(urlsplit(self.path).path).split("/")[3:]
                repo = "/".join(parts[:2])
                if repo in listings and (len(parts) == 2 or parts[2] == "revision"):
                    siblings = [{"rfilename": p, "size": s} for p, s in listings[repo].items()]
                    return self._reply({"id": repo, "siblings": siblings})
                self._reply(None)

            def log_message(self, *args):  # quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self, base: dict[str, str], tmp_path: Path, offline: str) -> dict[str, str]:
        """An empty hub cache, this hub as the endpoint, no proxy."""
        (tmp_path / "empty_cache").mkdir(exist_ok=True)
        env = {k: v for k, v in base.items() if "proxy" not in k.lower()}
        return dict(env, HF_HUB_CACHE=str(tmp_path / "empty_cache"), HF_ENDPOINT=self.endpoint, HF_HUB_OFFLINE=offline,
                    NO_PROXY="127.0.0.1,localhost")


def test_loaded_files_size_counts_what_from_pretrained_fetches():
    from pid.hub import loaded_files_size

    assert loaded_files_size(FLUX_LDM_FILES) == FLUX_LDM_LOADED
    assert loaded_files_size(GEMMA_FILES) == GEMMA_LOADED
    # a folder with only a variant keeps it; no listed size -> unknown
    assert loaded_files_size({"model_index.json": 1, "unet/model.fp16.safetensors": 7}) == 8
    assert loaded_files_size({"README.md": 5, "model.safetensors": None}) is None


def test_online_the_dry_run_and_verify_env_give_the_download_size_and_offline_ask_nothing(hub_cache_env, tmp_path):
    from pid.checkpoints import default_ckpt_type, lookup
    from pid.preflight import describe_size

    hub = _FakeHub()
    try:
        online = hub.env(hub_cache_env, tmp_path, offline="0")
        done = run_module("pid.inference.from_ldm", "backbone=flux", "prompt=a red fox", "--dry_run",
                          cwd=tmp_path, env=online)
        assert done.returncode == 0, done.stderr
        files = {f["what"]: f for f in json.loads(done.stdout)["files"]}
        decoder = lookup("flux", default_ckpt_type("flux"))
        assert files["PiD decoder"]["status"] == "would download"
        assert files["PiD decoder"]["size_bytes"] == _pid_file_size(decoder.hub_path)
        assert files["VAE/RAE ae.safetensors"]["size_bytes"] == _pid_file_size("checkpoints/ae.safetensors")
        assert files[f"Gemma {GEMMA}"]["size_bytes"] == GEMMA_LOADED
        assert files[f"LDM {FLUX_LDM}"]["status"] == "gated"  # FLUX.1-dev: licence first, and its size
        assert files[f"LDM {FLUX_LDM}"]["size_bytes"] == FLUX_LDM_LOADED

        proc = _verify(online, tmp_path, "--backbone", "flux")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ldm_line = next(line for line in proc.stdout.splitlines() if line.startswith("gated"))
        assert f"[{describe_size(FLUX_LDM_LOADED)}]" in proc.stdout, ldm_line
        assert f"[{describe_size(GEMMA_LOADED)}]" in proc.stdout
        assert max(map(len, proc.stdout.splitlines())) <= 100

        asked = len(hub.requests)
        offline = run_module("pid.inference.from_ldm", "backbone=flux", "prompt=a red fox", "--dry_run",
                             cwd=tmp_path, env=hub.env(hub_cache_env, tmp_path, offline="1"))
        assert offline.returncode == 0, offline.stderr
        assert {f["size_bytes"] for f in json.loads(offline.stdout)["files"]} == {None}
        assert len(hub.requests) == asked  # HF_HUB_OFFLINE=1: the hub is not asked
        assert len(hub.requests) == 2 * 3  # one question per repo and run (nvidia/PiD, Gemma-2, FLUX.1-dev)
    finally:
        hub.server.shutdown()
