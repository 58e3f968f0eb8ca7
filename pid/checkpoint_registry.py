"""The registry of released PiD decoders: which decoder (a `CheckpointRecord`) each backbone and checkpoint type
names, and where the nvidia/PiD hub repo keeps its file. Data and lookups only: nothing here reads or fetches
a file (`pid.checkpoints` does).

    record = lookup("zimage-turbo", "2k")           # -> the flux 2k decoder, under its alias
    ckpt_types("sdxl"), default_ckpt_type("sdxl")   # what was released, and the upstream default
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pid.errors import ConfigError

HUB_REPO = "nvidia/PiD"
CHECKPOINT_FILENAME = "model_ema_bf16.pth"
# Top-level folders of the hub repo that hold decoder folders: the current releases, and the
# June 2026 `2kto4k` decoders the v1.5 release moved aside (upstream README users have them
# under `checkpoints/`).
HUB_DIR = "checkpoints"
DEPRECATED_HUB_DIR = "checkpoints_deprecated"
HUB_DIRS = (HUB_DIR, DEPRECATED_HUB_DIR)
CKPT_TYPES = ("2k", "2kto4k", "2kto4k_v1pt5", "undistilled")


@dataclass(frozen=True)
class CheckpointRecord:
    """One released decoder as seen from a backbone.

    backbone: the name it was looked up under (aliases keep their own name);
    folder: the experiment folder under the hub repo's `checkpoints/`;
    net_config: key into `pid.models.NET_CONFIGS`; scale: output / LDM pixel ratio;
    latent_space: the latent family PiD reads (see `pid.latents`); sampler: "distilled"
    (4-step x0-renoise) or "undistilled" (DPM-Solver++ with CFG);
    dynamic_shift: (base_shift, base_size) for the undistilled sampler's shifted grid.
    """

    backbone: str
    ckpt_type: str
    folder: str
    net_config: str
    scale: int
    latent_space: str
    sampler: str = "distilled"
    dynamic_shift: tuple[float, int] | None = None
    hub_dir: str = HUB_DIR
    newer: str | None = None

    @property
    def hub_path(self) -> str:
        """Path of the weight file inside the hub repo, where the hub has it now."""
        return f"{self.hub_dir}/{self.folder}/{CHECKPOINT_FILENAME}"

    @property
    def hub_paths(self) -> tuple[str, ...]:
        """Every place the hub repo may hold the weight file: the current one first."""
        dirs = (self.hub_dir, *(d for d in HUB_DIRS if d != self.hub_dir))
        return tuple(f"{d}/{self.folder}/{CHECKPOINT_FILENAME}" for d in dirs)

    @property
    def deprecated(self) -> bool:
        """Whether the hub moved this decoder to `checkpoints_deprecated/`."""
        return self.hub_dir == DEPRECATED_HUB_DIR

    @property
    def default_resolution(self) -> int:
        """Output side the decoder was trained for: 2048 for 2k types, 4096 for 2kto4k types."""
        return 2048 if self.ckpt_type == "2k" else 4096

    @property
    def download_command(self) -> str:
        """The `hf download` command for this decoder's file, at its current hub path."""
        return hub_download_command(self.hub_path)


def _rec(
    backbone: str, ckpt_type: str, folder: str, net_config: str, latent_space: str, **kw
) -> CheckpointRecord:
    scale = kw.pop("scale", 4)
    return CheckpointRecord(backbone, ckpt_type, folder, net_config, scale, latent_space, **kw)


