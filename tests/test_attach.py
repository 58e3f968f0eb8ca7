"""pid.attach on tiny pipelines of every diffusers backbone: output types and sizes, bit equality with from_ldm's
PNGs, denoiser calls with pid_stop_at, chained user callbacks, batched prompts, one-line errors."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import pid
from pid.checkpoints import default_ckpt_type, lookup
from pid.decoder import PiDDecoder
from pid.errors import ConfigError, InputError
from pid.inference import from_ldm
from pid.pipeline_wrapper import PiDPipeline, detect_backbone

from tiny import tiny_caption_encoder, tiny_net
from tiny_pipelines import TINY_BACKBONES, TINY_SIZE, make_tiny_pipeline, tiny_call_overrides

PROMPT = "a red fox in snow"
OUT = TINY_SIZE * 4  # every PiD decoder upscales 4x
# Channels of the latent each tiny pipeline's VAE makes.
TINY_LATENT_CHANNELS = {
    "flux": 1, "zimage": 16, "zimage-turbo": 16, "sd3": 4, "sdxl": 4, "flux2": 4, "flux2-klein-4b": 4,
    "flux2-klein-9b": 4, "qwenimage": 4, "qwenimage-2512": 4,
}


@functools.cache
def tiny_decoder(backbone: str) -> PiDDecoder:
    record = lookup(backbone, default_ckpt_type(backbone))
    channels = TINY_LATENT_CHANNELS[backbone]
    unpatchify = 2 if record.net_config == "v1pt5_flux2_latent128ch" and channels % 4 == 0 else 1
    net = tiny_net(record.net_config, latent_channels=channels, latent_unpatchify=unpatchify)
    return PiDDecoder(net, record, tiny_caption_encoder())


def attached(backbone: str, **options) -> PiDPipeline:
    return pid.attach(make_tiny_pipeline(backbone), tiny_decoder(backbone), backbone=backbone, **options)


def ldm_kwargs(backbone: str, seed: int = 0, **extra):
    """What from_ldm passes for the tiny run of tests/test_from_ldm.py: 64 px, 3 steps, CPU generator seed."""
    kwargs = dict(height=TINY_SIZE, width=TINY_SIZE, num_inference_steps=3,
                  generator=torch.Generator("cpu").manual_seed(seed), pid_steps=2)
    kwargs.update(tiny_call_overrides(backbone))
    kwargs.update(extra)
    return kwargs


def from_ldm_pngs(backbone: str, tmp_path) -> dict[str, np.ndarray]:
    """from_ldm's PiD PNGs ("02xt", "x0") for PROMPT, seed 0, with the same pipeline and decoder objects."""
    overrides = tiny_call_overrides(backbone)
    guidance = overrides.pop("guidance_scale", None)
    args = [f"backbone={backbone}", f"prompt={PROMPT}", f"resolution={OUT}", "ldm_steps=3", "save_xt_steps=[2]",
            "pid_steps=2", f"output_dir={tmp_path}", "device=cpu", "comparison=false"]
    if guidance is not None:
        args.append(f"guidance_scale={guidance}")
    cfg = from_ldm.load_config(args)
    cfg.ldm_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    summary = from_ldm.run(cfg, pipe=make_tiny_pipeline(backbone), decoder=tiny_decoder(backbone))
    assert summary["failed"] == []
    found = {}
    for label in ("02xt", "x0"):
        [path] = tmp_path.glob(f"**/pid/step_{label}/00000000.png")
        found[label] = np.asarray(Image.open(path).convert("RGB"))
    return found


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_every_backbone_equals_from_ldm_and_skips_the_remaining_steps(backbone, tmp_path):
    pngs = from_ldm_pngs(backbone, tmp_path)
    assert not np.array_equal(pngs["02xt"], pngs["x0"]) and pngs["x0"].std() > 0  # the comparison means something
    pid_pipe = attached(backbone)
    steps_seen = []

    def user_callback(pipe, step_index, timestep, tensors):
        steps_seen.append(step_index)
        return tensors

    out = pid_pipe(PROMPT, pid_stop_at=2, callback_on_step_end=user_callback, **ldm_kwargs(backbone))
    pipe_package = type(pid_pipe.pipe).__module__.rpartition(".")[0]
    assert type(out).__name__.endswith("PipelineOutput") and type(out).__module__.startswith(pipe_package)
    [image] = out.images
    assert isinstance(image, Image.Image) and image.size == (OUT, OUT)
    assert np.array_equal(np.asarray(image), pngs["02xt"])  # bit for bit with from_ldm's 02xt PNG
    assert steps_seen == [0, 1]  # the user's callback ran on every step that ran, and only those
    assert pid_pipe.pipe.interrupt is False  # the flag is not left set
    [report] = out.pid_report
    assert (report.step, report.ldm_step, report.ldm_steps) == ("02xt", 2, 3)
    assert (report.denoiser_steps_run, report.denoiser_steps_skipped) == (2, 1)
    assert (report.denoiser_calls_run, report.denoiser_calls_skipped) == (2, 1)  # tiny settings: 1 call a step
    assert report.caption == PROMPT and report.ldm_seconds > 0 and report.pid_seconds > 0

    full = pid_pipe(PROMPT, output_type="np", **ldm_kwargs(backbone))
    assert full.images.shape == (1, OUT, OUT, 3) and full.images.dtype == np.float32
    assert np.array_equal((full.images[0] * 255.0).astype(np.uint8), pngs["x0"])  # from_ldm's x0 PNG
    assert (full.pid_report[0].step, full.pid_report[0].denoiser_steps_skipped) == ("x0", 0)


