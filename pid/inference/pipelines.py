"""Registry of the diffusers LDM backbones PiD decodes, and how to load and call their pipelines.

The registry is plain data (spec/inference.md §2.2, §13.3). Unpacking the latents a pipeline returns is not
done here: `PipelineSpec.latent_space` names the `pid.latents` space that knows each backbone's layout.

Differences from the reference tooling, on purpose:
- user values win over the registry's extra call kwargs (the reference merged the extras last, so Qwen's
  `true_cfg_scale=4.0` could not be changed; §14.2 #6);
- Qwen-Image's guidance goes to `true_cfg_scale`, the knob its non-distilled transformer actually reads (the
  reference passed `guidance_scale`, which the pipeline ignores with a warning);
- the device is passed in (no hard-coded "cuda"), and CPU offload targets that device;
- a missing torchvision for FLUX.2-dev is reported before anything is downloaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from loguru import logger

from pid.errors import CheckpointNotFoundError, ConfigError

if TYPE_CHECKING:
    from pid.inference.step_capture import StepCapture


@dataclass(frozen=True)
class PipelineSpec:
    """One diffusers backbone: what to load, how to call it, and which captures are worth decoding."""

    name: str
    pipeline_class: str  # dotted path, imported only when loading
    default_model_id: str
    default_steps: int
    default_guidance: float
    # Passed to the pipeline call under this name (Qwen-Image: true_cfg_scale; the rest: guidance_scale).
    guidance_kwarg: str = "guidance_scale"
    # Extra call kwargs as (key, value) pairs so the record stays immutable and hashable; see `extra_kwargs`.
    extra_call_kwargs: tuple[tuple[str, Any], ...] = ()
    # README example capture set (`--save_xt_steps`), and the latent it recommends decoding ("24xt" or "x0").
    recommended_capture_steps: tuple[int, ...] = ()
    recommended_latent: str = "x0"
    # pip extra (`pip install -e ".[<extra>]"`) whose packages the pipeline's components need, or None.
    needs_extra: str | None = None
    gated: bool = False  # the HF repo needs an accepted licence and a token
    latent_space: str = ""  # `pid.latents` space name; same as `name`

    @property
    def extra_kwargs(self) -> dict[str, Any]:
        """A fresh dict of the registry's extra call kwargs."""
        return dict(self.extra_call_kwargs)


_MAX_SEQ = (("max_sequence_length", 512),)


def _spec(name: str, **fields: Any) -> PipelineSpec:
    return PipelineSpec(name=name, latent_space=name, **fields)


