"""Rewrite a released PiD `.pth` checkpoint as `.safetensors` (same tensor names, same dtype).

    python -m pid.convert checkpoints/PiD_res2k_sr4x_official_flux_distill_4step/model_ema_bf16.pth

writes `model_ema_bf16.safetensors` beside it, which later loads memory-mapped and pickle-free
(`pid.checkpoints.resolve_checkpoint` prefers it). The input is read weights-only.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from loguru import logger

from pid.checkpoints import detect_net_config, read_checkpoint_file, strip_network_prefix
from pid.errors import PiDError


def convert(src: str | os.PathLike, dst: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Convert `src` (.pth) to `dst` (default: same name, .safetensors); returns the output path."""
    from safetensors.torch import save_file

    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".safetensors")
    if dst.exists() and not overwrite:
        raise PiDError(f"{dst} already exists; pass --overwrite to replace it")
    tensors = read_checkpoint_file(src)
    detected = detect_net_config(strip_network_prefix(tensors))
    metadata = {"format": "pt", "source": src.name, "net_config": detected or "unknown"}
    # safetensors needs contiguous, unshared storage; write to a temp file, then rename (atomic).
    payload = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        save_file(payload, tmp, metadata=metadata)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("wrote {} ({} tensors, network: {})", dst, len(payload), metadata["net_config"])
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pid.convert", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="released .pth checkpoint")
    parser.add_argument("dst", nargs="?", help="output .safetensors (default: beside the input)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.overwrite)
    except PiDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
