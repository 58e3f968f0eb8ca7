#!/usr/bin/env python
"""Check that this environment can run pid: imports, diffusers pipeline classes, device, checkpoints.

    python verify_env.py            # table of every check
    python verify_env.py --quiet    # only problems

Exit status is non-zero only when a required piece is missing; absent GPUs, optional extras
and not-yet-downloaded checkpoints are reported, not failed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

REQUIRED_MODULES = [
    "torch", "diffusers", "transformers", "safetensors", "huggingface_hub", "hydra", "omegaconf",
    "einops", "loguru", "imageio", "cv2", "PIL", "numpy", "tqdm", "pid",
]
OPTIONAL_MODULES = {"torchvision": "FLUX.2-dev / Qwen-Image prompt processors (pip install -e '.[flux2]')",
                    "matplotlib": "metric plots in from_clean (pip install -e '.[plots]')"}
PIPELINE_CLASSES = [
    "FluxPipeline", "Flux2Pipeline", "Flux2KleinPipeline", "StableDiffusion3Pipeline",
    "StableDiffusionXLPipeline", "ZImagePipeline", "QwenImagePipeline", "AutoencoderKL",
    "AutoencoderKLFlux2", "AutoencoderKLQwenImage",
]


def _version(module) -> str:
    return str(getattr(module, "__version__", "")) or "present"


def run_checks() -> list[tuple[str, str, str, bool]]:
    """Rows of (group, name, detail, required_ok)."""
    rows = []
    for name in REQUIRED_MODULES:
        try:
            rows.append(("import", name, _version(importlib.import_module(name)), True))
        except Exception as exc:  # noqa: BLE001 - report whatever breaks the import
            rows.append(("import", name, f"MISSING ({type(exc).__name__}: {exc})", False))
    for name, purpose in OPTIONAL_MODULES.items():
        try:
            detail = _version(importlib.import_module(name))
        except Exception:  # noqa: BLE001
            detail = f"not installed (optional: {purpose})"
        rows.append(("optional", name, detail, True))
    try:
        import diffusers

        for cls in PIPELINE_CLASSES:
            ok = hasattr(diffusers, cls)
            rows.append(("diffusers", cls, "ok" if ok else "MISSING (upgrade diffusers)", ok))
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            detail = f"{torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.0f} GiB"
            detail += f", bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
        else:
            detail = "no CUDA device: PiD runs on CPU (slowly)"
        rows.append(("device", "cuda", detail, True))
    except Exception:  # noqa: BLE001
        pass
    try:
        from pid.checkpoints import REGISTRY, checkpoint_roots

        roots = checkpoint_roots()
        for folder in sorted({r.folder for r in REGISTRY.values()}):
            found = [root / folder for root in roots if (root / folder).is_dir()]
            detail = str(found[0]) if found else "not downloaded (fetched on first use)"
            rows.append(("checkpoint", folder, detail, True))
    except Exception:  # noqa: BLE001
        pass
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quiet", action="store_true", help="print only failed required checks")
    args = parser.parse_args(argv)
    rows = run_checks()
    width = max(len(r[1]) for r in rows)
    for group, name, detail, ok in rows:
        if args.quiet and ok:
            continue
        print(f"{'ok ' if ok else 'FAIL'} {group:<10} {name:<{width}}  {detail}")
    failed = [r for r in rows if not r[3]]
    print(f"verify_env: {len(rows) - len(failed)} ok, {len(failed)} missing")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