_SPECS: dict[str, PipelineSpec] = {
    spec.name: spec
    for spec in (
        _spec(
            "flux",
            pipeline_class="diffusers.FluxPipeline",
            default_model_id="black-forest-labs/FLUX.1-dev",
            default_steps=28,
            default_guidance=3.5,  # embedded guidance, not CFG
            extra_call_kwargs=_MAX_SEQ,
            recommended_capture_steps=(22, 24, 26),
            recommended_latent="24xt",
            gated=True,
        ),
        _spec(
            "flux2",
            pipeline_class="diffusers.Flux2Pipeline",
            default_model_id="black-forest-labs/FLUX.2-dev",
            default_steps=50,
            default_guidance=4.0,
            extra_call_kwargs=_MAX_SEQ,
            recommended_capture_steps=(44, 46, 48),
            recommended_latent="46xt",
            needs_extra="flux2",  # its "tokenizer" is a PixtralProcessor, which needs torchvision
            gated=True,
        ),
        _spec(
            "flux2-klein-4b",
            pipeline_class="diffusers.Flux2KleinPipeline",
            default_model_id="black-forest-labs/FLUX.2-klein-4B",
            default_steps=4,
            default_guidance=1.0,
            extra_call_kwargs=_MAX_SEQ,
            recommended_capture_steps=(3,),
            recommended_latent="x0",
        ),
        _spec(
            "flux2-klein-9b",
            pipeline_class="diffusers.Flux2KleinPipeline",
            default_model_id="black-forest-labs/FLUX.2-klein-9B",
            default_steps=4,
            default_guidance=1.0,
            extra_call_kwargs=_MAX_SEQ,
            recommended_capture_steps=(3,),
            recommended_latent="x0",

            gated=True,  # FLUX Non-Commercial licence, gated like FLUX.1-dev (klein-4B is Apache-2.0, open)
        ),
        _spec(
            "sd3",
            pipeline_class="diffusers.StableDiffusion3Pipeline",
            default_model_id="stabilityai/stable-diffusion-3-medium-diffusers",
            default_steps=28,
            default_guidance=4.0,
            recommended_capture_steps=(22, 24, 26),
            recommended_latent="24xt",
            gated=True,
        ),
        _spec(
            "sdxl",
            pipeline_class="diffusers.StableDiffusionXLPipeline",
            default_model_id="stabilityai/stable-diffusion-xl-base-1.0",
            default_steps=30,
            default_guidance=7.5,
            recommended_capture_steps=(24, 26, 28),
            recommended_latent="26xt",
        ),
        _spec(
            "zimage",
            pipeline_class="diffusers.ZImagePipeline",
            default_model_id="Tongyi-MAI/Z-Image",
            default_steps=50,
            default_guidance=5.0,
            extra_call_kwargs=_MAX_SEQ,
            recommended_capture_steps=(44, 46, 48),
            recommended_latent="46xt",
        ),
        _spec(
            "zimage-turbo",
            pipeline_class="diffusers.ZImagePipeline",
            default_model_id="Tongyi-MAI/Z-Image-Turbo",
            default_steps=9,  # 8 NFE plus a terminal sigma=0 jump
            default_guidance=0.0,
            extra_call_kwargs=_MAX_SEQ,
            recommended_capture_steps=(7,),
            recommended_latent="x0",
        ),
        _spec(
            "qwenimage",
            pipeline_class="diffusers.QwenImagePipeline",
            default_model_id="Qwen/Qwen-Image",
            default_steps=50,
            default_guidance=4.0,
            guidance_kwarg="true_cfg_scale",
            # true CFG only runs with a negative prompt; " " is the model card's empty one.
            extra_call_kwargs=_MAX_SEQ + (("negative_prompt", " "),),
            recommended_capture_steps=(44, 46, 48),
            recommended_latent="44xt",
        ),
        _spec(
            "qwenimage-2512",
            pipeline_class="diffusers.QwenImagePipeline",
            default_model_id="Qwen/Qwen-Image-2512",
            default_steps=50,
            default_guidance=4.0,
            guidance_kwarg="true_cfg_scale",
            extra_call_kwargs=_MAX_SEQ + (("negative_prompt", " "),),
            recommended_capture_steps=(44, 46, 48),
            recommended_latent="44xt",
        ),
    )
}

# Packages each pip extra provides, as import names (checked with find_spec, never imported: a broken
# torchvision build also breaks diffusers and transformers once imported).
_EXTRA_MODULES: dict[str, tuple[str, ...]] = {"flux2": ("torchvision",)}

# Call kwargs the PiD flow relies on; overriding them would break the capture/unpack path.
_RESERVED_CALL_KWARGS = frozenset(
    {"output_type", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "num_images_per_prompt"}
)
# Call kwargs that have their own argument in `call_kwargs`.
_ARGUMENT_CALL_KWARGS = frozenset({"prompt", "height", "width", "generator"})


def pipeline_names() -> tuple[str, ...]:
    """The diffusers backbone names, in registry order."""
    return tuple(_SPECS)


def get_pipeline_spec(name: str) -> PipelineSpec:
    """The registry record of a diffusers backbone; an unknown name raises ConfigError listing valid ones."""
    try:
        return _SPECS[name]
    except KeyError:
        raise ConfigError(
            f"unknown diffusers backbone {name!r}; valid: {', '.join(pipeline_names())}"
        ) from None


def custom_pipeline_spec(name: str, pipeline_class: str | type, model_id: str | None = None) -> PipelineSpec:
    """A spec for a diffusers text-to-image pipeline outside the registry (the `pipeline_class=` / `model_id=`
    escape hatch, and `pid.attach` on such a pipeline): steps and guidance are the class's own call defaults.
    `pipeline_class` is a class or its dotted path ("diffusers.StableDiffusionPipeline"; a bare name is looked
    up in diffusers)."""
    import inspect

    if isinstance(pipeline_class, str):
        dotted = pipeline_class if "." in pipeline_class else f"diffusers.{pipeline_class}"
        cls = import_pipeline_class(PipelineSpec(name, dotted, "", 1, 1.0))
    else:
        cls, dotted = pipeline_class, f"{pipeline_class.__module__}.{pipeline_class.__name__}"
    parameters = inspect.signature(cls.__call__).parameters if isinstance(cls, type) else {}
    if "callback_on_step_end" not in parameters or "output_type" not in parameters:
        raise ConfigError(f"{cls.__name__} has no callback_on_step_end / output_type; PiD needs a diffusers "
                          "text-to-image pipeline that hands out its latents")
    guidance = next((k for k in ("guidance_scale", "true_cfg_scale") if k in parameters), "guidance_scale")

    def default(key: str, fallback: Any) -> Any:
        value = parameters[key].default if key in parameters else fallback
        return fallback if value is inspect.Parameter.empty or value is None else value

    return PipelineSpec(name=name, pipeline_class=dotted, default_model_id=str(model_id or ""),
                        default_steps=int(default("num_inference_steps", 50)),
                        default_guidance=float(default(guidance, 1.0)), guidance_kwarg=guidance, latent_space=name)


