"""Command-line plumbing shared by the entry points: Hydra config composition and the
reference's argparse flag spellings.

Native syntax is Hydra's (`backbone=flux prompt="a cat" save_xt_steps=[24]`). The reference's
flags (`--backbone flux --prompt "a cat" --save_xt_steps 24 26 --pid_ckpt_type 2kto4k`) are
translated to the same overrides, so its README commands work with only the module path changed.
Unknown keys and flags are errors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pid.config_files import config_dir
from pid.errors import ConfigError, PiDError

CONFIG_DIR = config_dir()

# Reference flag -> (config key, number of values: 1, "+" for one or more, 0 for a switch, 2 for a pair).
FlagTable = dict[str, tuple[str, Any]]

COMMON_FLAGS: FlagTable = {
    "--checkpoint_path": ("pid_checkpoint", 1),
    "--pid_ckpt_type": ("pid_ckpt_type", 1),
    "--seed": ("seed", 1),
    "--cfg_scale": ("pid_cfg_scale", 1),
    "--pid_inference_steps": ("pid_steps", 1),
    "--shift": ("pid_shift", 1),
    "--scale": ("scale", 1),
    "--compile": ("compile", 0),
    "--output_dir": ("output_dir", 1),
    "--save_format": ("save_format", 1),
    "--note": ("note", 1),
    "--backbone": ("backbone", 1),
    "--dtype": ("dtype", 1),
    "--text_encoder": ("text_encoder", 1),
    "--overwrite": ("overwrite", 0),
}
# Reference flags that have no effect here, accepted (and ignored with a warning) so old commands run.
IGNORED_FLAGS: dict[str, int] = {"--experiment": 1, "--config_file": 1, "--load_ema_to_reg": 0, "--upload": 0,
                                 "--group_name": 1}


def _format_value(value: str) -> str:
    """A value as a Hydra override literal (strings quoted unless they are plain numbers)."""
    try:
        float(value)
        return value
    except ValueError:
        pass
    if value.lower() in ("true", "false", "null"):
        return value.lower()
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def translate_reference_flags(argv: Sequence[str], flags: FlagTable) -> list[str]:
    """Turn reference-style `--flag value ...` arguments into Hydra overrides; keep native ones."""
    overrides: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            overrides.append(arg)
            i += 1
            continue
        name, eq, inline = arg.partition("=")
        values: list[str] = [inline] if eq else []
        if name in IGNORED_FLAGS:
            count = IGNORED_FLAGS[name]
            i += 1 + (0 if eq else count)
            from loguru import logger

            logger.warning("{} has no effect in pid and is ignored", name)
            continue
        if name not in flags:
            known = ", ".join(sorted(flags))
            raise ConfigError(f"unknown flag {name}; known flags: {known} (or use key=value overrides)")
        key, arity = flags[name]
        i += 1
        if not eq:
            if arity == 0:
                values = []
            elif arity == "+":
                while i < len(argv) and not argv[i].startswith("--") and "=" not in argv[i]:
                    values.append(argv[i])
                    i += 1
            else:
                values = argv[i : i + arity]
                i += arity
        if arity == 0:
            overrides.append(f"{key}=true")
        elif arity == "+" or arity == 2:
            parts = [v for value in values for v in value.split(",") if v != ""]
            if not parts or (arity == 2 and len(parts) != 2):
                raise ConfigError(f"{name} needs {'two values' if arity == 2 else 'one or more values'}")
            overrides.append(f"{key}=[{','.join(_format_value(v) for v in parts)}]")
        else:
            if len(values) != 1:
                raise ConfigError(f"{name} needs a value")
            overrides.append(f"{key}={_format_value(values[0])}")
    return overrides


def compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Compose `configs/<config_name>.yaml` with overrides; unknown keys raise ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not (CONFIG_DIR / f"{config_name}.yaml").is_file():
        raise ConfigError(
            f"the Hydra configs are not at {CONFIG_DIR}; install pid from a source checkout with "
            f'pip install -e ".[dev]" (the configs/ folder lives beside the package)'
        )
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        first = str(exc).strip().splitlines()[0]
        if "Could not find 'backbone/" in first:
            asked = first.split("backbone/", 1)[1].split("'")[0]
            known = sorted(p.stem for p in (CONFIG_DIR / "backbone").glob("*.yaml"))
            raise ConfigError(f"unknown backbone {asked!r}; choose one of: {', '.join(known)}") from None
        raise ConfigError(f"bad override: {first}") from None
    OmegaConf.set_struct(cfg, True)
    return cfg


def parse_resolution(value: Any) -> tuple[int, int] | None:
    """`N`, `"W,H"`, `[W, H]` -> (H, W); None stays None. Width first, as in the reference."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        side = int(value)
        return side, side
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
    else:
        parts = list(value)
    try:
        numbers = [int(p) for p in parts]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) == 1:
        return numbers[0], numbers[0]
    if len(numbers) == 2 and all(n > 0 for n in numbers):
        return numbers[1], numbers[0]
    raise ConfigError(f"resolution must be N or W,H (e.g. 2048 or 2304,1728), got {value!r}")


def chunk_setting(cfg: DictConfig) -> int | str | None:
    """`pid_chunk`: "auto" (sized from free memory), a number of patches, or null/0 (off)."""
    value = cfg.pid_chunk
    if value in (None, 0, "none", "off"):
        return None
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f'pid_chunk must be auto, a number of patches or null, got {value!r}') from None


def resolve_decoder(cfg: DictConfig) -> tuple[Any, int]:
    """(checkpoint record, scale) for the config: the backbone's default decoder type unless
    `pid_ckpt_type` names one (a type the backbone lacks is a one-line error listing valid ones); the
    scale from the record unless `scale` overrides it."""
    from loguru import logger

    from pid.checkpoints import lookup

    ckpt_type = None if cfg.pid_ckpt_type is None else str(cfg.pid_ckpt_type)
    record = lookup(cfg.backbone.name, ckpt_type)
    warn_unused_sampler_knobs(cfg, record)
    scale = int(cfg.scale) if cfg.scale is not None else record.scale
    if scale != record.scale:
        logger.warning("scale={} differs from the {} decoder's training scale {}", scale, record.ckpt_type, record.scale)
    return record, scale


def warn_unused_sampler_knobs(cfg: DictConfig, record: Any) -> None:
    """The distilled 4-step sampler has no CFG and no shift: say so instead of silently ignoring them."""
    if record.sampler != "distilled":
        return
    from loguru import logger

    for key in ("pid_cfg_scale", "pid_shift"):
        if cfg.get(key) is not None:
            logger.warning("{} only affects undistilled decoders (pid_ckpt_type=undistilled); ignored", key)


def run_cli(main: Callable[[Sequence[str]], Any], argv: Sequence[str] | None = None) -> int:
    """Run an entry point, turning `PiDError`s into one-line messages and exit code 2."""
    from loguru import logger

    try:
        main(sys.argv[1:] if argv is None else argv)
    except PiDError as exc:
        logger.error(str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept and a re-run resumes", file=sys.stderr)
        return 130
    return 0
