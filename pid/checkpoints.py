"""Checkpoint registry, file location/download, and safe state-dict loading.

    record = lookup("zimage-turbo", "2k")           # -> the flux 2k decoder
    path = resolve_checkpoint(record)               # local file, or a download from nvidia/PiD
    state = load_pid_state_dict(path)               # bare network names, strictly checked later

Files are found, in order: an explicit path; `$PID_CHECKPOINT_DIR/<folder>/model_ema_bf16.pth`;
`./checkpoints/<folder>/model_ema_bf16.pth` (the hub repo's layout); the Hugging Face cache /
a download of just that file. Nothing is ever unpickled beyond plain tensors.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from torch import Tensor

from pid.errors import CheckpointMismatchError, CheckpointNotFoundError, ConfigError
from pid.models.configs import NET_CONFIGS

HUB_REPO = "nvidia/PiD"
CHECKPOINT_FILENAME = "model_ema_bf16.pth"
CKPT_TYPES = ("2k", "2kto4k", "2kto4k_v1pt5", "undistilled")

# Key prefixes of a training checkpoint that are not the decoder network (dropped on load).
_DROPPED_PREFIXES = ("net_ema.", "fake_score.", "discriminator.")
_NET_PREFIX = "net."


@dataclass(frozen=True)
class CheckpointRecord:
    """One released decoder as seen from a backbone.

    backbone: the name it was looked up under (aliases keep their own name);
    folder: the experiment folder under the hub repo's `checkpoints/`;
    net_config: key into `pid.models.NET_CONFIGS`; scale: output / LDM pixel ratio;
    latent_space: the latent family PiD reads (see `pid.latents`); sampler: "distilled"
    (4-step x0-renoise) or "undistilled" (DPM-Solver++ with CFG);
    dynamic_shift: (base_shift, base_size) for the undistilled sampler's shifted grid.
    """

    backbone: str
    ckpt_type: str
    folder: str
    net_config: str
    scale: int
    latent_space: str
    sampler: str = "distilled"
    dynamic_shift: tuple[float, int] | None = None

    @property
    def hub_path(self) -> str:
        """Path of the weight file inside the hub repo."""
        return f"checkpoints/{self.folder}/{CHECKPOINT_FILENAME}"

    @property
    def default_resolution(self) -> int:
        """Output side the decoder was trained for: 2048 for 2k types, 4096 for 2kto4k types."""
        return 2048 if self.ckpt_type == "2k" else 4096

    @property
    def download_command(self) -> str:
        return download_command(f"{self.folder}/{CHECKPOINT_FILENAME}")


def _rec(
    backbone: str, ckpt_type: str, folder: str, net_config: str, latent_space: str, **kw
) -> CheckpointRecord:
    scale = kw.pop("scale", 4)
    return CheckpointRecord(backbone, ckpt_type, folder, net_config, scale, latent_space, **kw)


_V15_SHIFT = (6.0, 2048)
_CANONICAL: dict[tuple[str, str], CheckpointRecord] = {
    (r.backbone, r.ckpt_type): r
    for r in [
        _rec("flux", "2k", "PiD_res2k_sr4x_official_flux_distill_4step", "v1_latent16ch", "flux"),
        _rec("flux2", "2k", "PiD_res2k_sr4x_official_flux2_distill_4step", "v1_flux2_latent128ch", "flux2"),
        _rec("sd3", "2k", "PiD_res2k_sr4x_official_sd3_distill_4step", "v1_latent16ch", "sd3"),
        _rec(
            "dinov2", "2k", "PiD_res2k_sr4x_official_dinov2_distill_4step", "v1_dinov2_latent768ch", "dinov2"
        ),
        _rec(
            "siglip",
            "2k",
            "PiD_res2k_sr8x_official_siglip_distill_4step",
            "v1_siglip_latent1152ch_sr8",
            "siglip",
            scale=8,
        ),
        _rec(
            "sd3",
            "2kto4k",
            "PiD_res2kto4k_sr4x_official_sd3_distill_4step",
            "v1_latent16ch",
            "sd3",
            dynamic_shift=(4.0, 1024),
        ),
        _rec(
            "sdxl",
            "2kto4k",
            "PiD_res2kto4k_sr4x_official_sdxl_distill_4step",
            "v1_sdxl_latent4ch",
            "sdxl",
            dynamic_shift=(4.0, 1024),
        ),
        _rec(
            "flux",
            "2kto4k_v1pt5",
            "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step",
            "v1pt5_latent16ch",
            "flux",
            dynamic_shift=_V15_SHIFT,
        ),
        _rec(
            "flux2",
            "2kto4k_v1pt5",
            "PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step",
            "v1pt5_flux2_latent128ch",
            "flux2",
            dynamic_shift=_V15_SHIFT,
        ),
        _rec(
            "qwenimage",
            "2kto4k_v1pt5",
            "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step",
            "v1pt5_latent16ch",
            "qwenimage",
            dynamic_shift=_V15_SHIFT,
        ),
        _rec(
            "flux",
            "undistilled",
            "PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled",
            "v1pt5_latent16ch",
            "flux",
            sampler="undistilled",
            dynamic_shift=_V15_SHIFT,
        ),
        _rec(
            "flux2",
            "undistilled",
            "PiD_v1pt5_res2kto4k_sr4x_official_flux2_undistilled",
            "v1pt5_flux2_latent128ch",
            "flux2",
            sampler="undistilled",
            dynamic_shift=_V15_SHIFT,
        ),
        _rec(
            "qwenimage",
            "undistilled",
            "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_undistilled",
            "v1pt5_latent16ch",
            "qwenimage",
            sampler="undistilled",
            dynamic_shift=_V15_SHIFT,
        ),
    ]
}

# Backbones that share another backbone's VAE, hence its decoders (same files, same records).
ALIASES: dict[str, str] = {
    "zimage": "flux",
    "zimage-turbo": "flux",
    "flux2-klein-4b": "flux2",
    "flux2-klein-9b": "flux2",
    "qwenimage-2512": "qwenimage",
}


def _build_registry() -> dict[tuple[str, str], CheckpointRecord]:
    registry = dict(_CANONICAL)
    for alias, target in ALIASES.items():
        for (backbone, ckpt_type), record in _CANONICAL.items():
            if backbone == target:
                registry[(alias, ckpt_type)] = CheckpointRecord(
                    alias,
                    ckpt_type,
                    record.folder,
                    record.net_config,
                    record.scale,
                    record.latent_space,
                    record.sampler,
                    record.dynamic_shift,
                )
    return registry


REGISTRY: dict[tuple[str, str], CheckpointRecord] = _build_registry()


def backbones() -> list[str]:
    """Every backbone name the registry knows (canonical names and aliases)."""
    return sorted({b for b, _ in REGISTRY})


def ckpt_types(backbone: str) -> list[str]:
    """The checkpoint types released for `backbone`, in CKPT_TYPES order."""
    found = {t for b, t in REGISTRY if b == backbone}
    return [t for t in CKPT_TYPES if t in found]


def default_ckpt_type(backbone: str) -> str:
    """`2k` where it exists, else the backbone's first distilled type (sdxl: 2kto4k, qwen: 2kto4k_v1pt5)."""
    types = [t for t in ckpt_types(backbone) if t != "undistilled"]
    if not types:
        raise ConfigError(f"unknown backbone {backbone!r}; choose one of: {', '.join(backbones())}")
    return types[0]


