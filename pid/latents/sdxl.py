"""Stable Diffusion XL's 4-channel VAE latent space (backbone sdxl).

    z_norm = 0.13025 * z,   z = posterior mean, [B,4,H/8,W/8]

SDXL is the one variance-preserving backbone: PiD was trained on z_s = sqrt(1 - s^2) z + s eps, while
StableDiffusionXLPipeline's Euler scheduler keeps intermediate latents in the variance-exploding frame
x = z + s_eu eps. `to_training_frame` converts a capture: x / sqrt(s_eu^2 + 1), s_eu / sqrt(s_eu^2 + 1).

The hub repo ships the VAE as the single file `checkpoints/sdxl_vae.safetensors` (diffusers names, top-level
quant convs; an LDM-layout file is converted too).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from pid.errors import ConfigError, InputError
from pid.latents.base import AffineLatentSpace, default_device, default_dtype, finish_module
from pid.latents.flux import FLUX1_VAE_CONFIG, load_autoencoder_kl, read_weights

# diffusers `AutoencoderKL` config of stabilityai/sdxl-vae.
SDXL_VAE_CONFIG: dict[str, Any] = {
    **FLUX1_VAE_CONFIG,
    "latent_channels": 4,
    "scaling_factor": 0.13025,
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}


class SDXLLatentSpace(AffineLatentSpace):
    name = "sdxl"
    noise_form = "vp"
    default_channels = 4
    scaling_factor = 0.13025
    shift_factor = 0.0
    hub_file = "sdxl_vae.safetensors"
    vae_config: dict[str, Any] = SDXL_VAE_CONFIG

    def load(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        checkpoint_dir: str | None = None,
        revision: str | None = None,
    ) -> SDXLLatentSpace:
        from pid.checkpoints import resolve_hub_path

        path = resolve_hub_path(self.hub_file, checkpoint_dir, revision=revision)
        vae = load_autoencoder_kl(read_weights(path), self.vae_config, str(path))
        dev = default_device(device)
        self.vae = finish_module(vae, dev, default_dtype(dtype, dev))
        return self

    def to_training_frame(self, latent: Tensor, sigma: float | Tensor) -> tuple[Tensor, float | Tensor]:
        """Euler/VE-frame capture (x = z + s_eu eps) -> VP frame (x / d, s_eu / d), d = sqrt(s_eu^2 + 1)."""
        if isinstance(sigma, Tensor):
            if sigma.numel() not in (1, latent.shape[0]):
                raise InputError(f"sigma has {sigma.numel()} values for a batch of {latent.shape[0]}")
            if bool((sigma < 0).any()):
                raise ConfigError(f"Euler sigma must be >= 0, got {sigma.flatten().tolist()}")
            s = sigma.to(device=latent.device, dtype=torch.float64)
            d = (s * s + 1).sqrt()
            view = (-1,) + (1,) * (latent.ndim - 1) if s.numel() > 1 else ()
            return (latent / d.reshape(view).to(latent.dtype)), (s / d).to(sigma.dtype).reshape(sigma.shape)
        sigma = float(sigma)
        if sigma < 0:
            raise ConfigError(f"Euler sigma must be >= 0, got {sigma}")
        if sigma == 0.0:
            return latent, 0.0
        d = math.sqrt(sigma * sigma + 1.0)
        return latent / d, sigma / d
