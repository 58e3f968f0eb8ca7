"""Stable Diffusion 3's 16-channel VAE latent space (backbone sd3).

    z_norm = 1.5305 * (z - 0.0609),   z = posterior mean, [B,16,H/8,W/8]

StableDiffusion3Pipeline carries the latent unpacked, so pipeline latents pass through unchanged. Its transformer
patch is 2, hence image sides must be multiples of 16 (the pipeline raises otherwise).

The hub repo ships the VAE as the diffusers folder `checkpoints/sd3_vae/` (`vae/diffusion_pytorch_model.safetensors`,
with or without its `config.json`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pid.errors import CheckpointNotFoundError
from pid.latents.base import AffineLatentSpace, default_device, default_dtype, finish_module
from pid.latents.flux import FLUX1_VAE_CONFIG, load_autoencoder_kl, read_weights

# diffusers `AutoencoderKL` config of stabilityai/stable-diffusion-3-medium-diffusers (vae/config.json).
SD3_VAE_CONFIG: dict[str, Any] = {**FLUX1_VAE_CONFIG, "scaling_factor": 1.5305, "shift_factor": 0.0609}

_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def find_diffusers_vae(folder: Path) -> tuple[Path, Path | None]:
    """(weights, config.json or None) of a diffusers VAE folder, with or without its `vae/` level."""
    for sub in (folder / "vae", folder):
        for name in _WEIGHT_NAMES:
            if (sub / name).is_file():
                config = sub / "config.json"
                return sub / name, config if config.is_file() else None
    raise CheckpointNotFoundError(
        f"{folder} holds no diffusers VAE weights ({' or '.join(_WEIGHT_NAMES)}, optionally under vae/)"
    )


class SD3LatentSpace(AffineLatentSpace):
    name = "sd3"
    default_channels = 16
    scaling_factor = 1.5305
    shift_factor = 0.0609
    pipeline_patch = 2
    hub_dir = "sd3_vae"
    vae_config: dict[str, Any] = SD3_VAE_CONFIG  # used when the folder has no config.json

    def load(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        checkpoint_dir: str | None = None,
        revision: str | None = None,
    ) -> SD3LatentSpace:
        from pid.checkpoints import resolve_hub_path

        folder = resolve_hub_path(self.hub_dir, checkpoint_dir, is_dir=True, revision=revision)
        weights, config_path = find_diffusers_vae(folder)
        config = json.loads(config_path.read_text()) if config_path else self.vae_config
        vae = load_autoencoder_kl(read_weights(weights), config, str(weights))
        dev = default_device(device)
        self.vae = finish_module(vae, dev, default_dtype(dtype, dev))
        return self
