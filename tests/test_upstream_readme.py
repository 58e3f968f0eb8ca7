"""The upstream README's commands, typed as it prints them, resolve to the right decoder, sizes, steps and prompts
(checked with --dry_run, which loads and downloads nothing)."""

import json

import pytest

from pid.inference import from_clean, from_ldm
from pid.inference.io import shipped_prompt_sets

from cli_driver import REPO, cli_env, dry_run, run_module

FROM_LDM = "pid._src.inference.from_ldm"
FROM_CLEAN = "pid._src.inference.from_clean"
CAT = ("A photorealistic half-body portrait of a brown tabby cat with bold stripes sitting attentively on a rustic "
       "wooden kitchen table, soft morning light streaming sideways through a large window, fine fur detail and "
       "stripe patterns sharply visible, intense amber-green eyes in razor-sharp focus, warm farmhouse kitchen "
       "softly out of focus, cinematic shallow depth of field, ultra-detailed fur texture, photorealistic")


def test_example_1_flux_2k_single_prompt():
    plan = dry_run(FROM_LDM, "--backbone", "flux", "--prompt", CAT, "--ldm_inference_steps", "28",
                   "--save_xt_steps", "24", "--output_dir", "./results/official_demo/flux", "--pid_inference_steps", "4",
                   env=cli_env(PYTHONPATH="."))
    assert plan["entry"] == "from_ldm" and plan["backbone"] == "flux" and plan["ckpt_type"] == "2k"
    assert plan["checkpoint"]["folder"] == "PiD_res2k_sr4x_official_flux_distill_4step"
    assert plan["checkpoint"]["hub_file"] == "checkpoints/PiD_res2k_sr4x_official_flux_distill_4step/model_ema_bf16.pth"
    assert plan["net_config"] == "v1_latent16ch" and plan["scale"] == 4 and plan["pid_steps"] == 4
    assert plan["ldm_model"] == "black-forest-labs/FLUX.1-dev" and plan["ldm_steps"] == 28
    assert plan["ldm_size"] == [512, 512] and plan["output_size"] == [2048, 2048]
    assert plan["capture_steps"] == [24] and plan["prompts"] == [CAT]
    assert plan["output_dir"].startswith("results/official_demo/flux/flux_")


def test_example_2_flux_2kto4k_at_4_by_3():
    plan = dry_run(FROM_LDM, "--backbone", "flux", "--prompt", "A close photograph of a cat looking through frosted "
                   "glass beside a small pine branch, winter light, soft condensation, simple cozy composition, "
                   "expressive eyes.", "--resolution", "4096,3072", "--pid_ckpt_type", "2kto4k",
                   "--ldm_inference_steps", "28", "--save_xt_steps", "24", "26",
                   "--output_dir", "./results/official_demo/flux_4k_ar4_3")
    assert plan["ckpt_type"] == "2kto4k" and plan["net_config"] == "v1_latent16ch"
    assert plan["checkpoint"]["folder"] == "PiD_res2kto4k_sr4x_official_flux_distill_4step"
    assert plan["checkpoint"]["hub_file"].endswith("PiD_res2kto4k_sr4x_official_flux_distill_4step/model_ema_bf16.pth")
    assert plan["output_size"] == [3072, 4096] and plan["ldm_size"] == [768, 1024]  # [H, W]: the LDM runs at 1024,768
    assert plan["capture_steps"] == [24, 26] and plan["labels"] == ["24xt", "26xt", "x0"]


