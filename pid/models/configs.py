"""The network configurations of the released PiD checkpoints, as data.

Seven distinct networks back the released files (see docs/checkpoints.md). They share the
PixelDiT backbone and differ only in the latent adapter and the RoPE reference grid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Protocol


class NamesNetConfig(Protocol):
    """Anything that names a released network config, as `pid.checkpoints.CheckpointRecord` does. The network
    side knows records only by this shape, so `pid.models` never imports `pid.checkpoints` (which imports this
    module: one direction, no cycle)."""

    net_config: str


@dataclass(frozen=True)
class PiDNetConfig:
    """Hyper-parameters of one PiD network (PixelDiT backbone + latent adapter).

    Defaults are the released backbone; the adapter fields default to the v1 16-channel config.
    """

    # --- PixelDiT backbone -------------------------------------------------------------------
    in_channels: int = 3
    patch_size: int = 16
    hidden_size: int = 1536  # patch-token width D
    num_heads: int = 24  # MMDiT heads (head dim 64)
    patch_depth: int = 14  # MMDiT blocks
    mlp_hidden_size: int | None = None  # SwiGLU width; None -> int(2 * 4 * D / 3) = 4096
    pixel_hidden_size: int = 16  # per-pixel token width Cp
    pixel_attn_hidden_size: int = 1152  # PiT attention width Da
    pixel_num_heads: int = 16  # PiT heads (head dim 72)
    pixel_depth: int = 2
    pixel_mlp_ratio: int = 4
    text_dim: int = 2304  # Gemma-2-2b hidden size
    text_max_length: int = 300
    text_rope_theta: float = 10000.0
    rope_theta: float = 10000.0
    # NTK-aware RoPE: reference size in pixels (1024 for v1, 2048 for v1.5); grid = size / patch.
    rope_ref_size: int = 1024
    # Image RoPE coordinates span [0, rope_extent] on each axis, whatever the resolution.
    rope_extent: float = 16.0
    timestep_freq_dim: int = 256
    timestep_max_period: float = 10.0
    norm_eps: float = 1e-6

    # --- latent adapter ("lq_proj") -----------------------------------------------------------
    latent_channels: int = 16  # channels of the latent handed to the network
    latent_downsample: int = 8  # image pixels (at LDM scale) per latent cell
    latent_unpatchify: int = 1  # v1.5 Flux2: 2 -> [B,128,h,w] becomes [B,32,2h,2w] inside the net
    sr_scale: int = 4  # output pixels per LDM pixel
    adapter_width: int = 512
    adapter_res_blocks: int = 4
    adapter_groups: int = 4
    adapter_padding: Literal["zeros", "replicate"] = "zeros"
    gate: Literal["per_dim", "per_token"] = "per_dim"
    inject_interval: int = 2  # gate before every `inject_interval`-th MMDiT block
    pit_inject: bool = False  # v1.5: one more gate after the trunk, before the pixel blocks
    aux_rgb_head: bool = False  # v1.5 training-only head; kept so released files load strictly

    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError("hidden_size / num_heads must be a multiple of 4 (2-D RoPE)")
        if (
            self.pixel_attn_hidden_size % self.pixel_num_heads
            or (self.pixel_attn_hidden_size // self.pixel_num_heads) % 4
        ):
            raise ValueError("pixel_attn_hidden_size / pixel_num_heads must be a multiple of 4 (2-D RoPE)")
        if self.pixel_hidden_size % 4:
            raise ValueError("pixel_hidden_size must be a multiple of 4 (sin-cos pixel embedding)")
        if self.latent_channels % (self.latent_unpatchify**2):
            raise ValueError("latent_channels must be divisible by latent_unpatchify**2")

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_hidden_size or int(2 * (4 * self.hidden_size) / 3)

    @property
    def rope_ref_grid(self) -> int:
        """Reference grid of the NTK-aware RoPE in patches (64 for v1, 128 for v1.5 at patch 16)."""
        return self.rope_ref_size // self.patch_size

    @property
    def num_injections(self) -> int:
        return len(range(0, self.patch_depth, self.inject_interval))

    @property
    def adapter_in_channels(self) -> int:
        return self.latent_channels // (self.latent_unpatchify**2)

    @property
    def output_stride(self) -> int:
        """Output pixels per latent cell: lsdf * sr (e.g. 8 * 4 = 32 for Flux at 4x)."""
        return self.latent_downsample * self.sr_scale


_V1 = PiDNetConfig(name="v1_latent16ch")
_V1PT5 = replace(
    _V1,
    name="v1pt5_latent16ch",
    rope_ref_size=2048,
    adapter_width=1024,
    adapter_padding="replicate",
    gate="per_token",
    pit_inject=True,
    aux_rgb_head=True,
)

NET_CONFIGS: dict[str, PiDNetConfig] = {
    "v1_latent16ch": _V1,
    "v1_flux2_latent128ch": replace(
        _V1, name="v1_flux2_latent128ch", latent_channels=128, latent_downsample=16
    ),
    "v1_sdxl_latent4ch": replace(_V1, name="v1_sdxl_latent4ch", latent_channels=4),
    "v1_dinov2_latent768ch": replace(
        _V1, name="v1_dinov2_latent768ch", latent_channels=768, latent_downsample=16
    ),
    "v1_siglip_latent1152ch_sr8": replace(
        _V1, name="v1_siglip_latent1152ch_sr8", latent_channels=1152, latent_downsample=16, sr_scale=8
    ),
    "v1pt5_latent16ch": _V1PT5,
    "v1pt5_flux2_latent128ch": replace(
        _V1PT5,
        name="v1pt5_flux2_latent128ch",
        latent_channels=128,
        latent_downsample=16,
        latent_unpatchify=2,
    ),
}


def get_net_config(name: str) -> PiDNetConfig:
    try:
        return NET_CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown network config {name!r}; known: {', '.join(NET_CONFIGS)}") from None


def net_config_to_dict(cfg: PiDNetConfig) -> dict[str, str | int | float | bool]:
    """Every field of `cfg` as plain values (JSON- and weights_only-safe); None fields are left out
    (their default is None)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) is not None}


def released_name(cfg: PiDNetConfig) -> str | None:
    """The name of the released config equal to `cfg` (names aside), or None."""
    for name, released in NET_CONFIGS.items():
        if released == cfg:  # `name` has compare=False
            return name
    return None


def net_config_from_value(value: PiDNetConfig | str | Mapping[str, Any]) -> PiDNetConfig:
    """A config from a released name, a JSON object (string) or a mapping of PiDNetConfig fields.

    A mapping may hold "base": <released name> to start from that config (default: the v1
    16-channel one); every other key must be a PiDNetConfig field. Raises ValueError naming the
    problem.
    """
    if isinstance(value, PiDNetConfig):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text in NET_CONFIGS:
            return NET_CONFIGS[text]
        if not text.startswith("{"):
            raise ValueError(f"unknown network config {text!r}; known: {', '.join(NET_CONFIGS)}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"network config is not valid JSON ({exc})") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"network config must be a name or a mapping of fields, got {type(value).__name__}")
    values = dict(value)
    base_name = values.pop("base", None)
    if base_name is not None and base_name not in NET_CONFIGS:
        raise ValueError(f"unknown base network config {base_name!r}; known: {', '.join(NET_CONFIGS)}")
    base = NET_CONFIGS[base_name] if base_name else PiDNetConfig()
    known = {f.name: f for f in fields(PiDNetConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown network config fields: {', '.join(unknown)}")
    values.setdefault("name", base_name or "custom")
    try:
        return replace(base, **values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid network config ({exc})") from None
