"""Where the Hydra configs are: `configs/` beside the package in a source checkout, `pid/configs` in a wheel."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "configs"
