"""pid.memory: the estimate against measured CPU peaks, chunk choice, free memory."""

import json
from pathlib import Path

import pytest
import torch

from pid.decoder import PiDDecoder
from pid.errors import ConfigError
from pid.memory import (
    GiB,
    choose_pixel_chunk,
    estimate_decode_memory,
    free_memory_bytes,
    parameter_count,
    track_peak_memory,
)
from pid.models import build_pid_net, get_net_config
from pid.tiling import decode_tiled, estimate_tiled_decode_memory

from tiny import tiny_config, tiny_decoder

TOLERANCE = 0.20  # the bound; on CPU the estimate lands within ~3%


def _measured(decoder: PiDDecoder, latent: torch.Tensor, chunk: int | None = None, **kwargs) -> int:
    decoder.set_pixel_chunking(chunk)
    decoder.net._pos_cache.clear()  # the estimate includes building the positional tables
    embeds = torch.randn(latent.shape[0], 300, decoder.net.cfg.text_dim)
    try:
        with track_peak_memory("cpu") as peak:
            decoder.decode(latent, caption_embeds=embeds, **kwargs)
    finally:
        decoder.set_pixel_chunking(None)
    return peak.peak_bytes


@pytest.mark.parametrize(
    "latent_hw, batch, chunk",
    [((4, 4), 1, None), ((8, 6), 1, None), ((8, 6), 2, 24)],
    ids=["128px", "256x192", "256x192-b2-chunked"],
)
def test_estimate_within_20_percent_of_measured_fp32(latent_hw, batch, chunk):
    decoder = tiny_decoder(text_encoder=False)
    measured = _measured(decoder, torch.randn(batch, 16, *latent_hw), chunk)
    est = estimate_decode_memory(
        decoder.net.cfg, latent_hw[0] * 32, latent_hw[1] * 32, batch, torch.float32, torch.float32, chunk
    )
    assert abs(est.activation_peak_bytes / measured - 1) < TOLERANCE, (est, measured)


def test_estimate_within_20_percent_trunk_heavy_and_autocast():
    # Wide trunk, narrow pixel path: the MMDiT phase sets the peak; bf16 autocast on CPU.
    cfg = tiny_config(hidden_size=256, num_heads=4, pixel_hidden_size=4, pixel_attn_hidden_size=32)
    torch.manual_seed(0)
    for autocast in (False, True):
        decoder = PiDDecoder(build_pid_net(cfg), autocast=autocast)
        measured = _measured(decoder, torch.randn(1, 16, 6, 6), chunk=8)
        act = torch.bfloat16 if autocast else torch.float32
        est = estimate_decode_memory(cfg, 192, 192, 1, torch.float32, act, 8)
        assert est.peak_phase == "trunk" or autocast  # (autocast: the adaLN weight cast wins here)
        assert abs(est.activation_peak_bytes / measured - 1) < TOLERANCE, (autocast, est, measured)


def test_tiled_estimate_within_20_percent():
    decoder = tiny_decoder(text_encoder=False)
    decoder.net._pos_cache.clear()
    latent = torch.randn(1, 16, 8, 12)
    with track_peak_memory("cpu") as peak:
        decode_tiled(decoder, latent, tile_size=128, overlap=64, caption_embeds=torch.randn(1, 300, 32))
    est = estimate_tiled_decode_memory(decoder.net.cfg, 256, 384, 128, 1, torch.float32, torch.float32)
    assert abs(est.activation_peak_bytes / peak.peak_bytes - 1) < TOLERANCE, (est, peak.peak_bytes)


def test_parameter_count_matches_the_released_manifest():
    index = json.loads((Path(__file__).parent / "data" / "manifests" / "index.json").read_text())
    for name in ("v1_latent16ch", "v1pt5_latent16ch"):
        assert parameter_count(get_net_config(name)) == index[name]["total_params"]


def test_official_estimate_breakdown_and_scaling():
    cfg = get_net_config("v1_latent16ch")
    est = estimate_decode_memory(cfg, 2048, 2048)
    assert est.weights_bytes == parameter_count(cfg) * 4
    assert est.total_bytes == est.weights_bytes + est.activation_peak_bytes
    assert est.peak_phase == "pixel" and "phase:trunk" in est.breakdown
    assert 2 * GiB < est.activation_peak_bytes < 6 * GiB  # InvokeAI measured ~3.7 GB at 2048 px
    big = estimate_decode_memory(cfg, 4096, 4096)
    assert 3.5 < big.activation_peak_bytes / est.activation_peak_bytes < 4.5  # per-pixel dominated
    assert (
        estimate_decode_memory(cfg, 4096, 4096, weight_dtype=torch.bfloat16).weights_bytes
        == est.weights_bytes // 2
    )
    chunked = estimate_decode_memory(cfg, 4096, 4096, pixel_chunk_tokens=4096)
    assert chunked.activation_peak_bytes < big.activation_peak_bytes / 2
    assert "GiB" in str(est)
    with pytest.raises(ConfigError, match="multiple of 16"):
        estimate_decode_memory(cfg, 2040, 2048)


def test_choose_pixel_chunk_none_when_it_fits_and_monotone_in_budget():
    cfg = get_net_config("v1_latent16ch")
    need = estimate_decode_memory(cfg, 4096, 4096).activation_peak_bytes
    assert choose_pixel_chunk(cfg, 4096, 4096, 1, int(need / 0.9) + 1) is None
    chunks = [choose_pixel_chunk(cfg, 4096, 4096, 1, int(gib * GiB)) for gib in (8, 9, 10, 11, 12, 14)]
    assert all(isinstance(c, int) for c in chunks)
    assert chunks == sorted(chunks) and chunks[0] < chunks[-1]
    # the largest chunk that fits: one more token does not
    budget = 8 * GiB
    chunk = choose_pixel_chunk(cfg, 4096, 4096, 1, budget)
    usable = budget * 0.9
    assert estimate_decode_memory(cfg, 4096, 4096, pixel_chunk_tokens=chunk).activation_peak_bytes <= usable
    assert (
        estimate_decode_memory(cfg, 4096, 4096, pixel_chunk_tokens=chunk + 1).activation_peak_bytes > usable
    )
    # weights charged to the budget -> less room, smaller chunk
    roomy = 14 * GiB
    assert choose_pixel_chunk(cfg, 4096, 4096, 1, roomy, count_weights=True) < choose_pixel_chunk(
        cfg, 4096, 4096, 1, roomy
    )
    # the trunk does not chunk: below its peak only tiling helps
    with pytest.raises(ConfigError, match="decode_tiled"):
        choose_pixel_chunk(cfg, 4096, 4096, 1, 6 * GiB)


def test_free_memory_bytes_cpu():
    free = free_memory_bytes("cpu")
    assert isinstance(free, int) and free > 0
