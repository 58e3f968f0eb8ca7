"""DINOv2 representation-autoencoder (RAE) latent space (backbone dinov2), and the ViT-MAE decoder RAEs share.

    encode: [-1,1] -> [0,1] -> bicubic 448x448 -> ImageNet-normalise -> DINOv2-B-with-registers (final LayerNorm
            without affine) -> drop CLS + 4 registers -> tokens [B,768,32,32]
    z_norm = (tokens - mean) / sqrt(var + 1e-5)     per-(C,H,W) statistics of ImageNet-512
    decode: de-normalise -> ViT-XL decoder -> 16x16x3 patches -> 512x512 -> de-ImageNet, clamp -> [-1,1]

A 512-px image gives a 32x32 grid, so one latent cell stands for 16 pixels ("virtual" /16; any input is squashed to
448x448 first). Files: DINOv2 from the Hugging Face repo `facebook/dinov2-with-registers-base`; the decoder
(`rae/decoders/dinov2/wReg_base/ViTXL_n08_i512/model.pt`) and statistics (`rae/stats/dinov2/wReg_base/
imagenet1k_512/stat.pt`, a {"mean", "var"} dict) from the nvidia/PiD hub repo (both as published by the RAE
authors, github.com/bytetriper/RAE).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pid.errors import CheckpointMismatchError, CheckpointNotFoundError, ConfigError, InputError
from pid.latents.base import (
    LatentSpace,
    default_device,
    default_dtype,
    finish_module,
    load_into,
    module_device_dtype,
    tokens_to_grid,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's image processor
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_REPO = "facebook/dinov2-with-registers-base"
STATS_EPS = 1e-5

# ----------------------------------------------------------------------------------------------
# ViT-MAE decoder (parameter names match the published RAE / Scale-RAE decoder files)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTDecoderConfig:
    """Hyper-parameters of an RAE ViT-MAE decoder; defaults are RAE's ViT-XL (configs/decoder/ViTXL)."""

    hidden_size: int = 768  # width of the tokens it reads (the encoder's)
    decoder_hidden_size: int = 1152
    decoder_num_hidden_layers: int = 28
    decoder_num_attention_heads: int = 16
    decoder_intermediate_size: int = 4096
    patch_size: int = 16  # output pixels per token side
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    num_patches: int = 1024  # token grid the decoder was trained on (32x32)

    @property
    def grid(self) -> int:
        return math.isqrt(self.num_patches)

    @property
    def image_size(self) -> int:
        return self.grid * self.patch_size

    @classmethod
    def from_json(
        cls, path: str | Path, base: ViTDecoderConfig | None = None, **overrides: Any
    ) -> ViTDecoderConfig:
        """Read a transformers `ViTMAEConfig`-style JSON over `base`, keeping the fields this decoder uses."""
        raw = json.loads(Path(path).read_text())
        defaults = base or cls()
        # RAE ships "patch_size": "SHOULD BE RELOADED"; only values of the field's type are taken.
        kept = {
            f.name: raw[f.name]
            for f in fields(cls)
            if f.name in raw and _same_kind(raw[f.name], getattr(defaults, f.name))
        }
        return replace(defaults, **{**kept, **overrides})


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, type(default))


