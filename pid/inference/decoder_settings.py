"""What the decoder settings of a run mean, decided before any model loads: the output resolution, the
chunking, the declared latent space, the checkpoint record and scale, the step count, and the sampler knobs a
decoder ignores. Shared by from_ldm and from_clean; `pid.inference.cli` parses the settings these read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pid.errors import ConfigError
from pid.inference.cli import Settings, size_numbers


def parse_resolution(value: Any) -> tuple[int, int] | None:
    """`N`, `[W, H]`, `"W,H"` or `"WxH"` -> (H, W); None stays None. Width first, as in the reference."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"resolution must be N or W,H (e.g. 2048 or 2304,1728), got {value!r}")
    if isinstance(value, int | float):
        return int(value), int(value)
    try:
        numbers = size_numbers(value if isinstance(value, str) else ",".join(str(int(p)) for p in value))
    except (TypeError, ValueError):
        raise ConfigError(f"resolution must be N or W,H (e.g. 2048 or 2304,1728), got {value!r}") from None
    return (numbers[0], numbers[0]) if len(numbers) == 1 else (numbers[1], numbers[0])


def chunk_setting(settings: Settings) -> int | str | None:
    """`pid_chunk`: "auto" (sized from free memory), a number of patches, or None (off); parsed already."""
    value = settings.get("pid_chunk")
    return None if value in (None, 0) else value


def declared_space(settings: Settings) -> Any:
    """The run's declared latent space (`latent_space=`, else the one `pid_checkpoint` carries), not loaded; None
    for a built-in backbone's."""
    from pid.latents.declared import declared_space_of

    checkpoint = settings.get("pid_checkpoint")
    if checkpoint and not Path(checkpoint).expanduser().is_file():
        return None if settings.get("latent_space") is None else declared_space_of(None, None,
                                                                                   settings.latent_space)[0]
    space = declared_space_of(checkpoint, None, settings.get("latent_space"))[0]
    if space is not None and hasattr(space, "check_source"):
        space.check_source()
    return space


def _declared_record(settings: Settings, space: Any) -> Any:
    """The record of `pid_checkpoint`, a decoder for the declared `space` (network config from its metadata)."""
    from pid.checkpoints import NET_CONFIG_KEY, _embedded_config, read_checkpoint_metadata
    from pid.latents.declared import check_space_fits, custom_record

    if not settings.get("pid_checkpoint"):
        raise ConfigError(f"latent space {space.name} has no released decoder; give pid_checkpoint=<decoder file>")
    path = Path(settings.pid_checkpoint).expanduser()
    if not path.is_file():
        raise ConfigError(f"pid_checkpoint {path} does not exist")
    config = _embedded_config(read_checkpoint_metadata(path).get(NET_CONFIG_KEY), path)
    if config is not None:
        check_space_fits(config.latent_channels, space, path)
    sampler = "undistilled" if settings.get("pid_ckpt_type") == "undistilled" else None
    return custom_record(space.name, config, path, sampler)


def resolve_decoder(settings: Settings, space: Any = None) -> tuple[Any, int]:
    """(checkpoint record, scale): the backbone's default decoder type unless `pid_ckpt_type` names one (a type
    the backbone lacks is a one-line error listing the valid ones); the scale from the record unless `scale`
    overrides it. Says once when a newer decoder exists for the backbone. With a declared latent `space`, the
    record of `pid_checkpoint`, made for it."""
    from loguru import logger

    from pid.checkpoints import carried_ckpt_type, lookup

    ckpt_type = None if settings.pid_ckpt_type is None else str(settings.pid_ckpt_type)
    if ckpt_type is None and space is None and settings.get("pid_checkpoint"):
        # an exported pid.train decoder says how it is sampled (a teacher: undistilled; a student: distilled)
        ckpt_type = carried_ckpt_type(settings.pid_checkpoint, settings.backbone.name)
        if ckpt_type is not None:
            logger.info("{} is a {} decoder (its metadata); pid_ckpt_type= overrides", settings.pid_checkpoint,
                        ckpt_type)
    record = _declared_record(settings, space) if space is not None else lookup(settings.backbone.name, ckpt_type)
    warn_unused_sampler_knobs(settings, record)
    if settings.scale is not None and int(settings.scale) < 1:
        raise ConfigError(f"scale must be a positive integer (the {record.ckpt_type} decoder's is {record.scale}), "
                          f"got {settings.scale}")
    scale = int(settings.scale) if settings.scale is not None else record.scale
    if scale != record.scale:
        logger.warning("scale={} differs from the {} decoder's training scale {}", scale, record.ckpt_type,
                       record.scale)
    newer = getattr(record, "newer", None)
    if newer:
        logger.info("a newer decoder exists for {}: pid_ckpt_type={} (you asked for {})", settings.backbone.name,
                    newer, record.ckpt_type)
    return record, scale


def unused_sampler_knobs(settings: Settings, record: Any) -> list[str]:
    """Options the decoder's sampler does not read (the distilled 4-step sampler has no CFG and no shift)."""
    if record.sampler != "distilled":
        return []
    return [key for key in ("pid_cfg_scale", "pid_shift") if settings.get(key) is not None]


def warn_unused_sampler_knobs(settings: Settings, record: Any) -> None:
    from loguru import logger

    for key in unused_sampler_knobs(settings, record):
        logger.warning("{} only affects undistilled decoders (pid_ckpt_type=undistilled); ignored", key)


def check_pid_steps(settings: Settings, record: Any) -> int:
    """The PiD step count, checked before any model loads (upstream's rule for distilled decoders)."""
    from loguru import logger

    steps = settings.pid_steps
    if steps is None:
        return 4 if record.sampler == "distilled" else 25
    if steps < 1:
        raise ConfigError(f"pid_steps must be >= 1, got {steps}")
    if record.sampler == "distilled" and steps > 4:
        logger.warning("the {} decoder was distilled for 4 steps; {} steps revisit its 5 times "
                       "(upstream's round(linspace(0, 4, N+1)) rule) and are unlikely to help", record.ckpt_type,
                       steps)
    return int(steps)


__all__ = ["check_pid_steps", "chunk_setting", "declared_space", "parse_resolution", "resolve_decoder",
           "unused_sampler_knobs", "warn_unused_sampler_knobs"]
