"""Checkpoint files: location/download and safe state-dict loading (the registry of released decoders is
`pid.checkpoint_registry`; its names are re-exported here, the public API of docs/checkpoints.md).

    record = lookup("zimage-turbo", "2k")           # -> the flux 2k decoder
    path = resolve_checkpoint(record)               # local file, or a download from nvidia/PiD
    state = load_pid_state_dict(path)               # bare network names, strictly checked later

Files are found, in order: an explicit path; the local roots (`checkpoint_dir`,
`$PID_CHECKPOINT_DIR`, `./checkpoints`, `./checkpoints_deprecated`, see `search_folders`); the
Hugging Face cache / a download of just that file from nvidia/PiD (its current hub folder first,
then the other one: the June `2kto4k` decoders moved to `checkpoints_deprecated/`). Nothing is
ever unpickled beyond plain tensors.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from loguru import logger
from torch import Tensor

from pid.checkpoint_registry import (
    CHECKPOINT_FILENAME,
    CKPT_TYPES,
    DEPRECATED_HUB_DIR,
    HUB_DIR,
    HUB_DIRS,
    HUB_REPO,
    REGISTRY,
    CheckpointRecord,
    backbones,
    ckpt_types,
    default_ckpt_type,
    hub_download_command,
    lookup,
    released_with,
)
from pid.errors import CheckpointMismatchError, CheckpointNotFoundError, PiDError
from pid.models.configs import (
    NET_CONFIGS,
    PiDNetConfig,
    get_net_config,
    net_config_from_value,
    released_name,
)

# Key prefixes of a training checkpoint that are not the decoder network (dropped on load).
_DROPPED_PREFIXES = ("net_ema.", "fake_score.", "discriminator.")
_NET_PREFIX = "net."


def carried_ckpt_type(path: str | os.PathLike | None, backbone: str) -> str | None:
    """The checkpoint type a decoder file says it is sampled as (`pid.ckpt_type`, written by `pid.train.export`:
    `undistilled` for a teacher, a distilled type for a student), when that type exists for `backbone`; None for
    files that carry none, or that cannot be read here (their loading reports that)."""
    if path is None or not Path(path).expanduser().is_file():
        return None
    try:
        carried = read_checkpoint_metadata(Path(path).expanduser()).get("pid.ckpt_type")
        if carried:
            lookup(backbone, carried)
    except PiDError:
        return None
    return carried or None


# ----------------------------------------------------------------------------------------------
# Locating and downloading files
# ----------------------------------------------------------------------------------------------


def checkpoint_roots(checkpoint_dir: str | os.PathLike | None = None) -> list[Path]:
    """The local roots, in search order: `checkpoint_dir`, `$PID_CHECKPOINT_DIR`, `./checkpoints`,
    `./checkpoints_deprecated`. Each is a folder laid out like the hub repo's `checkpoints/` (or
    `checkpoints_deprecated/`) folder, or a whole local copy of the repo (see `search_folders`)."""
    roots = []
    if checkpoint_dir:
        roots.append(Path(checkpoint_dir).expanduser())
    if os.environ.get("PID_CHECKPOINT_DIR"):
        roots.append(Path(os.environ["PID_CHECKPOINT_DIR"]).expanduser())
    roots += [Path(HUB_DIR), Path(DEPRECATED_HUB_DIR)]
    return list(dict.fromkeys(root.absolute() for root in roots))


def search_folders(checkpoint_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders whose `<relative path>` may hold a hub file, in order.

    For each root R: R itself, then R/checkpoints and R/checkpoints_deprecated (R is a copy of the
    whole repo, as `hf download nvidia/PiD --local-dir R` makes), then, for a root named
    `checkpoints`, its sibling `checkpoints_deprecated` (where the same command put the moved
    decoders).
    """
    folders: list[Path] = []
    for root in checkpoint_roots(checkpoint_dir):
        folders.append(root)
        if root.name not in HUB_DIRS:
            folders += [root / d for d in HUB_DIRS]
        elif root.name == HUB_DIR:
            folders.append(root.parent / DEPRECATED_HUB_DIR)
    return list(dict.fromkeys(folders))


