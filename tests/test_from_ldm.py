"""from_ldm end to end on tiny offline pipelines and a tiny PiD decoder; config parsing; errors."""

import json
import os
import socket

import pytest
import torch

from pid.checkpoints import default_ckpt_type, lookup
from pid.decoder import PiDDecoder
from pid.errors import ConfigError, InputError
from pid.inference.cli import Settings
from pid.inference.from_ldm import load_config, main, plan_run, run

from tiny import tiny_caption_encoder, tiny_net
from tiny_pipelines import TINY_SIZE, make_tiny_pipeline, tiny_call_overrides

# Channels of the latent PiD receives from each tiny pipeline (tiny VAEs have few latent channels).
TINY_LATENT_CHANNELS = {
    "flux": 1, "zimage": 16, "zimage-turbo": 16, "sd3": 4, "sdxl": 4, "flux2": 4, "flux2-klein-4b": 4,
    "flux2-klein-9b": 4, "qwenimage": 4, "qwenimage-2512": 4,
}


def tiny_pid(backbone: str, ckpt_type: str | None = None) -> PiDDecoder:
    record = lookup(backbone, ckpt_type or default_ckpt_type(backbone))
    channels = TINY_LATENT_CHANNELS[backbone]
    unpatchify = 2 if record.net_config == "v1pt5_flux2_latent128ch" else 1
    net = tiny_net(record.net_config, latent_channels=channels, latent_unpatchify=unpatchify if channels % 4 == 0 else 1)
    return PiDDecoder(net, record, tiny_caption_encoder())


def tiny_cfg(backbone, tmp_path, *extra, prompt="a red fox in snow"):
    overrides = {k: v for k, v in tiny_call_overrides(backbone).items() if k not in ("guidance_scale",)}
    guidance = tiny_call_overrides(backbone).get("guidance_scale")
    args = [
        f"backbone={backbone}", f"resolution={TINY_SIZE * 4}", "ldm_steps=3",
        "save_xt_steps=[2]", "pid_steps=2", f"output_dir={tmp_path}", "dtype=fp32", "device=cpu",
    ] + ([f"prompt={prompt}"] if prompt is not None else [])
    if guidance is not None:
        args.append(f"guidance_scale={guidance}")
    cfg = load_config(args + list(extra))
    cfg.ldm_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    return cfg


@pytest.mark.parametrize("backbone", sorted(TINY_LATENT_CHANNELS))
def test_every_diffusers_backbone_end_to_end(backbone, tmp_path):
    cfg = tiny_cfg(backbone, tmp_path)
    summary = run(cfg, pipe=make_tiny_pipeline(backbone), decoder=tiny_pid(backbone))
    assert summary["failed"] == [] and summary["images"] == 2
    out = next(tmp_path.iterdir())
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["step"] for m in meta] == ["02xt", "x0"]
    assert meta[0]["sigma"] > 0 and meta[1]["sigma"] == 0
    for label in ("02xt", "x0"):
        for kind in ("pid", "vae", "compare"):
            assert (out / kind / f"step_{label}" / "00000000.png").is_file()
    import imageio.v3 as iio

    assert iio.imread(out / "pid" / "step_x0" / "00000000.png").shape == (256, 256, 3)
    assert (out / "report.html").is_file()  # the run's report, kept up to date by the CLI


def test_resume_skips_finished_prompts_and_overwrite_redoes(tmp_path):
    cfg = tiny_cfg("sd3", tmp_path)
    pipe, dec = make_tiny_pipeline("sd3"), tiny_pid("sd3")
    assert run(cfg, pipe=pipe, decoder=dec)["images"] == 2
    again = run(cfg, pipe=pipe, decoder=dec)
    assert again["images"] == 0 and again["skipped"] == 1
    cfg.overwrite = True
    assert run(cfg, pipe=pipe, decoder=dec)["images"] == 2


def test_reference_flags_parse_to_the_same_config():
    native = load_config(["backbone=sd3", "prompt=a cat", "save_xt_steps=[24,26]", "pid_ckpt_type=2kto4k",
                          "resolution=4096,3072"])
    reference = load_config(["--backbone", "sd3", "--prompt", "a cat", "--save_xt_steps", "24", "26",
                             "--pid_ckpt_type", "2kto4k", "--resolution", "4096,3072"])
    assert native.to_dict() == reference.to_dict()
    readme = load_config(["--backbone", "flux", "--prompt_file", "prompts.txt", "--save_xt_steps", "24",
                          "--seed", "3", "--ldm_inference_steps", "28", "--cpu_offload", "--save_format", "jpg"])
    assert readme.prompt_file == "prompts.txt" and readme.seed == 3 and readme.cpu_offload is True
    assert readme.ldm_steps == 28 and readme.save_format == "jpg"


