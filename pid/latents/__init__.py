"""Latent spaces of the backbones PiD decodes, one object per family, looked up by backbone name.

    import pid.latents
    space = pid.latents.get("zimage-turbo")       # a FluxLatentSpace; nothing is loaded yet
    space.from_pipeline(pipe)                     # reuse the pipeline's VAE ... or space.load() for PiD's copy
    z = space.from_pipeline_latent(out, 1024, 1024)

See `pid.latents.base.LatentSpace` for the contract and docs/latents.md for every family's constants and files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pid.errors import ConfigError
from pid.latents.base import AffineLatentSpace, LatentSpace
from pid.latents.declared import DeclaredLatentSpace, build_space, declare
from pid.latents.flux import FluxLatentSpace
from pid.latents.flux2 import Flux2LatentSpace
from pid.latents.qwenimage import QwenImageLatentSpace
from pid.latents.rae import DinoV2LatentSpace
from pid.latents.scale_rae import SigLIPLatentSpace
from pid.latents.sd3 import SD3LatentSpace
from pid.latents.sdxl import SDXLLatentSpace
from pid.latents.spec import LatentSpaceSpec, is_declaration, spec_from_reference

__all__ = [
    "AffineLatentSpace",
    "DinoV2LatentSpace",
    "Flux2LatentSpace",
    "FluxLatentSpace",
    "LatentSpace",
    "QwenImageLatentSpace",
    "SD3LatentSpace",
    "SDXLLatentSpace",
    "SigLIPLatentSpace",
    "DeclaredLatentSpace",
    "LatentSpaceSpec",
    "declare",
    "resolve",
    "ALIASES",
    "canonical_name",
    "get",
    "names",
]

# backbone name -> latent-space class (backbones sharing a VAE share a family)
_BACKBONES: dict[str, type[LatentSpace]] = {
    "flux": FluxLatentSpace,
    "zimage": FluxLatentSpace,
    "zimage-turbo": FluxLatentSpace,
    "flux2": Flux2LatentSpace,
    "flux2-klein-4b": Flux2LatentSpace,
    "flux2-klein-9b": Flux2LatentSpace,
    "sd3": SD3LatentSpace,
    "sdxl": SDXLLatentSpace,
    "qwenimage": QwenImageLatentSpace,
    "qwenimage-2512": QwenImageLatentSpace,
    "dinov2": DinoV2LatentSpace,
    "siglip": SigLIPLatentSpace,
}

# Other spellings people use for the same backbones.
ALIASES: dict[str, str] = {
    "flux1": "flux",
    "flux.1": "flux",
    "flux-1": "flux",
    "flux1-dev": "flux",
    "flux.1-dev": "flux",
    "z-image": "zimage",
    "z-image-turbo": "zimage-turbo",
    "flux.2": "flux2",
    "flux2-dev": "flux2",
    "flux.2-dev": "flux2",
    "flux2-klein": "flux2-klein-4b",
    "klein-4b": "flux2-klein-4b",
    "klein-9b": "flux2-klein-9b",
    "sd3-medium": "sd3",
    "stable-diffusion-3": "sd3",
    "stable-diffusion-xl": "sdxl",
    "qwen-image": "qwenimage",
    "qwen-image-2512": "qwenimage-2512",
    "rae": "dinov2",
    "dinov2-rae": "dinov2",
    "scale-rae": "siglip",
    "siglip2": "siglip",
}


def names() -> list[str]:
    """The 12 backbone names (aliases excluded), in registry order."""
    return list(_BACKBONES)


def canonical_name(name: str) -> str:
    """Backbone name for `name` (case, `_` vs `-` and the spellings in `ALIASES` are forgiven)."""
    key = str(name).strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in _BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; valid names: {', '.join(_BACKBONES)}")
    return key


def get(name: str) -> LatentSpace:
    """A fresh latent-space object for backbone `name`, without weights (call `.load()` or `.attach()`).

    `name` may also be a declared space: a YAML / JSON file, inline JSON or "module:Class" (see `resolve`)."""
    if is_declaration(name):
        return resolve(name)
    backbone = canonical_name(name)
    return _BACKBONES[backbone](backbone)


def resolve(reference: str | Mapping[str, Any] | LatentSpaceSpec | LatentSpace) -> LatentSpace:
    """A latent space from anything that names one: a backbone name, a declaration file (YAML / JSON), inline
    JSON, a mapping of `LatentSpaceSpec` fields, a spec, "module:Class", or a space object (returned as is)."""
    if isinstance(reference, LatentSpace):
        return reference
    if isinstance(reference, str) and not is_declaration(reference):
        return get(reference)
    return build_space(spec_from_reference(reference))
