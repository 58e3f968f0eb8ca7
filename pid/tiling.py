"""Tiled PiD decoding: outputs too large to decode at once (8K, or 4K on a small GPU).

    images = decode_tiled(decoder, lq_latent, tile_size=2048, overlap=256, caption="a fox", seed=0)

The output image is cut into overlapping tiles aligned to the latent grid; each tile is decoded
from the latent crop that covers it. The sampler runs over the WHOLE image: one global noise
image (drawn exactly as `PiDDecoder.decode` draws it), and at every step the tiles' velocities
are blended into one full-image velocity with smooth weights. Since x0 = x - t v is linear in v,
this is the same as assembling every step's x0 from the tiles before re-noising with the global
noise, so neighbouring tiles see the same x_t in their overlap at every step and seams stay
hidden. A single tile (tile_size >= the image) reproduces `decoder.decode` exactly.

Positions. The network takes two position signals, both per input image:
- the absolute pixel sin-cos embedding (pixel (i, j) of the image). With `positions="global"`
  (default) each tile gets the coordinates its pixels have in the whole image, so the network sees
  the same embedding as in an untiled decode and overlapping tiles agree; `positions="tile"`
  restarts them at each tile's corner (each tile decoded as a standalone image).
- image RoPE: coordinates are normalised to linspace(0, 16) over the tile's own patch grid, with an
  NTK base from the tile's grid size, in both modes (the network has no way to take a window of a
  larger grid). Every tile is thus attended as if it were a whole image of the tile's size, which
  keeps 8K tiles at a resolution the decoders were trained at; attention also sees only the tile.
What could be measured of their cost (random weights only so far) is in docs/benchmarks.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pid.decoder import PiDDecoder
from pid.errors import ConfigError
from pid.memory import MemoryEstimate, estimate_decode_memory
from pid.models.configs import PiDNetConfig

DEFAULT_TILE_SIZE = 2048  # output px: the resolution the released decoders were trained at
DEFAULT_OVERLAP = 256  # output px: 16 patches, wider than the adapter CNN's receptive field (±10)


@dataclass(frozen=True)
class Tile:
    """One tile: output rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int


def plan_tiles(
    size: tuple[int, int], cell: tuple[int, int], patch: int, tile_size: int, overlap: int
) -> list[Tile]:
    """Tiles covering an output of `size` = (H, W) whose latent cells are `cell` output px.

    Tiles are tile_size square (or the whole axis where it is shorter), start on cell
    boundaries, and overlap their neighbours by at least `overlap` px, spread evenly.
    """
    unit = math.lcm(*cell, patch)
    if tile_size <= 0 or tile_size % unit:
        raise ConfigError(
            f"tile_size {tile_size} must be a positive multiple of {unit} (latent cell {cell[0]}x{cell[1]} px, "
            f"patch {patch}); e.g. {max(unit, round(tile_size / unit) * unit)}"
        )
    if overlap < 0 or overlap % unit or overlap >= tile_size:
        raise ConfigError(
            f"overlap {overlap} must be a multiple of {unit} in [0, tile_size={tile_size}); "
            f"e.g. {min(max(0, round(overlap / unit) * unit), tile_size - unit)}"
        )
    rows = _axis_starts(size[0], tile_size, overlap, cell[0])
    cols = _axis_starts(size[1], tile_size, overlap, cell[1])
    height, width = min(tile_size, size[0]), min(tile_size, size[1])
    return [Tile(top, left, height, width) for top in rows for left in cols]


def _axis_starts(length: int, tile: int, overlap: int, cell: int) -> list[int]:
    """Evenly spread tile starts on `cell` multiples, first 0 and last length - tile."""
    if tile >= length:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    while True:  # rounding to cells can shrink an overlap: add a tile until none is below `overlap`
        span = (length - tile) / (count - 1)
        starts = [round(i * span / cell) * cell for i in range(count)]
        if all(b - a <= tile - overlap for a, b in zip(starts, starts[1:])):
            return starts
        count += 1


def _axis_window(starts: list[int], index: int, tile: int) -> Tensor:
    """1-D blend weights of one tile: cos² / sin² ramps over its actual overlaps with its
    neighbours (complementary, so two overlapping tiles sum to 1), 1 elsewhere and at image borders."""
    weight = torch.ones(tile, dtype=torch.float64)
    if index > 0:
        width = starts[index - 1] + tile - starts[index]
        ramp = torch.sin(0.5 * math.pi * (torch.arange(width, dtype=torch.float64) + 0.5) / width) ** 2
        weight[:width] *= ramp
    if index < len(starts) - 1:
        width = starts[index] + tile - starts[index + 1]
        ramp = torch.cos(0.5 * math.pi * (torch.arange(width, dtype=torch.float64) + 0.5) / width) ** 2
        weight[tile - width :] *= ramp
    return weight