_V15_SHIFT = (6.0, 2048)
# v1 multi-resolution (`2kto4k`) decoders: SD3-style dynamic shift (spec inference.md §1.1, §1.4). The
# distilled sampler never reads it; it is kept so the records describe the released experiments.
_V1_MULTIRES_SHIFT = (4.0, 1024)
_V15 = "2kto4k_v1pt5"
_CANONICAL: dict[tuple[str, str], CheckpointRecord] = {
    (r.backbone, r.ckpt_type): r
    for r in [
        _rec("flux", "2k", "PiD_res2k_sr4x_official_flux_distill_4step", "v1_latent16ch", "flux"),
        _rec("flux2", "2k", "PiD_res2k_sr4x_official_flux2_distill_4step", "v1_flux2_latent128ch", "flux2"),
        _rec("sd3", "2k", "PiD_res2k_sr4x_official_sd3_distill_4step", "v1_latent16ch", "sd3"),
        _rec(
            "dinov2", "2k", "PiD_res2k_sr4x_official_dinov2_distill_4step", "v1_dinov2_latent768ch", "dinov2"
        ),
        _rec(
            "siglip",
            "2k",
            "PiD_res2k_sr8x_official_siglip_distill_4step",
            "v1_siglip_latent1152ch_sr8",
            "siglip",
            scale=8,
        ),
        _rec(
            "sd3",
            "2kto4k",
            "PiD_res2kto4k_sr4x_official_sd3_distill_4step",
            "v1_latent16ch",
            "sd3",
            dynamic_shift=_V1_MULTIRES_SHIFT,
        ),
        _rec(
            "sdxl",
            "2kto4k",
            "PiD_res2kto4k_sr4x_official_sdxl_distill_4step",
            "v1_sdxl_latent4ch",
            "sdxl",
            dynamic_shift=_V1_MULTIRES_SHIFT,
        ),
        # The upstream README's (2026-06-02) `2kto4k` decoders, now in checkpoints_deprecated/ on the
        # hub and superseded by the v1.5 ones (spec inference.md §1.2a).
        _rec(
            "flux",
            "2kto4k",
            "PiD_res2kto4k_sr4x_official_flux_distill_4step",
            "v1_latent16ch",
            "flux",
            dynamic_shift=_V1_MULTIRES_SHIFT,
            hub_dir=DEPRECATED_HUB_DIR,
            newer=_V15,
        ),
        _rec(
            "flux2",
            "2kto4k",
            "PiD_res2kto4k_sr4x_official_flux2_distill_4step_2606",
            "v1_flux2_latent128ch",
            "flux2",
            dynamic_shift=_V1_MULTIRES_SHIFT,
            hub_dir=DEPRECATED_HUB_DIR,
            newer=_V15,
        ),
        _rec(
            "qwenimage",
            "2kto4k",
            "PiD_res2kto4k_sr4x_official_qwenimage_distill_4step",
            "v1_latent16ch",
            "qwenimage",
            dynamic_shift=_V1_MULTIRES_SHIFT,
            hub_dir=DEPRECATED_HUB_DIR,
            newer=_V15,
        ),
        _rec(
            "flux",
            "2kto4k_v1pt5",
            "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step",
            "v1pt5_latent16ch",
            "flux",
            dynamic_shift=_V15_SHIFT,
        ),
        _rec(
            "flux2",
            "2kto4k_v1pt5",
            "PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step",
            "v1pt5_flux2_latent128ch",
            "flux2",
            dynamic_shift=_V15_SHIFT,
        ),
        _rec(
            "qwenimage",
            "2kto4k_v1pt5",
            "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step",
            "v1pt5_latent16ch",
            "qwenimage",
            dynamic_shift=_V15_SHIFT,
        ),
        _rec(
            "flux",
            "undistilled",
            "PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled",
            "v1pt5_latent16ch",
            "flux",
            sampler="undistilled",
            dynamic_shift=_V15_SHIFT,
        ),
        _rec(
            "flux2",
            "undistilled",
            "PiD_v1pt5_res2kto4k_sr4x_official_flux2_undistilled",
            "v1pt5_flux2_latent128ch",
            "flux2",
            sampler="undistilled",
            dynamic_shift=_V15_SHIFT,
        ),
        _rec(
            "qwenimage",
            "undistilled",
            "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_undistilled",
            "v1pt5_latent16ch",
            "qwenimage",
            sampler="undistilled",
            dynamic_shift=_V15_SHIFT,
        ),
    ]
}

# Backbones that share another backbone's VAE, hence its decoders (same files, same records).
ALIASES: dict[str, str] = {
    "zimage": "flux",
    "zimage-turbo": "flux",
    "flux2-klein-4b": "flux2",
    "flux2-klein-9b": "flux2",
    "qwenimage-2512": "qwenimage",
}


def _build_registry() -> dict[tuple[str, str], CheckpointRecord]:
    registry = dict(_CANONICAL)
    for alias, target in ALIASES.items():
        for (backbone, ckpt_type), record in _CANONICAL.items():
            if backbone == target:
                registry[(alias, ckpt_type)] = replace(record, backbone=alias)
    return registry


REGISTRY: dict[tuple[str, str], CheckpointRecord] = _build_registry()


def backbones() -> list[str]:
    """Every backbone name the registry knows (canonical names and aliases)."""
    return sorted({b for b, _ in REGISTRY})


def ckpt_types(backbone: str) -> list[str]:
    """The checkpoint types released for `backbone`, in CKPT_TYPES order."""
    found = {t for b, t in REGISTRY if b == backbone}
    return [t for t in CKPT_TYPES if t in found]


def default_ckpt_type(backbone: str) -> str:
    """`2k` where it exists, else the backbone's first distilled type in CKPT_TYPES order: `2kto4k`
    for sdxl, qwenimage and qwenimage-2512 (the upstream README's table)."""
    types = [t for t in ckpt_types(backbone) if t != "undistilled"]
    if not types:
        raise ConfigError(f"unknown backbone {backbone!r}; choose one of: {', '.join(backbones())}")
    return types[0]


def lookup(backbone: str, ckpt_type: str | None = None) -> CheckpointRecord:
    """The record for (backbone, ckpt_type); `ckpt_type=None` picks the backbone's default."""
    if ckpt_type is None:
        ckpt_type = default_ckpt_type(backbone)
    record = REGISTRY.get((backbone, ckpt_type))
    if record is not None:
        return record
    if not ckpt_types(backbone):
        raise ConfigError(f"unknown backbone {backbone!r}; choose one of: {', '.join(backbones())}")
    raise ConfigError(
        f"backbone {backbone!r} has no {ckpt_type!r} checkpoint; valid ckpt_type for {backbone}: "
        f"{', '.join(ckpt_types(backbone))}"
    )


def released_with(net_config: str) -> list[CheckpointRecord]:
    """The released decoders (canonical backbone names, no aliases) built on the network `net_config`."""
    return [record for record in _CANONICAL.values() if record.net_config == net_config]


def hub_download_command(hub_path: str, revision: str | None = None) -> str:
    """`hf download nvidia/PiD <hub_path> --local-dir .` (a folder is fetched with --include)."""
    from pid.hub import download_command as hub_command

    return hub_command(HUB_REPO, hub_path, revision, local_dir=".")


__all__ = ["CHECKPOINT_FILENAME", "CKPT_TYPES", "DEPRECATED_HUB_DIR", "HUB_DIR", "HUB_DIRS", "HUB_REPO", "REGISTRY",
           "CheckpointRecord", "backbones", "ckpt_types", "default_ckpt_type", "hub_download_command", "lookup",
           "released_with"]
