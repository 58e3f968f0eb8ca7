"""StepCapture(stop_at=K): the LDM stops after step K through the pipeline's interrupt flag, and the denoiser is
not called again (counted on every tiny diffusers pipeline)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pid.errors import ConfigError
from pid.inference.pipelines import call_kwargs, get_pipeline_spec
from pid.inference.step_capture import StepCapture

from tiny_pipelines import TINY_BACKBONES, TINY_SIZE, make_tiny_pipeline, tiny_call_overrides


def _fake_pipe(sigmas):
    return SimpleNamespace(scheduler=SimpleNamespace(sigmas=torch.tensor(sigmas)), _interrupt=False)


def _drive(capture, pipe, steps):
    """What a diffusers loop does: skip the body once interrupted, else call the callback."""
    ran = []
    latents = torch.zeros(1, 2, 2, 2)
    pipe._interrupt = False
    for index in range(steps):
        if pipe._interrupt:
            continue
        latents = latents + 1
        ran.append(index)
        capture(pipe, index, 0, {"latents": latents})
    return ran, latents


def test_stop_sets_the_interrupt_after_step_k_and_results_end_with_its_capture():
    pipe = _fake_pipe([1.0, 0.75, 0.5, 0.25, 0.0])
    capture = StepCapture([1], num_inference_steps=4, stop_at=2)
    assert capture.stops_early and capture.labels == ["01xt", "02xt"]
    ran, _ = _drive(capture, pipe, 4)
    assert ran == [0, 1] and pipe._interrupt and capture.interrupted
    assert (capture.steps_run, capture.steps_skipped) == (2, 2)
    items = capture.results(None, pipe.scheduler)  # the pipeline's final latent is not needed
    assert [(i.label, i.step, i.sigma) for i in items] == [("01xt", 1, 0.75), ("02xt", 2, 0.5)]
    assert float(items[-1].latent[0, 0, 0, 0]) == 2.0


def test_stop_at_the_last_step_changes_nothing():
    pipe = _fake_pipe([1.0, 0.5, 0.25, 0.0])
    capture = StepCapture([2], num_inference_steps=3, stop_at=3)
    assert not capture.stops_early and capture.labels == ["02xt", "x0"]
    ran, final = _drive(capture, pipe, 3)
    assert ran == [0, 1, 2] and not pipe._interrupt and not capture.interrupted
    assert [i.label for i in capture.results(final, pipe.scheduler)] == ["02xt", "x0"]


def test_counts_restart_with_each_run_and_reset():
    pipe = _fake_pipe([1.0, 0.5, 0.25, 0.0])
    capture = StepCapture([], num_inference_steps=3, stop_at=1)
    _drive(capture, pipe, 3)
    _drive(capture, pipe, 3)
    assert capture.steps_run == 1 and capture.interrupted
    capture.reset()
    assert (capture.steps_run, capture.interrupted, capture.captured) == (0, False, {})
    assert StepCapture([1, 2], 3).steps_skipped == 3  # nothing ran yet


def test_a_stop_that_never_fires_is_reported():
    pipe = _fake_pipe([1.0, 0.5, 0.25, 0.0])
    capture = StepCapture([], num_inference_steps=3, stop_at=2)
    capture(pipe, 0, 0, {"latents": torch.zeros(1)})
    assert capture.missing() == [2]
    with pytest.raises(RuntimeError, match=r"\[2\] did not fire"):
        capture.results(None, pipe.scheduler)


@pytest.mark.parametrize("bad", [0, 4, -1, True, 2.0, "2"])
def test_stop_at_validation(bad):
    with pytest.raises(ConfigError, match=r"stop_at must be an LDM step in \[1, 3\]"):
        StepCapture([], 3, stop_at=bad)


def test_capture_steps_after_the_stop_are_refused():
    with pytest.raises(ConfigError, match=r"capture steps \[3\] come after stop_at=2"):
        StepCapture([1, 3], 4, stop_at=2)


def test_without_stop_behaviour_is_unchanged():
    capture = StepCapture([2], 4)
    assert capture.stop_at is None and not capture.stops_early and capture.labels == ["02xt", "x0"]
    pipe = _fake_pipe([1.0, 0.75, 0.5, 0.25, 0.0])
    ran, final = _drive(capture, pipe, 4)
    assert ran == [0, 1, 2, 3] and not pipe._interrupt and capture.steps_run == 4
    with pytest.raises(RuntimeError, match="final latent"):
        capture.results(None)


# ------------------------------------------------------------------------------------------------------------
# Real (tiny) pipelines: the loop honours the flag, the denoiser is not called after step K.


def _denoiser(pipe):
    return getattr(pipe, "transformer", None) or pipe.unet


def _run(backbone, capture, overrides=None):
    pipe = make_tiny_pipeline(backbone)
    kwargs = call_kwargs(
        get_pipeline_spec(backbone),
        prompt="a photo of the cat",
        height=TINY_SIZE,
        width=TINY_SIZE,
        num_inference_steps=capture.num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(0),
        capture=capture,
        overrides={**tiny_call_overrides(backbone), **(overrides or {})},
    )
    calls = []
    handle = _denoiser(pipe).register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            out = pipe(**kwargs)
    finally:
        handle.remove()
    return len(calls), out.images


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_every_pipeline_stops_after_step_k_without_calling_the_denoiser_again(backbone):
    full = StepCapture([2], num_inference_steps=4)
    full_calls, _ = _run(backbone, full)
    assert full_calls == 4  # tiny settings: no CFG, or CFG batched into one forward call
    stopped = StepCapture([1], num_inference_steps=4, stop_at=2)
    calls, _ = _run(backbone, stopped)
    assert calls == 2 and (stopped.steps_run, stopped.steps_skipped) == (2, 2)
    items = stopped.results(None, make_tiny_pipeline(backbone).scheduler)
    assert [i.label for i in items] == ["01xt", "02xt"]
    # Same trajectory up to the stop: x_2 and its sigma equal a full run's capture, bit for bit.
    assert torch.equal(items[-1].latent, full.captured[2][0]) and items[-1].sigma == full.captured[2][1]


@pytest.mark.parametrize(
    ("backbone", "cfg"),
    [
        ("qwenimage", {"true_cfg_scale": 4.0, "negative_prompt": "bad"}),  # cond and uncond: two calls a step
        ("flux", {"true_cfg_scale": 2.0, "negative_prompt": "the cat"}),  # words of the tiny T5 vocabulary
        ("flux2-klein-4b", {"guidance_scale": 3.0}),
    ],
)
def test_cfg_pipelines_skip_both_calls_of_every_skipped_step(backbone, cfg):
    full_calls, _ = _run(backbone, StepCapture([], num_inference_steps=3), cfg)
    assert full_calls == 6
    calls, _ = _run(backbone, StepCapture([], num_inference_steps=3, stop_at=1), cfg)
    assert calls == 2
