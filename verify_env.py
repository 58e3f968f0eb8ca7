#!/usr/bin/env python
"""Check that this environment can run pid: imports, diffusers classes, device, and every file each backbone needs.

    python verify_env.py                          # every check, all 12 backbones
    python verify_env.py --backbone flux sd3      # only these backbones' files
    python verify_env.py --model_id flux=/data/FLUX.1-dev --checkpoint_dir /data/pid
    python verify_env.py --quiet                  # only what is not ready

Files are reported, per backbone, as
  present         a local copy (./checkpoints, checkpoint_dir, $PID_CHECKPOINT_DIR, a local LDM folder)
                  or a complete copy in the Hugging Face cache;
  would download  not here, fetched on first use from a public repo (with its size);
  gated           not here, and the repo needs an accepted licence and `hf auth login` first;
  missing         not here and cannot be fetched now (HF_HUB_OFFLINE is set, or a local folder is
                  absent or EMPTY).
Nothing is downloaded. Sizes are those of local copies, and of what would download or is gated as the hub
lists them: online, the hub is asked once per repo for its file list (metadata only; HF_HUB_OFFLINE=1, or
an unreachable hub, asks nothing and leaves those sizes out). The exit status
is 1 when a required Python piece is missing or when a file a listed backbone needs is missing (offline
and not here); absent GPUs and optional modules are reported, not failed. The file logic lives in
pid/preflight.py and also fills the CLIs' `--dry_run` JSON (`files`). The table fits 100 columns.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import textwrap
from dataclasses import dataclass

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
PRESENT, WOULD_DOWNLOAD, GATED, MISSING = "present", "would download", "gated", "missing"  # as pid.preflight
WIDTH = 100  # the text table fits a 100-column terminal


@dataclass
class Row:
    group: str  # "import", "optional", "diffusers", "device", or a backbone name
    name: str
    status: str  # "ok" / "FAIL" for environment rows; PRESENT ... MISSING for files
    detail: str
    required_ok: bool = True
    needed: bool = True  # a missing file counts against the exit status


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
# Files, never downloading (pid.preflight, shared with the CLIs' --dry_run)
# ----------------------------------------------------------------------------------------------


def file_rows(
    backbones: list[str], checkpoint_dir: str | None, model_ids: dict[str, str], text_encoder: str | None
) -> list[Row]:
    from pid.hub import is_offline
    from pid.preflight import backbone_files, describe_size, text_encoder_status

    def row(group: str, found) -> Row:
        size = f" [{describe_size(found.size_bytes)}]" if found.size_bytes is not None else ""
        return Row(group, found.what, found.status, found.detail + size, needed=found.needed)

    rows = [row("all", text_encoder_status(text_encoder, is_offline()))]
    for backbone in backbones:
        rows += [row(backbone, f) for f in backbone_files(backbone, checkpoint_dir, model_ids.get(backbone))]
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


def _fit(head: str, detail: str) -> str:
    """One row within WIDTH columns: the detail beside the name when it fits, else on indented lines below,
    with paths and commands kept whole (only a word longer than a line is cut)."""
    if len(head) + 2 + len(detail) <= WIDTH:
        return f"{head}  {detail}"
    lines = textwrap.wrap(head, WIDTH, subsequent_indent=" " * 30, break_on_hyphens=False)
    lines += textwrap.wrap(detail, WIDTH, initial_indent=" " * 4, subsequent_indent=" " * 4, break_on_hyphens=False)
    return "\n".join(lines)


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
        for r in rows:
            if args.quiet and r.status in ready + ("absent",):
                continue
            print(_fit(f"{r.status:<14} {r.group:<14} {r.name}", r.detail))
    failed = [r for r in rows if not r.required_ok]
    missing = [r for r in rows if r.status == MISSING and r.needed]
    counts = {s: sum(r.status == s for r in rows) for s in (PRESENT, WOULD_DOWNLOAD, GATED, MISSING)}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    out = sys.stderr if args.json else sys.stdout
    print(f"verify_env: {len(failed)} required python pieces missing; files: {summary}", file=out)
    if missing:
        print(f"verify_env: {len(missing)} needed files are missing (exit 1); each row says how to get it", file=out)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
