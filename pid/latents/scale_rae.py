"""SigLIP-2 Scale-RAE latent space (backbone siglip).

    encode: [-1,1] -> [0,1] -> bicubic (antialiased) 224x224 -> (x - 0.5) / 0.5 -> SigLIP-2 So400M/14 vision tower
            without its post-LayerNorm -> tokens [B,1152,16,16]
    z_norm = LayerNorm(tokens) over the 1152 channels, no affine, eps 1e-6
    decode: Scale-RAE ViT-XL decoder (patch 14) -> 224x224 -> de-normalise, clamp -> bicubic 256x256, clamp -> [-1,1]

The LayerNorm is part of the feature definition the decoder was trained on, so it has no inverse:
`denormalize` is the identity and the decoder reads normalised tokens. A 256-px image gives a 16x16 grid
("virtual" /16). Files: SigLIP-2 from the Hugging Face repo `google/siglip2-so400m-patch14-224`; the decoder
(`scale_rae/decoder/siglip2_sop14_i224_web73M_ganw3_decXL.pt`) and its `XL_decoder_config.json` from the
nvidia/PiD hub repo (as published by the Scale-RAE authors, github.com/ZitengWangNYU/Scale-RAE).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pid.errors import ConfigError
from pid.latents.base import (
    default_device,
    default_dtype,
    finish_module,
    module_device_dtype,
    tokens_to_grid,
)
from pid.latents.rae import (
    TokenLatentSpace,
    ViTDecoderConfig,
    ViTMAEDecoder,
    hf_pretrained,
    load_vit_decoder,
)

SIGLIP_REPO = "google/siglip2-so400m-patch14-224"
SIGLIP_MEAN = (0.5, 0.5, 0.5)  # SigLIP's image processor
SIGLIP_STD = (0.5, 0.5, 0.5)
LN_EPS = 1e-6
# Scale-RAE's decoder: ViT-XL at patch 14 over the 16x16 grid of a 224-px SigLIP input. Only used where the JSON
# config the hub repo ships leaves a field out.
SCALE_RAE_DECODER = ViTDecoderConfig(hidden_size=1152, patch_size=14, num_patches=256)


def layer_norm_channels(tokens: Tensor, eps: float = LN_EPS) -> Tensor:
    """Affine-free LayerNorm over the channel axis of a (B, C, h, w) grid, computed in fp32."""
    x = tokens.float().permute(0, 2, 3, 1)
    return F.layer_norm(x, x.shape[-1:], eps=eps).permute(0, 3, 1, 2).to(tokens.dtype)


class ScaleRAEAutoencoder(nn.Module):
    """SigLIP vision tower (optional: decoding alone does not need it) + Scale-RAE ViT-MAE decoder."""

    def __init__(self, encoder: nn.Module | None, decoder: ViTMAEDecoder, output_size: int = 256) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.output_size = output_size
        self.register_buffer("pixel_mean", torch.tensor(SIGLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(SIGLIP_STD).view(1, 3, 1, 1))

    @property
    def width(self) -> int:
        return self.decoder.cfg.hidden_size

    def encode_features(self, images: Tensor) -> Tensor:
        """[-1,1] images -> raw (pre-LayerNorm) SigLIP patch tokens as a (B, C, g, g) grid."""
        if self.encoder is None:
            raise ConfigError(
                "this siglip Scale-RAE was loaded without its encoder; load(with_encoder=True) to encode"
            )
        patch = int(self.encoder.config.patch_size)
        size = self.decoder.cfg.grid * patch  # 16 * 14 = 224
        x = (images.float() + 1) / 2
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = (x - self.pixel_mean.float()) / self.pixel_std.float()
        device, dtype = module_device_dtype(self.encoder)
        x = x.to(device, dtype)
        if _is_naflex(self.encoder):
            tokens = self.encoder(**naflex_inputs(x, patch)).last_hidden_state
        else:
            tokens = self.encoder(pixel_values=x).last_hidden_state
        side = math.isqrt(tokens.shape[1])
        return tokens_to_grid(tokens.float(), side, side)

    def decode_features(self, grid: Tensor) -> Tensor:
        """Normalised (B, C, g, g) tokens -> [-1,1] images at `output_size`."""
        device, dtype = module_device_dtype(self.decoder)
        tokens = grid.flatten(2).transpose(1, 2)
        pixels = self.decoder.unpatchify(self.decoder(tokens.to(device, dtype))).float()
        pixels = (pixels * self.pixel_std.float() + self.pixel_mean.float()).clamp(0, 1)
        if pixels.shape[-1] != self.output_size:
            # bridge the decoder's 14-px patch grid (224) to the 16-px multiple the interface uses (256)
            size = (self.output_size, self.output_size)
            pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        return pixels * 2 - 1


def _is_naflex(encoder: nn.Module) -> bool:
    return getattr(encoder.config, "model_type", "").startswith("siglip2")


def naflex_inputs(images: Tensor, patch: int) -> dict[str, Tensor]:
    """Siglip2 (NaFlex) vision input: flattened (py, px, c) patches, their grid shape and an all-ones mask."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    patches = images.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, -1)
    shapes = torch.tensor([[gh, gw]] * b, device=images.device)
    mask = torch.ones(b, gh * gw, dtype=torch.int32, device=images.device)
    return {"pixel_values": patches, "spatial_shapes": shapes, "pixel_attention_mask": mask}


