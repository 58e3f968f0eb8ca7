"""A declared latent space as data (`LatentSpaceSpec`), and reading one from a YAML / JSON file, inline JSON,
options or "module:Class". The space object built from it lives in `pid.latents.declared`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pid.errors import ConfigError

Normalization = Literal["auto", "affine", "mean_std", "batchnorm", "none"]
Packing = Literal["none", "2x2", "tokens"]
NORMALIZATIONS = ("auto", "affine", "mean_std", "batchnorm", "none")
PACKINGS = ("none", "2x2", "tokens")


@dataclass(frozen=True)
class LatentSpaceSpec:
    """A declared latent space (module docstring). Only `vae` (or `entry_point`) is required."""

    name: str = "custom"
    vae: str | None = None  # hub repo id, local diffusers folder, or a single weight file
    subfolder: str | None = None  # inside a hub repo / folder, e.g. "vae"
    revision: str | None = None  # of the hub repo
    vae_class: str | None = None  # a diffusers Autoencoder* class; default the config's `_class_name`
    vae_config: str | None = None  # config.json of a single weight file (default: config.json beside it)
    normalization: Normalization = "auto"
    scaling_factor: float | None = None
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    batchnorm_eps: float | None = None
    patchify: int = 1  # 2: FLUX.2's 2x2 patchify before the normalisation
    channels: int | None = None  # channels PiD reads (after patchify); checked against the VAE
    downsample: int | None = None  # image pixels per latent cell (after patchify); checked against the VAE
    size_multiple: int | None = None  # image sides must be multiples of this (default: downsample)
    noise_form: Literal["flow", "vp"] = "flow"
    pipeline_packing: Packing = "none"  # how the LDM pipeline carries the latent when it has no unpack helper
    entry_point: str | None = None  # "module:Class", a LatentSpace subclass (then only `options` are used)
    options: Mapping[str, Any] = field(default_factory=dict)  # keyword arguments of the entry point class

    def __post_init__(self) -> None:
        if self.vae is None and self.entry_point is None:
            raise ConfigError("a declared latent space needs vae=<hub id, folder or file> (or entry_point=module:Class)")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}")
        if self.pipeline_packing not in PACKINGS:
            raise ConfigError(f"pipeline_packing must be one of {', '.join(PACKINGS)}, got {self.pipeline_packing!r}")
        if self.patchify not in (1, 2):
            raise ConfigError(f"patchify must be 1 or 2 (FLUX.2's 2x2), got {self.patchify}")
        if self.noise_form not in ("flow", "vp"):
            raise ConfigError(f"noise_form must be flow or vp, got {self.noise_form!r}")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ConfigError("give latents_mean and latents_std together")
        if self.latents_std is not None and any(s <= 0 for s in self.latents_std):
            raise ConfigError("latents_std values must be positive")
        for key in ("channels", "downsample", "size_multiple"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or int(value) < 1):
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if self.entry_point is not None and ":" not in self.entry_point:
            raise ConfigError(f"entry_point must look like module:Class, got {self.entry_point!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from the defaults, as JSON-safe values (what a checkpoint carries)."""
        default = {f.name: f.default for f in fields(self) if f.name != "options"}
        out = {k: v for k, v in asdict(self).items() if k == "name" or default.get(k, object()) != v}
        for key in ("latents_mean", "latents_std"):
            if out.get(key) is not None:
                out[key] = [float(x) for x in out[key]]
        if not out.get("options"):
            out.pop("options", None)
        return out


def spec_from_mapping(values: Mapping[str, Any], base_dir: Path | None = None) -> LatentSpaceSpec:
    """A spec from plain values (a parsed file or `latent_space=` options); unknown keys are a ConfigError.

    Relative local paths (`vae`, `vae_config`) resolve against `base_dir` (the declaration file's folder) when
    they exist there."""
    known = {f.name for f in fields(LatentSpaceSpec)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown latent space fields: {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    data = dict(values)
    for key in ("latents_mean", "latents_std"):
        if data.get(key) is not None:
            data[key] = tuple(float(x) for x in data[key])
    for key in ("scaling_factor", "shift_factor", "batchnorm_eps"):
        if data.get(key) is not None:
            data[key] = float(data[key])
    for key in ("patchify", "channels", "downsample", "size_multiple"):
        if data.get(key) is not None:
            data[key] = int(data[key])
    if base_dir is not None:
        for key in ("vae", "vae_config"):
            if data.get(key) and not Path(str(data[key])).expanduser().is_absolute():
                candidate = base_dir / str(data[key])
                if candidate.exists():
                    data[key] = str(candidate)
    data["options"] = dict(data.get("options") or {})
    return LatentSpaceSpec(**data)


def read_spec_file(path: str | Path) -> LatentSpaceSpec:
    """A declaration from a YAML or JSON file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"latent space file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except (json.JSONDecodeError, ValueError) as exc:
        raise ConfigError(f"latent space file {path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError
        first = " ".join(str(exc).split())
        raise ConfigError(f"latent space file {path} is not valid YAML: {first}") from None
    if not isinstance(values, Mapping):
        raise ConfigError(f"latent space file {path} must hold a mapping of fields (vae: ..., normalization: ...)")
    values = dict(values)
    values.setdefault("name", path.stem)
    return spec_from_mapping(values, base_dir=path.parent)


def is_declaration(reference: Any) -> bool:
    """Whether `reference` names a declared space (a file, a module:Class, a mapping) rather than a backbone."""
    if isinstance(reference, (Mapping, LatentSpaceSpec)):
        return True
    text = str(reference).strip()
    return text.endswith((".yaml", ".yml", ".json")) or text.startswith("{") or _is_entry_point(text)


def _is_entry_point(text: str) -> bool:
    module, sep, cls = text.partition(":")
    return bool(sep) and bool(module) and cls.isidentifier() and all(p.isidentifier() for p in module.split("."))


def spec_from_reference(reference: str | Mapping[str, Any] | LatentSpaceSpec) -> LatentSpaceSpec:
    """A spec from a file path, inline JSON, "module:Class" or a mapping."""
    if isinstance(reference, LatentSpaceSpec):
        return reference
    if isinstance(reference, Mapping):
        return spec_from_mapping(reference)
    text = str(reference).strip()
    if text.startswith("{"):
        try:
            return spec_from_mapping(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"latent_space is not valid JSON ({exc})") from None
    if _is_entry_point(text) and not Path(text).exists():
        return LatentSpaceSpec(name=text.rpartition(":")[2].lower(), entry_point=text)
    return read_spec_file(text)


def looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.count("/") != 1 or Path(source).expanduser().exists()