def test_output_types_and_latent_passthrough():
    pid_pipe = attached("sd3")
    pt = pid_pipe(PROMPT, output_type="pt", pid_stop_at=2, **ldm_kwargs("sd3"))
    np_out = pid_pipe(PROMPT, output_type="np", pid_stop_at=2, **ldm_kwargs("sd3"))
    assert isinstance(pt.images, torch.Tensor) and pt.images.shape == (1, 3, OUT, OUT)
    assert pt.images.dtype == torch.float32 and 0 <= pt.images.min() and pt.images.max() <= 1
    assert np.array_equal(pt.images.permute(0, 2, 3, 1).numpy(), np_out.images)
    (images,) = pid_pipe(PROMPT, return_dict=False, pid_stop_at=2, **ldm_kwargs("sd3"))
    assert isinstance(images, list) and images[0].size == (OUT, OUT)

    # latent: the pipeline's own output, untouched (no PiD decode)
    kwargs = ldm_kwargs("sd3")
    kwargs.pop("pid_steps")
    wrapped = pid_pipe(PROMPT, output_type="latent", **kwargs)
    kwargs["generator"] = torch.Generator("cpu").manual_seed(0)
    direct = pid_pipe.pipe(PROMPT, output_type="latent", **kwargs)
    assert type(wrapped) is type(direct) and torch.equal(wrapped.images, direct.images)
    assert wrapped.pid_report == []
    with pytest.raises(ConfigError, match="output_type must be one of pil, np, pt, latent"):
        pid_pipe(PROMPT, output_type="bogus")


def test_pt_output_equals_a_direct_decode_of_the_converted_capture():
    """The float image equals PiD's decode of x_K converted by hand (SDXL: Euler/VE frame -> VP frame)."""
    from pid.inference.step_capture import StepCapture

    pid_pipe = attached("sdxl")
    out = pid_pipe(PROMPT, output_type="pt", pid_stop_at=2, pid_chunk=None, **ldm_kwargs("sdxl"))
    capture = StepCapture([2], 3)
    kwargs = ldm_kwargs("sdxl")
    kwargs.pop("pid_steps")
    pid_pipe.pipe(PROMPT, output_type="latent", callback_on_step_end=capture,
                  callback_on_step_end_tensor_inputs=["latents"], **kwargs)
    latent, sigma = capture.captured[2]
    euler = sigma
    latent = latent.float() / (euler**2 + 1) ** 0.5
    sigma = euler / (euler**2 + 1) ** 0.5
    decoder = pid_pipe.decoder
    expected = decoder.decode(latent, caption=PROMPT, degrade_sigma=sigma, steps=2, seed=0, output_size=(OUT, OUT))
    assert torch.equal(out.images, expected)
    assert out.pid_report[0].sigma == pytest.approx(sigma, rel=1e-6)


