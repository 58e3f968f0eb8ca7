"""FLUX.1's 16-channel VAE latent space: backbones flux, zimage and zimage-turbo.

    z_norm = 0.3611 * (z - 0.1159),   z = posterior mean of the FLUX.1 VAE, [B,16,H/8,W/8]

FluxPipeline carries the latent as 2x2-packed tokens (B, (h/2)(w/2), 64) with channel order (c, py, px);
ZImagePipeline keeps it as (B,16,h,w) and reads its affine constants from `vae.config`.

The hub repo ships the VAE as `checkpoints/ae.safetensors` in the original black-forest-labs layout
(`encoder.down.0.block.0...`, 1x1-conv attention); `convert_bfl_vae` renames it to diffusers' `AutoencoderKL`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pid.errors import InputError
from pid.latents.base import (
    AffineLatentSpace,
    default_device,
    default_dtype,
    finish_module,
    load_into,
    pack_2x2,
    unpack_2x2,
)

# diffusers `AutoencoderKL` config of the FLUX.1 VAE (black-forest-labs/FLUX.1-dev, vae/config.json).
FLUX1_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
}

# ----------------------------------------------------------------------------------------------
# black-forest-labs / LDM autoencoder names -> diffusers names
# ----------------------------------------------------------------------------------------------

_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Pre-0.14 diffusers attention names still found in some single-file VAEs.
_OLD_DIFFUSERS_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_PREFIXES = ("first_stage_model.", "vae.", "module.")


def is_bfl_layout(state: Mapping[str, Tensor]) -> bool:
    """True for original black-forest-labs / LDM autoencoder key names."""
    return any(re.match(r"(encoder|decoder)\.(down|up|mid)\.", key) for key in state)


def convert_bfl_vae(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an original black-forest-labs (LDM-layout) autoencoder state dict to diffusers names.

    Covers FLUX.1 `ae.safetensors`, FLUX.2 `ae.safetensors` (`encoder.quant_conv`, `decoder.post_quant_conv`,
    top-level `bn.*` for `AutoencoderKLFlux2`) and SD-style files with top-level quant convs. Decoder levels are
    reversed (`decoder.up.{i}` -> `decoder.up_blocks.{n-1-i}`) and the 1x1-conv attention weights become linear.
    Keys that are already diffusers-style pass through unchanged.
    """
    state = _strip_prefixes(state)
    up_levels = [int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    num_up = max(up_levels) + 1 if up_levels else 0
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = _rename_bfl_key(key, num_up)
        if ".mid_block.attentions.0.to_" in new and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> linear
        out[new] = value
    return out


def _rename_bfl_key(key: str, num_up: int) -> str:
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", key):
        return f"{m[1]}.mid_block.attentions.0.{_ATTN_NAMES[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_(\d)\.(.+)", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet_part(m[3])}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet_part(m[3])}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", key):
        return f"decoder.up_blocks.{num_up - 1 - int(m[1])}.resnets.{m[2]}.{_resnet_part(m[3])}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", key):
        return f"decoder.up_blocks.{num_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key):
        return f"{m[1]}.conv_norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.quant_conv\.(.+)", key):  # FLUX.2 keeps quant convs inside enc/dec
        return f"quant_conv.{m[1]}"
    if m := re.fullmatch(r"decoder\.post_quant_conv\.(.+)", key):
        return f"post_quant_conv.{m[1]}"
    if m := re.fullmatch(r"(.+\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.(.+)", key):
        return f"{m[1]}.{_OLD_DIFFUSERS_ATTN[m[2]]}.{m[3]}"
    return key


def _resnet_part(part: str) -> str:
    return part.replace("nin_shortcut", "conv_shortcut")


def _strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def load_autoencoder_kl(
    state: Mapping[str, Tensor], config: Mapping[str, Any], source: str, cls: Any = None
) -> torch.nn.Module:
    """Build a diffusers autoencoder on the meta device and strictly load `state` (either layout) into it."""
    if cls is None:
        from diffusers import AutoencoderKL  # imported lazily: diffusers is slow to import

        cls = AutoencoderKL
    with torch.device("meta"):
        vae = cls.from_config(dict(config))  # from_config tolerates `_class_name` & co. from a config.json
    if is_bfl_layout(state) or any(re.search(r"\.(query|proj_attn)\.", k) for k in state):
        state = convert_bfl_vae(state)
    # Single-file SD VAEs sometimes keep 4-D 1x1-conv attention weights under diffusers names.
    state = {
        k: v[:, :, 0, 0] if ".mid_block.attentions.0.to_" in k and v.ndim == 4 else v
        for k, v in state.items()
    }
    # BatchNorm's step counter is bookkeeping only; a file may omit it.
    return load_into(vae, state, source, may_be_missing=lambda k: k.endswith("num_batches_tracked"))


def read_weights(path: Any) -> dict[str, Tensor]:
    from pid.checkpoints import read_checkpoint_file

    return read_checkpoint_file(path)


# ----------------------------------------------------------------------------------------------
# The latent space
# ----------------------------------------------------------------------------------------------


class FluxLatentSpace(AffineLatentSpace):
    """FLUX.1 VAE latents; `backbone` "flux" (packed pipeline latents) or "zimage"/"zimage-turbo" (unpacked)."""

    name = "flux"
    default_channels = 16
    scaling_factor = 0.3611
    shift_factor = 0.1159
    pipeline_patch = 2  # FLUX.1 packs 2x2 latent cells per token; Z-Image's transformer patch is 2 as well
    hub_file = "ae.safetensors"
    vae_config: dict[str, Any] = FLUX1_VAE_CONFIG

    @property
    def packed(self) -> bool:
        """Whether the backbone's pipeline carries 2x2-packed tokens (FluxPipeline) or a plain grid (Z-Image)."""
        return self.backbone == "flux"

    def load(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        checkpoint_dir: str | None = None,
        revision: str | None = None,
    ) -> FluxLatentSpace:
        from pid.checkpoints import resolve_hub_path

        path = resolve_hub_path(self.hub_file, checkpoint_dir, revision=revision)
        vae = load_autoencoder_kl(read_weights(path), self.vae_config, str(path))
        dev = default_device(device)
        self.vae = finish_module(vae, dev, default_dtype(dtype, dev))
        return self

    def attach(self, vae: Any) -> FluxLatentSpace:
        super().attach(vae)
        if not self.packed:
            # Z-Image's pipeline decodes with the VAE config's affine; stay consistent with it.
            config = getattr(vae, "config", None)
            scale = getattr(config, "scaling_factor", None)
            shift = getattr(config, "shift_factor", None)
            self.scale = float(scale) if scale else self.scaling_factor
            self.shift = float(shift) if shift is not None else 0.0
        return self

    def from_pipeline_latent(self, latent: Tensor, height: int, width: int) -> Tensor:
        if latent.ndim == 4:
            return latent
        if latent.ndim != 3:
            raise InputError(
                f"expected packed (B, seq, 4C) or (B, C, h, w) flux latents, got {tuple(latent.shape)}"
            )
        # FluxPipeline floors the image to multiples of 16 (2 * vae scale factor) before packing.
        cell = self.downsample * 2
        return unpack_2x2(latent, 2 * (height // cell), 2 * (width // cell))

    def to_pipeline_latent(self, latent: Tensor) -> Tensor:
        return pack_2x2(latent) if self.packed else super().to_pipeline_latent(latent)
