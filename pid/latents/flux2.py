"""FLUX.2's latent space: backbones flux2, flux2-klein-4b and flux2-klein-9b (one VAE, `AutoencoderKLFlux2`).

    z      = posterior mean of the 32-channel VAE, [B,32,H/8,W/8]
    z_norm = BatchNorm(patchify_2x2(z)),          [B,128,H/16,W/16], channel = c*4 + py*2 + px

The BatchNorm is affine-free with the VAE's own `bn.running_mean` / `bn.running_var` and eps (1e-4), so the
normalisation needs the VAE's weights even when no image is encoded.

Pipelines: every mid-loop latent (and FLUX.2-dev's `output_type="latent"`) is the normalised latent as row-major
tokens (B, (H/16)(W/16), 128); Flux2KleinPipeline's *final* latent is instead the raw (B,32,H/8,W/8), which
`from_pipeline_latent` re-patchifies and normalises. The hub repo ships the VAE as `checkpoints/flux2_ae.safetensors`
in the original black-forest-labs layout (converted on load).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pid.errors import ConfigError, InputError
from pid.latents.base import (
    LatentSpace,
    default_device,
    default_dtype,
    finish_module,
    grid_to_tokens,
    module_device_dtype,
    patchify_2x2,
    tokens_to_grid,
    unpatchify_2x2,
    vae_scale_factor,
)
from pid.latents.flux import load_autoencoder_kl, read_weights

# diffusers `AutoencoderKLFlux2` config of black-forest-labs/FLUX.2-dev (vae/config.json).
FLUX2_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 32,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1,
    "patch_size": [2, 2],
}

BN_EPS = 1e-4  # FLUX.2's BatchNorm eps, used when the VAE does not say otherwise


class Flux2LatentSpace(LatentSpace):
    name = "flux2"
    default_channels = 128
    hub_file = "flux2_ae.safetensors"
    vae_config: dict[str, Any] = FLUX2_VAE_CONFIG

    @property
    def channels(self) -> int:
        bn = getattr(self.vae, "bn", None)
        return int(bn.num_features) if bn is not None else self.default_channels

    @property
    def downsample(self) -> int:
        # 2x2 patchify on top of the VAE's /8
        return 2 * (vae_scale_factor(self.vae) if self.vae is not None else 8)

    def load(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        checkpoint_dir: str | None = None,
        revision: str | None = None,
    ) -> Flux2LatentSpace:
        from diffusers import AutoencoderKLFlux2

        from pid.checkpoints import resolve_hub_path

        path = resolve_hub_path(self.hub_file, checkpoint_dir, revision=revision)
        vae = load_autoencoder_kl(read_weights(path), self.vae_config, str(path), cls=AutoencoderKLFlux2)
        dev = default_device(device)
        # BatchNorm statistics stay fp32 whatever the compute dtype (they are tiny and precision-critical).
        stats = {name: buf.float() for name, buf in vae.bn.named_buffers() if buf.is_floating_point()}
        self.vae = finish_module(vae, dev, default_dtype(dtype, dev))
        for name, value in stats.items():
            setattr(self.vae.bn, name, value.to(dev))
        return self

    def _check_vae(self, vae: Any) -> None:
        super()._check_vae(vae)
        bn = getattr(vae, "bn", None)
        if bn is None or getattr(bn, "running_mean", None) is None:
            raise ConfigError(
                f"cannot attach {type(vae).__name__} to {self.backbone}: it has no BatchNorm `bn`"
            )

    def bn_stats(self) -> tuple[Tensor, Tensor, float]:
        """(running_mean, running_var, eps) of the VAE's latent BatchNorm."""
        bn = self._require_vae("flux2 latent normalisation").bn
        eps = getattr(bn, "eps", None)
        return bn.running_mean, bn.running_var, float(eps if eps is not None else BN_EPS)

    def normalize(self, raw: Tensor) -> Tensor:
        mean, var, eps = self.bn_stats()
        x = patchify_2x2(raw).float()
        view = (1, -1, 1, 1)
        mean, var = mean.to(x.device, torch.float32).view(view), var.to(x.device, torch.float32).view(view)
        return ((x - mean) / torch.sqrt(var + eps)).to(raw.dtype)

    def denormalize(self, latent: Tensor) -> Tensor:
        mean, var, eps = self.bn_stats()
        view = (1, -1, 1, 1)
        mean, var = (
            mean.to(latent.device, torch.float32).view(view),
            var.to(latent.device, torch.float32).view(view),
        )
        x = latent.float() * torch.sqrt(var + eps) + mean
        return unpatchify_2x2(x).to(latent.dtype)

    def _encode_raw(self, images: Tensor) -> Tensor:
        device, dtype = module_device_dtype(self.vae.encoder)
        return self.vae.encode(images.to(device, dtype)).latent_dist.mean.float()

    def _decode_raw(self, raw: Tensor) -> Tensor:
        device, dtype = module_device_dtype(self.vae.decoder)
        return self.vae.decode(raw.to(device, dtype), return_dict=False)[0]

    def from_pipeline_latent(self, latent: Tensor, height: int, width: int) -> Tensor:
        if latent.ndim == 3:
            cell = self.downsample  # the pipelines floor the image to multiples of 2 * vae scale factor
            return tokens_to_grid(latent, height // cell, width // cell)
        if latent.ndim == 4:
            if latent.shape[1] == self.channels:
                return latent
            if latent.shape[1] * 4 == self.channels:  # Flux2KleinPipeline's final, raw latent
                return self.normalize(latent)
        raise InputError(
            f"expected flux2 tokens (B, seq, {self.channels}), a normalised (B, {self.channels}, h, w) or a raw "
            f"(B, {self.channels // 4}, h, w) latent, got {tuple(latent.shape)}"
        )

    def to_pipeline_latent(self, latent: Tensor) -> Tensor:
        return grid_to_tokens(latent)