def test_cfg_multiple_is_counted_and_skipped():
    pid_pipe = attached("qwenimage")
    cfg = {"true_cfg_scale": 4.0, "negative_prompt": "bad"}  # two transformer calls a step
    out = pid_pipe(PROMPT, pid_stop_at=1, **ldm_kwargs("qwenimage", **cfg))
    report = out.pid_report[0]
    assert (report.denoiser_steps_run, report.denoiser_calls_run, report.denoiser_calls_skipped) == (1, 2, 4)


def test_batched_prompts_give_distinct_images_with_their_own_captions():
    pid_pipe = attached("flux")
    captions_encoded = []
    decoder = pid_pipe.decoder
    original = decoder.encode_captions
    decoder.encode_captions = lambda captions: captions_encoded.append(list(captions)) or original(captions)
    try:
        out = pid_pipe(["a red fox in snow", "a photo of a cat"], num_images_per_prompt=2, output_type="pt",
                       pid_stop_at=2, **ldm_kwargs("flux"))
    finally:
        del decoder.encode_captions
    assert out.images.shape == (4, 3, OUT, OUT)
    expected = ["a red fox in snow"] * 2 + ["a photo of a cat"] * 2
    assert [r.caption for r in out.pid_report] == expected and captions_encoded == [[c] for c in expected]
    assert [r.index for r in out.pid_report] == [0, 1, 2, 3]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(out.images[i], out.images[j]), (i, j)
    # one generator per image passes through too, as does a PiD seed per image
    generators = [torch.Generator("cpu").manual_seed(s) for s in (5, 6)]
    two = pid_pipe(PROMPT, num_images_per_prompt=2, output_type="pt", pid_seed=[1, 2],
                   **ldm_kwargs("flux", generator=generators))
    assert two.images.shape[0] == 2 and not torch.equal(two.images[0], two.images[1])


def test_zimage_turbo_example_stops_after_step_7_of_9():
    """The issue's example: registry defaults for Z-Image-Turbo (9 steps, guidance 0), stop after step 7."""
    pid_pipe = attached("zimage-turbo")
    out = pid_pipe(PROMPT, height=TINY_SIZE, width=TINY_SIZE, max_sequence_length=32, pid_stop_at=7, pid_steps=1)
    report = out.pid_report[0]
    assert (report.ldm_steps, report.denoiser_steps_run, report.denoiser_steps_skipped) == (9, 7, 2)
    assert (report.denoiser_calls_run, report.denoiser_calls_skipped) == (7, 2)  # guidance 0: no CFG
    assert out.images[0].size == (OUT, OUT)


def test_a_user_interrupt_before_the_stop_decodes_the_last_latent():
    pid_pipe = attached("sd3")

    def stop_now(pipe, step_index, timestep, tensors):
        pipe._interrupt = True
        return tensors

    out = pid_pipe(PROMPT, pid_stop_at=2, callback_on_step_end=stop_now, output_type="pt", **ldm_kwargs("sd3"))
    report = out.pid_report[0]
    assert (report.step, report.denoiser_steps_run, report.denoiser_calls_run) == ("01xt", 1, 1)
    assert 0 < report.sigma < 1


