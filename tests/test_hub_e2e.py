"""The CLIs as users type them, resolving every model from a Hugging Face cache of tiny stand-ins.

Nothing is passed in-process: the subprocesses find PiD, the VAE, Gemma-2 and the LDM under their real
repo ids in HF_HUB_CACHE, offline (see tests/hub_cache.py).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tiny_pipelines import tiny_call_overrides

PYTHON = sys.executable


def _run(args, env, cwd, timeout=600):
    proc = subprocess.run([PYTHON, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _hydra_value(value) -> str:
    """A Python value as a Hydra override value (dicts as {k:v,...}, strings quoted)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"'{value}'"
    return str(value)


@pytest.mark.slow  # a fresh interpreter importing diffusers + transformers: > 10 s here
def test_cache_resolves_through_every_hub_loader(hub_cache_env, tmp_path):
    script = """
import torch
from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache
from diffusers import ZImagePipeline
from transformers import AutoModel, AutoTokenizer
from pid.checkpoints import describe_checkpoint, lookup, resolve_checkpoint
from pid.decoder import PiDDecoder

rec = lookup("flux", "2kto4k")
assert "/snapshots/" in hf_hub_download("nvidia/PiD", rec.hub_path)
assert try_to_load_from_cache("nvidia/PiD", "checkpoints/ae.safetensors")
assert (snapshot_download("nvidia/PiD", allow_patterns=["checkpoints/*"]) + "/checkpoints")
assert type(ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo")).__name__ == "ZImagePipeline"
AutoTokenizer.from_pretrained("Efficient-Large-Model/gemma-2-2b-it")
AutoModel.from_pretrained("Efficient-Large-Model/gemma-2-2b-it")
info = describe_checkpoint(rec)
assert info["local_file"] and info["hub_file"].startswith("checkpoints_deprecated/"), info
main = PiDDecoder.from_pretrained("flux", "2k", device="cpu")
v1 = PiDDecoder.from_pretrained("flux", "2k", device="cpu", revision="v1", text_encoder=main.text_encoder)
a, b = (next(iter(d.net.state_dict().values())) for d in (main, v1))
assert not torch.equal(a, b), "revision v1 must load other weights"
print("OK", main.net.cfg.hidden_size)
"""
    proc = _run(["-c", script], hub_cache_env, tmp_path)
    assert "OK 64" in proc.stdout


@pytest.mark.slow  # a fresh interpreter importing diffusers + transformers: > 10 s here
def test_from_ldm_zimage_turbo_resolves_everything_from_the_cache(hub_cache_env, tmp_path):
    out = tmp_path / "out"
    ldm_kwargs = _hydra_value(tiny_call_overrides("zimage-turbo"))
    _run(
        ["-m", "pid.inference.from_ldm", "backbone=zimage-turbo", "prompt=a red fox", "resolution=256",
         "ldm_steps=2", f"ldm_kwargs={ldm_kwargs}", f"output_dir={out}", "device=cpu", "dtype=fp32",
         "pid_steps=1"],
        hub_cache_env, tmp_path,
    )  # fmt: skip
    pid_images = sorted(out.rglob("pid/step_x0/*.png"))
    vae_images = sorted(out.rglob("vae/step_x0/*.png"))
    assert len(pid_images) == 1 and len(vae_images) == 1
    assert Image.open(pid_images[0]).size == (256, 256)
    meta = [json.loads(line) for line in next(out.rglob("metadata.jsonl")).read_text().splitlines()]
    assert meta[0]["backbone"] == "zimage-turbo" and meta[0]["output_size"] == [256, 256]


def test_plain_ldm_kwargs_override_is_accepted():
    from pid.inference.from_ldm import load_config

    cfg = load_config(["backbone=zimage-turbo", "ldm_kwargs={max_sequence_length:32,text_encoder_out_layers:[1]}"])
    assert cfg.ldm_kwargs == {"max_sequence_length": 32, "text_encoder_out_layers": [1]}
    assert load_config(["ldm_kwargs={\"negative_prompt\": \"blurry, dark\"}"]).ldm_kwargs == {
        "negative_prompt": "blurry, dark"}


@pytest.mark.slow  # a fresh interpreter importing diffusers + transformers: > 10 s here
def test_from_clean_flux_resolves_everything_from_the_cache(hub_cache_env, tmp_path):
    rng = np.random.default_rng(0)
    image = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    _run(
        ["-m", "pid.inference.from_clean", "backbone=flux", f"input_path={image}", f"output_dir={out}",
         "device=cpu", "pid_steps=1", "plot=false", "prompt=a red fox"],
        hub_cache_env, tmp_path,
    )  # fmt: skip
    pid_images = sorted(out.rglob("pid/*/*.png"))
    assert pid_images, sorted(p.relative_to(out) for p in out.rglob("*"))
    # 64 px -> FLUX.1 VAE /8 -> 8x8 latent -> PiD 4x of the image: 256 px
    assert Image.open(pid_images[0]).size == (256, 256)


@pytest.mark.parametrize("what", ["pipeline", "decoder"])
def test_missing_from_cache_is_one_line_with_the_download_command(hub_cache_env, tmp_path, what):
    if what == "pipeline":
        # its decoder (flux2/2k) and Gemma are cached, its LDM is not
        args = ["-m", "pid.inference.from_ldm", "backbone=flux2-klein-4b", "prompt=x", "resolution=256",
                "device=cpu"]
        expected = "hf download black-forest-labs/FLUX.2-klein-4B"
    else:
        args = ["-m", "pid.inference.from_ldm", "backbone=flux2", "prompt=x", "resolution=256", "device=cpu",
                "pid_ckpt_type=2kto4k"]
        expected = ("hf download nvidia/PiD checkpoints_deprecated/"
                    "PiD_res2kto4k_sr4x_official_flux2_distill_4step_2606/model_ema_bf16.pth")
    proc = subprocess.run([PYTHON, *args], env=hub_cache_env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
