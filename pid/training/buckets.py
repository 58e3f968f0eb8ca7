"""Aspect-ratio / resolution buckets of the reference's training data (spec/training.md §b), as pure arithmetic.

Two bucketings, both from the reference:

- **fixed** (`image_caption_augmentor`): the nearest (log-ratio) of 7 aspect ratios picks a crop size from
  `IMAGE_RES_SIZE_INFO[resolution]`; the image is Lanczos-resized so the binding side lands on the crop
  ("adaptive"), a near miss (`min(h/Hc, w/Wc) > 0.9`) is Lanczos-*upscaled* ("rescue"), anything smaller is
  dropped; then centre-cropped. Bucket key: the aspect ratio, e.g. `"4,3"`.
- **multires** (`image_caption_multi_resolution_augmentor`): 5 aspect ratios, levels 2048..max step 256,
  target `round64(L*sqrt(r)) x round64(L/sqrt(r))` clipped per ratio to `IMAGE_RES_SIZE_INFO[max]`; the
  sample takes the largest level that fits inside it (else it is dropped). Bucket key `"L{level}_{ar}"`.

Small training (tiny / CPU runs): `BucketSpec(resolution=256)` (any multiple of 64 that is not a reference
table) derives the 7 crops with the multires formula at that side, and `BucketSpec("multires", 512)` uses
levels from half the maximum upward in steps of 64. Every size is a multiple of 64, so the LQ image (/4) and
the patch grid (/16) are integral. Sizes are (width, height) throughout, as in the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pid.errors import ConfigError

ALIGN = 64
RESCUE_THRESHOLD = 0.9  # the shipped fixed-resolution recipe's near-miss threshold

# (W, H) crop per aspect ratio and resolution preset (pid/_src/datasets/utils.py:20-66)
IMAGE_RES_SIZE_INFO: dict[str, dict[str, tuple[int, int]]] = {
    "1024": {"1,1": (1024, 1024), "4,3": (1152, 896), "3,4": (896, 1152), "16,9": (1344, 768),
             "9,16": (768, 1344), "3,2": (1344, 896), "2,3": (896, 1344)},
    "2048": {"1,1": (2048, 2048), "4,3": (2304, 1728), "3,4": (1728, 2304), "16,9": (2688, 1536),
             "9,16": (1536, 2688), "3,2": (2688, 1792), "2,3": (1792, 2688)},
    "3072": {"1,1": (3072, 3072), "4,3": (3520, 2688), "3,4": (2688, 3520), "16,9": (4096, 2304),
             "9,16": (2304, 4096), "3,2": (3776, 2496), "2,3": (2496, 3776)},
    "3840": {"1,1": (3584, 3584), "4,3": (4096, 2816), "3,4": (2816, 4096), "16,9": (4096, 2176),
             "9,16": (2176, 4096), "3,2": (4096, 2688), "2,3": (2688, 4096)},
    "4096": {"1,1": (4096, 4096), "4,3": (4096, 3072), "3,4": (3072, 4096), "16,9": (4096, 2304),
             "9,16": (2304, 4096), "3,2": (4096, 2688), "2,3": (2688, 4096)},
}

# Classification order matters for ties (first wins): InferAspectRatio's list, and the multires one.
FIXED_ASPECT_RATIOS: tuple[str, ...] = ("16,9", "3,2", "4,3", "1,1", "3,4", "2,3", "9,16")
MULTIRES_ASPECT_RATIOS: tuple[str, ...] = ("16,9", "4,3", "1,1", "3,4", "9,16")
MULTIRES_LEVELS: tuple[int, ...] = (2048, 2304, 2560, 2816, 3072, 3328, 3584, 3840, 4096)
MULTIRES_PRESETS: tuple[int, ...] = (3072, 3840, 4096)
# The WebDataset sub-roots the reference reads (21:9 is excluded).
WDS_ASPECT_DIRS: tuple[str, ...] = tuple(f"aspect_ratio_{ar.replace(',', '_')}" for ar in FIXED_ASPECT_RATIOS)


def ratio_of(ar: str) -> float:
    """`"16,9"` -> 16/9."""
    w, h = (int(p) for p in ar.split(","))
    return w / h


def nearest_aspect_ratio(width: int, height: int, choices: tuple[str, ...] = FIXED_ASPECT_RATIOS) -> str:
    """The choice whose log-ratio is closest to log(width/height); ties go to the earlier choice."""
    log_ratio = math.log(width / height)
    best, best_dist = choices[0], math.inf
    for ar in choices:
        dist = abs(log_ratio - math.log(ratio_of(ar)))
        if dist < best_dist:
            best, best_dist = ar, dist
    return best


def round64(x: float) -> int:
    """Nearest multiple of 64 (Python's round: halves go to even, as the reference's `_round_to_multiple`)."""
    return int(round(x / ALIGN)) * ALIGN


def area_size(side: int, ar: str) -> tuple[int, int]:
    """(W, H) of about side^2 pixels at ratio `ar`, snapped to multiples of 64 (the multires formula)."""
    r = ratio_of(ar)
    return round64(side * math.sqrt(r)), round64(side / math.sqrt(r))


def fixed_crop_sizes(resolution: int) -> dict[str, tuple[int, int]]:
    """The 7 crop sizes of the fixed bucketing: the reference table, else the area formula (small runs)."""
    table = IMAGE_RES_SIZE_INFO.get(str(resolution))
    if table is not None:
        return {ar: table[ar] for ar in FIXED_ASPECT_RATIOS}
    return {ar: tuple(max(ALIGN, s) for s in area_size(resolution, ar)) for ar in FIXED_ASPECT_RATIOS}  # type: ignore[misc]


def multires_levels(max_resolution: int) -> list[int]:
    """Levels of the multires grid: the reference's 2048..max step 256, or max/2..max step 64 below 2048."""
    if max_resolution >= MULTIRES_LEVELS[0]:
        return [level for level in MULTIRES_LEVELS if level <= max_resolution]
    low = max(ALIGN, round64(max_resolution / 2))
    return list(range(low, max_resolution + 1, ALIGN))


