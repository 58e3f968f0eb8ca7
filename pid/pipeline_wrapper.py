"""PiD inside a diffusers pipeline, by composition (`pid.attach`): the pipeline makes latents, PiD decodes them.

    pipe = ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo", torch_dtype=torch.bfloat16).to("cuda")
    pid_pipe = pid.attach(pipe)                                  # backbone + decoder from the pipeline
    out = pid_pipe("a red fox in snow", height=512, width=512)   # out.images[0]: 2048 x 2048 PIL image
    out = pid_pipe("a red fox in snow", pid_stop_at=7)           # the LDM stops after step 7 of 9
    out.pid_report[0]                                            # denoiser steps run / skipped, LDM and PiD s
    pid_pipe.pipe("a red fox in snow")                           # the untouched pipeline: its own VAE decode

How a call runs: the pipeline is called with the user's arguments but `output_type="latent"` (its VAE never
runs), with a `callback_on_step_end` that chains the user's callback (if any) and a `StepCapture`. With
`pid_stop_at=K` the capture sets the pipeline's own interrupt flag after step K, so steps K+1.. never call the
denoiser, and the captured x_K is decoded. The latent and its sigma are converted exactly as from_ldm converts
them (`pid.inference.step_capture.to_decoder_frame`: un-packing, FLUX.2 BN normalisation, SDXL's VE -> VP frame)
and decoded one image at a time with `pid.tiling.decode_within_memory`, so with the same seeds an image equals
from_ldm's PNG bit for bit.

The caller's arguments are never changed (the pipeline gets copies of lists and dicts), a single negative prompt
serves every prompt of a list, custom `sigmas=`/`timesteps=` set the step count that is reported and that
`pid_stop_at` is checked against, and bad input is a one-line InputError (docs/diffusers.md).

Defaults of the LDM call follow from_ldm's registry (`pid.inference.pipelines`): when the call does not say,
`num_inference_steps`, the guidance and the registry's extra kwargs are the backbone's (Z-Image-Turbo: 9 steps,
guidance 0), not the pipeline class's; `ldm_defaults=False` leaves them to the pipeline.

Decoder options, at `attach(...)` (defaults) or per call (`pid_` prefix): pid_steps, pid_seed (int, or one per
image; default 0, from_ldm's pid_seed) or pid_generator (a torch.Generator drawn from image after image, or one
per image), pid_chunk ("auto" / patches / None), pid_tile, pid_tile_overlap, pid_cfg_scale and pid_shift
(undistilled decoders), pid_output_size (default: LDM size x the decoder's scale), pid_caption (default: the
prompt of each image). PIL outputs are quantised like from_ldm's files (truncating x*255, not rounding).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from loguru import logger
from torch import Tensor

from pid.errors import ConfigError, InputError, PiDError

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass(frozen=True)
class DecodeOptions:
    """PiD-side options of a call; each is the call kwarg `pid_<name>` (see the module docstring)."""

    stop_at: int | None = None
    steps: int | None = None
    seed: int | Sequence[int] = 0
    generator: torch.Generator | Sequence[torch.Generator] | None = None
    chunk: int | str | None = "auto"
    tile: int | None = None
    tile_overlap: int = 256
    cfg_scale: float | None = None
    shift: float | None = None
    output_size: int | tuple[int, int] | None = None
    caption: str | Sequence[str] | None = None

    @classmethod
    def names(cls) -> list[str]:
        return [f"pid_{f.name}" for f in fields(cls)]

    def updated(self, pid_kwargs: Mapping[str, Any]) -> DecodeOptions:
        """These options with `pid_<name>` kwargs applied; an unknown `pid_` name is a ConfigError."""
        unknown = sorted(set(pid_kwargs) - set(self.names()))
        if unknown:
            raise ConfigError(f"unknown PiD option {', '.join(unknown)}; valid: {', '.join(self.names())}")
        values = asdict(self) | {key[len("pid_"):]: value for key, value in pid_kwargs.items()}
        values["generator"] = pid_kwargs.get("pid_generator", self.generator)  # asdict would deep-copy it
        return DecodeOptions(**values)


@dataclass(frozen=True)
class ImageReport:
    """What one image cost and saved. LDM figures are per pipeline call (the denoiser runs all images of a call
    together), with `ldm_seconds` that call's time divided by its images."""

    index: int  # position in out.images
    caption: str
    step: str  # decoded latent: "07xt" (after LDM step 7) or "x0"
    ldm_step: int  # LDM steps behind the decoded latent
    sigma: float  # its noise level in PiD's frame
    ldm_steps: int  # num_inference_steps of the call
    denoiser_steps_run: int
    denoiser_steps_skipped: int
    denoiser_calls_run: int  # forward calls of the transformer / UNet (CFG may make 2 per step)
    denoiser_calls_skipped: int  # estimated: calls per step that ran x steps skipped
    ldm_seconds: float
    pid_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# Backbone detection