def folder_pipeline_class(model_id: str | os.PathLike[str] | None) -> str | None:
    """The `_class_name` of a local pipeline folder's model_index.json, or None (a hub id, or no index)."""
    if model_id is None:
        return None
    index = Path(str(model_id)).expanduser() / "model_index.json"
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def check_optional_deps(spec: PipelineSpec) -> None:
    """Fail with a one-line install hint when the backbone needs packages of a pip extra that are missing."""
    if spec.needs_extra is None:
        return
    missing = [m for m in _EXTRA_MODULES.get(spec.needs_extra, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"backbone {spec.name!r} needs {', '.join(missing)} (for its prompt processor); "
            f'install it with: pip install -e ".[{spec.needs_extra}]"'
        )


def import_pipeline_class(spec: PipelineSpec) -> type:
    """Import the diffusers pipeline class named by the spec."""
    module_name, _, class_name = spec.pipeline_class.rpartition(".")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ConfigError(
            f"{spec.pipeline_class} is not in the installed diffusers; "
            "upgrade it with: pip install -U diffusers"
        ) from None


def _looks_like_local_path(model_id: str) -> bool:
    # Hub ids are "owner/name"; anything with a path prefix or more segments is meant as a folder.
    return model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or "\\" in model_id


def pipeline_class_name(spec: PipelineSpec) -> str:
    """The bare class name of the backbone's pipeline ("FluxPipeline")."""
    return spec.pipeline_class.rpartition(".")[2]


def check_model_folder(backbone: str, model_id: str | os.PathLike[str] | None) -> None:
    """Fail before loading anything when `model_id` is a local folder that is not this backbone's pipeline.

    Hub ids (and None) pass: they are checked when downloaded. A folder must hold a diffusers
    `model_index.json` whose `_class_name` is the backbone's pipeline class; otherwise a one-line
    ConfigError says which class it is and which backbone(s) it fits. A path that looks local but does
    not exist is a CheckpointNotFoundError. Reads one small JSON file; loads no model.
    """
    spec = get_pipeline_spec(backbone)
    if model_id is None:
        return
    source = str(model_id)
    folder = Path(source).expanduser()
    if not (_looks_like_local_path(source) or folder.is_dir()):
        return  # a hub id
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"pipeline folder {folder} does not exist (model_id / --backbone_model_id)")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ConfigError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); give the folder "
            f"save_pretrained / `hf download {spec.default_model_id} --local-dir <folder>` made"
        )
    try:
        found = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ConfigError(f"{index} is not a readable model_index.json ({exc})") from None
    expected = pipeline_class_name(spec)
    if found == expected:
        return
    fits = [name for name, other in _SPECS.items() if pipeline_class_name(other) == found]
    hint = f"it fits backbone {' / '.join(fits)}" if fits else "no PiD backbone uses that class"
    raise ConfigError(
        f"{folder} holds a {found or 'pipeline without _class_name'}, but backbone {backbone} needs a "
        f"{expected}; {hint}"
    )


def _dtype_kwarg() -> str:
    # diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name still works, with a deprecation warning).
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