def multires_grid(max_resolution: int) -> dict[str, list[tuple[int, int, int]]]:
    """ar -> [(level, W, H)] sorted by level, largest first (`_build_grid`)."""
    ceiling = IMAGE_RES_SIZE_INFO.get(str(max_resolution))
    grid: dict[str, list[tuple[int, int, int]]] = {}
    for ar in ("1,1", "4,3", "3,4", "16,9", "9,16"):
        entries = []
        for level in multires_levels(max_resolution):
            w, h = area_size(level, ar)
            if ceiling is not None:
                w, h = min(w, ceiling[ar][0]), min(h, ceiling[ar][1])
            entries.append((level, w, h))
        grid[ar] = sorted(entries, key=lambda e: e[0], reverse=True)
    return grid


def adaptive_resize_size(width: int, height: int, crop_w: int, crop_h: int) -> tuple[int, int]:
    """`_compute_adaptive_resize_size`: the smallest aspect-preserving size covering the crop; unchanged when the
    image is not larger than the crop on its binding side."""
    scale = min(width / crop_w, height / crop_h)
    if scale <= 1.0:
        return width, height
    return max(crop_w, int(math.ceil(width / scale))), max(crop_h, int(math.ceil(height / scale)))


def rescue_resize_size(width: int, height: int, crop_w: int, crop_h: int,
                       threshold: float | None) -> tuple[int, int] | None:
    """The near-miss Lanczos upscale of `ResizeScale` (resize.py:310-317), or None when the image is dropped."""
    shape_ratio = min(height / crop_h, width / crop_w)
    if threshold is None or shape_ratio <= threshold:
        return None
    upscale = 1.0 / shape_ratio
    return max(int(width * upscale + 0.5), crop_w), max(int(height * upscale + 0.5), crop_h)


def center_crop_offset(size: int, crop: int) -> int:
    """torchvision `center_crop`'s offset on a tensor: int(round((size - crop) / 2))."""
    return int(round((size - crop) / 2.0))


