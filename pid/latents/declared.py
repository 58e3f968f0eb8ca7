"""Latent spaces a user declares: any diffusers autoencoder, its normalisation and geometry, as data.

    space = pid.latents.declare(vae="stabilityai/sd-vae-ft-mse", name="sd15", noise_form="vp")
    space = pid.latents.resolve("my_space.yaml")          # the same fields in a YAML / JSON file
    space = pid.latents.resolve("my_pkg.spaces:MySpace")  # a LatentSpace subclass, for spaces that need code

A declaration (`LatentSpaceSpec`, pid/latents/spec.py) names the autoencoder (a hub repo id with `subfolder` / `revision`, a local
diffusers folder, or a single weight file with its `config.json`), how its raw latent becomes the normalised
latent PiD reads, and its geometry:

    z = posterior mean of the VAE                        [B, c, H/d, W/d]
    z = patchify_2x2(z) when patchify == 2               [B, 4c, H/2d, W/2d]  (FLUX.2's layout)
    z_norm = normalisation(z):
        affine     (z - shift) * scale                  scale/shift declared, else the VAE config's factors
        mean_std   (z - mean_c) / std_c * scale          per-channel stats declared, else the VAE config's
        batchnorm  (z - running_mean_c) / sqrt(running_var_c + eps)   the VAE's own `bn` (FLUX.2)
        none       z
        auto       mean_std when the VAE config has latents_mean/std, else affine

The declaration travels with a decoder trained for it (`space_metadata` / `space_from_metadata`, the
`pid.latent_space.spec` entry of a checkpoint's safetensors metadata), so a decoder file is enough to know which
VAE and normalisation it reads.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pid.errors import CheckpointNotFoundError, ConfigError, InputError, PiDError
from pid.latents.base import (
    LatentSpace,
    default_device,
    default_dtype,
    finish_module,
    grid_to_tokens,
    module_device_dtype,
    pack_2x2,
    patchify_2x2,
    tokens_to_grid,
    unpack_2x2,
    unpatchify_2x2,
    vae_scale_factor,
)
from pid.latents.spec import (
    LatentSpaceSpec,
    is_declaration,
    looks_local,
    spec_from_mapping,
    spec_from_reference,
)

# Key of a checkpoint's metadata that carries the declaration (JSON), beside `pid.net_config`.
SPACE_SPEC_KEY = "pid.latent_space.spec"
SPACE_NAME_KEY = "pid.latent_space"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_BN_EPS = 1e-4


def build_space(spec: LatentSpaceSpec) -> LatentSpace:
    """The latent-space object of a spec: a `DeclaredLatentSpace`, or the entry point's class."""
    if spec.entry_point is None:
        return DeclaredLatentSpace(spec)
    module_name, _, class_name = spec.entry_point.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import latent space {spec.entry_point} ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, LatentSpace)):
        raise ConfigError(f"{spec.entry_point} is not a pid.latents.LatentSpace subclass")
    try:
        space = cls(**dict(spec.options))
    except TypeError as exc:
        raise ConfigError(f"cannot build {spec.entry_point} with options {dict(spec.options)} ({exc})") from None
    space.spec = spec  # type: ignore[attr-defined]  # so a checkpoint can carry it
    return space


# ----------------------------------------------------------------------------------------------
# Checkpoint metadata
# ----------------------------------------------------------------------------------------------


def space_metadata(space: LatentSpace | str) -> dict[str, str]:
    """Metadata entries naming a latent space: the family name, and the declaration when it is declared."""
    if isinstance(space, str):
        from pid.latents import get

        space = get(space)
    spec = getattr(space, "spec", None)
    out = {SPACE_NAME_KEY: str(space.name)}
    if isinstance(spec, LatentSpaceSpec):
        out[SPACE_SPEC_KEY] = json.dumps(spec.to_dict(), sort_keys=True)
    return out


def space_from_metadata(metadata: Mapping[str, Any], source: str = "checkpoint") -> LatentSpace | None:
    """The declared space a checkpoint's metadata carries, or None (a built-in family or nothing)."""
    text = metadata.get(SPACE_SPEC_KEY)
    if text is None:
        return None
    try:
        values = json.loads(text) if isinstance(text, str) else dict(text)
        return build_space(spec_from_mapping(values))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"{source}: its {SPACE_SPEC_KEY} is unusable ({exc})") from None