def load_siglip_encoder(repo_or_path: str = SIGLIP_REPO) -> nn.Module:
    """The SigLIP(-2) vision tower alone, its post-LayerNorm removed (Scale-RAE reads the pre-LN tokens)."""
    from transformers import AutoConfig, Siglip2VisionModel, SiglipVisionModel

    config = hf_pretrained(AutoConfig, repo_or_path)
    cls = Siglip2VisionModel if config.model_type.startswith("siglip2") else SiglipVisionModel
    return strip_post_layernorm(hf_pretrained(cls, repo_or_path))


def strip_post_layernorm(encoder: nn.Module) -> nn.Module:
    tower = getattr(encoder, "vision_model", encoder)
    if hasattr(tower, "post_layernorm"):
        tower.post_layernorm = nn.Identity()
    if hasattr(tower, "head"):  # the attention-pooling head is unused and would run on every call
        tower.use_head = False
    return encoder


class SigLIPLatentSpace(TokenLatentSpace):
    name = "siglip"
    default_channels = 1152
    native_resolution = 256
    autoencoder_class = ScaleRAEAutoencoder
    decoder_file = "scale_rae/decoder/siglip2_sop14_i224_web73M_ganw3_decXL.pt"
    decoder_config_file = "scale_rae/decoder/XL_decoder_config.json"

    def load(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        checkpoint_dir: str | None = None,
        revision: str | None = None,
        *,
        with_encoder: bool = True,
        encoder_path: str = SIGLIP_REPO,
    ) -> SigLIPLatentSpace:
        """Decoder from the hub repo; SigLIP-2 from `encoder_path` unless `with_encoder=False`."""
        from pid.checkpoints import read_checkpoint_file, resolve_hub_path

        config_path = resolve_hub_path(self.decoder_config_file, checkpoint_dir, revision=revision)
        decoder_path = resolve_hub_path(self.decoder_file, checkpoint_dir, revision=revision)
        encoder = load_siglip_encoder(encoder_path) if with_encoder else None
        width = int(encoder.config.hidden_size) if encoder is not None else SCALE_RAE_DECODER.hidden_size
        # As Scale-RAE does: the decoder's input width is the encoder's, whatever the JSON says.
        cfg = ViTDecoderConfig.from_json(config_path, base=SCALE_RAE_DECODER, hidden_size=width)
        decoder = load_vit_decoder(read_checkpoint_file(decoder_path), cfg, str(decoder_path))
        dev = default_device(device)
        dt = default_dtype(dtype, dev)
        rae = ScaleRAEAutoencoder(encoder, finish_module(decoder, dev, dt), self.native_resolution)
        if encoder is not None:
            finish_module(encoder, dev, dt)
        self.vae = rae.to(dev)
        return self

    def normalize(self, raw: Tensor) -> Tensor:
        return layer_norm_channels(raw)

    def denormalize(self, latent: Tensor) -> Tensor:
        return latent  # the decoder reads LayerNorm-ed tokens; the norm is not inverted
