"""The latent-space contract shared by every backbone family, plus the tensor helpers they share.

A latent space maps images to the *normalised diffusion space* PiD was trained on and back, and converts
between that space and what each diffusers pipeline hands out (packed tokens, VE-frame latents, ...):

    space = pid.latents.get("flux").load()           # weights from the nvidia/PiD hub repo
    z = space.encode(images)                          # [B,3,H,W] in [-1,1] -> [B,16,H/8,W/8]
    z_noisy = space.add_noise(z, 0.3, generator)      # the training-time corruption
    baseline = space.decode(z)                        # the VAE's own decode, [-1,1]

Every tensor layout is written out here once (pack / patchify / token grids) so the family modules and the
tests share a single definition.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from pid.errors import CheckpointMismatchError, ConfigError, InputError

NoiseForm = Literal["flow", "vp"]


# ----------------------------------------------------------------------------------------------
# Layout helpers (pure tensor maths, no weights)
# ----------------------------------------------------------------------------------------------


def pack_2x2(latent: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C) tokens, row-major over 2x2 cells, channel order (c, py, px).

    This is FLUX.1's and Qwen-Image's transformer packing.
    """
    b, c, h, w = _expect_rank(latent, 4, "latent").shape
    _expect_even(h, w)
    x = latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of `pack_2x2`: (B, (h/2)(w/2), 4C) -> (B, C, h, w) for a latent grid of h x w cells."""
    b, n, c4 = _expect_rank(tokens, 3, "packed latent").shape
    _expect_even(h, w)
    if n != (h // 2) * (w // 2) or c4 % 4:
        raise InputError(
            f"packed latent {tuple(tokens.shape)} does not fit a {h}x{w} latent grid "
            f"(expected {(h // 2) * (w // 2)} tokens of 4*C channels)"
        )
    x = tokens.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def patchify_2x2(latent: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, 4C, h/2, w/2) with channel index c*4 + py*2 + px (FLUX.2's patchify)."""
    b, c, h, w = _expect_rank(latent, 4, "latent").shape
    _expect_even(h, w)
    x = latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify_2x2(latent: Tensor) -> Tensor:
    """Inverse of `patchify_2x2`: (B, 4C, h, w) -> (B, C, 2h, 2w)."""
    b, c4, h, w = _expect_rank(latent, 4, "latent").shape
    if c4 % 4:
        raise InputError(f"cannot unpatchify {c4} channels: not a multiple of 4")
    x = latent.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def grid_to_tokens(latent: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C), row-major (FLUX.2's sequence order)."""
    b, c, h, w = _expect_rank(latent, 4, "latent").shape
    return latent.reshape(b, c, h * w).permute(0, 2, 1)


def tokens_to_grid(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h*w, C) -> (B, C, h, w); tokens are in row-major order."""
    b, n, c = _expect_rank(tokens, 3, "token latent").shape
    if n != h * w:
        raise InputError(f"token latent {tuple(tokens.shape)} does not fit a {h}x{w} grid ({h * w} tokens)")
    return tokens.permute(0, 2, 1).reshape(b, c, h, w)


def _expect_rank(x: Tensor, rank: int, what: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != rank:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"expected a {rank}-D {what}, got {shape}")
    return x


def _expect_even(h: int, w: int) -> None:
    if h % 2 or w % 2:
        raise InputError(f"2x2 packing needs an even latent grid, got {h}x{w}")


# ----------------------------------------------------------------------------------------------
# Weight loading helpers
# ----------------------------------------------------------------------------------------------


def default_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    # The reference runs every tokenizer in bf16; on CPU fp32 is both faster and exact.
    if dtype is not None:
        return dtype
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_into(
    module: nn.Module,
    state: Mapping[str, Tensor],
    source: str,
    may_be_missing: Callable[[str], bool] = lambda key: False,
    adapt: Callable[[str, Tensor, torch.Size], Tensor | None] | None = None,
) -> nn.Module:
    """Strictly load `state` into a (possibly meta-device) module, materialising it.

    Keys for which `may_be_missing(key)` holds are filled with zeros (parameters the file legitimately lacks,
    e.g. temporal convolutions unused for single images). `adapt(key, tensor, expected_shape)` may reshape a
    tensor whose stored layout differs; it returns None when it cannot. Any other missing, unexpected or
    mis-shaped key raises `CheckpointMismatchError` naming a few of them.
    """
    expected = module.state_dict(keep_vars=True)
    unexpected = sorted(set(state) - set(expected))
    missing = [k for k in expected if k not in state and not may_be_missing(k)]
    full: dict[str, Tensor] = {}
    bad_shape = []
    for key, ref in expected.items():
        if key not in state:
            full[key] = torch.zeros(ref.shape, dtype=ref.dtype)
            continue
        value = state[key]
        if value.shape != ref.shape and adapt is not None:
            value = adapt(key, value, ref.shape)
        if value is None or value.shape != ref.shape:
            bad_shape.append(f"{key} {tuple(state[key].shape)} vs {tuple(ref.shape)}")
            continue
        full[key] = value
    if unexpected or missing or bad_shape:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise CheckpointMismatchError(f"{source} does not fit {type(module).__name__}: {'; '.join(parts)}")
    module.load_state_dict(full, strict=True, assign=True)
    return module


def finish_module(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move a loaded module to its device/dtype, frozen and in eval mode."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_meta:
            raise CheckpointMismatchError(f"{type(module).__name__}.{name} was never loaded")
    # diffusers' ModelMixin.to warns about fp32 modules whenever a dtype is given, even when it has none
    # (`... should be kept in float32: []`); with none to keep, torch's own `to` is the same move, silently.
    keep_fp32 = getattr(module, "_keep_in_fp32_modules", None)
    move = nn.Module.to if isinstance(module, nn.Module) and not keep_fp32 else type(module).to
    return move(module, device=device, dtype=dtype).eval().requires_grad_(False)


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in module.parameters():
        return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


# ----------------------------------------------------------------------------------------------
# The latent-space contract
# ----------------------------------------------------------------------------------------------


class LatentSpace(ABC):
    """One backbone family's latent space (see the module docstring).

    Class attributes describe the released models; instance properties `channels`, `downsample` and
    `size_multiple` follow an attached VAE whose geometry differs (e.g. a tiny test VAE).
    """

    name: ClassVar[str]  # family name ("flux", "flux2", ...)
    noise_form: ClassVar[NoiseForm] = "flow"
    default_channels: ClassVar[int]  # channels of the latent PiD receives
    native_resolution: ClassVar[int] = 512  # image side the tokenizer was trained at
    has_pipeline: ClassVar[bool] = True  # a diffusers pipeline produces these latents

    def __init__(self, backbone: str | None = None) -> None:
        self.backbone = backbone or self.name
        self.vae: Any = None  # the loaded or attached autoencoder (a family-specific module)

    def __repr__(self) -> str:
        state = "loaded" if self.is_loaded else "no weights"
        return f"<{type(self).__name__} {self.backbone!r} ({state})>"

    # --- weights ------------------------------------------------------------------------------

    @property
    def is_loaded(self) -> bool:
        return self.vae is not None

    @abstractmethod
    def load(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        checkpoint_dir: str | None = None,
        revision: str | None = None,
    ) -> LatentSpace:
        """Load the autoencoder weights the nvidia/PiD hub repo ships (local copy, HF cache or a download
        at `revision`, default main); returns self."""

    def attach(self, vae: Any) -> LatentSpace:
        """Use an already loaded autoencoder (no second copy); returns self."""
        self._check_vae(vae)
        self.vae = vae
        return self

    def from_pipeline(self, pipe: Any) -> LatentSpace:
        """Attach a diffusers pipeline's own VAE; returns self."""
        if not self.has_pipeline:
            raise ConfigError(f"{self.backbone} latents do not come from a diffusers pipeline; use load()")
        vae = getattr(pipe, "vae", None)
        if vae is None:
            raise ConfigError(
                f"{type(pipe).__name__} has no `vae` to attach to the {self.backbone} latent space"
            )
        return self.attach(vae)

    def _check_vae(self, vae: Any) -> None:
        if not (hasattr(vae, "encode") and hasattr(vae, "decode")):
            raise ConfigError(
                f"cannot attach {type(vae).__name__} to {self.backbone}: it has no encode/decode"
            )

    def _require_vae(self, what: str) -> Any:
        if self.vae is None:
            raise ConfigError(
                f"{what} needs the {self.backbone} autoencoder: call pid.latents.get({self.backbone!r}).load() "
                "(or .attach(vae) / .from_pipeline(pipe)) first"
            )
        return self.vae

    # --- geometry -----------------------------------------------------------------------------

    @property
    def channels(self) -> int:
        """Channels of the latent PiD receives."""
        return self.default_channels

    @property
    def downsample(self) -> int:
        """Image pixels per latent cell (per side)."""
        return 8

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this for the latent (and the family's pipeline) without rounding."""
        return self.downsample

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent grid (h, w) of an image of this size (after `check_size`)."""
        self.check_size(height, width)
        return height // self.downsample, width // self.downsample

    def check_size(self, height: int, width: int) -> None:
        """Raise a one-line `ConfigError` naming the nearest valid sizes when a side is not a valid multiple."""
        m = self.size_multiple
        if height > 0 and width > 0 and height % m == 0 and width % m == 0:
            return

        def near(side: int) -> tuple[int, int]:
            low = max(m, side // m * m)
            return low, low if side <= low else low + m

        (h0, h1), (w0, w1) = near(height), near(width)
        options = f"{w0}x{h0}" if (h0, w0) == (h1, w1) else f"{w0}x{h0} or {w1}x{h1}"
        raise ConfigError(
            f"{self.backbone} needs image sides that are positive multiples of {m}; got {width}x{height} "
            f"(WxH); nearest valid sizes: {options}"
        )

    # --- normalisation ------------------------------------------------------------------------

    @abstractmethod
    def normalize(self, raw: Tensor) -> Tensor:
        """Raw autoencoder latent (posterior mean) -> the normalised space PiD reads."""

    @abstractmethod
    def denormalize(self, latent: Tensor) -> Tensor:
        """Normalised latent -> what the autoencoder's decoder takes."""

    # --- images -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """[B,3,H,W] images in [-1,1] -> normalised latent (posterior mean, no sampling), in the input dtype."""
        _expect_rank(images, 4, "image batch")
        if images.shape[1] != 3:
            raise InputError(f"expected RGB images [B,3,H,W], got {tuple(images.shape)}")
        self._require_vae("encode()")
        raw = self._encode_raw(images)
        return self.normalize(raw).to(images.dtype)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """Normalised latent -> images in [-1,1] (the baseline decode, at the LDM resolution)."""
        _expect_rank(latent, 4, "latent")
        self._require_vae("decode()")
        images = self._decode_raw(self.denormalize(latent))
        return images.clamp(-1.0, 1.0).to(latent.dtype)

    @abstractmethod
    def _encode_raw(self, images: Tensor) -> Tensor: ...

    @abstractmethod
    def _decode_raw(self, raw: Tensor) -> Tensor: ...

    # --- pipeline layouts ---------------------------------------------------------------------

    def from_pipeline_latent(self, latent: Tensor, height: int, width: int) -> Tensor:
        """What the diffusers pipeline hands to `callback_on_step_end` / returns as `output_type="latent"`
        for an image of `height` x `width` -> the normalised (B, C, h, w) latent PiD reads."""
        return _expect_rank(latent, 4, "latent")

    def to_pipeline_latent(self, latent: Tensor) -> Tensor:
        """Normalised (B, C, h, w) latent -> the layout the pipeline's denoising loop carries."""
        return _expect_rank(latent, 4, "latent")

    # --- noise --------------------------------------------------------------------------------

    def add_noise(
        self, latent: Tensor, sigma: float | Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """The training-time corruption: flow (1-s)z + s*eps, or variance-preserving sqrt(1-s^2)z + s*eps.

        eps is one `torch.randn` of the latent's shape, device and dtype from `generator`; sigma may be a float
        or a per-sample tensor in [0, 1]. sigma = 0 returns the latent untouched and draws nothing.
        """
        s = _sigma_like(sigma, latent)
        if (isinstance(s, float) and s == 0.0) or (isinstance(s, Tensor) and not bool(s.any())):
            return latent
        eps = torch.randn(latent.shape, generator=generator, device=latent.device, dtype=latent.dtype)
        if self.noise_form == "vp":
            keep = (
                math.sqrt(max(0.0, 1.0 - s * s)) if isinstance(s, float) else (1 - s * s).clamp_min(0).sqrt()
            )
            return keep * latent + s * eps
        return (1 - s) * latent + s * eps

    def to_training_frame(self, latent: Tensor, sigma: float | Tensor) -> tuple[Tensor, float | Tensor]:
        """A captured pipeline latent at noise level sigma -> (latent, sigma) in PiD's training frame.

        Identity for flow-matching backbones (their schedulers already use x = (1-s)x0 + s*eps).
        """
        return latent, sigma


def _sigma_like(sigma: float | Tensor, latent: Tensor) -> float | Tensor:
    """Validate sigma in [0, 1]; a tensor becomes broadcastable against the latent's batch."""
    if isinstance(sigma, Tensor):
        if sigma.numel() != 1 and sigma.numel() != latent.shape[0]:
            raise InputError(f"sigma has {sigma.numel()} values for a batch of {latent.shape[0]}")
        if bool(((sigma < 0) | (sigma > 1)).any()):
            raise ConfigError(f"sigma must lie in [0, 1], got {sigma.flatten().tolist()}")
        view = (-1,) + (1,) * (latent.ndim - 1) if sigma.numel() > 1 else ()
        return sigma.to(device=latent.device, dtype=latent.dtype).reshape(view)
    sigma = float(sigma)
    if not 0.0 <= sigma <= 1.0:
        raise ConfigError(f"sigma must lie in [0, 1], got {sigma}")
    return sigma


# ----------------------------------------------------------------------------------------------
# Diffusers conv autoencoders with an affine normalisation (FLUX.1, Z-Image, SD3, SDXL)
# ----------------------------------------------------------------------------------------------


def vae_scale_factor(vae: Any, default: int = 8) -> int:
    """Spatial compression of a diffusers autoencoder, read from its config."""
    config = getattr(vae, "config", None)
    if config is None:
        return default
    if getattr(config, "temperal_downsample", None) is not None:  # Qwen-Image / Wan
        return 2 ** len(config.temperal_downsample)
    blocks = getattr(config, "block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else default


class AffineLatentSpace(LatentSpace):
    """z_norm = scaling * (z - shift) over a diffusers `AutoencoderKL`."""

    scaling_factor: ClassVar[float]
    shift_factor: ClassVar[float] = 0.0
    pipeline_patch: ClassVar[int] = 1  # the pipeline's transformer patch (2 -> sides must be multiples of 16)

    def __init__(self, backbone: str | None = None) -> None:
        super().__init__(backbone)
        self.scale = self.scaling_factor
        self.shift = self.shift_factor

    @property
    def channels(self) -> int:
        config = getattr(self.vae, "config", None)
        return int(getattr(config, "latent_channels", self.default_channels))

    @property
    def downsample(self) -> int:
        return vae_scale_factor(self.vae) if self.vae is not None else 8

    @property
    def size_multiple(self) -> int:
        return self.downsample * self.pipeline_patch

    def normalize(self, raw: Tensor) -> Tensor:
        return (raw - self.shift) * self.scale

    def denormalize(self, latent: Tensor) -> Tensor:
        return latent / self.scale + self.shift

    def _encode_raw(self, images: Tensor) -> Tensor:
        device, dtype = module_device_dtype(self.vae)
        return self.vae.encode(images.to(device, dtype)).latent_dist.mean.float()

    def _decode_raw(self, raw: Tensor) -> Tensor:
        device, dtype = module_device_dtype(self.vae)
        return self.vae.decode(raw.to(device, dtype), return_dict=False)[0]
