"""Qwen-Image's latent space: backbones qwenimage and qwenimage-2512 (the Wan-2.1-style `AutoencoderKLQwenImage`).

    z_norm[c] = (z[c] - mean[c]) / std[c],   z = posterior mean, [B,16,H/8,W/8] (the VAE's time axis dropped)

with the 16 `latents_mean` / `latents_std` values of the VAE config (`LATENTS_MEAN`, `LATENTS_STD`; read from
`vae.config` when a VAE is attached). QwenImagePipeline carries the latent 2x2-packed like FLUX.1: (B, seq, 64).

The hub repo ships `checkpoints/QwenImage_VAE_2d.pth`: the VAE with its time axis stripped (2-D convs, original
Wan names `encoder.conv1`, `encoder.downsamples.*`, `*.middle.*`, `*.head.*`, `conv1`, `conv2`, `decoder.*`).
For a single frame diffusers' causal 3-D convs only ever see their last temporal tap (the two earlier taps read
the zero padding), so each 2-D kernel becomes a 3-D kernel that is zero except its last tap, and the temporal
resampling convs (skipped on a first frame) are zero-filled.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pid.errors import ConfigError, InputError
from pid.latents.base import (
    LatentSpace,
    default_device,
    default_dtype,
    finish_module,
    load_into,
    module_device_dtype,
    pack_2x2,
    unpack_2x2,
    vae_scale_factor,
)
from pid.latents.flux import read_weights

LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# diffusers `AutoencoderKLQwenImage` config of Qwen/Qwen-Image (vae/config.json).
QWEN_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": list(LATENTS_MEAN),
    "latents_std": list(LATENTS_STD),
}

# ----------------------------------------------------------------------------------------------
# Original Wan names (2-D stripped or 3-D) -> diffusers names
# ----------------------------------------------------------------------------------------------

_RESIDUAL = {
    "residual.0.": "norm1.",
    "residual.2.": "conv1.",
    "residual.3.": "norm2.",
    "residual.6.": "conv2.",
}


def _block_part(part: str) -> str:
    for old, new in _RESIDUAL.items():
        if part.startswith(old):
            return new + part[len(old) :]
    return part.replace("shortcut.", "conv_shortcut.", 1) if part.startswith("shortcut.") else part


def convert_wan_vae(state: Mapping[str, Tensor], num_res_blocks: int = 2) -> dict[str, Tensor]:
    """Rename an original Wan/Qwen-Image VAE state dict (3-D, or the 2-D stripped one) to diffusers names.

    The decoder's flat `upsamples` list holds, per stage, `num_res_blocks + 1` residual blocks then one resample.
    Shapes are left alone (see `adapt_wan_tensor`).
    """
    group = num_res_blocks + 2
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key
        if m := re.fullmatch(r"(encoder|decoder)\.conv1\.(.+)", key):
            new = f"{m[1]}.conv_in.{m[2]}"
        elif m := re.fullmatch(r"conv1\.(.+)", key):
            new = f"quant_conv.{m[1]}"
        elif m := re.fullmatch(r"conv2\.(.+)", key):
            new = f"post_quant_conv.{m[1]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.middle\.([012])\.(.+)", key):
            slot = {"0": "resnets.0.", "1": "attentions.0.", "2": "resnets.1."}[m[2]]
            new = f"{m[1]}.mid_block.{slot}{_block_part(m[3])}"
        elif m := re.fullmatch(r"(encoder|decoder)\.head\.([02])\.(.+)", key):
            new = f"{m[1]}.{'norm_out' if m[2] == '0' else 'conv_out'}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", key):
            new = f"encoder.down_blocks.{m[1]}.{_block_part(m[2])}"
        elif m := re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key):
            stage, slot = divmod(int(m[1]), group)
            if slot <= num_res_blocks:
                new = f"decoder.up_blocks.{stage}.resnets.{slot}.{_block_part(m[2])}"
            else:
                new = f"decoder.up_blocks.{stage}.upsamplers.0.{m[2]}"
        out[new] = value
    return out


def adapt_wan_tensor(key: str, value: Tensor, shape: torch.Size) -> Tensor | None:
    """Fit a 2-D tensor into its 3-D slot: kernels go to the last temporal tap, RMS-norm gammas gain an axis."""
    if value.ndim == 4 and len(shape) == 5 and value.shape == (*shape[:2], *shape[3:]):
        kernel = value.new_zeros(shape)
        kernel[:, :, -1] = value  # causal conv: the only tap that sees the current (single) frame
        return kernel
    if value.numel() == math.prod(shape) and key.endswith("gamma"):
        return value.reshape(shape)
    return None


# ----------------------------------------------------------------------------------------------
# The latent space
# ----------------------------------------------------------------------------------------------


class QwenImageLatentSpace(LatentSpace):
    name = "qwenimage"
    default_channels = 16
    hub_file = "QwenImage_VAE_2d.pth"
    vae_config: dict[str, Any] = QWEN_VAE_CONFIG

    @property
    def channels(self) -> int:
        config = getattr(self.vae, "config", None)
        return int(getattr(config, "z_dim", self.default_channels))

    @property
    def downsample(self) -> int:
        return vae_scale_factor(self.vae) if self.vae is not None else 8

    @property
    def size_multiple(self) -> int:
        return 2 * self.downsample  # the pipeline's 2x2 packing

    def load(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        checkpoint_dir: str | None = None,
        revision: str | None = None,
    ) -> QwenImageLatentSpace:
        from pid.checkpoints import resolve_hub_path

        path = resolve_hub_path(self.hub_file, checkpoint_dir, revision=revision)
        vae = load_qwen_vae(read_weights(path), self.vae_config, str(path))
        dev = default_device(device)
        self.vae = finish_module(vae, dev, default_dtype(dtype, dev))
        return self

    def _check_vae(self, vae: Any) -> None:
        super()._check_vae(vae)
        if getattr(getattr(vae, "config", None), "z_dim", None) is None:
            raise ConfigError(
                f"cannot attach {type(vae).__name__} to {self.backbone}: not an AutoencoderKLQwenImage"
            )

    def stats(self) -> tuple[Tensor, Tensor]:
        """Per-channel (mean, std): the attached VAE's config values, else the Qwen-Image constants."""
        config = getattr(self.vae, "config", None)
        mean = getattr(config, "latents_mean", None) or LATENTS_MEAN
        std = getattr(config, "latents_std", None) or LATENTS_STD
        return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    def normalize(self, raw: Tensor) -> Tensor:
        """Raw (B,16,1,h,w) or (B,16,h,w) -> (B,16,h,w)."""
        raw = _drop_time(raw)
        mean, std = (t.to(raw.device).view(1, -1, 1, 1) for t in self.stats())
        return ((raw.float() - mean) / std).to(raw.dtype)

    def denormalize(self, latent: Tensor) -> Tensor:
        """(B,16,h,w) -> raw (B,16,1,h,w), what the 3-D VAE decodes."""
        mean, std = (t.to(latent.device).view(1, -1, 1, 1) for t in self.stats())
        return (latent.float() * std + mean).to(latent.dtype).unsqueeze(2)

    def _encode_raw(self, images: Tensor) -> Tensor:
        device, dtype = module_device_dtype(self.vae)
        return self.vae.encode(images.to(device, dtype).unsqueeze(2)).latent_dist.mean.float()

    def _decode_raw(self, raw: Tensor) -> Tensor:
        device, dtype = module_device_dtype(self.vae)
        return self.vae.decode(raw.to(device, dtype), return_dict=False)[0][:, :, 0]

    def from_pipeline_latent(self, latent: Tensor, height: int, width: int) -> Tensor:
        if latent.ndim == 3:
            cell = self.downsample * 2  # QwenImagePipeline floors the image to multiples of 16
            return unpack_2x2(latent, 2 * (height // cell), 2 * (width // cell))
        return _drop_time(latent)

    def to_pipeline_latent(self, latent: Tensor) -> Tensor:
        return pack_2x2(latent)


def _drop_time(latent: Tensor) -> Tensor:
    if latent.ndim == 5:
        if latent.shape[2] != 1:
            raise InputError(f"Qwen-Image latents must hold a single frame, got {tuple(latent.shape)}")
        return latent[:, :, 0]
    if latent.ndim != 4:
        raise InputError(f"expected a (B,C,h,w) or (B,C,1,h,w) Qwen-Image latent, got {tuple(latent.shape)}")
    return latent


def load_qwen_vae(state: Mapping[str, Tensor], config: Mapping[str, Any], source: str) -> torch.nn.Module:
    """Build `AutoencoderKLQwenImage` on the meta device and load a Wan-named (2-D or 3-D) or diffusers state."""
    from diffusers import AutoencoderKLQwenImage

    with torch.device("meta"):
        vae = AutoencoderKLQwenImage.from_config(dict(config))
    if not any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
        state = convert_wan_vae(state, int(config.get("num_res_blocks", 2)))
    return load_into(vae, state, source, may_be_missing=lambda k: ".time_conv." in k, adapt=adapt_wan_tensor)