# ----------------------------------------------------------------------------------------------
# The space
# ----------------------------------------------------------------------------------------------


class DeclaredLatentSpace(LatentSpace):
    """A latent space over any diffusers autoencoder, described by a `LatentSpaceSpec`."""

    name = "custom"
    default_channels = 0

    def __init__(self, spec: LatentSpaceSpec) -> None:
        self.spec = spec
        self.name = spec.name  # type: ignore[misc]  # an instance's name: the declared one
        self.noise_form = spec.noise_form  # type: ignore[misc]
        super().__init__(spec.name)
        self._unpack: Callable[..., Tensor] | None = None  # the attached pipeline's own unpack helper

    # --- weights ------------------------------------------------------------------------------

    def load(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        checkpoint_dir: str | None = None,
        revision: str | None = None,
    ) -> DeclaredLatentSpace:
        """Load the declared autoencoder (`checkpoint_dir` / `revision` are nvidia/PiD's and unused here)."""
        vae = load_declared_vae(self.spec)
        dev = default_device(device)
        stats = _bn_stats_fp32(vae)
        self.vae = finish_module(vae, dev, default_dtype(dtype, dev))
        for name, value in stats.items():  # BatchNorm statistics stay fp32 (tiny and precision-critical)
            setattr(self.vae.bn, name, value.to(dev))
        self._check_geometry()
        return self

    def attach(self, vae: Any) -> DeclaredLatentSpace:
        super().attach(vae)
        self._check_geometry()
        return self

    def from_pipeline(self, pipe: Any) -> DeclaredLatentSpace:
        super().from_pipeline(pipe)
        self._unpack = getattr(type(pipe), "_unpack_latents", None)
        return self

    def check_source(self) -> None:
        """Fail now, in one line, when the declared VAE is a local path that does not exist (before any load)."""
        source = str(self.spec.vae)
        path = Path(source).expanduser()
        if looks_local(source) and not path.exists():
            raise CheckpointNotFoundError(f"latent space {self.name}: VAE {path} does not exist; give a diffusers "
                                          "folder, a weight file or a hub repo id as vae=")

    def _check_geometry(self) -> None:
        """Declared channels / downsample must be what the autoencoder makes (one line naming both)."""
        if self.spec.normalization == "batchnorm" and getattr(getattr(self.vae, "bn", None), "running_mean", None) is None:
            raise ConfigError(f"latent space {self.name}: normalization batchnorm needs a VAE with a BatchNorm `bn` "
                              f"(AutoencoderKLFlux2); {type(self.vae).__name__} has none")
        made = self._vae_channels() * self.spec.patchify**2
        if self.spec.channels is not None and self.spec.channels != made:
            raise ConfigError(f"latent space {self.name} declares {self.spec.channels} channels but its VAE "
                              f"{type(self.vae).__name__} makes {made}; fix channels= or the vae")
        stride = self._vae_downsample() * self.spec.patchify
        if self.spec.downsample is not None and self.spec.downsample != stride:
            raise ConfigError(f"latent space {self.name} declares downsample {self.spec.downsample} but its VAE "
                              f"downsamples by {stride}; fix downsample= or the vae")

    def _vae_channels(self) -> int:
        config = getattr(self.vae, "config", None)
        for key in ("latent_channels", "z_dim"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
        raise ConfigError(f"latent space {self.name}: cannot read the latent channels of {type(self.vae).__name__}; "
                          "declare channels=")

    def _vae_downsample(self) -> int:
        config = getattr(self.vae, "config", None)
        ratio = getattr(config, "spatial_compression_ratio", None) or getattr(self.vae, "spatial_compression_ratio", None)
        if isinstance(ratio, int):
            return ratio
        if type(self.vae).__name__ == "AutoencoderDC":
            return 2 ** (len(config.encoder_block_out_channels) - 1)
        return vae_scale_factor(self.vae)

    # --- geometry -----------------------------------------------------------------------------

    @property
    def channels(self) -> int:
        if self.vae is not None:
            return self._vae_channels() * self.spec.patchify**2
        if self.spec.channels is not None:
            return self.spec.channels
        config = peek_vae_config(self.spec)
        value = (config or {}).get("latent_channels") or (config or {}).get("z_dim")
        if not isinstance(value, int):
            raise ConfigError(f"latent space {self.name}: channels unknown before the VAE loads; declare channels=")
        return value * self.spec.patchify**2

    @property
    def downsample(self) -> int:
        if self.vae is not None:
            return self._vae_downsample() * self.spec.patchify
        if self.spec.downsample is not None:
            return self.spec.downsample
        return _config_downsample(peek_vae_config(self.spec) or {}) * self.spec.patchify

    @property
    def size_multiple(self) -> int:
        return self.spec.size_multiple or self.downsample

    # --- normalisation ------------------------------------------------------------------------

    def _config_value(self, key: str) -> Any:
        config = getattr(self.vae, "config", None)
        return getattr(config, key, None) if config is not None else None

    def _mode(self) -> str:
        mode = self.spec.normalization
        if mode != "auto":
            return mode
        if self.spec.latents_mean is not None or self._config_value("latents_mean") is not None:
            return "mean_std"
        return "affine"

    def _scale(self, default: float) -> float:
        for value in (self.spec.scaling_factor, self._config_value("scaling_factor")):
            if value is not None:
                return float(value)
        return default

    def _stats(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        """(offset, divisor) per channel of `latent` (after patchify), float32, shaped for broadcasting."""
        mode = self._mode()
        c = latent.shape[1]
        if mode == "none":
            mean, std = torch.zeros(1), torch.ones(1)
        elif mode == "affine":
            shift = self.spec.shift_factor
            shift = shift if shift is not None else self._config_value("shift_factor")
            mean, std = torch.tensor([float(shift or 0.0)]), torch.tensor([1.0 / self._scale(1.0)])
        elif mode == "mean_std":
            declared = self.spec.latents_mean is not None
            mean_v = self.spec.latents_mean if declared else self._config_value("latents_mean")
            std_v = self.spec.latents_std if declared else self._config_value("latents_std")
            if mean_v is None or std_v is None:
                raise ConfigError(f"latent space {self.name}: normalization mean_std needs latents_mean/latents_std "
                                  "(declared, or in the VAE config)")
            # diffusers' convention for a VAE that ships its statistics: the config's scaling_factor on top;
            # declared statistics take only a declared scaling_factor
            scale = self._scale(1.0) if not declared else (self.spec.scaling_factor or 1.0)
            mean = torch.tensor([float(x) for x in mean_v])
            std = torch.tensor([float(x) for x in std_v]) / scale
        else:  # batchnorm
            bn = self._require_vae(f"{self.name} batchnorm normalisation").bn
            eps = self.spec.batchnorm_eps or getattr(bn, "eps", None) or _BN_EPS
            mean, std = bn.running_mean.float().cpu(), torch.sqrt(bn.running_var.float().cpu() + float(eps))
        p2 = self.spec.patchify**2
        if mean.numel() not in (1, c) and mean.numel() * p2 == c:  # stats of the raw channels, before patchify
            mean, std = mean.repeat_interleave(p2), std.repeat_interleave(p2)
        if mean.numel() not in (1, c) or std.numel() not in (1, c):
            raise ConfigError(f"latent space {self.name}: {mode} statistics have {mean.numel()} values for a "
                              f"{c}-channel latent")
        view = (1, -1, 1, 1)
        return mean.to(latent.device).view(view), std.to(latent.device).view(view)

    def normalize(self, raw: Tensor) -> Tensor:
        x = patchify_2x2(raw) if self.spec.patchify == 2 else raw
        mean, std = self._stats(x)
        return ((x.float() - mean) / std).to(raw.dtype)

    def denormalize(self, latent: Tensor) -> Tensor:
        mean, std = self._stats(latent)
        x = (latent.float() * std + mean).to(latent.dtype)
        return unpatchify_2x2(x) if self.spec.patchify == 2 else x

    # --- images -------------------------------------------------------------------------------

    def _is_video_vae(self) -> bool:
        return self._config_value("temperal_downsample") is not None  # Wan / Qwen-Image: [B, C, T, H, W]

    def _encode_raw(self, images: Tensor) -> Tensor:
        device, dtype = module_device_dtype(self.vae)
        x = images.to(device, dtype)
        out = self.vae.encode(x[:, :, None] if self._is_video_vae() else x)
        dist = getattr(out, "latent_dist", None)
        raw = dist.mean if dist is not None else getattr(out, "latent", None)
        if raw is None:
            raw = out[0]
            raw = raw.mean if hasattr(raw, "mean") and not isinstance(raw, Tensor) else raw
        raw = raw[:, :, 0] if raw.ndim == 5 else raw
        return raw.float()

    def _decode_raw(self, raw: Tensor) -> Tensor:
        device, dtype = module_device_dtype(self.vae)
        z = raw.to(device, dtype)
        images = self.vae.decode(z[:, :, None] if self._is_video_vae() else z, return_dict=False)[0]
        return images[:, :, 0] if images.ndim == 5 else images

    # --- pipeline layouts ---------------------------------------------------------------------

    def from_pipeline_latent(self, latent: Tensor, height: int, width: int) -> Tensor:
        if latent.ndim == 4:
            return latent
        if latent.ndim != 3:
            raise InputError(f"expected a (B, C, h, w) or token (B, seq, C) {self.name} latent, got {tuple(latent.shape)}")
        if self._unpack is not None:  # the pipeline's own helper (FluxPipeline-style signature)
            grid = self._unpack(latent, height, width, self.downsample // self.spec.patchify)
            return grid if grid.ndim == 4 else grid[:, :, 0]
        h, w = height // self.downsample, width // self.downsample
        if self.spec.pipeline_packing == "2x2":
            return unpack_2x2(latent, 2 * (h // 2), 2 * (w // 2))
        return tokens_to_grid(latent, h, w)

    def to_pipeline_latent(self, latent: Tensor) -> Tensor:
        if self.spec.pipeline_packing == "2x2":
            return pack_2x2(latent)
        if self.spec.pipeline_packing == "tokens":
            return grid_to_tokens(latent)
        return super().to_pipeline_latent(latent)

    def to_training_frame(self, latent: Tensor, sigma: float | Tensor) -> tuple[Tensor, float | Tensor]:
        """Flow spaces: identity. VP spaces captured from a variance-exploding (Euler) scheduler, as SDXL:
        x / sqrt(s^2 + 1), s / sqrt(s^2 + 1)."""
        if self.noise_form != "vp":
            return latent, sigma
        if isinstance(sigma, Tensor):
            d = (sigma.double() ** 2 + 1).sqrt()
            view = (-1,) + (1,) * (latent.ndim - 1) if sigma.numel() > 1 else ()
            return latent / d.reshape(view).to(latent), (sigma.double() / d).to(sigma.dtype)
        d = math.sqrt(float(sigma) ** 2 + 1.0)
        return latent / d, float(sigma) / d


def _config_downsample(config: Mapping[str, Any]) -> int:
    """Spatial compression a diffusers autoencoder config implies (8 when it does not say)."""
    if config.get("temperal_downsample") is not None:
        return 2 ** len(config["temperal_downsample"])
    for key in ("encoder_block_out_channels", "block_out_channels"):
        if config.get(key):
            return 2 ** (len(config[key]) - 1)
    return 8


def peek_vae_config(spec: LatentSpaceSpec) -> dict[str, Any] | None:
    """The declared VAE's config.json without loading weights or downloading (local files and the HF cache)."""
    if spec.vae is None:
        return None
    path = Path(str(spec.vae)).expanduser()
    candidates: list[Path] = []
    if spec.vae_config:
        candidates.append(Path(spec.vae_config).expanduser())
    elif path.is_file():
        candidates.append(path.with_name("config.json"))
    elif path.is_dir():
        candidates += [path / (spec.subfolder or "") / "config.json", path / "vae" / "config.json"]
    else:
        from huggingface_hub import try_to_load_from_cache

        name = f"{spec.subfolder}/config.json" if spec.subfolder else "config.json"
        try:
            found = try_to_load_from_cache(str(spec.vae), name, revision=spec.revision)
        except Exception:  # noqa: BLE001 - not a valid repo id: nothing cached
            found = None
        if isinstance(found, str):
            candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def space_net_config(space: LatentSpace, sr_scale: int = 4, base: str = "v1pt5_latent16ch") -> Any:
    """The PiD network for a latent space: the released v1.5 network (so training starts from the hub's PixelDiT
    backbone with a fresh adapter) with the space's latent channels and stride, and FLUX.2-style un-patchify for
    a 2x2-patchified space."""
    from pid.models.configs import get_net_config

    patchify = getattr(getattr(space, "spec", None), "patchify", 1)
    return replace(get_net_config(base), name=f"v1pt5_{space.name}", latent_channels=space.channels,
                   latent_downsample=space.downsample, latent_unpatchify=patchify, sr_scale=sr_scale)


def training_backbone(latent_space: Any) -> str | None:
    """What the trainer stores as its backbone for `latent_space=`: a declaration file's absolute path (so every
    later `pid.latents.get` of the run finds the same space), a built-in's canonical name, or None when unset."""
    if latent_space in (None, ""):
        return None
    from pid.latents import canonical_name

    text = str(latent_space)
    if not is_declaration(text):
        return canonical_name(text)
    spec_from_reference(text)  # fails now, with one line, when the declaration is bad
    path = Path(text).expanduser()
    return str(path.absolute()) if path.is_file() else text


def _bn_stats_fp32(vae: Any) -> dict[str, Tensor]:
    bn = getattr(vae, "bn", None)
    if bn is None:
        return {}
    return {name: buf.float() for name, buf in bn.named_buffers() if buf.is_floating_point()}


# ----------------------------------------------------------------------------------------------
# Loading a declared autoencoder
# ----------------------------------------------------------------------------------------------


def autoencoder_class(name: str | None, config: Mapping[str, Any] | None = None) -> type:
    """The diffusers autoencoder class `name` (default: the config's `_class_name`, else AutoencoderKL)."""
    import diffusers

    name = name or (config or {}).get("_class_name") or "AutoencoderKL"
    cls = getattr(diffusers, str(name), None)
    if cls is None or not str(name).startswith("Autoencoder"):
        shipped = ", ".join(n for n in dir(diffusers) if n.startswith("AutoencoderKL"))[:200]
        raise ConfigError(f"vae_class {name!r} is not a diffusers autoencoder (e.g. {shipped}, AutoencoderDC)")
    return cls


def load_declared_vae(spec: LatentSpaceSpec) -> torch.nn.Module:
    """The autoencoder of `spec` on the CPU in fp32 (a hub repo, a local folder or a single file)."""
    source = str(spec.vae)
    path = Path(source).expanduser()
    if path.is_file() or (path.suffix in _WEIGHT_SUFFIXES and looks_local(source)):
        return _load_single_file(spec, path)
    if looks_local(source):
        if not path.is_dir():
            raise CheckpointNotFoundError(f"latent space {spec.name}: VAE {path} does not exist; give a diffusers "
                                          "folder, a weight file or a hub repo id as vae=")
        subfolder = spec.subfolder
        if subfolder is None and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            subfolder = "vae"  # a whole pipeline folder
        config_path = path / (subfolder or "") / "config.json"
        if not config_path.is_file():
            raise CheckpointNotFoundError(f"latent space {spec.name}: {config_path.parent} holds no config.json of a "
                                          "diffusers autoencoder")
        cls = autoencoder_class(spec.vae_class, json.loads(config_path.read_text()))
        return cls.from_pretrained(str(path), subfolder=subfolder).float().eval()
    return _load_from_hub(spec, source)


def _load_single_file(spec: LatentSpaceSpec, path: Path) -> torch.nn.Module:
    from pid.latents.flux import load_autoencoder_kl, read_weights

    if not path.is_file():
        raise CheckpointNotFoundError(f"latent space {spec.name}: VAE file {path} does not exist")
    config_path = Path(spec.vae_config).expanduser() if spec.vae_config else path.with_name("config.json")
    if not config_path.is_file():
        raise ConfigError(f"latent space {spec.name}: the single-file VAE {path.name} needs its diffusers config; "
                          f"give vae_config=<config.json> (looked for {config_path})")
    config = json.loads(config_path.read_text())
    cls = autoencoder_class(spec.vae_class, config)
    return load_autoencoder_kl(read_weights(path), config, str(path), cls=cls).float().eval()


def _load_from_hub(spec: LatentSpaceSpec, repo: str) -> torch.nn.Module:
    from pid.hub import catchable_errors, download_command, translate_hub_error

    try:
        from huggingface_hub import hf_hub_download

        config_file = hf_hub_download(repo, "config.json", subfolder=spec.subfolder, revision=spec.revision)
        cls = autoencoder_class(spec.vae_class, json.loads(Path(config_file).read_text()))
        return cls.from_pretrained(repo, subfolder=spec.subfolder, revision=spec.revision).float().eval()
    except catchable_errors() as err:
        command = download_command(repo, revision=spec.revision)
        translated = translate_hub_error(err, repo, revision=spec.revision, command=command,
                                         what=f"the {spec.name} VAE {repo}")
        if translated is not None:
            raise translated from err
        raise CheckpointNotFoundError(f"could not load the {spec.name} VAE from {repo}: "
                                      f"{' '.join(str(err).split())[:200]}") from err


def declare(**fields_: Any) -> LatentSpace:
    """A declared latent space from keyword fields of `LatentSpaceSpec` (nothing loaded)."""
    return build_space(spec_from_mapping(fields_))


# ----------------------------------------------------------------------------------------------
# Decoders that know their space
# ----------------------------------------------------------------------------------------------


def declared_space_of(
    checkpoint: str | Path | None, backbone: str | None = None, latent_space: Any = None
) -> tuple[LatentSpace | None, str | None]:
    """(declared space, backbone the file names) for a decoder load: `latent_space` if given, else `backbone` when
    it is a declaration, else the space the checkpoint's metadata carries. A file made for a declared space asked
    for as a built-in backbone is a one-line ConfigError naming both."""
    from pid.checkpoints import read_checkpoint_metadata
    from pid.latents import resolve

    space: LatentSpace | None = None
    if latent_space is not None:
        space = resolve(latent_space)
    elif backbone is not None and is_declaration(backbone):
        space = resolve(backbone)
    if space is not None and not _is_declared(space):
        return None, space.backbone  # a built-in family named through latent_space=
    metadata: dict[str, str] = {}
    if checkpoint is not None and Path(checkpoint).expanduser().is_file():
        try:
            metadata = read_checkpoint_metadata(Path(checkpoint).expanduser())
        except PiDError:
            metadata = {}  # an unreadable file: loading it says why, in its own words
    carried = space_from_metadata(metadata, str(checkpoint))
    if space is None and carried is not None:
        if backbone is not None:
            raise ConfigError(f"{checkpoint} is a decoder for the declared latent space {carried.name!r}, not backbone "
                              f"{backbone}; leave the backbone unset (the file says which VAE it reads)")
        space = carried
    return space, metadata.get("pid.backbone")


def _is_declared(space: LatentSpace) -> bool:
    return isinstance(getattr(space, "spec", None), LatentSpaceSpec)


def check_space_fits(decoder_channels: int, space: LatentSpace, source: Any = "the decoder") -> None:
    """A decoder reads `decoder_channels`-channel latents: the space must make as many (one line naming both)."""
    try:
        channels = space.channels
    except ConfigError:
        return  # not known before the VAE loads; checked again when it is attached
    if channels != decoder_channels:
        raise ConfigError(f"{source} decodes {decoder_channels}-channel latents but latent space {space.name} has "
                          f"{channels} channels; use a decoder trained for {space.name}")


# The sampler of a v1.5 undistilled decoder: DPM-Solver++ on the released v1.5 shifted grid.
_UNDISTILLED_SHIFT = (6.0, 2048)


def custom_record(name: str, config: Any, path: str | Path | None, sampler: str | None = None) -> Any:
    """The checkpoint record of a decoder for a declared space (no hub folder). Its sampler: `sampler`, else the
    file's `pid.sampler` entry, else undistilled for a teacher run's export (`pid.train.mode` teacher), else
    distilled."""
    from pid.checkpoints import CheckpointRecord, read_checkpoint_metadata
    from pid.models.configs import released_name

    net_config = "custom" if config is None else (released_name(config) or config.name)
    scale = 4 if config is None else int(config.sr_scale)
    folder = Path(path).parent.name if path is not None else ""
    if sampler is None and path is not None and Path(path).is_file():
        metadata = read_checkpoint_metadata(path)
        sampler = metadata.get("pid.sampler") or ("undistilled" if metadata.get("pid.train.mode") == "teacher"
                                                  else None)
    sampler = sampler or "distilled"
    if sampler not in ("distilled", "undistilled"):
        raise ConfigError(f"{path}: unknown sampler {sampler!r} (distilled or undistilled)")
    shift = _UNDISTILLED_SHIFT if sampler == "undistilled" else None
    return CheckpointRecord(name, "custom", folder, net_config, scale, name, sampler=sampler, dynamic_shift=shift)
