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
    latent).
    """

    def __init__(
        self, steps: Iterable[int], num_inference_steps: int, *, offload_to_cpu: bool = False
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
        self._wanted = frozenset(self.steps)
        self._captured: dict[int, tuple[torch.Tensor, float]] = {}
        self._final_sigma: float | None = None

    @property
    def tensor_inputs(self) -> list[str]:
        """Value for the pipeline's `callback_on_step_end_tensor_inputs`."""
        return list(LATENT_TENSOR_INPUTS)

    @property
    def labels(self) -> list[str]:
        """Output labels in decode order: each captured step ascending ("07xt"), then "x0"."""
        return [step_label(step) for step in self.steps] + [step_label(None)]

    @property
    def captured(self) -> dict[int, tuple[torch.Tensor, float]]:
        """Captures so far: step K -> (latent, sigma)."""
        return dict(self._captured)

    def missing(self) -> list[int]:
        """Requested steps that have not fired (the run was interrupted or used fewer steps)."""
        return [step for step in self.steps if step not in self._captured]

    def reset(self) -> None:
        """Forget captures, to reuse the callback for another prompt."""
        self._captured.clear()
        self._final_sigma = None

    def __call__(
        self, pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        sigmas = pipe.scheduler.sigmas
        self._final_sigma = float(sigmas[-1])
        step = step_index + 1
        if step in self._wanted:
            sigma = float(sigmas[min(step, len(sigmas) - 1)])
            latent = callback_kwargs["latents"].detach()
            latent = latent.to("cpu", copy=True) if self.offload_to_cpu else latent.clone()
            self._captured[step] = (latent, sigma)
        return callback_kwargs

    def results(self, final_latent: torch.Tensor, scheduler: Any | None = None) -> list[CapturedLatent]:
        """Captured steps in ascending order, then the final latent labelled "x0".

        The final sigma is `scheduler.sigmas[-1]` (0 for every scheduler used here); without a scheduler, the
        value seen by the last callback is used. A requested step that never fired raises RuntimeError.
        """
        missing = self.missing()
        if missing:
            raise RuntimeError(
                f"capture steps {missing} did not fire; the pipeline ran fewer than "
                f"{max(missing)} steps (num_inference_steps={self.num_inference_steps})"
            )
        if scheduler is not None:
            final_sigma = float(scheduler.sigmas[-1])
        elif self._final_sigma is not None:
            final_sigma = self._final_sigma
        else:
            raise RuntimeError("the callback never ran; pass the pipeline's scheduler to results()")
        items = [
            CapturedLatent(label=step_label(step), step=step, latent=latent, sigma=sigma)
            for step, (latent, sigma) in sorted(self._captured.items())
        ]
        items.append(
            CapturedLatent(label=step_label(None), step=None, latent=final_latent, sigma=final_sigma)
        )
        return items
