"""Declared latent spaces through the CLIs, as a user types them (issue 18)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from declared_spaces import save_tiny_gemma, write_decoder, write_spaces
from PIL import Image

from cli_driver import run_module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo_vae")
    paths = write_spaces(root)
    paths["decoder"] = write_decoder(root / "sd15_pid.safetensors", 4, paths["sd15"])
    paths["gemma"] = save_tiny_gemma(root / "gemma")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(root / "photo.png")
    paths["image"] = root / "photo.png"
    return paths


def test_from_clean_end_to_end_with_only_the_decoder_file(setup, tmp_path):
    done = run_module("pid.inference.from_clean", f"pid_checkpoint={setup['decoder']}", f"input_path={setup['image']}",
                      "prompt=a red fox in snow", f"text_encoder={setup['gemma']}", "device=cpu", "pid_steps=1",
                      "degrade_sigmas=[0,0.3]", f"output_dir={tmp_path}", "plot=false")
    assert done.returncode == 0, done.stderr[-2000:]
    [out] = list(tmp_path.iterdir())
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {(r["decoder"], float(r["sigma"])) for r in rows} == {(d, s) for d in ("vae", "pid") for s in (0.0, 0.3)}
    assert {r["backbone"] for r in rows} == {"sd15"}
    # 40x24 is already a multiple of the space's 8 px cell; PiD decodes at 4x
    assert {r["output_size"] for r in rows if r["decoder"] == "pid"} == {"160x96"}
    assert {r["output_size"] for r in rows if r["decoder"] == "vae"} == {"40x24"}
    assert all(0 < float(r["psnr"]) < 100 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backbone"] == "sd15" and summary["ckpt_type"] == "custom"


def _common(setup, tmp_path):
    return [f"input_path={setup['image']}", f"text_encoder={setup['gemma']}", "device=cpu", f"output_dir={tmp_path}"]


def test_from_clean_channel_mismatch_is_one_line(setup, tmp_path):
    common = _common(setup, tmp_path)
    done = run_module("pid.inference.from_clean", f"pid_checkpoint={setup['decoder']}",
                      f"latent_space={setup['vae32']}", *common)
    assert done.returncode == 2
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "decodes 4-channel latents but latent space vae32 has 32 channels" in lines[0]


def test_from_clean_missing_vae_is_one_line(setup, tmp_path):
    common = _common(setup, tmp_path)
    missing = tmp_path / "gone.yaml"
    missing.write_text(f"vae: {tmp_path / 'no_such_vae'}\n")
    done = run_module("pid.inference.from_clean", f"pid_checkpoint={setup['decoder']}", f"latent_space={missing}",
                      *common)
    assert done.returncode == 2
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "no_such_vae does not exist" in lines[0]
    assert not any(tmp_path.glob("*/metrics.csv"))


def test_train_dry_run_for_a_declared_32_channel_space(setup, tmp_path):
    from train_harness import make_images

    images = make_images(tmp_path / "images")
    done = run_module("pid.train", f"latent_space={setup['vae32']}", f"data={images}", "resolution=64",
                      f"output_dir={tmp_path / 'runs'}", "--dry_run")
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout)
    cfg = plan["net_config"]
    assert (cfg["latent_channels"], cfg["latent_downsample"], cfg["latent_unpatchify"]) == (32, 8, 1)
    # the released v1.5 backbone (hub PixelDiT weights) with a fresh adapter for this space
    assert cfg["hidden_size"] == 1536 and cfg["patch_depth"] == 14 and plan["init"]["kind"] == "pixeldit"
    assert plan["output_dir"] == str(tmp_path / "runs" / "vae32_teacher")


def test_train_plan_for_a_patchified_declared_space(setup, tmp_path):
    from pid.inference.cli import parse_command
    from pid.train.__main__ import TRAIN
    from pid.train.plan import plan_run

    from train_harness import make_images

    images = make_images(tmp_path / "images")
    patched = tmp_path / "vae32_p2.yaml"
    patched.write_text(f"vae: {setup['vae32_folder']}\npatchify: 2\n")
    plan = plan_run(parse_command(TRAIN, [f"latent_space={patched}", f"data={images}", "resolution=64",
                                          f"output_dir={tmp_path / 'runs'}"]).settings)
    # the same VAE 2x2-patchified is FLUX.2's layout: exactly the released FLUX.2 v1.5 network
    assert plan.describe()["net_config"] == "v1pt5_flux2_latent128ch"
    assert plan.backbone == str(patched) and plan.run_dir.name == "vae32_p2_teacher"


@pytest.fixture(scope="module")
def sd15(tmp_path_factory, setup):
    """A tiny StableDiffusionPipeline saved as a folder, its declared space and a decoder file carrying it."""
    from declared_spaces import tiny_sd15_pipeline

    root = tmp_path_factory.mktemp("sd15_pipe")
    pipe = tiny_sd15_pipeline()
    pipe.save_pretrained(root / "pipe")
    (root / "sd15.yaml").write_text(f"vae: {root / 'pipe'}\nnoise_form: vp\n")
    return {"pipe": pipe, "folder": root / "pipe", "decoder": write_decoder(root / "pid.safetensors", 4,
                                                                            root / "sd15.yaml")}


def test_attach_any_pipeline_with_a_decoder_that_carries_its_space(sd15):
    import pid

    from tiny import tiny_caption_encoder

    pipe = sd15["pipe"]
    pid_pipe = pid.attach(pipe, pid_checkpoint=str(sd15["decoder"]), text_encoder=tiny_caption_encoder(),
                          device="cpu", pid_steps=1)
    assert pid_pipe.backbone == "sd15" and pid_pipe.space.vae is pipe.vae  # the pipeline's own VAE
    out = pid_pipe("a cat", height=32, width=32, num_inference_steps=3, output_type="pt", pid_stop_at=2)
    assert out.images.shape == (1, 3, 128, 128)
    [report] = out.pid_report
    assert report.step == "02xt" and report.denoiser_steps_run == 2 and 0 < report.sigma < 1
    # the same latent decoded by hand: Euler (VE) frame -> VP frame, as SDXL
    sigma_ve = float(pipe.scheduler.sigmas[2])
    assert report.sigma == pytest.approx(sigma_ve / (sigma_ve**2 + 1) ** 0.5)
    # a registered backbone's decoder on this pipeline is refused in one line
    from tiny import tiny_decoder

    with pytest.raises(Exception, match="StableDiffusionPipeline"):
        pid.attach(pipe, tiny_decoder("sdxl", "2kto4k"))


def test_from_ldm_plan_for_an_unregistered_pipeline(setup, sd15, tmp_path):
    from pid.errors import ConfigError
    from pid.inference.from_ldm import load_config, plan_run

    args = [f"pid_checkpoint={sd15['decoder']}", "prompt=a cat", "resolution=128", f"output_dir={tmp_path}"]
    plan = plan_run(load_config([*args, f"model_id={sd15['folder']}"]))
    assert plan.backbone == "sd15" and plan.kind == "diffusers" and plan.ldm_size == (32, 32)
    assert plan.pipeline.pipeline_class.endswith("StableDiffusionPipeline") and plan.ldm_steps == 50
    assert plan.identity["latent_space"]["noise_form"] == "vp"
    # the space as inline JSON options instead of the file the decoder carries
    inline = json.dumps({"name": "sd15", "vae": str(sd15["folder"]), "noise_form": "flow"})
    plan = plan_run(load_config([*args, f"model_id={sd15['folder']}", f"latent_space={inline}"]))
    assert plan.identity["latent_space"] == {"name": "sd15", "vae": str(sd15["folder"])}
    with pytest.raises(ConfigError, match="give model_id="):
        plan_run(load_config(args))
    with pytest.raises(ConfigError, match="pipeline_class= is for declared latent spaces"):
        plan_run(load_config(["backbone=flux", "prompt=x", "pipeline_class=StableDiffusionPipeline"]))


@pytest.mark.slow
def test_from_ldm_with_an_unregistered_pipeline_folder(setup, sd15, tmp_path):
    done = run_module("pid.inference.from_ldm", f"pid_checkpoint={sd15['decoder']}", f"model_id={sd15['folder']}",
                      "prompt=a cat", f"text_encoder={setup['gemma']}", "device=cpu", "dtype=fp32", "resolution=128",
                      "ldm_steps=3", "save_xt_steps=2", "pid_steps=1", f"output_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    [out] = list(tmp_path.iterdir())
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(r["step"], r["backbone"]) for r in rows] == [("02xt", "sd15"), ("x0", "sd15")]
    assert rows[0]["sigma"] > 0 and rows[1]["sigma"] == 0
    for row in rows:
        assert Image.open(out / row["pid"]).size == (128, 128) and Image.open(out / row["vae"]).size == (32, 32)


def test_packed_pipeline_latents_use_the_pipelines_unpack_helper():
    import torch

    import pid.latents

    from tiny_pipelines import make_tiny_pipeline

    pipe = make_tiny_pipeline("flux")
    declared = pid.latents.declare(vae="unused/placeholder", name="myflux").from_pipeline(pipe)
    builtin = pid.latents.get("flux").from_pipeline(pipe)
    packed = torch.randn(1, (32 // 2) * (48 // 2), 4, generator=torch.Generator().manual_seed(0))
    grid = declared.from_pipeline_latent(packed, 32, 48)
    assert grid.shape == (1, 1, 32, 48)
    torch.testing.assert_close(grid, builtin.from_pipeline_latent(packed, 32, 48))
