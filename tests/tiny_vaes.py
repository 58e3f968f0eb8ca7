"""Tiny random autoencoders / encoders for the latent-space tests, built offline in milliseconds.

Every builder keeps the *geometry* of the real model (channels of the latent, /8 spatial compression, the 2x2
patchify of FLUX.2, 14-px patches of DINOv2 / SigLIP, the RAE token grids) and shrinks only the widths, so the
latent spaces run their real code paths. `TinyWan2dVAE` is an independent 2-D Wan VAE written from the spec
(§7.2) whose state dict has the layout of the hub repo's `QwenImage_VAE_2d.pth`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TINY_BLOCKS = [8, 8, 8, 8]  # four levels -> /8, like the real VAEs


def _randomize(module: nn.Module, seed: int, scale: float = 0.2) -> nn.Module:
    """Small random weights everywhere (zero-initialised layers would hide layout bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
    return module.eval().requires_grad_(False)


def tiny_kl_config(latent_channels: int = 16, quant: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": TINY_BLOCKS,
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": 4,
        "sample_size": 32,
        "use_quant_conv": quant,
        "use_post_quant_conv": quant,
        **extra,
    }


def tiny_autoencoder_kl(
    latent_channels: int = 16, quant: bool = False, seed: int = 0, **extra: Any
) -> nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return _randomize(AutoencoderKL(**tiny_kl_config(latent_channels, quant, **extra)), seed)


def tiny_flux2_config() -> dict[str, Any]:
    cfg = tiny_kl_config(latent_channels=32, quant=True)
    cfg.pop("shift_factor", None)
    return {**cfg, "batch_norm_eps": 1e-4, "patch_size": [2, 2]}


def tiny_flux2_vae(seed: int = 0) -> nn.Module:
    """AutoencoderKLFlux2 (32-ch latent, /8) with non-trivial BatchNorm running statistics."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = _randomize(AutoencoderKLFlux2(**tiny_flux2_config()), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    vae.bn.running_mean.copy_(torch.randn(128, generator=gen) * 0.3)
    vae.bn.running_var.copy_(torch.rand(128, generator=gen) + 0.5)
    return vae


def tiny_qwen_config(z_dim: int = 16, **extra: Any) -> dict[str, Any]:
    return {
        "base_dim": 8,
        "z_dim": z_dim,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        **extra,
    }


def tiny_qwen_vae(seed: int = 0, **extra: Any) -> nn.Module:
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return _randomize(AutoencoderKLQwenImage(**tiny_qwen_config(**extra)), seed)


# ----------------------------------------------------------------------------------------------
# Layouts of the original files, produced independently of pid.latents
# ----------------------------------------------------------------------------------------------

_ATTN_BACK = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_to_bfl(state: dict[str, Tensor], flux2: bool = False) -> dict[str, Tensor]:
    """diffusers AutoencoderKL(/Flux2) names -> original black-forest-labs names (the layout of `ae.safetensors`).

    Test-side only; `test_latents` checks it against diffusers' own LDM converter.
    """
    num_up = 1 + max(int(m[1]) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if m := re.fullmatch(
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", key
        ):
            new = f"{m[1]}.mid.attn_1.{_ATTN_BACK[m[2]]}.{m[3]}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", new):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", new):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", new):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", new):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", new):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif flux2 and key.startswith("quant_conv."):
            new = "encoder." + key
        elif flux2 and key.startswith("post_quant_conv."):
            new = "decoder." + key
        out[new] = value.clone()
    return out


class _RMS(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * x.shape[1] ** 0.5 * self.gamma


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            _RMS(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
            _RMS(cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1),
        )  # fmt: skip
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.residual(x) + self.shortcut(x)


class _Attn(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = _RMS(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class _Up(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
        )


class _Down(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))


def _run(seq: nn.Module, x: Tensor) -> Tensor:
    for layer in seq:
        x = layer.resample(x) if isinstance(layer, _Up | _Down) else layer(x)
    return x


class TinyWan2dVAE(nn.Module):
    """The Qwen-Image / Wan-2.1 VAE reduced to 2-D (spec §7.2), with the original Wan parameter names."""

    def __init__(
        self, dim: int = 8, z_dim: int = 16, dim_mult: tuple[int, ...] = (1, 2, 4, 4), num_res: int = 1
    ):
        super().__init__()
        self.encoder = nn.Module()
        dims = [dim * u for u in (1, *dim_mult)]
        self.encoder.conv1 = nn.Conv2d(3, dims[0], 3, padding=1)
        down: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(num_res):
                down.append(_Res(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                down.append(_Down(cout))
        self.encoder.downsamples = nn.Sequential(*down)
        top = dims[-1]
        self.encoder.middle = nn.Sequential(_Res(top, top), _Attn(top), _Res(top, top))
        self.encoder.head = nn.Sequential(_RMS(top), nn.SiLU(), nn.Conv2d(top, 2 * z_dim, 3, padding=1))
        self.conv1 = nn.Conv2d(2 * z_dim, 2 * z_dim, 1)
        self.conv2 = nn.Conv2d(z_dim, z_dim, 1)

        self.decoder = nn.Module()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        self.decoder.conv1 = nn.Conv2d(z_dim, dims[0], 3, padding=1)
        self.decoder.middle = nn.Sequential(_Res(dims[0], dims[0]), _Attn(dims[0]), _Res(dims[0], dims[0]))
        up: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            cin = cin // 2 if i > 0 else cin  # the previous upsample halved the channels
            for _ in range(num_res + 1):
                up.append(_Res(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                up.append(_Up(cout))
        self.decoder.upsamples = nn.Sequential(*up)
        self.decoder.head = nn.Sequential(_RMS(dims[-1]), nn.SiLU(), nn.Conv2d(dims[-1], 3, 3, padding=1))

    def encode_mean(self, x: Tensor) -> Tensor:
        h = self.encoder.conv1(x)
        h = self.encoder.head(self.encoder.middle(_run(self.encoder.downsamples, h)))
        return self.conv1(h).chunk(2, dim=1)[0]

    def decode_raw(self, z: Tensor) -> Tensor:
        h = self.decoder.middle(self.decoder.conv1(self.conv2(z)))
        return self.decoder.head(_run(self.decoder.upsamples, h))


def tiny_wan2d(seed: int = 0) -> TinyWan2dVAE:
    torch.manual_seed(seed)
    model = TinyWan2dVAE()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn(p.shape, generator=gen)
                if name.endswith("gamma")
                else 0.2 * torch.randn(p.shape, generator=gen)
            )
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# RAE encoders / decoders
# ----------------------------------------------------------------------------------------------


def tiny_vit_decoder_config(**overrides: Any) -> Any:
    from pid.latents.rae import ViTDecoderConfig

    base = {
        "hidden_size": 16,
        "decoder_hidden_size": 32,
        "decoder_num_hidden_layers": 1,
        "decoder_num_attention_heads": 2,
        "decoder_intermediate_size": 48,
        "patch_size": 16,
        "num_patches": 1024,
    }
    return ViTDecoderConfig(**{**base, **overrides})


def tiny_vit_decoder_state(cfg: Any, seed: int = 0) -> dict[str, Tensor]:
    """A random decoder state dict with the published parameter names (sin-cos table included)."""
    from pid.latents.rae import ViTMAEDecoder, sincos_pos_embed

    torch.manual_seed(seed)
    decoder = _randomize(ViTMAEDecoder(cfg), seed)
    decoder.decoder_pos_embed.data.copy_(sincos_pos_embed(cfg.decoder_hidden_size, cfg.grid).unsqueeze(0))
    return {k: v.clone() for k, v in decoder.state_dict().items()}


def tiny_dinov2(seed: int = 0) -> nn.Module:
    """Dinov2WithRegistersModel at patch 14 with 4 registers (448 px -> 32x32 tokens), width 16."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    config = Dinov2WithRegistersConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=14,
        image_size=448, num_register_tokens=4,
    )  # fmt: skip
    return Dinov2WithRegistersModel(config).eval()


def tiny_siglip(seed: int = 0) -> nn.Module:
    """SiglipVisionModel at patch 14 (224 px -> 16x16 tokens), width 16."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=14,
        image_size=224,
    )  # fmt: skip
    return SiglipVisionModel(config).eval()


def sample_images(batch: int = 2, size: int = 32, seed: int = 0) -> Tensor:
    """Smooth images in [-1, 1] (a gradient plus low-amplitude noise)."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-0.8, 0.8, size)
    base = (ramp[None, :] * ramp[:, None]).expand(batch, 3, size, size)
    return (base + 0.1 * torch.randn(batch, 3, size, size, generator=gen)).clamp(-1, 1)