@pytest.mark.parametrize("rank", [0, 1])
def test_example_3_zimage_prompt_file_under_torchrun_sharding(rank):
    # torchrun sets these for each of its 4 processes; the dry run shows this rank's share of the prompts.
    plan = dry_run(FROM_LDM, "--backbone", "zimage", "--prompt_file", "pid/_src/inference/prompts/prompt_creative.txt",
                   "--ldm_inference_steps", "50", "--save_xt_steps", "46", "--compile",
                   "--output_dir", "./results/official_demo/zimage",
                   env=cli_env(PYTHONPATH=".", RANK=str(rank), WORLD_SIZE="4", LOCAL_RANK=str(rank)))
    every = [line for line in shipped_prompt_sets()["creative"].read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(every) == 12
    assert plan["prompts"] == every[rank::4] and plan["world_size"] == 4
    assert plan["ldm_steps"] == 50 and plan["capture_steps"] == [46] and plan["ckpt_type"] == "2k"
    assert plan["checkpoint"]["folder"] == "PiD_res2k_sr4x_official_flux_distill_4step"  # Z-Image shares FLUX.1's VAE


def test_example_4_zimage_turbo_4k():
    plan = dry_run(FROM_LDM, "--backbone", "zimage-turbo", "--prompt_file",
                   "pid/_src/inference/prompts/prompt_zimage_turbo.txt", "--resolution", "4096", "--pid_ckpt_type",
                   "2kto4k", "--output_dir", "./results/official_demo/zimage_turbo_4k")
    assert plan["ldm_steps"] == 9 and plan["ldm_size"] == [1024, 1024] and plan["output_size"] == [4096, 4096]
    assert plan["checkpoint"]["folder"] == "PiD_res2kto4k_sr4x_official_flux_distill_4step"
    assert plan["capture_steps"] == [] and plan["labels"] == ["x0"] and len(plan["prompts"]) == 5


def test_from_clean_example_and_upstream_manifest_paths(tmp_path):
    plan = dry_run(FROM_CLEAN, "--backbone", "flux", "--manifest", "assets/clean_image_manifest.jsonl",
                   "--degrade_sigmas", "0.0", "--output_dir", "./results/official_demo_from_clean/flux",
                   "--cfg_scale", "1", "--pid_inference_steps", "4", "--scale", "4")
    assert plan["entry"] == "from_clean" and plan["degrade_sigmas"] == [0.0] and plan["missing"] == []
    assert plan["images"] and all((REPO / "assets").as_posix() in p for p in plan["images"])
    # an upstream-style manifest names images relative to the working folder, not to itself
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "0072.jpg").write_bytes((REPO / "assets" / "colour_chart.png").read_bytes())
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "m.jsonl").write_text(json.dumps({"image": "assets/0072.jpg", "prompt": "a chart"}) + "\n"
                                       + json.dumps({"image": "assets/none.jpg"}) + "\n")
    plan = dry_run("pid.inference.from_clean", "backbone=flux", "manifest=manifests/m.jsonl", cwd=tmp_path)
    assert plan["images"] == [str(tmp_path / "assets" / "0072.jpg")] and plan["prompts"] == ["a chart"]
    [missing] = plan["missing"]
    assert str(manifests / "assets" / "none.jpg") in missing["reason"] and str(tmp_path / "assets" / "none.jpg") in \
        missing["reason"]


def test_from_clean_prose_variants_single_image_sigma_sweep_and_other_vaes():
    image = "assets/colour_chart.png"
    plan = dry_run(FROM_CLEAN, "--backbone", "sdxl", "--input_path", image, "--prompt", "a colour chart",
                   "--degrade_sigmas", "0.0", "0.2", "0.4", "0.8")
    assert plan["degrade_sigmas"] == [0.0, 0.2, 0.4, 0.8] and plan["ckpt_type"] == "2kto4k"
    assert plan["prompts"] == ["a colour chart"] and plan["net_config"] == "v1_sdxl_latent4ch"