def test_decoder_is_picked_from_the_pipelines_latent_space(monkeypatch):
    calls = []

    def fake_from_pretrained(backbone, ckpt_type, **kwargs):
        calls.append((backbone, ckpt_type, kwargs["device"]))
        return tiny_decoder("zimage-turbo")

    monkeypatch.setattr(PiDDecoder, "from_pretrained", staticmethod(fake_from_pretrained))
    pid_pipe = pid.attach(make_tiny_pipeline("zimage"), backbone="zimage-turbo")
    assert calls == [("zimage-turbo", "2k", torch.device("cpu"))] and pid_pipe.backbone == "zimage-turbo"
    assert pid_pipe.pipe is make_tiny_pipeline("zimage")


def _named(cls_name: str, name_or_path: str | None = None):
    return type(cls_name, (), {"name_or_path": name_or_path})()


def test_backbone_detection_from_class_and_model_name():
    assert detect_backbone(make_tiny_pipeline("sdxl")) == "sdxl"
    assert detect_backbone(make_tiny_pipeline("flux2")) == "flux2"
    assert detect_backbone(_named("ZImagePipeline", "Tongyi-MAI/Z-Image-Turbo")) == "zimage-turbo"
    assert detect_backbone(_named("ZImagePipeline", "Tongyi-MAI/Z-Image")) == "zimage"
    assert detect_backbone(_named("ZImagePipeline")) == "zimage"
    assert detect_backbone(_named("Flux2KleinPipeline", "black-forest-labs/FLUX.2-klein-9B")) == "flux2-klein-9b"
    assert detect_backbone(_named("QwenImagePipeline", "/models/qwen-image-2512/")) == "qwenimage-2512"
    assert detect_backbone(_named("QwenImagePipeline"), backbone="Qwen-Image-2512") == "qwenimage-2512"


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unsupported_pipeline_and_mismatches_are_one_line_errors():
    with pytest.raises(ConfigError) as info:
        pid.attach(_named("StableDiffusionPipeline"), tiny_decoder("sd3"))
    message = _one_line(info)
    assert message.startswith("pid.attach does not support StableDiffusionPipeline") and "FluxPipeline" in message
    with pytest.raises(ConfigError) as info:
        pid.attach(make_tiny_pipeline("sd3"), tiny_decoder("sd3"), backbone="flux")
    assert "valid for it: sd3" in _one_line(info)
    with pytest.raises(ConfigError) as info:
        pid.attach(make_tiny_pipeline("sdxl"), tiny_decoder("sd3"))
    assert "attach a sdxl decoder" in _one_line(info)
    with pytest.raises(ConfigError) as info:
        pid.attach(make_tiny_pipeline("zimage"), tiny_decoder("flux"))  # same family, other channel count
    assert "16" in _one_line(info)
    pid_pipe = attached("sd3")
    with pytest.raises(ConfigError, match="unknown PiD option pid_stepz"):
        pid_pipe(PROMPT, pid_stepz=2)
    with pytest.raises(ConfigError, match=r"stop_at must be an LDM step in \[1, 3\]"):
        pid_pipe(PROMPT, pid_stop_at=4, **ldm_kwargs("sd3"))
    with pytest.raises(ConfigError, match="multiples of 2"):
        pid_pipe(PROMPT, **ldm_kwargs("sd3", height=63))
    with pytest.raises(InputError, match="pid_seed has 3 entries for 1 images"):
        pid_pipe(PROMPT, pid_seed=[1, 2, 3], **ldm_kwargs("sd3"))


def test_a_diffusers_pipeline_callback_is_chained_with_its_tensor_inputs():
    from diffusers.callbacks import SDXLCFGCutoffCallback

    pid_pipe = attached("sdxl")
    cutoff = SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)  # needs prompt_embeds, add_text_embeds, add_time_ids
    out = pid_pipe(PROMPT, pid_stop_at=2, callback_on_step_end=cutoff, output_type="pt", **ldm_kwargs("sdxl"))
    assert pid_pipe.pipe.guidance_scale == 0.0  # the callback ran and switched CFG off after step 1
    assert out.pid_report[0].denoiser_steps_run == 2 and out.images.shape == (1, 3, OUT, OUT)


