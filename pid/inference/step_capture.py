"""Capture intermediate LDM latents x_t through diffusers' `callback_on_step_end` (spec/inference.md §4.5).

A user step K means "the latent after K denoiser forward passes". Diffusers calls the callback with
`step_index = i` after step i, so K is captured at i = K-1, when the latent sits at `scheduler.sigmas[K]`.

The capture is generic: it stores the pipeline's raw latent layout (packed tokens for Flux, Flux2, Klein and
Qwen; VE frame for SDXL) with the scheduler's sigma. Converting to PiD's layout and frame is the job of the
backbone's `pid.latents` space (`from_pipeline_latent`, `to_training_frame`).

    capture = StepCapture([22, 24], num_inference_steps=28)
    out = pipe(..., callback_on_step_end=capture, callback_on_step_end_tensor_inputs=capture.tensor_inputs)
    for item in capture.results(out.images, pipe.scheduler):   # 22xt, 24xt, x0
        ...

Early stop. `StepCapture(steps, N, stop_at=K)` with K < N also captures x_K and, right after step K, sets the
pipeline's `_interrupt` flag, diffusers' own way to end a run early: every supported pipeline (diffusers 0.42:
Flux, Flux2, Flux2Klein, SD3, SDXL, Z-Image, Qwen-Image) tests it at the top of each loop iteration and `continue`s
before calling the denoiser, so steps K+1..N cost nothing, and resets it when a call starts. The pipeline's return
value is then x_K in whatever layout its post-loop code leaves (Flux2Klein un-patchifies it), so the decode target
is the *captured* x_K: `results()` ends with the "KKxt" capture instead of "x0".

    capture = StepCapture([], 9, stop_at=7)          # stop after step 7 of 9
    out = pipe(..., callback_on_step_end=capture, callback_on_step_end_tensor_inputs=capture.tensor_inputs)
    [item] = capture.results(out.images, pipe.scheduler)   # label "07xt", step 7, sigma = scheduler.sigmas[7]
    capture.steps_run, capture.steps_skipped                 # (7, 2)

`steps_run` counts the callbacks seen in the latest run (the loop iterations that ran the denoiser; it restarts at
step index 0), whether or not stop_at is set; `interrupted` says whether this capture set the flag.
stop_at = N is accepted and changes nothing (the run ends there anyway; the result is "x0"). Capture steps after
stop_at are a ConfigError (they could never fire).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from pid.errors import ConfigError
from pid.inference.io import step_label

# What the callback asks diffusers for; every supported pipeline lists "latents" in `_callback_tensor_inputs`.
LATENT_TENSOR_INPUTS: tuple[str, ...] = ("latents",)


@dataclass
class Capture:
    """One latent to decode, converted for PiD (from a `CapturedLatent`, or by an RAE flow): label ("24xt" /
    "x0"), normalised [1, C, h, w] latent, sigma in PiD's frame."""

    label: str
    latent: torch.Tensor
    sigma: float


@dataclass(frozen=True)
class CapturedLatent:
    """One latent to decode: captured step K (label "KKxt") or the final latent (`step` None, "x0")."""

    label: str
    step: int | None
    latent: torch.Tensor  # pipeline layout, as the pipeline held it
    sigma: float  # the scheduler's sigma at that latent, in the scheduler's own frame


def validate_capture_steps(steps: Iterable[int], num_inference_steps: int) -> tuple[int, ...]:
    """Sorted unique capture steps; any step outside [1, num_inference_steps] raises ConfigError."""
    result = set()
    for step in steps:
        if isinstance(step, bool) or not isinstance(step, int):
            raise ConfigError(f"capture step {step!r} is not an integer")
        if not 1 <= step <= num_inference_steps:
            raise ConfigError(
                f"capture step {step} out of range [1, {num_inference_steps}] "
                f"(the LDM runs {num_inference_steps} steps)"
            )
        result.add(step)
    return tuple(sorted(result))


