"""Tiny declared latent spaces for tests: random diffusers autoencoders saved as folders, and their YAML / JSON
declarations (a 4-channel SD 1.5-style VAE with scale + shift, a 32-channel one with per-channel mean / std)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pid.models import build_pid_net

from tiny import tiny_config
from tiny_vaes import tiny_autoencoder_kl

MEAN32 = [round(0.05 * i - 0.5, 3) for i in range(32)]
STD32 = [round(0.8 + 0.02 * i, 3) for i in range(32)]


def write_spaces(root: Path) -> dict[str, Path]:
    """Two VAEs and three declarations under `root`; returns their paths."""
    tiny_autoencoder_kl(4, quant=True, seed=1, scaling_factor=0.18215, shift_factor=0.1).save_pretrained(
        root / "sd15" / "vae")
    tiny_autoencoder_kl(32, seed=2, latents_mean=MEAN32, latents_std=STD32).save_pretrained(root / "vae32")
    (root / "sd15.yaml").write_text("# an SD 1.5-style VAE\nvae: sd15\nnoise_form: vp\nchannels: 4\n")
    (root / "vae32.json").write_text(json.dumps({"vae": str(root / "vae32"), "channels": 32}))
    return {"sd15": root / "sd15.yaml", "vae32": root / "vae32.json", "sd15_folder": root / "sd15",
            "vae32_folder": root / "vae32"}


def write_decoder(path: Path, channels: int, latent_space: Path | None, seed: int = 0) -> Path:
    """A tiny PiD decoder file for `channels`-channel latents, carrying `latent_space` (via pid.convert)."""
    from pid.convert import convert

    torch.manual_seed(seed)
    cfg = tiny_config(latent_channels=channels)
    raw = path.with_suffix(".pth")
    torch.save(build_pid_net(cfg).state_dict(), raw)
    return convert(raw, path, net_config=cfg, latent_space=latent_space, overwrite=True)


def save_tiny_gemma(folder: Path) -> Path:
    from tiny import tiny_gemma, tiny_tokenizer

    if not (folder / "config.json").is_file():
        tiny_gemma().save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_sd15_pipeline(seed: int = 0):
    """A tiny StableDiffusionPipeline (SD 1.5's class: UNet, one CLIP, 4-channel /8 VAE, Euler scheduler): a
    diffusers text-to-image pipeline that is none of the ten registered backbones."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from tiny_pipelines import _clip_config, clip_tokenizer

    torch.manual_seed(seed)
    tok = clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4,
    )
    vae = AutoencoderKL(block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=4,
                        sample_size=64, scaling_factor=0.18215)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(_clip_config(tok)), tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe.to("cpu")
