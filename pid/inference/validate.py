"""Checks of the settings both CLIs share, run while planning: before any model loads, before anything in a run
folder changes, and by `--dry_run`. Each failure is one ConfigError line naming the setting and the fix."""

from __future__ import annotations

import difflib
import inspect
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pid.errors import ConfigError

# torch.Generator.manual_seed takes any value in [-2**63, 2**64 - 1]
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# Pipeline call arguments the CLI sets itself, and the option to use instead.
CLI_OWNED_CALL_KWARGS = {
    "prompt": "prompt= or prompt_file=",
    "height": "resolution= (the output size; the LDM runs at resolution / scale)",
    "width": "resolution= (the output size; the LDM runs at resolution / scale)",
    "generator": "seed=",
    "num_inference_steps": "ldm_steps=",
    "latents": "seed=",
}


def check_positive(settings: Any, key: str, minimum: int = 1) -> None:
    value = settings.get(key)
    if value is not None and not isinstance(value, str) and value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")


def check_decode_settings(settings: Any) -> None:
    """pid_tile, pid_tile_overlap, pid_chunk and pid_batch: sizes, so positive (overlap may be 0)."""
    check_positive(settings, "pid_tile")
    check_positive(settings, "pid_tile_overlap", 0)
    check_positive(settings, "pid_chunk")
    check_positive(settings, "pid_batch")
    tile, overlap = settings.get("pid_tile"), settings.get("pid_tile_overlap")
    if tile is not None and overlap is not None and overlap >= tile:
        raise ConfigError(f"pid_tile_overlap {overlap} must be smaller than pid_tile {tile}")


def check_seeds(settings: Any, items: int) -> None:
    """`seed` (item i uses seed + i) and `pid_seed` must stay in the generator's range for every item."""
    for key, count in (("seed", items), ("pid_seed", 1)):
        value = settings.get(key)
        if value is None:
            continue
        last = int(value) + max(count, 1) - 1
        if int(value) < SEED_MIN or last > SEED_MAX:
            what = f"{key} + {count - 1} (the last item's)" if count > 1 else key
            raise ConfigError(f"{what} must be within [{SEED_MIN}, {SEED_MAX}] (the generator's range), got "
                              f"{last}; choose a smaller seed")


def check_device(value: str | None) -> None:
    """cpu, cuda, cuda:N, mps or xpu[:N], and present on this machine."""
    if value is None:
        return
    import torch

    try:
        device = torch.device(str(value))
    except (RuntimeError, ValueError):
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {value!r}") from None
    if device.type == "cpu":
        return
    if device.type not in ("cuda", "mps", "xpu"):
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {value!r}")
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        raise ConfigError(f"device={value} but this torch sees no {device.type.upper()} device; use device=cpu "
                          f"(or leave device unset)")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device={value} but this machine has {count} {device.type} device(s) "
                          f"({device.type}:0..{count - 1})")


def looks_like_local_path(name: str) -> bool:
    """Hub ids are `owner/name`; a path prefix, more segments or a backslash mean a local folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_text_encoder(value: str | None) -> None:
    """A local caption-encoder folder must exist (a hub id is resolved when the decoder loads)."""
    if not value or not looks_like_local_path(str(value)):
        return
    folder = Path(str(value)).expanduser()
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ConfigError(f"text_encoder {folder} {state}; give a local Gemma-2 folder or a hub id (default "
                          f"Efficient-Large-Model/gemma-2-2b-it)")


def call_parameters(pipeline_class: type) -> tuple[set[str], bool]:
    """(named parameters of `pipeline_class.__call__`, whether it also takes **kwargs); no weights load."""
    signature = inspect.signature(pipeline_class.__call__)
    names = {n for n, p in signature.parameters.items() if n != "self" and p.kind != p.VAR_KEYWORD}
    return names, any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())


def check_ldm_kwargs(backbone: str, ldm_kwargs: Mapping[str, Any] | None, *, diffusers: bool) -> None:
    """Keys of `ldm_kwargs` must be arguments of the backbone pipeline's `__call__` that the CLI does not set."""
    if not ldm_kwargs:
        return
    if not diffusers:
        raise ConfigError(f"ldm_kwargs is for the diffusers backbones; {backbone} runs the upstream code "
                          f"(see its backbone.* options)")
    from pid.inference.pipelines import _RESERVED_CALL_KWARGS, get_pipeline_spec, import_pipeline_class

    for key in ldm_kwargs:
        if key in CLI_OWNED_CALL_KWARGS:
            raise ConfigError(f"ldm_kwargs {key} is set by the CLI; use {CLI_OWNED_CALL_KWARGS[key]} instead")
        if key in _RESERVED_CALL_KWARGS:
            raise ConfigError(f"ldm_kwargs {key} is set by PiD (it captures the latents) and cannot be changed")
    try:
        pipeline_class = import_pipeline_class(get_pipeline_spec(backbone))
        names, open_ended = call_parameters(pipeline_class)
    except Exception:  # a declared space's pipeline, or diffusers too old: loading the pipeline says why
        return
    if open_ended:
        return
    for key in ldm_kwargs:
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f"did you mean {close[0]}?" if close else f"it takes: {', '.join(sorted(names))}"
            raise ConfigError(f"ldm_kwargs {key} is not an argument of {pipeline_class.__name__}; {hint}")


def check_writable_folder(folder: Path, what: str) -> None:
    """`folder` must take new files; when it does not exist yet, the deepest folder above it must take new
    folders: tried for real there (a temporary folder, removed at once), because permission bits say nothing for
    root in /proc or /sys. An existing folder is only asked (`os.access`, which sees read-only mounts), so
    nothing in it changes."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} {folder}: {probe} is a file, not a folder; choose another {what}")
    if probe == folder:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {folder} is not writable (read-only?); choose another {what}")
        return
    try:
        Path(tempfile.mkdtemp(dir=probe, prefix=".pid-write-check-")).rmdir()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{what} {folder}: cannot create files in {probe} ({reason}); choose another "
                          f"{what}") from None
