"""Which files a command needs, and where each one stands, without downloading or contacting the hub.

One list serves `verify_env.py` and both CLIs' `--dry_run` JSON (`files`). Every needed file is

  present         a local copy (./checkpoints, checkpoint_dir, $PID_CHECKPOINT_DIR, a local LDM folder)
                  or a complete copy in the Hugging Face cache; `size_bytes` is its size on disk;
  would download  not here, fetched on first use from a public repo; `size_bytes` is what the hub lists for
                  it (one question per repo, only when the hub can be reached; else null);
  gated           not here, and the repo needs an accepted licence (`licence` URL) and `hf auth login`;
  missing         not here and cannot be fetched now (HF_HUB_OFFLINE is set, or a local folder is absent or
                  EMPTY): `detail` holds the download command.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

PRESENT, WOULD_DOWNLOAD, GATED, MISSING = "present", "would download", "gated", "missing"
STATUSES = (PRESENT, WOULD_DOWNLOAD, GATED, MISSING)


@dataclass(frozen=True)
class FileStatus:
    """One file (or model folder) a command needs."""

    what: str  # "PiD 2k", "VAE ae.safetensors", "Gemma <repo>", "LDM <repo or folder>", "encoder <repo>"
    status: str  # one of STATUSES ("n/a" where pid cannot tell)
    detail: str  # where it is, or the command that fetches it
    size_bytes: int | None = None  # on disk when present; else to download, as the hub lists it (None: unknown)
    licence: str | None = None  # the page to accept, for gated repos
    needed: bool = True  # False for the backbone's other decoder types (listed, not required)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _size(path: Path) -> int | None:
    """Bytes on disk of a file, or of every file under a folder (symlinks into a hub cache followed)."""
    try:
        if path.is_file():
            return path.stat().st_size
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return None
    return None


def _unavailable(what: str, repo: str, gated: bool, offline: bool, command: str,
                 hub_path: str | None = None, revision: str | None = None) -> FileStatus:
    """Not here: missing (offline), gated or would download, with the download size the hub lists (the file or
    folder `hub_path` of `repo`, else what `from_pretrained` loads of it) when it can be asked."""
    licence = f"https://huggingface.co/{repo}" if gated else None
    if offline:
        note = "gated repo; " if gated else ""
        return FileStatus(what, MISSING, f"not cached and HF_HUB_OFFLINE is set ({note}get it with: {command})",
                          licence=licence)
    from pid.hub import download_size, hub_token

    size = download_size(repo, hub_path, revision)
    if gated:
        login = "token found" if hub_token() else "no token: run `hf auth login`"
        return FileStatus(what, GATED, f"accept the licence at {licence} ({login}); then: {command}", size,
                          licence=licence)
    return FileStatus(what, WOULD_DOWNLOAD, f"fetched on first use ({command})", size)


def pid_file_status(what: str, hub_paths: tuple[str, ...], checkpoint_dir: str | None, offline: bool,
                    is_dir: bool = False) -> FileStatus:
    """A file (or folder) of nvidia/PiD, given its possible hub paths (current first)."""
    from huggingface_hub import try_to_load_from_cache

    from pid.checkpoints import HUB_REPO, find_local, hub_download_command, search_folders

    relatives = [p.split("/", 1)[1] for p in hub_paths]
    for relative in dict.fromkeys(relatives):
        found = find_local(relative, checkpoint_dir, is_dir=is_dir)
        if found is None and not is_dir and relative.endswith(".pth"):
            found = find_local(str(Path(relative).with_suffix(".safetensors")), checkpoint_dir)
        if found is not None:
            return FileStatus(what, PRESENT, str(found), _size(Path(found)))
    for hub_path in hub_paths:
        if is_dir:
            index = try_to_load_from_cache(HUB_REPO, f"{hub_path}/config.json")
            if isinstance(index, str) and _non_empty_dir(Path(index).parent):
                return FileStatus(what, PRESENT, f"HF cache: {Path(index).parent}", _size(Path(index).parent))
        else:
            cached = try_to_load_from_cache(HUB_REPO, hub_path)
            if isinstance(cached, str):
                return FileStatus(what, PRESENT, f"HF cache: {cached}", _size(Path(cached)))
    # The folder a file would live in (a decoder's experiment folder), or the folder itself, left EMPTY.
    holders = [Path(r) if is_dir else Path(r).parent for r in relatives]
    empty = [
        str(f / h) for f in search_folders(checkpoint_dir) for h in holders
        if str(h) != "." and (f / h).is_dir() and not _non_empty_dir(f / h)
    ]  # fmt: skip
    found = _unavailable(what, HUB_REPO, False, offline, hub_download_command(hub_paths[0]), hub_paths[0])
    if empty:
        return replace(found, detail=f"empty folder {empty[0]} ignored; {found.detail}")
    return found


def _incomplete_pipeline(snapshot: Path) -> list[str]:
    """Components named in model_index.json whose folder is absent or empty."""
    try:
        index = json.loads((snapshot / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ["a readable model_index.json"]
    return [
        name for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is not None
        and not _non_empty_dir(snapshot / name)
    ]  # fmt: skip


def hf_model_status(what: str, repo: str, gated: bool, offline: bool, revision: str | None = None) -> FileStatus:
    """A transformers / diffusers model: a local folder, or its (complete) copy in the HF cache."""
    from huggingface_hub import try_to_load_from_cache

    from pid.hub import download_command

    local = Path(repo).expanduser()
    if local.is_dir() or repo.startswith(("/", ".", "~")):
        if _non_empty_dir(local):
            return FileStatus(what, PRESENT, f"local folder {local}", _size(local))
        return FileStatus(what, MISSING, f"local folder {local} is {'EMPTY' if local.is_dir() else 'absent'}")
    command = download_command(repo, revision=revision)
    for marker in ("model_index.json", "config.json"):
        found = try_to_load_from_cache(repo, marker, revision=revision)
        if isinstance(found, str):
            snapshot = Path(found).parent
            incomplete = _incomplete_pipeline(snapshot) if marker == "model_index.json" else []
            if not incomplete:
                return FileStatus(what, PRESENT, f"HF cache: {snapshot}", _size(snapshot))
            status = _unavailable(what, repo, gated, offline, command, revision=revision)
            return replace(status, detail=f"HF cache copy is incomplete (no {', '.join(incomplete)}); {command}")
    return _unavailable(what, repo, gated, offline, command, revision=revision)


def decoder_file_status(what: str, checkpoint: Mapping[str, Any], offline: bool) -> FileStatus:
    """The decoder a plan resolved (`pid.inference.runs.describe_decoder_file`)."""
    local = checkpoint.get("local_file")
    if local:
        return FileStatus(what, PRESENT, str(local), _size(Path(local)))
    from pid.checkpoints import HUB_REPO

    return _unavailable(what, HUB_REPO, False, offline, checkpoint.get("download_command") or "hf download nvidia/PiD",
                        checkpoint.get("hub_file"))


def latent_space_files(backbone: str, checkpoint_dir: str | None, offline: bool) -> list[FileStatus]:
    """The VAE / RAE files of the backbone's latent space, and the image encoder dinov2 / siglip need."""
    import pid.latents
    from pid.latents.rae import DINOV2_REPO
    from pid.latents.scale_rae import SIGLIP_REPO

    if backbone not in pid.latents.names():
        return []  # a declared space: its VAE is the user's (a hub id, folder or file), loaded as given
    space = pid.latents.get(backbone)
    rows = []
    for attr in ("hub_file", "decoder_config_file", "decoder_file", "stats_file"):
        relative = getattr(space, attr, None)
        if relative:
            rows.append(pid_file_status(f"VAE/RAE {relative}", (f"checkpoints/{relative}",), checkpoint_dir, offline))
    if getattr(space, "hub_dir", None):
        rows.append(pid_file_status(f"VAE {space.hub_dir}/", (f"checkpoints/{space.hub_dir}",), checkpoint_dir,
                                    offline, is_dir=True))
    encoder = {"dinov2": DINOV2_REPO, "siglip": SIGLIP_REPO}.get(backbone)
    if encoder:
        rows.append(hf_model_status(f"encoder {encoder}", encoder, False, offline))
    return rows