def download_command(relative_path: str, revision: str | None = None) -> str:
    """The download command of `checkpoints/<relative_path>`."""
    return hub_download_command(f"{HUB_DIR}/{relative_path.strip('/')}", revision)


def find_local(
    relative_path: str, checkpoint_dir: str | os.PathLike | None = None, is_dir: bool = False
) -> Path | None:
    """The first local copy of `relative_path` (relative to a hub folder) in `search_folders`, or None.

    An empty folder does not count (an interrupted download leaves one behind).
    """
    relative_path = relative_path.strip("/")
    for folder in search_folders(checkpoint_dir):
        candidate = folder / relative_path
        if is_dir:
            if candidate.is_dir() and any(candidate.iterdir()):
                return candidate
        elif candidate.is_file():
            return candidate
    return None


def resolve_hub_path(
    relative_path: str,
    checkpoint_dir: str | os.PathLike | None = None,
    download: bool = True,
    is_dir: bool = False,
    revision: str | None = None,
    hub_dirs: tuple[str, ...] = (HUB_DIR,),
) -> Path:
    """Find `<hub dir>/<relative_path>` of the hub repo locally, else download it.

    `is_dir=True` fetches a whole folder (e.g. `sd3_vae`). `hub_dirs`: the repo folders to try, in
    order (a decoder moved to `checkpoints_deprecated/` passes both). `revision`: a branch, tag or
    commit of nvidia/PiD (default: main). Not found: a one-line `CheckpointNotFoundError` (a
    `pid.hub.HubAccessError` when the hub said why) whose offline advice is the exact `hf download`
    command for the first hub dir.
    """
    from pid.hub import HubAccessError, HubFileMissingError, HubOfflineError

    relative_path = relative_path.strip("/")
    found = find_local(relative_path, checkpoint_dir, is_dir)
    if found is not None:
        return found
    first = f"{hub_dirs[0]}/{relative_path}"
    command = hub_download_command(first, revision)
    searched = ", ".join(str(r) for r in checkpoint_roots(checkpoint_dir))
    if not download:
        raise CheckpointNotFoundError(
            f"{first} not found (searched {searched}); download it with: {command}"
        )
    errors: list[HubAccessError] = []
    for hub_dir in hub_dirs:
        try:
            return _hub_download(f"{hub_dir}/{relative_path}", is_dir, revision, command)
        except (HubFileMissingError, HubOfflineError) as exc:
            errors.append(exc)  # the other hub dir may have it (or have it cached)
    offline = [e for e in errors if isinstance(e, HubOfflineError)]
    if offline:
        raise HubOfflineError(f"{offline[0]} (also searched {searched})") from offline[0]
    tried = " or ".join(f"{d}/{relative_path}" for d in hub_dirs)
    raise HubFileMissingError(
        f"{tried} is neither in {HUB_REPO}{f' at revision {revision}' if revision else ''} nor local "
        f"(searched {searched})"
    ) from errors[-1]


def _hub_download(hub_path: str, is_dir: bool, revision: str | None, command: str) -> Path:
    from pid.hub import hub_file, hub_folder

    if is_dir:
        return hub_folder(HUB_REPO, hub_path, revision, command)
    logger.info("fetching {} from {} (cache first)", hub_path, HUB_REPO)
    return hub_file(HUB_REPO, hub_path, revision, command)