class StepCapture:
    """A `callback_on_step_end` that records the latent and sigma after each requested step.

    It never changes the trajectory: the callback kwargs are returned as received and the stored latent is a
    detached copy. Latents stay on their device unless `offload_to_cpu` (useful for many captures of a big
    latent). `stop_at=K` ends the run after step K through the pipeline's interrupt flag (module docstring).
    """

    def __init__(
        self,
        steps: Iterable[int],
        num_inference_steps: int,
        *,
        offload_to_cpu: bool = False,
        stop_at: int | None = None,
    ) -> None:
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ConfigError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        self.steps: tuple[int, ...] = validate_capture_steps(steps, num_inference_steps)
        self.offload_to_cpu = offload_to_cpu
        self.stop_at: int | None = None
        if stop_at is not None:
            if isinstance(stop_at, bool) or not isinstance(stop_at, int) or not 1 <= stop_at <= num_inference_steps:
                raise ConfigError(
                    f"stop_at must be an LDM step in [1, {num_inference_steps}] (the LDM runs "
                    f"{num_inference_steps} steps), got {stop_at!r}"
                )
            self.stop_at = stop_at
            late = [step for step in self.steps if step > self.stop_at]
            if late:
                raise ConfigError(
                    f"capture steps {late} come after stop_at={self.stop_at}; the LDM stops there, so they "
                    "would never run"
                )
        self._wanted = frozenset(self.steps) | ({self.stop_at} if self.stops_early else set())
        self._captured: dict[int, tuple[torch.Tensor, float]] = {}
        self._final_sigma: float | None = None
        self.steps_run = 0  # callbacks seen in the current run = loop iterations that ran the denoiser
        self.interrupted = False  # whether this capture set the pipeline's interrupt flag

    @property
    def stops_early(self) -> bool:
        """True when stop_at ends the run before its last step (then there is no "x0")."""
        return self.stop_at is not None and self.stop_at < self.num_inference_steps

    @property
    def steps_skipped(self) -> int:
        """Steps of `num_inference_steps` that did not run (after the pipeline call returned)."""
        return self.num_inference_steps - self.steps_run

    @property
    def tensor_inputs(self) -> list[str]:
        """Value for the pipeline's `callback_on_step_end_tensor_inputs`."""
        return list(LATENT_TENSOR_INPUTS)

    @property
    def labels(self) -> list[str]:
        """Output labels in decode order: each captured step ascending ("07xt"), then "x0" (with an early
        stop_at K: the steps up to K, ending with K's label, and no "x0")."""
        if self.stops_early:
            return [step_label(step) for step in sorted(self._wanted)]
        return [step_label(step) for step in self.steps] + [step_label(None)]

    @property
    def captured(self) -> dict[int, tuple[torch.Tensor, float]]:
        """Captures so far: step K -> (latent, sigma)."""
        return dict(self._captured)

    def missing(self) -> list[int]:
        """Requested steps (and an early stop_at) that have not fired (the run was interrupted or used fewer
        steps)."""
        return [step for step in sorted(self._wanted) if step not in self._captured]

    def reset(self) -> None:
        """Forget captures and counts, to reuse the callback for another prompt."""
        self._captured.clear()
        self._final_sigma = None
        self.steps_run = 0
        self.interrupted = False

    def __call__(
        self, pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        sigmas = pipe.scheduler.sigmas
        self._final_sigma = float(sigmas[-1])
        step = step_index + 1
        if step_index == 0:  # a new run of the pipeline
            self.steps_run, self.interrupted = 0, False
        self.steps_run += 1
        if step in self._wanted:
            sigma = float(sigmas[min(step, len(sigmas) - 1)])
            latent = callback_kwargs["latents"].detach()
            latent = latent.to("cpu", copy=True) if self.offload_to_cpu else latent.clone()
            self._captured[step] = (latent, sigma)
        if self.stops_early and step >= self.stop_at:
            # diffusers' interrupt: the loop `continue`s before the denoiser on every remaining step.
            pipe._interrupt = True
            self.interrupted = True
        return callback_kwargs

    def results(
        self, final_latent: torch.Tensor | None, scheduler: Any | None = None
    ) -> list[CapturedLatent]:
        """Captured steps in ascending order, then the final latent labelled "x0".

        The final sigma is `scheduler.sigmas[-1]` (0 for every scheduler used here); without a scheduler, the
        value seen by the last callback is used. A requested step that never fired raises RuntimeError.
        With an early stop_at K the list ends with the capture of step K and `final_latent` is not used (it may
        be None).
        """
        missing = self.missing()
        if missing:
            raise RuntimeError(
                f"capture steps {missing} did not fire; the pipeline ran fewer than "
                f"{max(missing)} steps (num_inference_steps={self.num_inference_steps})"
            )
        items = [
            CapturedLatent(label=step_label(step), step=step, latent=latent, sigma=sigma)
            for step, (latent, sigma) in sorted(self._captured.items())
        ]
        if self.stops_early:
            return items
        if final_latent is None:
            raise RuntimeError("results() needs the pipeline's final latent (its output_type='latent' images)")
        if scheduler is not None:
            final_sigma = float(scheduler.sigmas[-1])
        elif self._final_sigma is not None:
            final_sigma = self._final_sigma
        else:
            raise RuntimeError("the callback never ran; pass the pipeline's scheduler to results()")
        items.append(
            CapturedLatent(label=step_label(None), step=None, latent=final_latent, sigma=final_sigma)
        )
        return items


def to_decoder_frame(space: Any, item: CapturedLatent, height: int, width: int) -> tuple[torch.Tensor, float]:
    """A capture in the pipeline's layout and frame -> (normalised [B, C, h, w] fp32 latent, sigma in PiD's
    training frame), for an LDM image of `height` x `width`.

    `space` is the backbone's `pid.latents` space attached to the pipeline's VAE: it unpacks the layout (Flux /
    Qwen 2x2 tokens, FLUX.2 token grids, Klein's raw final latent re-patchified and BN-normalised) and converts the
    frame (SDXL: Euler/VE -> VP). This is the one conversion from_ldm and `pid.attach` share.
    """
    latent = space.from_pipeline_latent(item.latent, height, width)
    latent, sigma = space.to_training_frame(latent.float(), item.sigma)
    return latent, float(sigma)