def _class_names(obj: Any) -> list[str]:
    return [cls.__name__ for cls in type(obj).__mro__]


def supported_pipeline_classes() -> dict[str, list[str]]:
    """diffusers pipeline class name -> the backbone names that use it, in registry order."""
    from pid.inference.pipelines import get_pipeline_spec, pipeline_names

    table: dict[str, list[str]] = {}
    for name in pipeline_names():
        table.setdefault(get_pipeline_spec(name).pipeline_class.rpartition(".")[2], []).append(name)
    return table


def _model_name(pipe: Any) -> str:
    try:
        name = getattr(pipe, "name_or_path", None)
    except Exception:  # noqa: BLE001 - a pipeline without a config simply has no name
        name = None
    return str(name or "").rstrip("/").rpartition("/")[2].lower().replace("_", "-")


def detect_backbone(pipe: Any, backbone: str | None = None) -> str:
    """The PiD backbone of a diffusers pipeline, from its class (and, for classes that several backbones share,
    the model folder's name: Z-Image vs Z-Image-Turbo, Klein 4B vs 9B, Qwen-Image vs -2512; else the first).

    `backbone` names it explicitly; it must belong to the pipeline's class. Unsupported: one-line ConfigError.
    """
    from pid.inference.pipelines import get_pipeline_spec
    from pid.latents import canonical_name

    table = supported_pipeline_classes()
    candidates = next((table[name] for name in _class_names(pipe) if name in table), None)
    if candidates is None:
        listed = ", ".join(f"{cls} ({'/'.join(names)})" for cls, names in table.items())
        raise ConfigError(
            f"pid.attach does not support {type(pipe).__name__}; supported diffusers pipelines: {listed}"
        )
    if backbone is not None:
        name = canonical_name(backbone)
        if name not in candidates:
            raise ConfigError(
                f"backbone {backbone!r} does not run on {type(pipe).__name__}; "
                f"valid for it: {', '.join(candidates)}"
            )
        return name
    model = _model_name(pipe)
    matches = [
        name for name in candidates
        if get_pipeline_spec(name).default_model_id.rpartition("/")[2].lower() in model
    ]
    # The longest hub name that the folder name contains: "z-image-turbo" beats "z-image".
    return max(matches, key=lambda n: len(get_pipeline_spec(n).default_model_id)) if matches else candidates[0]


def _denoiser(pipe: Any) -> torch.nn.Module | None:
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def _pipeline_device(pipe: Any) -> torch.device:
    for attribute in ("_execution_device", "device"):
        try:
            device = getattr(pipe, attribute, None)
        except Exception:  # noqa: BLE001 - offload hooks may not say; try the next
            device = None
        if device is not None:
            return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------
# The wrapper


