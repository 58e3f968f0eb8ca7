"""The upstream research code the RAE flows run and pid does not vendor (`pid.inference.rae_flows`): where each
clone is and what it is for (its URL, fixed LDM size, default steps), importing from it with one-line errors,
autocast as upstream samples, and the baseline decode shaped like a pid latent space."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pid.errors import ConfigError
from pid.inference.cli import Settings

UPSTREAM = {
    # kind: (environment variable, default path, clone URL, fixed LDM size, default LDM steps)
    "rae": ("RAE_REPO_PATH", "../RAE", "https://github.com/bytetriper/RAE", (512, 512), 50),
    "scale_rae": (
        "SCALE_RAE_REPO_PATH",
        "../Scale-RAE",
        "https://github.com/ZitengWangNYU/Scale-RAE",
        (256, 256),
        50,
    ),
}


def upstream_kind(cfg: Settings) -> tuple:
    kind = cfg.backbone.kind
    if kind not in UPSTREAM:
        raise ConfigError(f"backbone kind {kind!r} is not an RAE flow")
    return UPSTREAM[kind]


def repo_path(cfg: Settings) -> Path:
    """The upstream clone for this backbone; a one-line error saying what to clone where if absent."""
    env, default, url, *_ = upstream_kind(cfg)
    path = Path(cfg.backbone.repo_path or os.environ.get(env) or default).expanduser()
    marker = path / "src" if cfg.backbone.kind == "rae" else path
    if not marker.is_dir() or not any(marker.iterdir()):
        raise ConfigError(
            f"backbone {cfg.backbone.name} generates with the upstream code at {path}, which is missing; "
            f"clone it with: git clone {url} {default} (or set {env} / backbone.repo_path=)"
        )
    return path


def ldm_size(cfg: Settings) -> tuple[int, int]:
    return upstream_kind(cfg)[3]


def default_ldm_steps(cfg: Settings) -> int:
    return upstream_kind(cfg)[4]


def to_capture(label: str, latent: Tensor, sigma: float) -> Any:
    from pid.inference.step_capture import Capture

    return Capture(label, latent.float(), float(sigma))


def use_upstream(root: Path, packages: Sequence[str]) -> None:
    """Put `root` first on sys.path and forget `packages` modules imported from anywhere else.

    The upstream top-level names (`stage1`, `stage2`, `scale_rae`) are generic, so a stale module from another
    clone (or an installed copy) must not shadow the clone this run was pointed at.
    """
    root = root.resolve()
    entry = str(root)
    if entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(0, entry)
    for name in list(sys.modules):
        if name.split(".")[0] not in packages:
            continue
        file = getattr(sys.modules[name], "__file__", None)
        if file is None or not Path(file).resolve().is_relative_to(root):
            del sys.modules[name]
    importlib.invalidate_caches()


def import_upstream(module: str, root: Path, url: str) -> types.ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot import {module} from the upstream clone at {root} ({first}); "
            f"it must be a complete clone of {url} with its requirements installed"
        ) from None


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def upstream_autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    # The upstream samplers keep fp32 weights; bf16/fp16 comes only from autocast (as RAE's sample_ddp.py).
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class UpstreamDecodeSpace:
    """The baseline decode through upstream code, shaped like a pid latent space: `decode(latent) -> [-1, 1]`."""

    def __init__(
        self, decode_unit: Callable[[Tensor], Tensor], name: str, module: nn.Module | None = None
    ) -> None:
        self._decode_unit = decode_unit  # normalised latent -> [0, 1] pixels
        self.name = name
        self.module = module  # the upstream model behind it (for inspection)

    def __repr__(self) -> str:
        return f"<UpstreamDecodeSpace {self.name!r}>"

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        return self._decode_unit(latent).float().clamp(0.0, 1.0) * 2 - 1