@pytest.mark.parametrize(("backbone", "steps", "xt", "ckpt_type"), [
    ("sd3", 28, ["22", "24", "26"], "2k"), ("sdxl", 30, ["24", "26", "28"], "2kto4k"),
    ("flux2", 50, ["44", "46", "48"], "2k"), ("flux2-klein-4b", 4, ["2", "3"], "2k"),
    ("flux2-klein-9b", 4, ["2", "3"], "2kto4k"), ("qwenimage", 50, ["44", "46", "48"], "2kto4k"),
    ("qwenimage-2512", 50, ["44", "46", "48"], "2kto4k"), ("flux2", 50, ["46"], "2kto4k"),
])
def test_every_backbone_of_the_table_with_its_suggested_steps(backbone, steps, xt, ckpt_type, capsys):
    # in-process (the subprocess path is the same code; these run fast)
    code = from_ldm.main(["--backbone", backbone, "--prompt", "x", "--ldm_inference_steps", str(steps),
                          "--save_xt_steps", *xt, "--pid_ckpt_type", ckpt_type, "--dry_run"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["ldm_steps"] == steps and plan["capture_steps"] == [int(s) for s in xt]
    assert plan["ckpt_type"] == ckpt_type
    if backbone.startswith("flux2") and ckpt_type == "2kto4k":
        assert plan["checkpoint"]["folder"] == "PiD_res2kto4k_sr4x_official_flux2_distill_4step_2606"
    default = 2048 if ckpt_type == "2k" else 4096
    assert plan["output_size"] == [default, default]


def _fake_rae_repo(root):
    (root / "src" / "stage1").mkdir(parents=True)
    (root / "configs").mkdir()
    return root


def test_dinov2_commands_resolution_is_the_ldm_size_and_env_repo_path(tmp_path):
    repo = _fake_rae_repo(tmp_path / "RAE")
    plan = dry_run(FROM_LDM, "--backbone", "dinov2", "--resolution", "512", "--rae_class_ids", "207", "281", "387",
                   "--num_inference_steps", "50", "--save_xt_steps", "46", "--scale", "4", "--load_ema_to_reg",
                   env=cli_env(RAE_REPO_PATH=str(repo)))
    assert plan["ldm_size"] == [512, 512] and plan["output_size"] == [2048, 2048] and plan["ldm_model"] == str(repo)
    assert plan["prompts"] == ["207", "281", "387"] and plan["ckpt_type"] == "2k"
    bad = run_module(FROM_LDM, "--backbone", "dinov2", "--resolution", "1024", "--rae_class_ids", "1", "--dry_run",
                     env=cli_env(RAE_REPO_PATH=str(repo)))
    assert bad.returncode == 2 and "generates at 512 px only" in bad.stderr


def test_siglip_resolution_256_is_the_ldm_size(tmp_path, monkeypatch, capsys):
    from pid.inference import scale_rae_flow

    monkeypatch.setattr(scale_rae_flow, "check_scale_rae_transformers", lambda: None)  # needs transformers 4.57 here
    (tmp_path / "scale_rae").mkdir()  # stands in for a clone of the upstream repository
    monkeypatch.setenv("SCALE_RAE_REPO_PATH", str(tmp_path))
    assert from_ldm.main(["--backbone", "siglip", "--resolution", "256", "--prompt", "a fox", "--dry_run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["ldm_size"] == [256, 256] and plan["output_size"] == [2048, 2048] and plan["scale"] == 8


def test_shipped_prompt_sets_by_short_name_and_upstream_path(tmp_path, capsys):
    sets = shipped_prompt_sets()
    assert set(sets) >= {"creative", "zimage_turbo"}
    assert from_ldm.main(["backbone=zimage-turbo", "prompt_file=zimage_turbo", "--dry_run"]) == 0
    assert len(json.loads(capsys.readouterr().out)["prompts"]) == 5
    # the upstream path works from any folder, not only the repository root
    plan = dry_run("pid.inference.from_ldm", "prompt_file=pid/_src/inference/prompts/prompt_creative.txt",
                   cwd=tmp_path)
    assert len(plan["prompts"]) == 12
    done = run_module("pid.inference.from_ldm", "prompt_file=nonexistent_set", "--dry_run", cwd=tmp_path)
    assert done.returncode == 2 and "creative, zimage_turbo" in done.stderr


def test_pid_inference_steps_checked_before_loading(capsys):
    assert from_ldm.main(["prompt=x", "--pid_inference_steps", "0", "--dry_run"]) == 2
    assert "pid_steps must be >= 1" in capsys.readouterr().err
    assert from_ldm.main(["prompt=x", "--pid_inference_steps", "6", "--dry_run"]) == 0
    assert json.loads(capsys.readouterr().out)["pid_steps"] == 6


def test_from_clean_dry_run_spellings_mix(capsys):
    assert from_clean.main(["backbone=sd3", "--input_path", "assets/colour_chart.png", "dry_run=true",
                            "degrade_sigmas=0,0.5"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["degrade_sigmas"] == [0.0, 0.5] and plan["backbone"] == "sd3"