def attach(
    pipe: Any,
    decoder: Any = None,
    *,
    backbone: str | None = None,
    ckpt_type: str | None = "2k",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    checkpoint: str | None = None,
    checkpoint_dir: str | None = None,
    text_encoder: Any = None,
    ldm_defaults: bool = True,
    latent_space: Any = None,
    **pid_options: Any,
) -> PiDPipeline:
    """Wrap a diffusers pipeline so its images are decoded by PiD (see the module docstring).

    decoder: a `PiDDecoder` to use (one can serve several pipelines of the same latent space); else the released
    decoder for the detected backbone and `ckpt_type` is loaded (`PiDDecoder.from_pretrained`, with `device`
    default the pipeline's, `dtype`, `checkpoint`, `checkpoint_dir`, `text_encoder`). backbone: override the
    detection. pid_options: defaults of the `pid_*` call options; `pid_checkpoint=` is `checkpoint=`.

    Any diffusers text-to-image pipeline works with a decoder for a declared latent space (docs/latents.md):
    `attach(pipe, pid_checkpoint="my_decoder.safetensors")` when the file carries its space, or
    `latent_space=` (a declaration file, mapping or object); the pipeline's own VAE is used.
    """
    from pid.latents.declared import declared_space_of

    checkpoint = pid_options.pop("pid_checkpoint", checkpoint)
    space = getattr(decoder, "latent_space", None) if latent_space is None else None
    if space is None:
        space, _ = declared_space_of(checkpoint, None, latent_space)
    if space is None:
        name = detect_backbone(pipe, backbone)
    else:
        name = space.name
    if decoder is None:
        from pid.decoder import PiDDecoder

        decoder = PiDDecoder.from_pretrained(
            None if space is not None else name,
            ckpt_type,
            device=device if device is not None else _pipeline_device(pipe),
            dtype=dtype,
            checkpoint=checkpoint,
            checkpoint_dir=checkpoint_dir,
            text_encoder=text_encoder,
            latent_space=space,
        )
    return PiDPipeline(pipe, decoder, name, options=DecodeOptions().updated(pid_options), ldm_defaults=ldm_defaults,
                       space=space)