def blend_weights(tiles: Sequence[Tile]) -> list[Tensor]:
    """Per-tile [h, w] float64 weights (separable cos² ramps); positive everywhere."""
    rows = sorted({t.top for t in tiles})
    cols = sorted({t.left for t in tiles})
    out = []
    for t in tiles:
        wy = _axis_window(rows, rows.index(t.top), t.height)
        wx = _axis_window(cols, cols.index(t.left), t.width)
        out.append(wy[:, None] * wx[None, :])
    return out


@torch.no_grad()
def decode_tiled(
    decoder: PiDDecoder,
    lq_latent: Tensor,
    tile_size: int = DEFAULT_TILE_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    caption: str | Sequence[str] | None = None,
    caption_embeds: Tensor | None = None,
    degrade_sigma: float | Sequence[float] | Tensor = 0.0,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    output_size: int | tuple[int, int] | None = None,
    cfg_scale: float | None = None,
    shift: float | None = None,
    positions: Literal["global", "tile"] = "global",
    progress: bool = False,
) -> Tensor:
    """`decoder.decode` in overlapping tiles of tile_size x tile_size output px (see module doc).

    tile_size and overlap must be multiples of the latent cell in output px and of the patch size
    (32 for 4x Flux decoders). Arguments otherwise as `PiDDecoder.decode`; the same seed draws the
    same global noise. positions: the pixel coordinates a tile sees, "global" (its place in the
    whole image) or "tile" (from 0 at its corner); RoPE is per tile either way (module doc).
    Returns fp32 [B, 3, H, W] in [0, 1] on the decoder's device.
    """
    if positions not in ("global", "tile"):
        raise ConfigError(f'positions must be "global" or "tile", got {positions!r}')
    batch = lq_latent.shape[0]
    size = decoder.output_size_for(lq_latent, output_size)
    if size[0] % lq_latent.shape[-2] or size[1] % lq_latent.shape[-1]:
        raise ConfigError(
            f"tiled decoding needs an output size that is a whole number of px per latent cell; "
            f"{size[0]}x{size[1]} from a {lq_latent.shape[-2]}x{lq_latent.shape[-1]} latent is not"
        )
    cell = (size[0] // lq_latent.shape[-2], size[1] // lq_latent.shape[-1])
    tiles = plan_tiles(size, cell, decoder.net.cfg.patch_size, tile_size, overlap)
    # Same validation, caption encoding (once for all tiles) and global noise draw as decode().
    inputs = decoder.prepare_inputs(lq_latent, caption, caption_embeds, degrade_sigma, generator, seed, size)
    negative, cfg = decoder.guidance(cfg_scale, batch)
    device = inputs.noise.device

    weights = [w.to(device, torch.float32) for w in blend_weights(tiles)]
    total = torch.zeros(size, dtype=torch.float32, device=device)
    for t, w in zip(tiles, weights, strict=True):
        total[t.top : t.top + t.height, t.left : t.left + t.width] += w
    net = decoder._net_for((tiles[0].height, tiles[0].width))
    global_pos = positions == "global" and len(tiles) > 1

    def tile_velocity(x: Tensor, t_flow: float, tile: Tile) -> Tensor:
        rows = slice(tile.top // cell[0], (tile.top + tile.height) // cell[0])
        cols = slice(tile.left // cell[1], (tile.left + tile.width) // cell[1])
        # Adapter features are recomputed per tile and step rather than kept for every tile: they
        # would cost the memory of a full-image decode's features, and the adapter is ~2% of a step.
        with decoder._autocast_ctx():
            features = decoder.net.encode_latent(
                inputs.lq_latent[..., rows, cols], inputs.sigma, (tile.height, tile.width)
            )
        x_tile = x[..., tile.top : tile.top + tile.height, tile.left : tile.left + tile.width].contiguous()
        offset = (tile.top, tile.left) if global_pos else (0, 0)
        return decoder.velocity_fn(net, inputs.embeds, features, negative, cfg, pixel_offset=offset)(
            x_tile, t_flow
        )

    def velocity(x: Tensor, t_flow: float) -> Tensor:
        if len(tiles) == 1:
            return tile_velocity(x, t_flow, tiles[0])  # one tile: exactly decode's arithmetic
        blended = torch.zeros_like(x)
        for tile, w in zip(tiles, weights, strict=True):
            v = tile_velocity(x, t_flow, tile)
            blended[..., tile.top : tile.top + tile.height, tile.left : tile.left + tile.width] += v * w
        return blended / total

    return decoder.sample(velocity, inputs, steps, shift, progress, calls_per_step=len(tiles))


def decode_within_memory(
    decoder: PiDDecoder,
    lq_latent: Tensor,
    *,
    chunk: int | str | None = "auto",
    tile_size: int | None = None,
    overlap: int = DEFAULT_OVERLAP,
    budget_bytes: int | None = None,
    **decode_kwargs,
) -> Tensor:
    """`decoder.decode`, bounded in memory: what the command-line tools call.

    tile_size: always decode in tiles of this size. Otherwise `chunk` "auto" asks the estimator
    (`pid.memory`) whether the decode fits the free memory of the device (or `budget_bytes`):
    unchunked if it fits, else with the largest PiT chunk that fits, else tiled (2048-px tiles);
    an int forces that chunk; None decodes plainly.
    """
    from loguru import logger

    from pid.memory import choose_pixel_chunk, free_memory_bytes

    if tile_size:
        return decode_tiled(decoder, lq_latent, tile_size=tile_size, overlap=overlap, **decode_kwargs)
    previous = decoder.net.pixel_chunk_tokens
    if chunk == "auto":
        size = decoder.output_size_for(lq_latent, decode_kwargs.get("output_size"))
        weights = next(decoder.net.parameters()).dtype
        activations = torch.bfloat16 if decoder.uses_autocast else weights
        cfg_batch = 1 if decoder.distilled or decode_kwargs.get("cfg_scale") == 1.0 else 2
        budget = budget_bytes if budget_bytes is not None else free_memory_bytes(decoder.device)
        try:
            chunk = choose_pixel_chunk(
                decoder.net.cfg, *size, lq_latent.shape[0], budget, weights, activations, cfg_batch
            )
        except ConfigError:
            logger.info("a {}x{} decode does not fit {:.1f} GiB; decoding in tiles", *size, budget / 2**30)
            return decode_tiled(decoder, lq_latent, overlap=overlap, **decode_kwargs)
        if chunk is not None:
            logger.info("decoding {}x{} with PiT chunks of {} patches to fit memory", *size, chunk)
    elif chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ConfigError(f'chunk must be "auto", a positive number of patches or None, got {chunk!r}')
    decoder.set_pixel_chunking(chunk)
    try:
        return decoder.decode(lq_latent, **decode_kwargs)
    finally:
        decoder.set_pixel_chunking(previous)


def estimate_tiled_decode_memory(
    cfg: PiDNetConfig,
    height: int,
    width: int,
    tile_size: int = DEFAULT_TILE_SIZE,
    batch: int = 1,
    weight_dtype: torch.dtype = torch.float32,
    activation_dtype: torch.dtype = torch.bfloat16,
    pixel_chunk_tokens: int | None = None,
    cfg_batch: int = 1,
) -> MemoryEstimate:
    """Peak memory of `decode_tiled`: one tile's decode plus the full-image sampler state.

    The whole image keeps the sampler's images (noise, x, x0, eps, the previous and the blended
    velocity), the blend weights and, between steps, three float64 images of the x0 update; each
    tile call adds its crop of x, its velocity and the weighted velocity, and its offset pixel table.
    """
    th, tw = min(tile_size, height), min(tile_size, width)
    tile = estimate_decode_memory(
        cfg, th, tw, batch, weight_dtype, activation_dtype, pixel_chunk_tokens, cfg_batch
    )
    image = 3 * height * width * 4 * batch
    tile_image = 3 * th * tw * 4 * batch
    blend = 2 * height * width * 4  # weight sum + per-tile windows (about the image once more)
    full_state = 6 * image + blend
    tile_activations = (
        tile.activation_peak_bytes
        - tile.breakdown["sampler_state"]
        + 3 * tile_image
        + th * tw * cfg.pixel_hidden_size * 4
    )
    activations = full_state + max(tile_activations, 6 * image)
    breakdown = {**tile.breakdown, "sampler_state": full_state, "phase:sampler": 6 * image}
    phase = tile.peak_phase if tile_activations >= 6 * image else "sampler"
    return MemoryEstimate(
        weights_bytes=tile.weights_bytes,
        activation_peak_bytes=activations,
        total_bytes=tile.weights_bytes + activations,
        peak_phase=phase,
        breakdown=breakdown,
    )


__all__ = [
    "decode_within_memory",
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE_SIZE",
    "Tile",
    "blend_weights",
    "decode_tiled",
    "estimate_tiled_decode_memory",
    "plan_tiles",
]