def ldm_status(backbone: str, model_id: str | None, offline: bool) -> FileStatus:
    """The LDM pipeline a from_ldm run loads (a local folder is checked to hold the backbone's pipeline)."""
    from pid.errors import PiDError
    from pid.inference.pipelines import check_model_folder, get_pipeline_spec, pipeline_names

    if backbone not in pipeline_names():
        return FileStatus("LDM (upstream RAE code)", "n/a", "see docs/rae.md; not checked here")
    spec = get_pipeline_spec(backbone)
    source = model_id or spec.default_model_id
    found = hf_model_status(f"LDM {source}", source, spec.gated, offline)
    if model_id and found.status == PRESENT:
        try:
            check_model_folder(backbone, model_id)
        except PiDError as exc:
            return FileStatus(found.what, MISSING, str(exc))
    return found


def text_encoder_status(text_encoder: str | None, offline: bool) -> FileStatus:
    from pid.text_encoder import DEFAULT_TEXT_ENCODER

    gemma = text_encoder or DEFAULT_TEXT_ENCODER
    return hf_model_status(f"Gemma {gemma}", gemma, False, offline)


def optional_extras(backbone: str) -> list[FileStatus]:
    """Python extras a backbone's LDM needs beyond the base install."""
    import importlib.util

    extra = {"flux2": "flux2", "qwenimage": "qwenimage", "qwenimage-2512": "qwenimage"}.get(backbone)
    if extra is None:
        return []
    found = importlib.util.find_spec("torchvision") is not None
    return [FileStatus(f"extra [{extra}] torchvision", PRESENT if found else MISSING,
                       "installed" if found else f"the prompt processor needs it: pip install -e '.[{extra}]'",
                       needed=False)]  # reported, not failed: a CUDA machine installs it with its torch


