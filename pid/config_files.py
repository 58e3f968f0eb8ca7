"""Where the Hydra configs (`from_ldm.yaml`, `from_clean.yaml`, `backbone/*.yaml`) are.

In a source checkout they live in the top-level `configs/` folder beside the package (the one place they
are edited). A wheel or a non-editable `pip install .` ships the same files inside the package as the
data-only package `pid.configs` (pyproject.toml maps `configs/` there), so the CLIs start from any folder.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from pid.errors import ConfigError

# A file every complete config folder has; used to tell a real config folder from an empty or partial one.
_MARKER = "from_ldm.yaml"


def _packaged_config_dir() -> Path | None:
    """`pid/configs` of an installed wheel (or a setuptools editable install's mapping), if importable."""
    try:
        root = importlib.resources.files("pid.configs")
    except ModuleNotFoundError:
        return None
    # `pid.configs` has no __init__.py, so `files()` may be a MultiplexedPath; joining a file name gives
    # a concrete path. Wheels install unpacked, so that is a real file, and Hydra needs a folder on disk.
    marker = root.joinpath(_MARKER)
    if not marker.is_file():
        return None
    return Path(str(marker)).parent


def config_dir() -> Path:
    """The folder holding the Hydra configs: a source checkout's `configs/`, else the installed copy.

    Never raises (the CLIs call it at import time): when neither holds the configs it returns the checkout
    path, and `pid.inference.cli.compose` reports the missing files as a ConfigError
    (`check_config_dir` gives the same one-line message).
    """
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if (checkout / _MARKER).is_file():
        return checkout
    packaged = _packaged_config_dir()
    return packaged if packaged is not None else checkout


def check_config_dir(folder: Path, config_name: str) -> None:
    """Raise ConfigError (one line, with the fix) when `folder` lacks `<config_name>.yaml`."""
    if not (folder / f"{config_name}.yaml").is_file():
        raise ConfigError(
            f"pid's Hydra config {config_name}.yaml is not in {folder} (nor in the installed package "
            "pid.configs); reinstall pid: pip install --force-reinstall <the pid wheel>, or pip install . "
            "from a checkout"
        )
