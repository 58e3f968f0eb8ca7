"""Diffusers backbone registry, pipeline loading/calling, and x_t capture on tiny offline pipelines."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from pid.errors import CheckpointNotFoundError, ConfigError
from pid.inference import pipelines
from pid.inference.pipelines import (
    call_kwargs,
    check_optional_deps,
    get_pipeline_spec,
    import_pipeline_class,
    load_pipeline,
    pipeline_names,
)
from pid.inference.step_capture import StepCapture, validate_capture_steps

from tiny_pipelines import (
    TINY_SIZE,
    TINY_STEPS,
    family_of,
    make_tiny_pipeline,
    tiny_call_overrides,
)

# (default model id, steps, guidance) from spec/inference.md §2.2
EXPECTED = {
    "flux": ("black-forest-labs/FLUX.1-dev", 28, 3.5),
    "flux2": ("black-forest-labs/FLUX.2-dev", 50, 4.0),
    "flux2-klein-4b": ("black-forest-labs/FLUX.2-klein-4B", 4, 1.0),
    "flux2-klein-9b": ("black-forest-labs/FLUX.2-klein-9B", 4, 1.0),
    "sd3": ("stabilityai/stable-diffusion-3-medium-diffusers", 28, 4.0),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", 30, 7.5),
    "zimage": ("Tongyi-MAI/Z-Image", 50, 5.0),
    "zimage-turbo": ("Tongyi-MAI/Z-Image-Turbo", 9, 0.0),
    "qwenimage": ("Qwen/Qwen-Image", 50, 4.0),
    "qwenimage-2512": ("Qwen/Qwen-Image-2512", 50, 4.0),
}


# ----------------------------------------------------------------------------------------------------------------
# Registry


def test_registry_has_exactly_the_ten_diffusers_backbones():
    assert set(pipeline_names()) == set(EXPECTED)
    assert len(pipeline_names()) == 10


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_spec_contents(name):
    spec = get_pipeline_spec(name)
    model_id, steps, guidance = EXPECTED[name]
    assert (spec.default_model_id, spec.default_steps, spec.default_guidance) == (model_id, steps, guidance)
    assert spec.latent_space == name
    assert import_pipeline_class(spec).__name__ == spec.pipeline_class.rsplit(".", 1)[1]
    assert spec.recommended_capture_steps
    assert all(1 <= k <= spec.default_steps for k in spec.recommended_capture_steps)
    assert (
        spec.recommended_latent == "x0" or int(spec.recommended_latent[:2]) in spec.recommended_capture_steps
    )
    assert hash(spec) == hash(get_pipeline_spec(name))  # frozen, hashable records
    if name != "sd3" and name != "sdxl":
        assert spec.extra_kwargs["max_sequence_length"] == 512


def test_capture_recommendations_match_spec_13_3():
    recommended = {n: get_pipeline_spec(n).recommended_latent for n in pipeline_names()}
    assert recommended == {
        "flux": "24xt",
        "sd3": "24xt",
        "sdxl": "26xt",
        "flux2": "46xt",
        "flux2-klein-4b": "x0",
        "flux2-klein-9b": "x0",
        "qwenimage": "44xt",
        "qwenimage-2512": "44xt",
        "zimage": "46xt",
        "zimage-turbo": "x0",
    }
    assert get_pipeline_spec("sdxl").recommended_capture_steps == (24, 26, 28)
    assert get_pipeline_spec("zimage-turbo").recommended_capture_steps == (7,)


def test_unknown_backbone_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as info:
        get_pipeline_spec("dinov2")
    message = str(info.value)
    assert "\n" not in message
    assert "dinov2" in message and all(name in message for name in EXPECTED)


def test_extra_kwargs_are_copies():
    spec = get_pipeline_spec("qwenimage")
    spec.extra_kwargs["negative_prompt"] = "changed"
    assert spec.extra_kwargs["negative_prompt"] == " "


# ----------------------------------------------------------------------------------------------------------------
# call_kwargs


def test_call_kwargs_defaults():
    kwargs = call_kwargs(get_pipeline_spec("flux"), prompt="p", height=512, width=768)
    assert kwargs["num_inference_steps"] == 28
    assert kwargs["guidance_scale"] == 3.5
    assert kwargs["max_sequence_length"] == 512
    assert kwargs["output_type"] == "latent" and kwargs["num_images_per_prompt"] == 1
    assert (kwargs["height"], kwargs["width"]) == (512, 768)
    assert "callback_on_step_end" not in kwargs and "generator" not in kwargs


def test_user_values_win_over_registry_extras():
    spec = get_pipeline_spec("qwenimage")
    kwargs = call_kwargs(spec, prompt="p", height=64, width=64, num_inference_steps=7, guidance_scale=2.5)
    # Qwen-Image's guidance knob is true_cfg_scale; guidance_scale is not passed at all.
    assert kwargs["true_cfg_scale"] == 2.5 and "guidance_scale" not in kwargs
    assert kwargs["num_inference_steps"] == 7
    assert kwargs["negative_prompt"] == " "
    kwargs = call_kwargs(
        spec,
        prompt="p",
        height=64,
        width=64,
        guidance_scale=2.5,
        overrides={"true_cfg_scale": 1.0, "max_sequence_length": 32, "negative_prompt": None},
    )
    assert kwargs["true_cfg_scale"] == 1.0
    assert kwargs["max_sequence_length"] == 32
    assert kwargs["negative_prompt"] is None
    assert call_kwargs(spec, prompt="p", height=8, width=8)["true_cfg_scale"] == 4.0


@pytest.mark.parametrize(
    "bad",
    [
        {"output_type": "pil"},
        {"callback_on_step_end": None},
        {"num_images_per_prompt": 2},
        {"height": 32},
        {"prompt": "x"},
    ],
)
def test_call_kwargs_rejects_overrides_of_flow_keys(bad):
    with pytest.raises(ConfigError):
        call_kwargs(get_pipeline_spec("sd3"), prompt="p", height=64, width=64, overrides=bad)


@pytest.mark.parametrize("steps", [0, -1, True, 2.5])
def test_call_kwargs_rejects_bad_steps(steps):
    with pytest.raises(ConfigError):
        call_kwargs(get_pipeline_spec("sd3"), prompt="p", height=64, width=64, num_inference_steps=steps)


def test_call_kwargs_wires_capture_and_generator():
    capture = StepCapture([2], num_inference_steps=4)
    gen = torch.Generator().manual_seed(1)
    spec = get_pipeline_spec("sdxl")
    with pytest.raises(ConfigError, match="set up for 4 steps but the LDM runs 30"):
        call_kwargs(spec, prompt="p", height=64, width=64, capture=capture)
    kwargs = call_kwargs(
        spec, prompt="p", height=64, width=64, num_inference_steps=4, generator=gen, capture=capture
    )
    assert kwargs["callback_on_step_end"] is capture
    assert kwargs["callback_on_step_end_tensor_inputs"] == ["latents"]
    assert kwargs["generator"] is gen


# ----------------------------------------------------------------------------------------------------------------
# Optional dependencies, tokens, loading


def _hide_torchvision(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "torchvision" else real_find_spec(name, *a, **k),
    )


def test_optional_deps_error_names_the_extra(monkeypatch):
    _hide_torchvision(monkeypatch)
    with pytest.raises(ConfigError) as info:
        check_optional_deps(get_pipeline_spec("flux2"))
    assert 'pip install -e ".[flux2]"' in str(info.value)
    assert "\n" not in str(info.value)
    for name in ("flux2-klein-4b", "qwenimage", "flux", "sdxl"):
        check_optional_deps(get_pipeline_spec(name))  # none of these needs torchvision


def test_optional_deps_fail_before_any_download(monkeypatch):
    _hide_torchvision(monkeypatch)
    import diffusers

    def must_not_run(*args, **kwargs):
        raise AssertionError("from_pretrained ran before the dependency check")

    monkeypatch.setattr(diffusers.Flux2Pipeline, "from_pretrained", must_not_run)
    with pytest.raises(ConfigError, match="flux2"):
        load_pipeline(get_pipeline_spec("flux2"), device="cpu")


def test_load_pipeline_round_trip_from_local_folder(tmp_path):
    spec = get_pipeline_spec("flux")
    tiny = make_tiny_pipeline("flux")
    tiny.save_pretrained(tmp_path / "flux")
    loaded = load_pipeline(spec, tmp_path / "flux", dtype=torch.float32, device="cpu", local_files_only=True)
    assert type(loaded) is type(tiny)
    assert loaded.transformer.dtype == torch.float32

    def run(pipe):
        kwargs = call_kwargs(
            spec,
            prompt="a photo of the cat",
            height=TINY_SIZE,
            width=TINY_SIZE,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(3),
            overrides=tiny_call_overrides("flux"),
        )
        return pipe(**kwargs).images

    # Same weights and tokens; summation order may differ in the last bits after a reload.
    torch.testing.assert_close(run(loaded), run(tiny), rtol=0, atol=1e-5)


def test_load_pipeline_passes_token_and_device(monkeypatch):
    import diffusers

    seen = {}

    class FakePipe:
        def to(self, device):
            seen["device"] = device
            return self

        def enable_model_cpu_offload(self, device=None):
            seen["offload"] = device

    def fake_from_pretrained(source, **kwargs):
        seen.update(source=source, **kwargs)
        return FakePipe()

    monkeypatch.setenv("HF_TOKEN", "secret")
    monkeypatch.setattr(diffusers.StableDiffusion3Pipeline, "from_pretrained", fake_from_pretrained)
    load_pipeline(get_pipeline_spec("sd3"), dtype=torch.float32, device="cpu", cpu_offload=True)
    assert seen["source"] == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert seen["token"] == "secret" and seen.get("dtype", seen.get("torch_dtype")) == torch.float32
    assert seen["device"] == torch.device("cpu") and "offload" not in seen  # offload is moot on the CPU
    seen.clear()
    # An accelerator rank offloads onto its own device (never a hard-coded GPU 0); nothing runs on it here.
    load_pipeline(get_pipeline_spec("sd3"), device="cuda:1", cpu_offload=True)
    assert seen["offload"] == torch.device("cuda:1") and "device" not in seen


def test_load_pipeline_errors_are_one_line(monkeypatch, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_pipeline(get_pipeline_spec("sdxl"), tmp_path / "missing", device="cpu")

    import diffusers

    def offline(source, **kwargs):
        raise OSError("We couldn't connect to the hub\nsecond line")

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(diffusers.FluxPipeline, "from_pretrained", offline)
    with pytest.raises(CheckpointNotFoundError) as info:
        load_pipeline(get_pipeline_spec("flux"), device="cpu")
    assert "\n" not in str(info.value) and "HF_TOKEN" in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# StepCapture on its own


def test_capture_step_validation():
    assert validate_capture_steps([3, 1, 3], 4) == (1, 3)
    for bad in ([0], [5], [-1]):
        with pytest.raises(ConfigError, match=r"out of range \[1, 4\]"):
            StepCapture(bad, num_inference_steps=4)
    with pytest.raises(ConfigError):
        StepCapture([True], num_inference_steps=4)
    with pytest.raises(ConfigError):
        StepCapture([1], num_inference_steps=0)
    assert StepCapture([7, 24], 28).labels == ["07xt", "24xt", "x0"]
    assert StepCapture([], 28).labels == ["x0"]


def _fake_pipe(sigmas):
    return SimpleNamespace(scheduler=SimpleNamespace(sigmas=torch.tensor(sigmas)))


def test_capture_stores_copies_and_sigmas():
    pipe = _fake_pipe([1.0, 0.75, 0.5, 0.25, 0.0])
    capture = StepCapture([2, 4], num_inference_steps=4, offload_to_cpu=True)
    latents = torch.zeros(1, 4, 2, 2)
    for index in range(4):
        latents = latents + 1
        kwargs = {"latents": latents}
        assert capture(pipe, index, 0, kwargs) is kwargs
        assert kwargs["latents"] is latents  # trajectory untouched
    latents.add_(100)  # later in-place changes must not reach the stored copies
    items = capture.results(torch.full((1, 4, 2, 2), 9.0))
    assert [i.label for i in items] == ["02xt", "04xt", "x0"]
    assert [i.sigma for i in items] == [0.5, 0.0, 0.0]
    assert [float(i.latent[0, 0, 0, 0]) for i in items] == [2.0, 4.0, 9.0]
    assert items[0].latent.device.type == "cpu"


def test_capture_missing_step_is_reported():
    capture = StepCapture([3], num_inference_steps=4)
    capture(_fake_pipe([1.0, 0.5, 0.25, 0.1, 0.0]), 0, 0, {"latents": torch.zeros(1)})
    assert capture.missing() == [3]
    with pytest.raises(RuntimeError, match=r"\[3\] did not fire"):
        capture.results(torch.zeros(1))
    capture.reset()
    assert capture.captured == {}


# ----------------------------------------------------------------------------------------------------------------
# Every diffusers backbone: 3 tiny steps, capture [1, 2] + final


def _run(name, capture):
    spec = get_pipeline_spec(name)
    pipe = make_tiny_pipeline(name)
    kwargs = call_kwargs(
        spec,
        prompt="a photo of the cat",
        height=TINY_SIZE,
        width=TINY_SIZE,
        num_inference_steps=TINY_STEPS,
        generator=torch.Generator("cpu").manual_seed(0),
        capture=capture,
        overrides=tiny_call_overrides(name),
    )
    with torch.no_grad():
        return pipe, pipe(**kwargs).images


@pytest.mark.parametrize("name", pipeline_names())
def test_tiny_pipeline_capture(name):
    capture = StepCapture([1, 2], num_inference_steps=TINY_STEPS)
    pipe, final = _run(name, capture)
    items = capture.results(final, pipe.scheduler)

    assert [item.label for item in items] == ["01xt", "02xt", "x0"]
    assert items[-1].latent is final
    sigmas = [item.sigma for item in items]
    assert sigmas[0] > sigmas[1] > sigmas[2] == 0.0, sigmas
    scheduler_sigmas = pipe.scheduler.sigmas
    assert sigmas[:2] == [float(scheduler_sigmas[1]), float(scheduler_sigmas[2])]
    first, second = items[0].latent, items[1].latent
    assert first.shape == second.shape
    assert torch.isfinite(first).all() and torch.isfinite(second).all() and torch.isfinite(final).all()
    assert not torch.equal(first, second)
    if family_of(name) == "flux2-klein":
        # Mid-loop latents are packed tokens; Klein's final output is unpacked.
        assert first.shape == (1, (TINY_SIZE // 2) ** 2, 4) and final.ndim == 4
    elif first.ndim == 3:
        assert final.shape == first.shape  # packed pipelines return packed latents
    else:
        assert final.shape == first.shape and first.ndim == 4

    # The callback never changes the trajectory.
    _, final_without_capture = _run(name, None)
    torch.testing.assert_close(final, final_without_capture, rtol=0, atol=0)


def test_module_has_no_hard_coded_cuda():
    source = open(pipelines.__file__).read()
    assert '"cuda"' not in source.split('"""', 2)[2]