def lookup(backbone: str, ckpt_type: str | None = None) -> CheckpointRecord:
    """The record for (backbone, ckpt_type); `ckpt_type=None` picks the backbone's default."""
    if ckpt_type is None:
        ckpt_type = default_ckpt_type(backbone)
    record = REGISTRY.get((backbone, ckpt_type))
    if record is not None:
        return record
    if not ckpt_types(backbone):
        raise ConfigError(f"unknown backbone {backbone!r}; choose one of: {', '.join(backbones())}")
    raise ConfigError(
        f"backbone {backbone!r} has no {ckpt_type!r} checkpoint; valid ckpt_type for {backbone}: "
        f"{', '.join(ckpt_types(backbone))}"
    )


# ----------------------------------------------------------------------------------------------
# Locating and downloading files
# ----------------------------------------------------------------------------------------------


def checkpoint_roots(checkpoint_dir: str | os.PathLike | None = None) -> list[Path]:
    """Local folders searched for files laid out like the hub repo's `checkpoints/` folder."""
    roots = []
    if checkpoint_dir:
        roots.append(Path(checkpoint_dir))
    if os.environ.get("PID_CHECKPOINT_DIR"):
        roots.append(Path(os.environ["PID_CHECKPOINT_DIR"]))
    roots.append(Path("checkpoints"))
    return [root.absolute() for root in roots]


def download_command(relative_path: str) -> str:
    return f"hf download {HUB_REPO} checkpoints/{relative_path.strip('/')} --local-dir ."


def resolve_hub_path(
    relative_path: str,
    checkpoint_dir: str | os.PathLike | None = None,
    download: bool = True,
    is_dir: bool = False,
) -> Path:
    """Find `checkpoints/<relative_path>` of the hub repo locally, else download it.

    `is_dir=True` fetches a whole folder (e.g. `sd3_vae`). Offline and absent: raises
    `CheckpointNotFoundError` whose message is the exact `hf download` command.
    """
    relative_path = relative_path.strip("/")
    roots = checkpoint_roots(checkpoint_dir)
    for root in roots:
        candidate = root / relative_path
        if candidate.is_dir() if is_dir else candidate.is_file():
            return candidate
    searched = ", ".join(str(r) for r in roots)
    missing = CheckpointNotFoundError(
        f"checkpoints/{relative_path} not found (searched {searched}); download it with: "
        f"{download_command(relative_path)}"
    )
    if not download:
        raise missing
    try:
        return _hub_download(relative_path, is_dir)
    except Exception as exc:  # offline, no such file, no access: all end in the same advice
        logger.debug("hub download of {} failed: {!r}", relative_path, exc)
        raise missing from exc


