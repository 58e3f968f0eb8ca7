#!/usr/bin/env python
"""Check that this environment can run pid: imports, diffusers classes, device, and every file each backbone needs.

    python verify_env.py                          # every check, all 12 backbones
    python verify_env.py --backbone flux sd3      # only these backbones' files
    python verify_env.py --model_id flux=/data/FLUX.1-dev --checkpoint_dir /data/pid
    python verify_env.py --quiet                  # only what is not ready

Files are reported, per backbone, as
  present         a local copy (./checkpoints, checkpoint_dir, $PID_CHECKPOINT_DIR, a local LDM folder)
                  or a complete copy in the Hugging Face cache;
  would download  not here, fetched on first use from a public repo;
  gated           not here, and the repo needs an accepted licence and `hf auth login` first;
  missing         not here and cannot be fetched now (HF_HUB_OFFLINE is set, or a local folder is
                  absent or EMPTY).
Nothing is downloaded and the hub is never contacted. The exit status is non-zero only when a
required Python piece is missing; absent GPUs, optional extras and files are reported, not failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REQUIRED_MODULES = [
    "torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "hydra", "omegaconf",
    "loguru", "cv2", "PIL", "numpy", "tqdm", "packaging", "psutil", "pid",
]  # fmt: skip
OPTIONAL_MODULES = {
    "torchvision": "FLUX.2-dev / Qwen-Image prompt processors (pip install -e '.[flux2]')",
    "matplotlib": "metric plots in from_clean (pip install -e '.[plots]')",
}
PIPELINE_CLASSES = [
    "FluxPipeline", "Flux2Pipeline", "Flux2KleinPipeline", "StableDiffusion3Pipeline",
    "StableDiffusionXLPipeline", "ZImagePipeline", "QwenImagePipeline", "AutoencoderKL",
    "AutoencoderKLFlux2", "AutoencoderKLQwenImage",
]  # fmt: skip
PRESENT, WOULD_DOWNLOAD, GATED, MISSING = "present", "would download", "gated", "missing"


@dataclass
class Row:
    group: str  # "import", "optional", "diffusers", "device", or a backbone name
    name: str
    status: str  # "ok" / "FAIL" for environment rows; PRESENT ... MISSING for files
    detail: str
    required_ok: bool = True


def _version(module) -> str:
    return str(getattr(module, "__version__", "")) or "present"


# ----------------------------------------------------------------------------------------------
# Python environment
# ----------------------------------------------------------------------------------------------


def environment_rows() -> list[Row]:
    rows = []
    for name in REQUIRED_MODULES:
        try:
            rows.append(Row("import", name, "ok", _version(importlib.import_module(name))))
        except Exception as exc:  # noqa: BLE001 - any import failure is reported, whatever it is
            rows.append(Row("import", name, "FAIL", f"MISSING ({type(exc).__name__}: {exc})", False))
    for name, purpose in OPTIONAL_MODULES.items():
        found = importlib.util.find_spec(name) is not None
        rows.append(Row("optional", name, "ok" if found else "absent", "installed" if found else f"optional: {purpose}"))
    try:
        import diffusers
    except ImportError:
        diffusers = None
    if diffusers is not None:
        for cls in PIPELINE_CLASSES:
            ok = hasattr(diffusers, cls)
            rows.append(Row("diffusers", cls, "ok" if ok else "FAIL", "ok" if ok else "MISSING (upgrade diffusers)", ok))
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            detail = f"{torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.0f} GiB"
            detail += f", bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
        else:
            detail = "no CUDA device: PiD runs on CPU (slowly)"
        rows.append(Row("device", "cuda", "ok", detail))
    except ImportError:
        pass
    return rows


# ----------------------------------------------------------------------------------------------
# Files, never downloading
# ----------------------------------------------------------------------------------------------


def _non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _unavailable(repo: str, gated: bool, offline: bool, command: str) -> tuple[str, str]:
    if offline:
        note = "gated repo; " if gated else ""
        return MISSING, f"not cached and HF_HUB_OFFLINE is set ({note}get it with: {command})"
    if gated:
        from pid.hub import hub_token

        login = "token found" if hub_token() else "no token: run `hf auth login`"
        return GATED, f"accept the licence at https://huggingface.co/{repo} ({login}); then: {command}"
    return WOULD_DOWNLOAD, f"fetched on first use ({command})"


def pid_file_status(
    hub_paths: tuple[str, ...], checkpoint_dir: str | None, offline: bool, is_dir: bool = False
) -> tuple[str, str]:
    """Status of a file (or folder) of nvidia/PiD, given its possible hub paths (current first)."""
    from huggingface_hub import try_to_load_from_cache

    from pid.checkpoints import HUB_REPO, find_local, hub_download_command, search_folders

    relatives = [p.split("/", 1)[1] for p in hub_paths]
    for relative in dict.fromkeys(relatives):
        found = find_local(relative, checkpoint_dir, is_dir=is_dir)
        if found is not None:
            return PRESENT, str(found)
        if not is_dir and relative.endswith(".pth"):
            fast = find_local(str(Path(relative).with_suffix(".safetensors")), checkpoint_dir)
            if fast is not None:
                return PRESENT, str(fast)
    for hub_path in hub_paths:
        if is_dir:
            index = try_to_load_from_cache(HUB_REPO, f"{hub_path}/config.json")
            if isinstance(index, str) and _non_empty_dir(Path(index).parent):
                return PRESENT, f"HF cache: {Path(index).parent}"
        else:
            cached = try_to_load_from_cache(HUB_REPO, hub_path)
            if isinstance(cached, str):
                return PRESENT, f"HF cache: {cached}"
    # The folder a file would live in (a decoder's experiment folder), or the folder itself, left EMPTY.
    holders = [Path(r) if is_dir else Path(r).parent for r in relatives]
    empty = [
        str(f / h) for f in search_folders(checkpoint_dir) for h in holders
        if str(h) != "." and (f / h).is_dir() and not _non_empty_dir(f / h)
    ]  # fmt: skip
    status, detail = _unavailable(HUB_REPO, False, offline, hub_download_command(hub_paths[0]))
    if empty:
        detail = f"empty folder {empty[0]} ignored; {detail}"
    return status, detail


def hf_model_status(repo: str, gated: bool, offline: bool, revision: str | None = None) -> tuple[str, str]:
    """Status of a transformers / diffusers model: a local folder, or its copy in the HF cache."""
    from huggingface_hub import try_to_load_from_cache

    from pid.hub import download_command

    local = Path(repo).expanduser()
    if local.is_dir() or repo.startswith(("/", ".", "~")):
        if _non_empty_dir(local):
            return PRESENT, f"local folder {local}"
        return MISSING, f"local folder {local} is {'EMPTY' if local.is_dir() else 'absent'}"
    for marker in ("model_index.json", "config.json"):
        found = try_to_load_from_cache(repo, marker, revision=revision)
        if isinstance(found, str):
            snapshot = Path(found).parent
            incomplete = _incomplete_pipeline(snapshot) if marker == "model_index.json" else []
            if not incomplete:
                return PRESENT, f"HF cache: {snapshot}"
            return _unavailable(repo, gated, offline, download_command(repo, revision=revision))[0], (
                f"HF cache copy is incomplete (no {', '.join(incomplete)}); " + download_command(repo, revision=revision)
            )
    return _unavailable(repo, gated, offline, download_command(repo, revision=revision))


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


def backbone_rows(
    backbone: str, checkpoint_dir: str | None, model_id: str | None, offline: bool, gemma: str | None
) -> list[Row]:
    import pid.latents
    from pid.checkpoints import ckpt_types, lookup
    from pid.inference.pipelines import check_model_folder, get_pipeline_spec, pipeline_names
    from pid.latents.rae import DINOV2_REPO
    from pid.latents.scale_rae import SIGLIP_REPO

    rows = []
    for ckpt_type in ckpt_types(backbone):
        record = lookup(backbone, ckpt_type)
        status, detail = pid_file_status(record.hub_paths, checkpoint_dir, offline)
        if record.newer:
            detail += f"; superseded by {record.newer}"
        rows.append(Row(backbone, f"PiD {ckpt_type}", status, detail))

    space = pid.latents.get(backbone)
    pid_files = [getattr(space, a) for a in ("hub_file", "decoder_config_file", "decoder_file", "stats_file")
                 if getattr(space, a, None)]  # fmt: skip
    for relative in pid_files:
        status, detail = pid_file_status((f"checkpoints/{relative}",), checkpoint_dir, offline)
        rows.append(Row(backbone, f"VAE/RAE {relative}", status, detail))
    if getattr(space, "hub_dir", None):
        status, detail = pid_file_status((f"checkpoints/{space.hub_dir}",), checkpoint_dir, offline, is_dir=True)
        rows.append(Row(backbone, f"VAE {space.hub_dir}/", status, detail))
    encoder = {"dinov2": DINOV2_REPO, "siglip": SIGLIP_REPO}.get(backbone)
    if encoder:
        status, detail = hf_model_status(encoder, False, offline)
        rows.append(Row(backbone, f"encoder {encoder}", status, detail))

    if gemma:
        rows.append(Row(backbone, f"Gemma {gemma}", *hf_model_status(gemma, False, offline)))

    if backbone in pipeline_names():
        spec = get_pipeline_spec(backbone)
        source = model_id or spec.default_model_id
        status, detail = hf_model_status(source, spec.gated, offline)
        if model_id and status == PRESENT:
            from pid.errors import PiDError

            try:
                check_model_folder(backbone, model_id)
            except PiDError as exc:
                status, detail = MISSING, str(exc)
        rows.append(Row(backbone, f"LDM {source}", status, detail))
    else:
        rows.append(Row(backbone, "LDM (upstream RAE code)", "n/a", "see docs/rae.md; not checked here"))
    return rows


def file_rows(
    backbones: list[str], checkpoint_dir: str | None, model_ids: dict[str, str], text_encoder: str | None
) -> list[Row]:
    from pid.hub import is_offline
    from pid.text_encoder import DEFAULT_TEXT_ENCODER

    offline = is_offline()
    gemma = text_encoder or DEFAULT_TEXT_ENCODER
    rows = [Row("all", f"Gemma {gemma}", *hf_model_status(gemma, False, offline))]
    for backbone in backbones:
        rows += backbone_rows(backbone, checkpoint_dir, model_ids.get(backbone), offline, None)
    return rows


def run_checks(
    backbones: list[str] | None = None,
    checkpoint_dir: str | None = None,
    model_ids: dict[str, str] | None = None,
    text_encoder: str | None = None,
) -> list[Row]:
    rows = environment_rows()
    if all(r.required_ok for r in rows if r.group == "import"):
        import pid.latents

        rows += file_rows(backbones or pid.latents.names(), checkpoint_dir, model_ids or {}, text_encoder)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quiet", action="store_true", help="print only rows that are not ready")
    parser.add_argument("--backbone", nargs="+", default=None, help="only these backbones (default: all 12)")
    parser.add_argument("--checkpoint_dir", default=None, help="extra folder laid out like nvidia/PiD's checkpoints/")
    parser.add_argument("--model_id", action="append", default=[], metavar="BACKBONE=ID_OR_FOLDER",
                        help="the LDM a backbone would load (repeatable)")  # fmt: skip
    parser.add_argument("--text_encoder", default=None, help="Gemma-2 repo id or local folder")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    args = parser.parse_args(argv)
    model_ids = {}
    for item in args.model_id:
        backbone, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--model_id takes BACKBONE=ID_OR_FOLDER, got {item!r}")
        model_ids[backbone] = value
    if args.backbone:
        try:
            import pid.latents

            args.backbone = [pid.latents.canonical_name(b) for b in args.backbone]
        except ImportError:
            pass
        except ValueError as exc:
            parser.error(str(exc))
    rows = run_checks(args.backbone, args.checkpoint_dir, model_ids, args.text_encoder)
    ready = ("ok", PRESENT, "n/a")
    if args.json:
        for r in rows:
            print(json.dumps({"group": r.group, "name": r.name, "status": r.status, "detail": r.detail}))
    else:
        width = max(len(r.name) for r in rows)
        for r in rows:
            if args.quiet and r.status in ready + ("absent",):
                continue
            print(f"{r.status:<14} {r.group:<15} {r.name:<{width}}  {r.detail}")
    failed = [r for r in rows if not r.required_ok]
    counts = {s: sum(r.status == s for r in rows) for s in (PRESENT, WOULD_DOWNLOAD, GATED, MISSING)}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    print(f"verify_env: {len(failed)} required python pieces missing; files: {summary}", file=sys.stderr if args.json else sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