def test_bad_input_is_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown backbone 'nope'"):
        load_config(["backbone=nope", "prompt=x"])
    with pytest.raises(ConfigError, match="unknown flag --bogus"):
        load_config(["--bogus", "1"])
    with pytest.raises(ConfigError, match="unknown option colour"):
        load_config(["colour=red"])
    with pytest.raises(ConfigError, match="valid ckpt_type for sdxl: 2kto4k"):
        plan_run(load_config(["backbone=sdxl", "prompt=x", "pid_ckpt_type=2k"]))
    with pytest.raises(ConfigError, match="multiple of 64 px"):
        plan_run(load_config(["backbone=flux", "prompt=x", "resolution=2050"]))
    with pytest.raises(ConfigError, match="nearest: width 2048 or 2112"):
        plan_run(load_config(["backbone=flux", "prompt=x", "resolution=2056"]))  # LDM 514: not a multiple of 16
    with pytest.raises(ConfigError, match="out of range"):
        plan_run(load_config(["backbone=flux", "prompt=x", "save_xt_steps=[40]"]))
    with pytest.raises(ConfigError, match="exactly one of"):
        plan_run(load_config(["backbone=flux"]))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(InputError, match="no prompts"):
        plan_run(load_config(["backbone=flux", f"prompt_file={empty}"]))
    with pytest.raises(ConfigError, match="git clone"):
        plan_run(load_config(["backbone=dinov2", "backbone.repo_path=/nonexistent"]))


def test_main_prints_one_line_error_and_exit_code(capsys):
    assert main(["--backbone", "sdxl", "--prompt", "x", "--pid_ckpt_type", "2k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: backbone 'sdxl' has no '2k' checkpoint")


def test_defaults_follow_checkpoint_type():
    plan = plan_run(load_config(["backbone=flux", "prompt=x"]))
    assert plan.output_size == (2048, 2048) and plan.ldm_size == (512, 512) and plan.ckpt_type == "2k"
    plan = plan_run(load_config(["backbone=qwenimage", "prompt=x"]))
    assert plan.output_size == (4096, 4096) and plan.ldm_size == (1024, 1024) and plan.ckpt_type == "2kto4k"
    plan = plan_run(load_config(["backbone=flux", "prompt=x", "resolution=2304,1728"]))
    assert plan.output_size == (1728, 2304)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, cfg_yaml, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = Settings(cfg_yaml)
    try:
        summary = run(cfg, pipe=make_tiny_pipeline("sd3"), decoder=tiny_pid("sd3"))
    finally:
        from pid.inference.distributed import cleanup

        cleanup()
    (result_dir / f"rank{rank}.json").write_text(json.dumps(summary))


@pytest.mark.slow
def test_two_rank_gloo_run_covers_every_prompt_once(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a cat number {i}" for i in range(5)))
    cfg = tiny_cfg("sd3", tmp_path / "out", f"prompt_file={prompts}", "save_xt_steps=[]",
                   "pid_steps=1", "comparison=false", prompt=None)
    torch.multiprocessing.spawn(
        _rank_main, args=(2, _free_port(), cfg.to_dict(), tmp_path), nprocs=2, join=True
    )
    out = next((tmp_path / "out").iterdir())
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert sorted(m["index"] for m in meta) == [0, 1, 2, 3, 4]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert rank0["ranks"] == 2 and rank0["images"] == 5


def test_batched_pid_decode_of_captures(tmp_path):
    cfg = tiny_cfg("sd3", tmp_path, "pid_batch=2", "save_xt_steps=[1,2]")
    calls = []
    dec = tiny_pid("sd3")
    original = dec.decode
    dec.decode = lambda latent, **kw: calls.append((latent.shape[0], list(kw["degrade_sigma"]))) or original(latent, **kw)
    summary = run(cfg, pipe=make_tiny_pipeline("sd3"), decoder=dec)
    assert summary["images"] == 3 and [b for b, _ in calls] == [2, 1]
    sigmas = calls[0][1]
    assert sigmas[0] > sigmas[1] > 0 and calls[1][1] == [0.0]


def test_caption_offload_encodes_everything_first(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na cat\n")
    cfg = tiny_cfg("sd3", tmp_path / "out", f"prompt_file={prompts}", "save_xt_steps=[]",
                   "pid_steps=1", "caption_encoder_offload=true", prompt=None)
    dec = tiny_pid("sd3")
    seen = []
    original = dec.text_encoder._encode_uncached
    dec.text_encoder._encode_uncached = lambda caps: seen.append(list(caps)) or original(caps)
    order = []
    pipe = make_tiny_pipeline("sd3")

    class Spy:
        def __getattr__(self, name):
            return getattr(pipe, name)

        def __call__(self, *a, **k):
            order.append(len(seen))
            return pipe(*a, **k)

    summary = run(cfg, pipe=Spy(), decoder=dec)
    assert summary["images"] == 3
    assert seen == [["a cat", "a dog"]]  # both captions in one batch, before the LDM ran
    assert order[0] == 1


def test_ldm_stop_at_skips_the_remaining_denoiser_calls(tmp_path):
    pipe = make_tiny_pipeline("sd3")
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        summary = run(tiny_cfg("sd3", tmp_path, "ldm_stop_at=2", "save_xt_steps=[1]"), pipe=pipe,
                      decoder=tiny_pid("sd3"))
    finally:
        hook.remove()
    assert len(calls) == 2  # steps 1 and 2 of 3 ran (SD3 batches its CFG pair into one forward call)
    assert summary["steps_run"] == 2 and summary["steps_skipped"] == 1 and summary["images"] == 2
    out = next(tmp_path.iterdir())
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["step"] for m in meta] == ["01xt", "02xt"]  # x0 was never computed
    assert all(m["denoiser_steps"] == {"run": 2, "skipped": 1} for m in meta)
    assert not (out / "pid" / "step_x0").exists()
    with pytest.raises(ConfigError, match="come after ldm_stop_at=1"):
        plan_run(tiny_cfg("sd3", tmp_path, "ldm_stop_at=1", "save_xt_steps=[2]"))