def _hub_download(relative_path: str, is_dir: bool) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    hub_path = f"checkpoints/{relative_path}"
    if is_dir:
        root = snapshot_download(HUB_REPO, allow_patterns=[f"{hub_path}/*"])
        path = Path(root) / hub_path
        if not path.is_dir():
            raise FileNotFoundError(hub_path)
        return path
    logger.info("downloading {} from {}", hub_path, HUB_REPO)
    return Path(hf_hub_download(HUB_REPO, hub_path))


def resolve_checkpoint(
    record: CheckpointRecord,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> Path:
    """The weight file of `record`: `checkpoint` if given (must exist), else located/downloaded.

    A converted `.safetensors` beside the `.pth` (see `python -m pid.convert`) is preferred.
    """
    if checkpoint is not None:
        path = Path(checkpoint).absolute()
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"checkpoint file {path} does not exist; download the released one with: {record.download_command}"
            )
        return path
    for root in checkpoint_roots(checkpoint_dir):
        fast = root / record.folder / Path(CHECKPOINT_FILENAME).with_suffix(".safetensors")
        if fast.is_file():
            return fast
    return resolve_hub_path(f"{record.folder}/{CHECKPOINT_FILENAME}", checkpoint_dir, download)


# ----------------------------------------------------------------------------------------------
# Loading and checking state dicts
# ----------------------------------------------------------------------------------------------


def read_checkpoint_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Raw key -> tensor mapping of a `.pth` (weights-only, memory-mapped) or `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise CheckpointMismatchError(f"{path} is not a readable safetensors file ({exc})") from None
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported object"
        raise CheckpointMismatchError(
            f"{path} is not a plain tensor checkpoint; refusing to unpickle arbitrary objects ({first})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointMismatchError(f"{path} is not a readable PyTorch checkpoint ({exc})") from None
    if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()
    ):
        raise CheckpointMismatchError(f"{path} does not hold a flat {{name: tensor}} dict")
    return dict(data)


def strip_network_prefix(raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Bare network names: strip `net.`, drop `net_ema.` / `fake_score.` / `discriminator.` keys."""
    out: dict[str, Tensor] = {}
    for key, value in raw.items():
        if key.startswith(_DROPPED_PREFIXES):
            continue
        out[key[len(_NET_PREFIX) :] if key.startswith(_NET_PREFIX) else key] = value
    return out


def detect_net_config(state_dict: Mapping[str, Tensor]) -> str | None:
    """The released network config whose adapter shapes match, or None."""
    first = state_dict.get("lq_proj.latent_proj.0.weight")
    if first is None or first.ndim != 4:
        return None
    for name, cfg in NET_CONFIGS.items():
        if (
            first.shape[0] == cfg.adapter_width
            and first.shape[1] == cfg.adapter_in_channels
            and ("pit_lq_gate.log_alpha" in state_dict) == cfg.pit_inject
        ):
            return name
    return None


def _describe(config_name: str | None) -> str:
    if config_name is None:
        return "no released PiD network"
    records = sorted(
        {f"{r.backbone}/{r.ckpt_type}" for r in _CANONICAL.values() if r.net_config == config_name}
    )
    return f"the {config_name} network ({', '.join(records)})"


def check_state_dict(
    state_dict: Mapping[str, Tensor], expected: Mapping[str, torch.Size], config_name: str
) -> None:
    """Raise `CheckpointMismatchError` naming missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k])
    )
    if not (missing or unexpected or misshaped):
        return

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {few(unexpected)}")
    if misshaped:
        shown = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k])}" for k in misshaped]
        problems.append(f"{len(misshaped)} mis-shaped: {few(shown)}")
    detected = detect_net_config(state_dict)
    raise CheckpointMismatchError(
        f"checkpoint does not fit the {config_name} network: {'; '.join(problems)}. "
        f"The file looks like {_describe(detected)}."
    )


def load_pid_state_dict(path: str | os.PathLike, config_name: str | None = None) -> dict[str, Tensor]:
    """Bare-named state dict of a PiD checkpoint, checked against `config_name` when given."""
    state = strip_network_prefix(read_checkpoint_file(path))
    if config_name is not None:
        from pid.models import build_pid_net

        skeleton = build_pid_net(config_name, device="meta")
        expected = {k: v.shape for k, v in skeleton.state_dict().items()}
        try:
            check_state_dict(state, expected, config_name)
        except CheckpointMismatchError as exc:
            raise CheckpointMismatchError(f"{path}: {exc}") from None
    return state