def resolve_checkpoint(
    record: CheckpointRecord,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    download: bool = True,
    revision: str | None = None,
) -> Path:
    """The weight file of `record`: `checkpoint` if given (must exist), else located/downloaded.

    A converted `.safetensors` beside the `.pth` (see `python -m pid.convert`) is preferred.
    `revision`: branch, tag or commit of nvidia/PiD for a download (default: main).
    """
    if checkpoint is not None:
        path = Path(checkpoint).expanduser().absolute()
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"checkpoint file {path} does not exist; download the released one with: {record.download_command}"
            )
        return path
    fast = find_local(f"{record.folder}/{Path(CHECKPOINT_FILENAME).with_suffix('.safetensors')}", checkpoint_dir)
    if fast is not None:
        return fast
    hub_dirs = (record.hub_dir, *(d for d in HUB_DIRS if d != record.hub_dir))
    return resolve_hub_path(
        f"{record.folder}/{CHECKPOINT_FILENAME}", checkpoint_dir, download, revision=revision, hub_dirs=hub_dirs
    )


def cached_hub_file(hub_path: str, revision: str | None = None) -> Path | None:
    """The Hugging Face cache's copy of `hub_path` of nvidia/PiD, or None. Never downloads."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(HUB_REPO, hub_path, revision=revision)
    return Path(found) if isinstance(found, str) else None


def describe_checkpoint(
    record: CheckpointRecord,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    revision: str | None = None,
) -> dict[str, str | None]:
    """Where `record`'s weights would come from, without downloading anything (for dry runs).

    {"folder": experiment folder, "hub_file": path inside nvidia/PiD where the hub has it now,
    "local_file": the file a run would load (explicit path, local copy or HF cache) or None,
    "newer": ckpt_type of a newer decoder or None, "download_command": how to fetch it}.
    """
    local: Path | None = None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser().absolute()
        local = path if path.is_file() else None
    else:
        fast = Path(CHECKPOINT_FILENAME).with_suffix(".safetensors")
        local = find_local(f"{record.folder}/{fast}", checkpoint_dir) or find_local(
            f"{record.folder}/{CHECKPOINT_FILENAME}", checkpoint_dir
        )
        if local is None:
            for hub_path in record.hub_paths:
                local = cached_hub_file(hub_path, revision)
                if local is not None:
                    break
    return {
        "folder": record.folder,
        "hub_file": record.hub_path,
        "local_file": str(local) if local is not None else None,
        "newer": record.newer,
        "download_command": hub_download_command(record.hub_path, revision),
    }


# ----------------------------------------------------------------------------------------------
# Loading and checking state dicts
# ----------------------------------------------------------------------------------------------


# Key of the network config a checkpoint may carry: safetensors metadata, or a top-level entry of a
# `.pth` dict. Its value: a released config name, or the PiDNetConfig fields (JSON text in safetensors
# metadata, a plain dict in a `.pth`). See `pid.models.configs.net_config_from_value`.
NET_CONFIG_KEY = "pid.net_config"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], PiDNetConfig | None]:
    """(raw key -> tensor mapping, embedded network config or None) of a `.pth` (weights-only,
    memory-mapped) or `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointMismatchError(f"{path} is not a readable safetensors file ({exc})") from None
        return tensors, _embedded_config(metadata.get(NET_CONFIG_KEY), path)
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False; never pass on advice to unpickle an untrusted file.
        raise CheckpointMismatchError(
            f"{path} holds pickled objects other than tensors; pid loads only plain tensor checkpoints "
            f"(.pth of a state dict, or .safetensors)"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, TypeError, AttributeError, IndexError):
        # a text file, a truncated download, another format: the weights-only reader fails in many ways
        raise CheckpointMismatchError(
            f"{path} is not a PyTorch checkpoint (.pth written by torch.save), or it is damaged: download it again"
        ) from None
    config = None
    if isinstance(data, Mapping) and NET_CONFIG_KEY in data:
        data = dict(data)
        config = _embedded_config(data.pop(NET_CONFIG_KEY), path)
    if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()
    ):
        raise CheckpointMismatchError(f"{path} does not hold a flat {{name: tensor}} dict")
    return dict(data), config


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text entries a decoder file carries beside its tensors (safetensors metadata, read from the header
    only; for a `.pth`, its top-level string entries): network config, backbone, latent space, ..."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return dict(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointMismatchError(f"{path} is not a readable safetensors file ({exc})") from None
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - read_checkpoint reports unreadable files with the full reason
        return {}
    if not isinstance(data, Mapping):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def _embedded_config(value: object, path: Path) -> PiDNetConfig | None:
    if value is None:
        return None
    try:
        return net_config_from_value(value)  # type: ignore[arg-type]
    except ValueError as exc:
        raise CheckpointMismatchError(f"{path}: its embedded {NET_CONFIG_KEY} is unusable: {exc}") from None


def read_checkpoint_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Raw key -> tensor mapping of a `.pth` (weights-only, memory-mapped) or `.safetensors` file."""
    return read_checkpoint(path)[0]


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
    records = sorted({f"{r.backbone}/{r.ckpt_type}" for r in released_with(config_name)})
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
        check_network_fits(state, config_name, path, config_name)
    return state


def load_network_weights(
    path: str | os.PathLike, record: CheckpointRecord | None = None, config: PiDNetConfig | str | None = None
) -> tuple[PiDNetConfig, dict[str, Tensor]]:
    """(network config, strictly checked bare state dict) of a PiD weight file.

    The config is the one the file carries (see `NET_CONFIG_KEY`) when present, else `config`,
    else the record's. An embedded config must fit the record's latent space (same latent
    channels and latent stride), else a one-line `CheckpointMismatchError`.
    """

    raw, embedded = read_checkpoint(path)
    state = strip_network_prefix(raw)
    expected_cfg = get_net_config(record.net_config) if record is not None else None
    if embedded is not None:
        cfg = embedded
        if expected_cfg is not None and (
            cfg.latent_channels != expected_cfg.latent_channels
            or cfg.latent_downsample != expected_cfg.latent_downsample
        ):
            raise CheckpointMismatchError(
                f"{path} carries a network for {cfg.latent_channels}-channel latents at stride "
                f"{cfg.latent_downsample}, but {record.backbone} latents have {expected_cfg.latent_channels} "
                f"channels at stride {expected_cfg.latent_downsample}; use a decoder made for {record.backbone}"
            )
    elif config is not None:
        cfg = net_config_from_value(config)
    elif expected_cfg is not None:
        cfg = expected_cfg
    else:
        detected = detect_net_config(state)
        if detected is None:
            raise CheckpointMismatchError(
                f"{path} carries no {NET_CONFIG_KEY} and matches no released network; "
                "embed one with: python -m pid.convert <file> --net-config <name or JSON file>"
            )
        cfg = get_net_config(detected)
    check_network_fits(state, cfg, path, released_name(cfg) or f"embedded {cfg.name}")
    return cfg, state


def check_network_fits(
    state: Mapping[str, Tensor], cfg: PiDNetConfig | str, path: str | os.PathLike, label: str
) -> None:
    """Raise a CheckpointMismatchError naming `path` when `state` does not fit the network `cfg` (a config or a
    released name), called `label` in the message."""
    from pid.models import build_pid_net

    skeleton = build_pid_net(cfg, device="meta")
    try:
        check_state_dict(state, {k: v.shape for k, v in skeleton.state_dict().items()}, label)
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(f"{path}: {exc}") from None


__all__ = [
    # the registry (pid.checkpoint_registry)
    "CHECKPOINT_FILENAME", "CKPT_TYPES", "DEPRECATED_HUB_DIR", "HUB_DIR", "HUB_DIRS", "HUB_REPO", "REGISTRY",
    "CheckpointRecord", "backbones", "ckpt_types", "default_ckpt_type", "hub_download_command", "lookup",
    "released_with",
    # files
    "NET_CONFIG_KEY", "cached_hub_file", "carried_ckpt_type", "check_network_fits", "check_state_dict",
    "checkpoint_roots", "describe_checkpoint", "detect_net_config", "download_command", "find_local",
    "load_network_weights", "load_pid_state_dict", "read_checkpoint", "read_checkpoint_file",
    "read_checkpoint_metadata", "resolve_checkpoint", "resolve_hub_path", "search_folders", "strip_network_prefix",
]