# ------------------------------------------------------------------------------------------------
# The wrapper's invariants: it never changes the user's inputs, every batch shape runs, and the step count it
# reports (and checks pid_stop_at against) is the one that runs.

TWO_PROMPTS = ["a red fox in snow", "a photo of a cat"]


def _encoded_captions(pid_pipe: PiDPipeline, monkeypatch) -> list[list[str]]:
    """The captions the PiD decoder is asked to encode, call by call."""
    seen: list[list[str]] = []
    original = pid_pipe.decoder.encode_captions
    monkeypatch.setattr(pid_pipe.decoder, "encode_captions", lambda captions: seen.append(list(captions)) or original(captions))
    return seen


def test_zimage_list_prompt_stays_as_given_and_pid_gets_the_plain_prompt(monkeypatch):
    """Z-Image's encode_prompt writes its chat template into the prompt list it is given; the wrapper hands it a
    copy, so the user's list is untouched and PiD's captions are the prompts, not "<|im_start|>user ...". """
    pid_pipe = attached("zimage")
    encoded = _encoded_captions(pid_pipe, monkeypatch)
    prompts, negatives = list(TWO_PROMPTS), ["blurry", "dark"]
    out = pid_pipe(prompts, output_type="pt", **ldm_kwargs("zimage", negative_prompt=negatives, pid_steps=1))
    assert prompts == TWO_PROMPTS and negatives == ["blurry", "dark"]
    assert encoded == [[text] for text in TWO_PROMPTS]
    assert [r.caption for r in out.pid_report] == TWO_PROMPTS and out.images.shape == (2, 3, OUT, OUT)


def test_qwenimage_list_prompt_with_two_images_each_and_the_registry_negative(monkeypatch):
    """Qwen-Image's registry default negative_prompt " " (true CFG on) with a list of prompts and
    num_images_per_prompt=2: one negative per prompt, four images, each captioned with its own prompt."""
    pid_pipe = attached("qwenimage")
    encoded = _encoded_captions(pid_pipe, monkeypatch)
    kwargs = ldm_kwargs("qwenimage", true_cfg_scale=4.0, pid_steps=1)
    del kwargs["negative_prompt"]  # the registry's " " is injected
    prompts = list(TWO_PROMPTS)
    out = pid_pipe(prompts, num_images_per_prompt=2, output_type="pt", **kwargs)
    expected = [TWO_PROMPTS[0]] * 2 + [TWO_PROMPTS[1]] * 2
    assert out.images.shape == (4, 3, OUT, OUT) and prompts == TWO_PROMPTS
    assert [r.caption for r in out.pid_report] == expected and encoded == [[c] for c in expected]
    assert out.pid_report[0].denoiser_calls_run == 2 * 3  # true CFG ran: two transformer calls a step


# Per family: call kwargs that switch classifier-free guidance on with a single negative prompt string, where the
# pipeline has one (FLUX.2-dev and klein have none).
_CFG_WITH_NEGATIVE = {
    # words of the tiny T5 vocabulary: on the transformers floor (4.57.1) other words map past the tiny embedding
    "flux": {"true_cfg_scale": 2.0, "negative_prompt": "the cat"},
    "flux2": {},
    "flux2-klein-4b": {"guidance_scale": 2.0},
    "sd3": {"negative_prompt": "bad", "negative_prompt_2": "bad", "negative_prompt_3": "the cat"},
    "sdxl": {"negative_prompt": "bad", "negative_prompt_2": "bad"},
    "zimage": {"negative_prompt": "bad"},
    "qwenimage": {"true_cfg_scale": 4.0, "negative_prompt": "bad"},
}