def backbone_files(backbone: str, checkpoint_dir: str | None = None, model_id: str | None = None,
                   ldm: bool = True) -> list[FileStatus]:
    """Every released decoder of the backbone, its VAE / encoder files, and (ldm=True) its LDM and extras."""
    from pid.checkpoints import ckpt_types, default_ckpt_type, lookup
    from pid.hub import is_offline

    offline = is_offline()
    rows = []
    for ckpt_type in ckpt_types(backbone):
        record = lookup(backbone, ckpt_type)
        found = pid_file_status(f"PiD {ckpt_type}", record.hub_paths, checkpoint_dir, offline)
        detail = f"{found.detail}; superseded by {record.newer}" if record.newer else found.detail
        rows.append(replace(found, detail=detail, needed=ckpt_type == default_ckpt_type(backbone)))
    rows += latent_space_files(backbone, checkpoint_dir, offline)
    if ldm:
        rows.append(ldm_status(backbone, model_id, offline))
        rows += optional_extras(backbone)
    return rows


def plan_files(backbone: str, checkpoint: Mapping[str, Any], text_encoder: str | None = None,
               ldm_model: str | None = None, checkpoint_dir: str | None = None) -> list[dict[str, Any]]:
    """The dry run's `files`: the decoder the plan resolved, Gemma-2, the latent space's files and (from_ldm,
    ldm_model given) the LDM pipeline and extras."""
    from pid.hub import is_offline

    offline = is_offline()
    rows = [decoder_file_status("PiD decoder", checkpoint, offline), text_encoder_status(text_encoder, offline)]
    rows += latent_space_files(backbone, checkpoint_dir, offline)
    if ldm_model is not None:
        from pid.inference.pipelines import get_pipeline_spec, pipeline_names

        if backbone in pipeline_names():
            default = get_pipeline_spec(backbone).default_model_id
            rows.append(ldm_status(backbone, None if ldm_model == default else ldm_model, offline))
            rows += optional_extras(backbone)
    return [r.to_dict() for r in rows]


def describe_size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "?"
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size_bytes >= factor:
            return f"{size_bytes / factor:.1f} {unit}"
    return f"{size_bytes} B"
