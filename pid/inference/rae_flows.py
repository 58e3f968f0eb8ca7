"""LDM flows of the RAE backbones, which generate with upstream code that pid does not vendor.

* dinov2: class-conditional ImageNet-512 with the RAE repository (DiT^DH-XL + autoguidance);
  latents are DINOv2-B (with registers) tokens [1, 768, 32, 32]; captions are class names.
* siglip: text-to-image at 256 px with the Scale-RAE repository (Qwen LM + diffusion head);
  latents are SigLIP-2 tokens [1, 1152, 16, 16]; PiD decodes them 8x.

`from_ldm` asks this module for the repository path, defaults, prompts and a latent source.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from pid.errors import ConfigError

_UPSTREAM = {
    # kind: (environment variable, default path, clone URL, fixed LDM size, default LDM steps)
    "rae": ("RAE_REPO_PATH", "../RAE", "https://github.com/bytetriper/RAE", (512, 512), 50),
    "scale_rae": ("SCALE_RAE_REPO_PATH", "../Scale-RAE", "https://github.com/ZitengWangNYU/Scale-RAE", (256, 256), 50),
}


def _kind(cfg: DictConfig) -> tuple:
    kind = cfg.backbone.kind
    if kind not in _UPSTREAM:
        raise ConfigError(f"backbone kind {kind!r} is not an RAE flow")
    return _UPSTREAM[kind]


def repo_path(cfg: DictConfig) -> Path:
    """The upstream clone for this backbone; a one-line error saying what to clone where if absent."""
    env, default, url, *_ = _kind(cfg)
    path = Path(cfg.backbone.repo_path or os.environ.get(env) or default).expanduser()
    marker = path / "src" if cfg.backbone.kind == "rae" else path
    if not marker.is_dir() or not any(marker.iterdir()):
        raise ConfigError(
            f"backbone {cfg.backbone.name} generates with the upstream code at {path}, which is missing; "
            f"clone it with: git clone {url} {default} (or set {env} / backbone.repo_path=)"
        )
    return path


def ldm_size(cfg: DictConfig) -> tuple[int, int]:
    return _kind(cfg)[3]


def default_ldm_steps(cfg: DictConfig) -> int:
    return _kind(cfg)[4]


def is_class_conditional(cfg: DictConfig) -> bool:
    return cfg.backbone.kind == "rae"


def class_prompts(cfg: DictConfig) -> list[str]:
    """ImageNet class ids to generate, as strings (the item list that from_ldm shards)."""
    ids, span = cfg.backbone.class_ids, cfg.backbone.class_range
    if (ids is None) == (span is None):
        raise ConfigError("dinov2 needs exactly one of backbone.class_ids=[...] or backbone.class_range=[START,END]")
    if span is not None:
        start, end = (int(v) for v in span)
        if not 0 <= start < end <= 1000:
            raise ConfigError(f"backbone.class_range must satisfy 0 <= START < END <= 1000, got [{start}, {end})")
        ids = list(range(start, end))
    out = []
    for value in ids:
        if not 0 <= int(value) < 1000:
            raise ConfigError(f"class id {value} is outside [0, 1000)")
        out.append(str(int(value)))
    return out


def make_source(cfg: DictConfig, plan, device: torch.device):
    """A latent source (`.space`, `.generate(index, item)`, `.caption_for(index, item)`) for the RAE flows."""
    repo_path(cfg)
    raise ConfigError(
        f"generation with backbone {cfg.backbone.name} is not supported by this version of pid; decode its "
        f"latents with pid.PiDDecoder or evaluate it with python -m pid.inference.from_clean backbone={cfg.backbone.name}"
    )