@pytest.mark.parametrize("backbone", list(_CFG_WITH_NEGATIVE))
def test_list_prompts_with_one_negative_and_custom_sigmas_on_every_pipeline(backbone, monkeypatch):
    """The same class of bug on every supported pipeline: a list of prompts with one negative string and two
    images each runs (Z-Image asserted, FLUX.1 and Qwen-Image failed on a tensor shape), the user's lists and
    dicts come back unchanged, and with custom sigmas= (no num_inference_steps) the reported step count is the
    pipeline's own."""
    pid_pipe = attached(backbone)
    encoded = _encoded_captions(pid_pipe, monkeypatch)
    kwargs = ldm_kwargs(backbone, pid_steps=1, **_CFG_WITH_NEGATIVE[backbone])
    del kwargs["num_inference_steps"]
    kwargs["sigmas"] = sigmas = [1.0, 0.75, 0.5]
    prompts = list(TWO_PROMPTS)
    given = {key: (list(value) if isinstance(value, list) else value) for key, value in kwargs.items()}
    out = pid_pipe(prompts, num_images_per_prompt=2, output_type="pt", **kwargs)
    expected = [TWO_PROMPTS[0]] * 2 + [TWO_PROMPTS[1]] * 2
    assert out.images.shape == (4, 3, OUT, OUT) and encoded == [[c] for c in expected]
    assert prompts == TWO_PROMPTS and sigmas == [1.0, 0.75, 0.5]
    assert {key: kwargs[key] for key in given if key != "generator"} == {k: v for k, v in given.items() if k != "generator"}
    report = out.pid_report[0]
    ran = pid_pipe.pipe.num_timesteps  # the pipeline's own count (SDXL's Euler: one fewer than the sigmas)
    assert report.ldm_steps == ran == report.denoiser_steps_run and report.denoiser_steps_skipped == 0


def test_custom_sigmas_set_the_step_count_that_pid_stop_at_is_checked_against():
    pid_pipe = attached("sd3")
    kwargs = ldm_kwargs("sd3", pid_steps=1)
    del kwargs["num_inference_steps"]  # the registry default (28) must not count
    out = pid_pipe(PROMPT, sigmas=[1.0, 0.75, 0.5, 0.25], pid_stop_at=3, output_type="pt", **kwargs)
    report = out.pid_report[0]
    assert (report.ldm_steps, report.step, report.denoiser_steps_run, report.denoiser_steps_skipped) == (4, "03xt", 3, 1)
    with pytest.raises(ConfigError, match=r"stop_at must be an LDM step in \[1, 4\]"):
        pid_pipe(PROMPT, sigmas=[1.0, 0.75, 0.5, 0.25], pid_stop_at=5, **kwargs)


def test_bad_prompts_are_one_line_errors_before_the_ldm_runs():
    pid_pipe = attached("sd3")
    calls = []
    counter = pid_pipe.pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for prompt, extra, expected in [
            (None, {}, "no prompt: pass a prompt"),
            ([], {}, "prompt must be a string or a non-empty list of strings"),
            (TWO_PROMPTS, {"negative_prompt": ["bad"] * 3}, "negative_prompt has 3 entries for 2 prompts"),
            (PROMPT, {"num_inference_stepz": 2}, "StableDiffusion3Pipeline takes no num_inference_stepz"),
        ]:
            with pytest.raises(InputError) as info:
                pid_pipe(prompt, **ldm_kwargs("sd3", **extra))
            assert _one_line(info).startswith(expected)
        with pytest.raises(InputError) as info:
            attached("sdxl")(PROMPT, sigmas=[1.0, 0.5, 0.0], timesteps=[999, 500], **ldm_kwargs("sdxl"))
        assert _one_line(info) == "pass sigmas= or timesteps=, not both (each sets the whole schedule)"
        # What only diffusers checks still ends as one line naming the pipeline: a generator list of another length.
        with pytest.raises(InputError) as info:
            pid_pipe(PROMPT, **ldm_kwargs("sd3", generator=[torch.Generator().manual_seed(0)] * 3))
        assert _one_line(info).startswith("StableDiffusion3Pipeline refused the call:")
    finally:
        counter.remove()
    assert calls == []