@dataclass(frozen=True)
class Placement:
    """Where one image goes: its bucket, the Lanczos resize (None: keep native size) and the centre crop."""

    bucket: str
    crop: tuple[int, int]  # (W, H)
    resize: tuple[int, int] | None  # (W, H) before the crop
    rescued: bool = False

    def crop_offset(self, native: tuple[int, int]) -> tuple[int, int]:
        """(left, top) of the centre crop of an image of `native` (W, H) size."""
        w, h = self.resize_or(native)
        return center_crop_offset(w, self.crop[0]), center_crop_offset(h, self.crop[1])

    def resize_or(self, native: tuple[int, int]) -> tuple[int, int]:
        return self.resize if self.resize is not None else native


@dataclass(frozen=True)
class BucketSpec:
    """Which bucketing and how large: `mode` fixed (resolution = a preset or any multiple of 64) or multires
    (resolution = the maximum level)."""

    mode: Literal["fixed", "multires"] = "fixed"
    resolution: int = 2048
    rescue_threshold: float | None = RESCUE_THRESHOLD  # fixed mode only (multires drops, as the reference)

    def __post_init__(self) -> None:
        if self.mode not in ("fixed", "multires"):
            raise ConfigError(f"bucket mode must be fixed or multires, got {self.mode!r}")
        res = self.resolution
        if isinstance(res, bool) or not isinstance(res, int) or res < ALIGN or res % ALIGN:
            raise ConfigError(f"resolution must be a positive multiple of {ALIGN} (e.g. 256, 512, 2048), got {res!r}")
        if self.mode == "multires" and res >= MULTIRES_LEVELS[0] and res not in MULTIRES_PRESETS:
            raise ConfigError(f"multires resolution must be one of {', '.join(map(str, MULTIRES_PRESETS))} "
                              f"(the reference's grids) or below 2048 for small runs, got {res}")

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "resolution": self.resolution, "rescue_threshold": self.rescue_threshold}

    def buckets(self) -> dict[str, tuple[int, int]]:
        """Every bucket key -> its (W, H)."""
        if self.mode == "fixed":
            return fixed_crop_sizes(self.resolution)
        return {f"L{level}_{ar}": (w, h) for ar, entries in multires_grid(self.resolution).items()
                for level, w, h in entries}

    def place(self, width: int, height: int) -> Placement | None:
        """The placement of a `width` x `height` image, or None when the reference drops it (too small)."""
        if width <= 0 or height <= 0:
            return None
        if self.mode == "multires":
            ar = nearest_aspect_ratio(width, height, MULTIRES_ASPECT_RATIOS)
            for level, w_t, h_t in multires_grid(self.resolution)[ar]:
                if width >= w_t and height >= h_t:
                    size = adaptive_resize_size(width, height, w_t, h_t)
                    return Placement(f"L{level}_{ar}", (w_t, h_t), None if size == (width, height) else size)
            return None
        ar = nearest_aspect_ratio(width, height, FIXED_ASPECT_RATIOS)
        crop_w, crop_h = fixed_crop_sizes(self.resolution)[ar]
        size = adaptive_resize_size(width, height, crop_w, crop_h)
        if size[0] >= crop_w and size[1] >= crop_h:
            return Placement(ar, (crop_w, crop_h), None if size == (width, height) else size)
        rescue = rescue_resize_size(size[0], size[1], crop_w, crop_h, self.rescue_threshold)
        return None if rescue is None else Placement(ar, (crop_w, crop_h), rescue, rescued=True)


__all__ = [
    "ALIGN", "FIXED_ASPECT_RATIOS", "IMAGE_RES_SIZE_INFO", "MULTIRES_ASPECT_RATIOS", "MULTIRES_LEVELS",
    "MULTIRES_PRESETS", "RESCUE_THRESHOLD", "WDS_ASPECT_DIRS", "BucketSpec", "Placement", "adaptive_resize_size",
    "area_size", "center_crop_offset", "fixed_crop_sizes", "multires_grid", "multires_levels",
    "nearest_aspect_ratio", "rescue_resize_size", "round64",
]