def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """MAE's fixed 2-D sin-cos table, (1 + grid*grid, dim), zero row first for the CLS slot.

    First half of the channels encodes the column (x) coordinate, second half the row; each half is
    [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/4)).
    """
    if dim % 4:
        raise ConfigError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )

    def embed(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    table = torch.cat([embed(cols), embed(rows)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,  # transformers' "gelu" is the exact (erf) GELU
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


class _Linear(nn.Module):
    """A named holder so parameter paths read `...output.dense.weight` like the published files."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width, bias=bias)
        self.key = nn.Linear(width, width, bias=bias)
        self.value = nn.Linear(width, width, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = (
            proj(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
            for proj in (self.query, self.key, self.value)
        )
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.attention = _SelfAttention(width, heads, bias)
        self.output = _Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.output.dense(self.attention(x))


class ViTLayer(nn.Module):
    """Pre-norm transformer block (ViT-MAE's `ViTMAELayer`)."""

    def __init__(self, cfg: ViTDecoderConfig) -> None:
        super().__init__()
        width = cfg.decoder_hidden_size
        if width % cfg.decoder_num_attention_heads:
            raise ConfigError(
                f"decoder width {width} is not divisible by {cfg.decoder_num_attention_heads} heads"
            )
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ConfigError(
                f"unsupported decoder activation {cfg.hidden_act!r}; known: {', '.join(_ACTIVATIONS)}"
            )
        self.layernorm_before = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.attention = _Attention(width, cfg.decoder_num_attention_heads, cfg.qkv_bias)
        self.layernorm_after = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.intermediate = _Linear(width, cfg.decoder_intermediate_size)
        self.output = _Linear(cfg.decoder_intermediate_size, width)
        self.act = _ACTIVATIONS[cfg.hidden_act]()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(self.act(self.intermediate.dense(self.layernorm_after(x))))


class ViTMAEDecoder(nn.Module):
    """RAE's ViT-MAE pixel decoder: tokens (B, N, hidden) -> per-patch pixels (B, num_patches, p*p*3).

    A learned CLS token is prepended, the fixed sin-cos table added, and a token count other than `num_patches`
    is bilinearly resized on its (square) grid first.
    """

    def __init__(self, cfg: ViTDecoderConfig) -> None:
        super().__init__()
        if cfg.grid * cfg.grid != cfg.num_patches:
            raise ConfigError(f"decoder num_patches {cfg.num_patches} is not a square grid")
        self.cfg = cfg
        width = cfg.decoder_hidden_size
        self.decoder_embed = nn.Linear(cfg.hidden_size, width)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, width), requires_grad=False)
        self.decoder_layers = nn.ModuleList(ViTLayer(cfg) for _ in range(cfg.decoder_num_hidden_layers))
        self.decoder_norm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.decoder_pred = nn.Linear(width, cfg.patch_size**2 * cfg.num_channels)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self._resize_tokens(self.decoder_embed(tokens))
        x = (
            torch.cat([self.trainable_cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            + self.decoder_pos_embed
        )
        for layer in self.decoder_layers:
            x = layer(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def _resize_tokens(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        if n == self.cfg.num_patches:
            return x
        side = math.isqrt(n)
        if side * side != n:
            raise InputError(f"cannot decode {n} tokens: not a square grid")
        grid = x.transpose(1, 2).reshape(b, c, side, side)
        grid = F.interpolate(grid, size=(self.cfg.grid, self.cfg.grid), mode="bilinear", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(B, g*g, p*p*C) with per-patch order (py, px, c) -> (B, C, g*p, g*p)."""
        b, p, c, g = patches.shape[0], self.cfg.patch_size, self.cfg.num_channels, self.cfg.grid
        x = patches.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)


def load_vit_decoder(state: Mapping[str, Tensor], cfg: ViTDecoderConfig, source: str) -> ViTMAEDecoder:
    """Build the decoder on the meta device and strictly load a published decoder state dict into it."""
    state = {_strip(k): v for k, v in state.items()}
    if "decoder_pos_embed" not in state:  # fixed table; recompute when a file leaves it out
        state["decoder_pos_embed"] = sincos_pos_embed(cfg.decoder_hidden_size, cfg.grid).unsqueeze(0)
    with torch.device("meta"):
        decoder = ViTMAEDecoder(cfg)
    return load_into(decoder, state, source)


def _strip(key: str) -> str:
    # DDP / torch.compile / wrapper-module prefixes ("decoder.decoder_embed..." from a MultimodalDecoder)
    for prefix in ("module.", "_orig_mod.", "decoder."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def hf_pretrained(cls: Any, repo_or_path: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained`, turning "not available offline" into the download command."""
    from pid.hub import catchable_errors, download_command, translate_hub_error

    try:
        return cls.from_pretrained(repo_or_path, **kwargs)
    except catchable_errors() as exc:
        if not Path(repo_or_path).expanduser().exists():  # a hub id: gated / missing / offline, one line each
            command = download_command(repo_or_path, revision=kwargs.get("revision"))
            translated = translate_hub_error(exc, repo_or_path, revision=kwargs.get("revision"), command=command)
            if translated is not None:
                raise translated from None
        if not isinstance(exc, OSError):
            raise
        raise CheckpointNotFoundError(
            f"{repo_or_path} is not available locally ({str(exc).splitlines()[0][:120]}); "
            f"download it with: hf download {repo_or_path}"
        ) from None


def read_stats(path: str | Path) -> tuple[Tensor, Tensor]:
    """RAE latent statistics file -> (mean, var) shaped (1, C, H, W) (or (1, C, 1, 1) for per-channel stats)."""
    from pid.checkpoints import read_checkpoint_file

    stats = read_checkpoint_file(path)
    if "mean" not in stats or "var" not in stats:
        raise CheckpointMismatchError(f"{path} must hold 'mean' and 'var' tensors, found {sorted(stats)}")
    return tuple(_stat_shape(stats[k].float()) for k in ("mean", "var"))  # type: ignore[return-value]


def _stat_shape(t: Tensor) -> Tensor:
    return t.reshape(1, *t.shape[-3:]) if t.ndim >= 3 else t.reshape(1, -1, 1, 1)


# ----------------------------------------------------------------------------------------------
# DINOv2 + RAE decoder
# ----------------------------------------------------------------------------------------------


class RAEAutoencoder(nn.Module):
    """DINOv2 encoder (optional: decoding alone does not need it) + ViT-MAE decoder + latent statistics."""

    def __init__(self, encoder: nn.Module | None, decoder: ViTMAEDecoder, mean: Tensor, var: Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.register_buffer("latent_mean", _stat_shape(mean.float()))
        self.register_buffer("latent_var", _stat_shape(var.float()))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    @property
    def width(self) -> int:
        return self.decoder.cfg.hidden_size

    def encode_features(self, images: Tensor) -> Tensor:
        """[-1,1] images -> raw DINOv2 patch tokens as a (B, C, g, g) grid."""
        if self.encoder is None:
            raise ConfigError(
                "this dinov2 RAE was loaded without its encoder; load(with_encoder=True) to encode"
            )
        config = self.encoder.config
        size = self.decoder.cfg.grid * int(config.patch_size)  # 32 * 14 = 448
        x = (images.float() + 1) / 2
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        x = (x - self.pixel_mean.float()) / self.pixel_std.float()
        device, dtype = module_device_dtype(self.encoder)
        hidden = self.encoder(pixel_values=x.to(device, dtype)).last_hidden_state
        tokens = hidden[:, 1 + int(getattr(config, "num_register_tokens", 0) or 0) :].float()
        side = math.isqrt(tokens.shape[1])
        return tokens_to_grid(tokens, side, side)

    def decode_features(self, grid: Tensor) -> Tensor:
        """Raw (B, C, g, g) token grid -> [-1,1] images at the decoder's resolution."""
        device, dtype = module_device_dtype(self.decoder)
        tokens = grid.flatten(2).transpose(1, 2)
        pixels = self.decoder.unpatchify(self.decoder(tokens.to(device, dtype))).float()
        pixels = pixels * self.pixel_std.float() + self.pixel_mean.float()
        return pixels.clamp(0, 1) * 2 - 1


def load_dinov2_encoder(repo_or_path: str = DINOV2_REPO) -> nn.Module:
    """DINOv2 (with or without registers) from transformers, its final LayerNorm made affine-free (RAE)."""
    from transformers import AutoConfig, Dinov2Model, Dinov2WithRegistersModel

    config = hf_pretrained(AutoConfig, repo_or_path)
    cls = Dinov2WithRegistersModel if config.model_type == "dinov2_with_registers" else Dinov2Model
    return strip_final_norm_affine(hf_pretrained(cls, repo_or_path))


def strip_final_norm_affine(encoder: nn.Module) -> nn.Module:
    """RAE reads DINOv2 tokens normalised by the final LayerNorm *without* its learned scale and shift."""
    norm = encoder.layernorm
    encoder.layernorm = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)
    return encoder


class TokenLatentSpace(LatentSpace):
    """Representation-autoencoder latents: a vision encoder's patch tokens as a [B, C, h, w] grid."""

    has_pipeline = False
    autoencoder_class: type[nn.Module]

    @property
    def channels(self) -> int:
        return self.vae.width if self.vae is not None else self.default_channels

    @property
    def downsample(self) -> int:
        # virtual: image px per token at the native size (the encoders see 448 / 224 px at patch 14)
        return 16

    def _check_vae(self, vae: Any) -> None:
        if not isinstance(vae, self.autoencoder_class):
            raise ConfigError(
                f"{self.name} attaches a {self.autoencoder_class.__name__}, not {type(vae).__name__}"
            )

    def _encode_raw(self, images: Tensor) -> Tensor:
        return self.vae.encode_features(images)

    def _decode_raw(self, raw: Tensor) -> Tensor:
        return self.vae.decode_features(raw)

    def from_pipeline_latent(self, latent: Tensor, height: int, width: int) -> Tensor:
        return tokens_as_grid(latent)


class DinoV2LatentSpace(TokenLatentSpace):
    name = "dinov2"
    default_channels = 768
    native_resolution = 512
    autoencoder_class = RAEAutoencoder
    decoder_file = "rae/decoders/dinov2/wReg_base/ViTXL_n08_i512/model.pt"
    stats_file = "rae/stats/dinov2/wReg_base/imagenet1k_512/stat.pt"
    decoder_config = ViTDecoderConfig()  # ViT-XL, patch 16, 32x32 tokens -> 512 px

    def load(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        checkpoint_dir: str | None = None,
        revision: str | None = None,
        *,
        with_encoder: bool = True,
        encoder_path: str = DINOV2_REPO,
    ) -> DinoV2LatentSpace:
        """Decoder + statistics from the hub repo; DINOv2 from `encoder_path` unless `with_encoder=False`."""
        from pid.checkpoints import read_checkpoint_file, resolve_hub_path

        decoder_path = resolve_hub_path(self.decoder_file, checkpoint_dir, revision=revision)
        mean, var = read_stats(resolve_hub_path(self.stats_file, checkpoint_dir, revision=revision))
        decoder = load_vit_decoder(read_checkpoint_file(decoder_path), self.decoder_config, str(decoder_path))
        encoder = load_dinov2_encoder(encoder_path) if with_encoder else None
        dev = default_device(device)
        rae = RAEAutoencoder(encoder, finish_module(decoder, dev, default_dtype(dtype, dev)), mean, var)
        if encoder is not None:
            finish_module(encoder, dev, default_dtype(dtype, dev))
        self.vae = rae.to(dev)
        return self

    def normalize(self, raw: Tensor) -> Tensor:
        rae = self._require_vae("dinov2 latent normalisation")
        mean, var = rae.latent_mean.to(raw.device), rae.latent_var.to(raw.device)
        return ((raw.float() - mean) / torch.sqrt(var + STATS_EPS)).to(raw.dtype)

    def denormalize(self, latent: Tensor) -> Tensor:
        rae = self._require_vae("dinov2 latent normalisation")
        mean, var = rae.latent_mean.to(latent.device), rae.latent_var.to(latent.device)
        return (latent.float() * torch.sqrt(var + STATS_EPS) + mean).to(latent.dtype)


def tokens_as_grid(latent: Tensor) -> Tensor:
    """(B, N, C) raster tokens -> (B, C, sqrt N, sqrt N); a 4-D grid passes through."""
    if latent.ndim == 3:
        side = math.isqrt(latent.shape[1])
        return tokens_to_grid(latent, side, side)
    if latent.ndim != 4:
        raise InputError(f"expected (B, N, C) tokens or a (B, C, h, w) grid, got {tuple(latent.shape)}")
    return latent