def load_pipeline(
    spec: PipelineSpec,
    model_id: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    cpu_offload: bool = False,
    token: str | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
) -> Any:
    """Load the backbone's pipeline with diffusers `from_pretrained` and place it on `device`.

    `model_id` is a hub id or a local folder (default: the registry's id; a folder is checked with
    `check_model_folder` first). `device` defaults to this rank's device
    (`pid.inference.distributed.rank_device()`). With `cpu_offload`, the pipeline stays on the CPU and
    diffusers moves each model to `device` while it runs. `token`: default `huggingface_hub.get_token()`
    (`HF_TOKEN`, then `hf auth login`). `revision`: branch, tag or commit of the hub repo.
    Hub failures (gated repo, missing repo or file, offline and not cached) are one-line
    `pid.hub.HubAccessError`s.
    """
    from pid.hub import HUB_URL, catchable_errors, download_command, hub_token, translate_hub_error

    check_optional_deps(spec)
    source = str(model_id) if model_id is not None else spec.default_model_id
    local = _looks_like_local_path(source) or Path(source).expanduser().is_dir()
    if local:
        source = str(Path(source).expanduser())
        if spec.name in _SPECS:
            check_model_folder(spec.name, source)
        elif not Path(source).is_dir():
            raise CheckpointNotFoundError(f"pipeline folder {source} does not exist (model_id=)")
    pipeline_cls = import_pipeline_class(spec)
    if device is None:
        from pid.inference.distributed import rank_device

        device = rank_device()
    device = torch.device(device)

    token = token if token is not None else hub_token()  # HF_TOKEN, then `hf auth login`
    kwargs: dict[str, Any] = {_dtype_kwarg(): dtype}
    if token is not None:
        kwargs["token"] = token
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    if revision is not None:
        kwargs["revision"] = revision
    at = f" (revision {revision})" if revision else ""
    logger.info(f"loading {spec.name} pipeline ({pipeline_cls.__name__}) from {source}{at} as {dtype}")
    try:
        pipe = pipeline_cls.from_pretrained(source, **kwargs)
    except catchable_errors() as err:
        translated = None if local else translate_hub_error(
            err, source, revision=revision, command=download_command(source, revision=revision),
            what=f"the {spec.name} pipeline {source}",
        )
        if translated is not None:
            raise translated from err
        if not isinstance(err, OSError):
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if not local and spec.gated and token is None:
            hint = (
                f"; the repo is gated: accept its licence at {HUB_URL}/{source} and log in with "
                "`hf auth login` (or set HF_TOKEN)"
            )
        elif not local:
            hint = f"; download it with: {download_command(source, revision=revision)}"
        raise CheckpointNotFoundError(
            f"could not load the {spec.name} pipeline from {source}{at}: {first_line}{hint}"
        ) from err

    if cpu_offload and device.type != "cpu":
        # An explicit device keeps every rank off GPU 0.
        pipe.enable_model_cpu_offload(device=device)
    else:
        if cpu_offload:
            logger.warning("--cpu_offload has no effect when the device is the CPU")
        pipe.to(device)
    return pipe


def call_kwargs(
    spec: PipelineSpec,
    *,
    prompt: str | list[str],
    height: int,
    width: int,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
    capture: StepCapture | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `pipe(**kwargs)` that return latents (`output_type="latent"`).

    Precedence, lowest first: registry defaults (steps, guidance, extra kwargs) < explicit arguments <
    `overrides`. `guidance_scale` is passed under the spec's `guidance_kwarg` (Qwen-Image: `true_cfg_scale`).
    `None` means "use the registry default". `capture` wires a StepCapture in as `callback_on_step_end`.
    """
    steps = spec.default_steps if num_inference_steps is None else num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"LDM inference steps must be a positive integer, got {num_inference_steps!r}")
    if height < 1 or width < 1:
        raise ConfigError(f"LDM size must be positive, got {height}x{width}")
    kwargs: dict[str, Any] = {
        "num_inference_steps": steps,
        spec.guidance_kwarg: spec.default_guidance,
    }
    kwargs.update(spec.extra_kwargs)
    if guidance_scale is not None:
        kwargs[spec.guidance_kwarg] = float(guidance_scale)
    user = dict(overrides or {})
    reserved = sorted(_RESERVED_CALL_KWARGS.intersection(user))
    if reserved:
        raise ConfigError(
            f"pipeline call kwargs {', '.join(reserved)} are set by PiD and cannot be overridden"
        )
    as_arguments = sorted(_ARGUMENT_CALL_KWARGS.intersection(user))
    if as_arguments:
        raise ConfigError(f"pass {', '.join(as_arguments)} as arguments of call_kwargs, not in overrides")
    kwargs.update(user)
    kwargs.update(
        prompt=prompt,
        height=height,
        width=width,
        num_images_per_prompt=1,
        output_type="latent",
    )
    if generator is not None:
        kwargs["generator"] = generator
    if capture is not None:
        if capture.num_inference_steps != kwargs["num_inference_steps"]:
            raise ConfigError(
                f"the step capture was set up for {capture.num_inference_steps} steps but the LDM runs "
                f"{kwargs['num_inference_steps']}"
            )
        kwargs["callback_on_step_end"] = capture
        kwargs["callback_on_step_end_tensor_inputs"] = list(capture.tensor_inputs)
    return kwargs