class PiDPipeline:
    """A diffusers pipeline whose images PiD decodes; call it like the pipeline (plus `pid_*` options).

    `pipe` is the pipeline itself, untouched (call it for the VAE path), `decoder` the PiDDecoder, `space` the
    backbone's latent space on the pipeline's VAE, `last_report` the `ImageReport`s of the latest call.
    """

    def __init__(
        self,
        pipe: Any,
        decoder: Any,
        backbone: str,
        *,
        options: DecodeOptions | None = None,
        ldm_defaults: bool = True,
        space: Any = None,
    ) -> None:
        from pid.inference.pipelines import custom_pipeline_spec, get_pipeline_spec
        from pid.latents import get as get_latent_space

        self.pipe = pipe
        self.decoder = decoder
        self.backbone = backbone
        self.declared = space is not None  # a declared latent space: any pipeline class whose VAE makes it
        self.spec = custom_pipeline_spec(backbone, type(pipe)) if self.declared else get_pipeline_spec(backbone)
        space = space if self.declared else get_latent_space(backbone)
        self.space = space.from_pipeline(pipe)  # the pipeline's own VAE, no second copy
        self.options = options or DecodeOptions()
        self.ldm_defaults = ldm_defaults
        self.last_report: list[ImageReport] = []
        self._check_decoder()

    def __repr__(self) -> str:
        record = getattr(self.decoder, "record", None)
        kind = f"{record.backbone}/{record.ckpt_type}" if record is not None else "custom"
        return f"<PiDPipeline {type(self.pipe).__name__} as {self.backbone!r}, decoder {kind}>"

    def _check_decoder(self) -> None:
        from pid.latents import get as get_latent_space

        record = getattr(self.decoder, "record", None)
        if record is not None and self.declared != (record.ckpt_type == "custom"):
            made = f"the declared latent space {record.backbone}" if record.ckpt_type == "custom" else record.backbone
            raise ConfigError(f"the PiD decoder is made for {made}, but {type(self.pipe).__name__} was attached as "
                              f"{self.backbone}; attach the decoder made for this pipeline's VAE")
        if record is not None and not self.declared and get_latent_space(record.backbone).name != self.space.name:
            raise ConfigError(
                f"the {record.backbone} PiD decoder reads {get_latent_space(record.backbone).name} latents, but "
                f"{type(self.pipe).__name__} makes {self.space.name} latents; attach a {self.backbone} decoder"
            )
        channels = getattr(self.decoder, "latent_channels", None)
        if channels is not None and channels != self.space.channels:
            raise ConfigError(
                f"the PiD decoder takes {channels}-channel latents but {type(self.pipe).__name__}'s VAE makes "
                f"{self.space.channels}; attach the decoder of this pipeline's backbone ({self.backbone})"
            )

    # --------------------------------------------------------------------------------------------

    def __call__(self, prompt: str | list[str] | None = None, **kwargs: Any) -> Any:
        pid_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key.startswith("pid_")}
        options = self.options.updated(pid_kwargs)
        output_type = kwargs.pop("output_type", "pil")
        return_dict = kwargs.pop("return_dict", True)
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        # The pipeline gets copies: Z-Image rewrites a prompt list in place with its chat template, Flux and SD3
        # write IP-adapter embeds into the attention kwargs; the user's objects stay as they were given.
        kwargs = {key: _shallow_copy(value) for key, value in kwargs.items()}
        if prompt is not None:
            kwargs["prompt"] = _shallow_copy(prompt)
        self._check_call(kwargs)
        self._fill_defaults(kwargs)
        _broadcast_negatives(kwargs)
        height, width = int(kwargs["height"]), int(kwargs["width"])
        self.space.check_size(height, width)
        steps = self._ldm_steps(kwargs)

        from pid.inference.step_capture import StepCapture, to_decoder_frame

        capture = StepCapture([], steps, stop_at=options.stop_at)
        self._chain_callback(kwargs, capture)
        counter = _CallCounter(_denoiser(self.pipe))
        start = time.perf_counter()
        try:
            with counter:
                out = self.pipe(**kwargs, output_type="latent", return_dict=True)
        except PiDError:
            raise
        except ValueError as error:  # diffusers' check_inputs: bad input the checks above do not foresee
            raise InputError(f"{type(self.pipe).__name__} refused the call: {_one_line(error)}") from error
        finally:
            if capture.interrupted:
                self.pipe._interrupt = False  # leave the pipeline as found (it also resets it on its next call)
        ldm_seconds = time.perf_counter() - start
        if output_type == "latent":  # the pipeline's own latents, untouched (x_K with pid_stop_at)
            self.last_report = []
            self._log(capture, counter, ldm_seconds)
            out.pid_report = []
            return out if return_dict else (out.images,)

        latents = out.images
        batch = latents.shape[0]
        captions = self._captions(prompt, kwargs, options, batch)
        item = self._decode_target(capture, latents)
        size = self._output_size(options, height, width)
        generators = _per_image(options.generator, batch, "pid_generator")
        seeds = _per_image(options.seed, batch, "pid_seed")
        images, sigmas, pid_seconds = [], [], []
        for index in range(batch):
            # One image at a time, as from_ldm decodes: same arithmetic, same noise for the same seed.
            one = replace(item, latent=item.latent[index : index + 1])
            latent, sigma = to_decoder_frame(self.space, one, height, width)
            t0 = time.perf_counter()
            images.append(
                self._decode(latent, sigma, captions[index], options, generators[index], seeds[index], size)
            )
            pid_seconds.append(time.perf_counter() - t0)
            sigmas.append(sigma)

        calls_per_step = counter.calls / capture.steps_run if capture.steps_run else 0.0
        self.last_report = [
            ImageReport(
                index=index,
                caption=captions[index],
                step=item.label,
                ldm_step=capture.steps_run,
                sigma=sigmas[index],
                ldm_steps=steps,
                denoiser_steps_run=capture.steps_run,
                denoiser_steps_skipped=capture.steps_skipped,
                denoiser_calls_run=counter.calls,
                denoiser_calls_skipped=round(calls_per_step * capture.steps_skipped),
                ldm_seconds=ldm_seconds / batch,
                pid_seconds=pid_seconds[index],
            )
            for index in range(batch)
        ]
        self._log(capture, counter, ldm_seconds, sum(pid_seconds), batch)
        converted = _convert(torch.cat(images), output_type)
        try:
            result = type(out)(images=converted)
        except TypeError:  # an output with more fields (StableDiffusionPipelineOutput's nsfw_content_detected)
            result = replace(out, images=converted)
        result.pid_report = list(self.last_report)
        return result if return_dict else (result.images,)

    # --------------------------------------------------------------------------------------------

    def _decode_target(self, capture: Any, final_latents: Tensor) -> Any:
        """The latent to decode: the capture of the stop step, or else (no stop, or the user's callback
        interrupted first) the pipeline's last latent, at the sigma of the steps that ran."""
        from pid.inference.io import step_label
        from pid.inference.step_capture import CapturedLatent

        if capture.stops_early and capture.interrupted:
            [item] = capture.results(None, self.pipe.scheduler)
            return item
        sigmas = self.pipe.scheduler.sigmas
        done = capture.steps_run
        step = None if done == capture.num_inference_steps else done
        sigma = float(sigmas[min(done, len(sigmas) - 1)])
        return CapturedLatent(label=step_label(step), step=step, latent=final_latents, sigma=sigma)

    def _check_call(self, kwargs: dict[str, Any]) -> None:
        """The bad inputs diffusers would meet with an assertion, a tensor-shape error or a ValueError deep in the
        call, as one line each (before the LDM runs)."""
        import inspect

        pipe_name = type(self.pipe).__name__
        parameters = inspect.signature(self.pipe.__call__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            unknown = sorted(set(kwargs) - set(parameters))
            if unknown:
                raise InputError(
                    f"{pipe_name} takes no {', '.join(unknown)}; check the names against its __call__ "
                    "(PiD's own options start with pid_)"
                )
        prompt = kwargs.get("prompt")
        if prompt is None and kwargs.get("prompt_embeds") is None:
            raise InputError("no prompt: pass a prompt (a string or a list of strings) or prompt_embeds=")
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, str) for t in prompt))
        ):
            raise InputError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")
        if kwargs.get("sigmas") is not None and kwargs.get("timesteps") is not None:
            raise InputError("pass sigmas= or timesteps=, not both (each sets the whole schedule)")

    def _ldm_steps(self, kwargs: dict[str, Any]) -> int:
        """The denoising steps the call will run: num_inference_steps, or with custom `sigmas=`/`timesteps=`
        as many as the pipeline's scheduler makes of them (diffusers then ignores num_inference_steps)."""
        custom = next((name for name in ("timesteps", "sigmas") if kwargs.get(name) is not None), None)
        if custom is None:
            return int(kwargs["num_inference_steps"])
        import copy
        import inspect

        scheduler = copy.deepcopy(self.pipe.scheduler)  # set_timesteps changes it; the pipeline's stays as is
        accepts = inspect.signature(scheduler.set_timesteps).parameters
        if custom not in accepts:
            raise InputError(
                f"{type(scheduler).__name__} takes no custom {custom}; pass num_inference_steps= instead"
            )
        # mu only shifts the values (Flux, Z-Image, Qwen-Image compute it from the image size), not their count.
        shift = {"mu": 0.0} if "mu" in accepts and getattr(scheduler.config, "use_dynamic_shifting", False) else {}
        try:
            scheduler.set_timesteps(**{custom: kwargs[custom]}, device="cpu", **shift)
        except (ValueError, TypeError) as error:
            raise InputError(f"{custom}= does not suit {type(scheduler).__name__}: {_one_line(error)}") from error
        return len(scheduler.timesteps)

    def _fill_defaults(self, kwargs: dict[str, Any]) -> None:
        """from_ldm's LDM defaults where the call is silent; height/width made explicit (the latent needs them).
        With custom `sigmas=`/`timesteps=` the step count is theirs (FLUX.2 derives its shift from it)."""
        if "num_inference_steps" not in kwargs and any(kwargs.get(k) is not None for k in ("sigmas", "timesteps")):
            kwargs["num_inference_steps"] = self._ldm_steps(kwargs)
        if self.ldm_defaults:
            kwargs.setdefault("num_inference_steps", self.spec.default_steps)
            kwargs.setdefault(self.spec.guidance_kwarg, self.spec.default_guidance)
            for key, value in self.spec.extra_kwargs.items():
                if key not in kwargs and f"{key}_embeds" not in kwargs:
                    kwargs[key] = value
        if "num_inference_steps" not in kwargs:
            import inspect

            default = inspect.signature(self.pipe.__call__).parameters.get("num_inference_steps")
            if default is None or not isinstance(default.default, int):
                raise ConfigError(f"pass num_inference_steps: {type(self.pipe).__name__} has no default for it")
            kwargs["num_inference_steps"] = default.default
        for side in ("height", "width"):
            if kwargs.get(side) is None:
                if kwargs.get("image") is not None:
                    raise ConfigError("pass height and width with image=: PiD needs the LDM size up front")
                sample = getattr(self.pipe, "default_sample_size", None)
                factor = getattr(self.pipe, "vae_scale_factor", None)
                kwargs[side] = int(sample * factor) if sample and factor else 1024  # Z-Image: 1024

    def _chain_callback(self, kwargs: dict[str, Any], capture: Any) -> None:
        """callback_on_step_end = the user's callback (if any), then the capture, which sees the latents the
        pipeline continues with."""
        user = kwargs.pop("callback_on_step_end", None)
        inputs = list(kwargs.pop("callback_on_step_end_tensor_inputs", None) or ["latents"])
        if user is not None and hasattr(user, "tensor_inputs"):  # diffusers PipelineCallback / Multi...
            inputs = list(user.tensor_inputs)
        inputs += [name for name in capture.tensor_inputs if name not in inputs]

        def on_step_end(pipe: Any, step_index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            result = tensors
            if user is not None:
                result = user(pipe, step_index, timestep, tensors)
                if result is None:
                    result = {}
            capture(pipe, step_index, timestep, {**tensors, **result})
            return result

        kwargs["callback_on_step_end"] = on_step_end
        kwargs["callback_on_step_end_tensor_inputs"] = inputs

    def _captions(self, prompt: Any, kwargs: dict[str, Any], options: DecodeOptions, batch: int) -> list[str]:
        """One caption per image: pid_caption, else each image's prompt (prompt-major, as diffusers orders)."""
        per_prompt = int(kwargs.get("num_images_per_prompt") or 1)
        source = options.caption if options.caption is not None else prompt
        if source is None:
            logger.warning("no prompt to caption PiD with (prompt_embeds were given); pass pid_caption=")
            source = ""
        texts = [source] if isinstance(source, str) else list(source)
        if len(texts) * per_prompt == batch:
            return [text for text in texts for _ in range(per_prompt)]
        if len(texts) == batch or len(texts) == 1:
            return texts * (batch if len(texts) == 1 else 1)
        raise InputError(f"got {len(texts)} captions for {batch} images; give one per prompt or one per image")

    def _output_size(self, options: DecodeOptions, height: int, width: int) -> tuple[int, int]:
        if options.output_size is None:
            return height * self.decoder.scale, width * self.decoder.scale
        if isinstance(options.output_size, int):
            return options.output_size, options.output_size
        return int(options.output_size[0]), int(options.output_size[1])

    def _decode(
        self,
        latent: Tensor,
        sigma: float,
        caption: str,
        options: DecodeOptions,
        generator: torch.Generator | None,
        seed: int,
        size: tuple[int, int],
    ) -> Tensor:
        from pid.tiling import decode_within_memory

        return decode_within_memory(
            self.decoder,
            latent,
            chunk=options.chunk,
            tile_size=options.tile,
            overlap=options.tile_overlap,
            caption_embeds=self.decoder.encode_captions([caption]),
            degrade_sigma=[min(max(sigma, 0.0), 1.0)],
            steps=options.steps,
            generator=generator,
            seed=None if generator is not None else seed,
            output_size=size,
            cfg_scale=options.cfg_scale,
            shift=options.shift,
        )

    def _log(self, capture: Any, counter: _CallCounter, ldm_s: float, pid_s: float = 0.0, images: int = 0) -> None:
        logger.info(
            "{}: LDM {} of {} steps ({} skipped), {} denoiser calls, {:.2f} s{}",
            self.backbone, capture.steps_run, capture.num_inference_steps, capture.steps_skipped, counter.calls,
            ldm_s, f"; PiD {pid_s / images:.2f} s per image" if images else "",
        )


class _CallCounter:
    """Counts forward calls of a module while active (a forward pre-hook, removed on exit)."""

    def __init__(self, module: torch.nn.Module | None) -> None:
        self.module = module
        self.calls = 0
        self._handle: Any = None

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def __enter__(self) -> _CallCounter:
        if self.module is not None:
            self._handle = self.module.register_forward_pre_hook(self._count)
        return self

    def __exit__(self, *_: Any) -> None:
        if self._handle is not None:
            self._handle.remove()


def _per_image(value: Any, batch: int, name: str) -> list[Any]:
    """One value per image: a single value is repeated (a Generator is shared and drawn from in turn)."""
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise InputError(f"{name} has {len(value)} entries for {batch} images; give one or one per image")
        return list(value)
    return [value] * batch


_NEGATIVE_PROMPTS = ("negative_prompt", "negative_prompt_2", "negative_prompt_3")


def _shallow_copy(value: Any) -> Any:
    """A new list / dict with the same items (prompts, generators, attention kwargs); anything else as is."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return dict(value) if isinstance(value, dict) else value


def _prompt_count(kwargs: Mapping[str, Any]) -> int | None:
    """Prompts in the call (before num_images_per_prompt): from the prompt, else from prompt_embeds."""
    prompt = kwargs.get("prompt")
    if prompt is None:
        prompt = kwargs.get("prompt_embeds")  # a tensor, or Z-Image's list of tensors
    if prompt is None:
        return None
    return 1 if isinstance(prompt, str) else len(prompt)


def _broadcast_negatives(kwargs: dict[str, Any]) -> None:
    """One negative prompt per prompt: a single string serves every prompt of a list, as SD3 and SDXL do
    themselves (Z-Image asserts, Qwen-Image and FLUX.1 fail on a tensor shape, including with Qwen-Image's
    registry default " "). A list of another length is a one-line InputError."""
    count = _prompt_count(kwargs)
    for key in _NEGATIVE_PROMPTS:
        negative = kwargs.get(key)
        if isinstance(negative, str) and count is not None and count > 1:
            kwargs[key] = [negative] * count
        elif isinstance(negative, list) and count is not None and len(negative) != count:
            raise InputError(
                f"{key} has {len(negative)} entries for {count} prompts; give one string or one per prompt"
            )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _convert(images: Tensor, output_type: str) -> Any:
    """[B, 3, H, W] in [0, 1] -> the pipeline output convention: pt as is, np [B, H, W, 3] float32, pil list."""
    if output_type == "pt":
        return images
    if output_type == "np":
        return images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    from PIL import Image

    from pid.inference.io import unit_to_uint8

    # The quantisation of from_ldm's files: truncate x * 255 (diffusers rounds).
    return [Image.fromarray(unit_to_uint8(image)) for image in images]


__all__ = ["DecodeOptions", "ImageReport", "PiDPipeline", "attach", "detect_backbone", "supported_pipeline_classes"]
