"""The network: released layouts (names, shapes, counts) and the forward pass on tiny configs."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pid.checkpoints import REGISTRY, lookup
from pid.models import NET_CONFIGS, build_pid_net
from pid.models.pixeldit import TimestepEmbedder, pixel_sincos_embedding, rope_2d_angles

from tiny import tiny_config, tiny_net

MANIFESTS = Path(__file__).parent / "data" / "manifests"


@pytest.mark.parametrize("config_name", sorted(NET_CONFIGS))
def test_state_dict_equals_manifest(config_name):
    manifest = json.loads((MANIFESTS / f"{config_name}.json").read_text())
    net = build_pid_net(config_name, device="meta")
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert ours == manifest["params"]
    assert sum(p.numel() for p in net.parameters()) == manifest["total_params"]
    assert list(net.buffers()) == []


def test_flux_2k_parameter_count_and_strict_load_of_released_names():
    record = lookup("flux", "2k")
    net = build_pid_net(record, device="meta")
    assert sum(p.numel() for p in net.parameters()) == 1_362_348_170
    manifest = json.loads((MANIFESTS / "v1_latent16ch.json").read_text())["params"]
    released = {
        f"net.{k}": torch.empty(shape, dtype=torch.bfloat16, device="meta") for k, shape in manifest.items()
    }
    from pid.checkpoints import strip_network_prefix

    net.load_state_dict(strip_network_prefix(released), strict=True, assign=True)
    bad = strip_network_prefix(released)
    bad.pop("lq_proj.output_heads.3.weight")
    with pytest.raises(RuntimeError, match="output_heads.3"):
        build_pid_net(record, device="meta").load_state_dict(bad, strict=True, assign=True)


@pytest.mark.parametrize("key", sorted(REGISTRY))
def test_every_registry_record_builds(key):
    net = build_pid_net(REGISTRY[key], device="meta")
    assert net.cfg.sr_scale == REGISTRY[key].scale


def _inputs(cfg, batch=2, height=64, width=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    stride = cfg.output_stride
    return dict(
        x_t=torch.randn(batch, 3, height, width, generator=g),
        t=torch.tensor([900.0, 250.0][:batch]),
        caption_embeds=torch.randn(batch, 300, cfg.text_dim, generator=g),
        lq_latent=torch.randn(batch, cfg.latent_channels, height // stride, width // stride, generator=g),
        degrade_sigma=torch.tensor([0.0, 0.5][:batch]),
    )


@pytest.mark.parametrize(
    "base", ["v1_latent16ch", "v1_flux2_latent128ch", "v1pt5_latent16ch", "v1pt5_flux2_latent128ch"]
)
def test_tiny_forward_shape_dtype_determinism(base):
    net = tiny_net(base)
    inputs = _inputs(net.cfg)
    with torch.no_grad():
        out = net(**inputs)
        again = net(**inputs)
    assert out.shape == inputs["x_t"].shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)


@pytest.mark.parametrize("base", ["v1_latent16ch", "v1pt5_latent16ch"])
def test_latent_sigma_caption_and_time_each_change_the_output(base):
    net = tiny_net(base)
    inputs = _inputs(net.cfg)
    with torch.no_grad():
        ref = net(**inputs)
        for name, change in [
            ("lq_latent", lambda v: v + 0.5),
            ("degrade_sigma", lambda v: v + 0.4),
            ("caption_embeds", lambda v: v.flip(1)),
            ("t", lambda v: v * 0.5),
        ]:
            changed = dict(inputs, **{name: change(inputs[name])})
            diff = (net(**changed) - ref).abs().max().item()
            assert diff > 1e-4, name


def test_keyword_call_and_precomputed_latent_features_match():
    net = tiny_net()
    inputs = _inputs(net.cfg)
    with torch.no_grad():
        direct = net(**inputs)
        feats = net.encode_latent(inputs["lq_latent"], inputs["degrade_sigma"], inputs["x_t"].shape[-2:])
        reused = net(inputs["x_t"], inputs["t"], inputs["caption_embeds"], latent_features=feats)
    assert torch.equal(direct, reused)


def test_chunked_pixel_blocks_equal_plain():
    net = tiny_net()
    inputs = _inputs(net.cfg)
    with torch.no_grad():
        plain = net(**inputs)
        net.pixel_chunk_tokens = 5  # does not divide L = 2 * 24
        chunked = net(**inputs)
    assert torch.allclose(plain, chunked, atol=1e-6)


def test_caption_longer_than_max_length_is_truncated():
    net = tiny_net()
    inputs = _inputs(net.cfg)
    longer = torch.cat([inputs["caption_embeds"], torch.randn(2, 20, net.cfg.text_dim)], dim=1)
    with torch.no_grad():
        assert torch.equal(net(**inputs), net(**dict(inputs, caption_embeds=longer)))


def test_output_size_must_be_patch_multiple():
    net = tiny_net()
    inputs = _inputs(net.cfg)
    inputs["x_t"] = torch.randn(2, 3, 60, 96)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        net(**inputs)


def test_timestep_embedding_uses_max_period_10_cosine_first():
    emb = TimestepEmbedder(8, freq_dim=256, max_period=10.0)
    t = torch.tensor([500.0])
    e = emb.sinusoid(t)
    k = 5
    f = 10 ** (-k / 128)
    assert math.isclose(e[0, k].item(), math.cos(500 * f), abs_tol=1e-4)
    assert math.isclose(e[0, 128 + k].item(), math.sin(500 * f), abs_tol=1e-4)


def test_ntk_rope_bases_match_spec_examples():
    # grid 128 with reference 64 (v1 at 2048 px): theta_w = 20945.88 for d = 64
    angles = rope_2d_angles(128, 128, 64, 10000.0, 64, 16.0)
    last_x = angles[-1, 2]  # x = 16, k = 1
    theta = 10000 * 2 ** (32 / 30)
    assert math.isclose(theta, 20945.88, rel_tol=1e-6)
    assert math.isclose(last_x.item(), 16 * theta ** (-4 / 64), rel_tol=1e-5)
    # grid 128 with reference 128 (v1.5 at 2048): plain theta
    angles = rope_2d_angles(128, 128, 72, 10000.0, 128, 16.0)
    assert math.isclose(angles[-1, 3].item(), 16 * 10000 ** (-4 / 72), rel_tol=1e-5)  # y part of k = 1


def test_pixel_sincos_layout_column_first():
    emb = pixel_sincos_embedding(4, 6, 16)
    i, j = 3, 5
    w = 10000 ** (-1 / 4)
    assert math.isclose(emb[i, j, 1].item(), math.sin(j * w), rel_tol=1e-6)
    assert math.isclose(emb[i, j, 5].item(), math.cos(j * w), rel_tol=1e-6)
    assert math.isclose(emb[i, j, 9].item(), math.sin(i * w), rel_tol=1e-6)
    assert math.isclose(emb[i, j, 13].item(), math.cos(i * w), rel_tol=1e-6)


def test_flux2_v15_unpatchify_channel_order():
    # channel c*4 + a*2 + b of the packed latent lands on channel c at (2i + a, 2j + b)
    packed = torch.arange(8 * 2 * 2, dtype=torch.float32).reshape(1, 8, 2, 2)
    out = F.pixel_shuffle(packed, 2)
    c, a, b, i, j = 1, 1, 0, 1, 0
    assert out[0, c, 2 * i + a, 2 * j + b] == packed[0, c * 4 + a * 2 + b, i, j]
    cfg = tiny_config("v1pt5_flux2_latent128ch")
    assert cfg.adapter_in_channels == 32 and cfg.output_stride == 64


def test_random_init_build_is_fast_and_weights_are_initialised():
    import time

    start = time.perf_counter()
    net = build_pid_net(tiny_config())
    assert time.perf_counter() - start < 5
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert net.pixel_blocks[0].norm1.weight.eq(1).all()


def test_pixel_offset_shifts_only_the_pixel_embedding():
    from pid.models.pixeldit import pixel_sincos_embedding

    full = pixel_sincos_embedding(12, 20, 8)
    window = pixel_sincos_embedding(4, 8, 8, offset=(6, 10))
    assert torch.allclose(window, full[6:10, 10:18])
    net = tiny_net()
    inputs = _inputs(net.cfg)
    with torch.no_grad():
        plain = net(**inputs)
        shifted = net(**inputs, pixel_offset=(16, 32))
        again = net(**inputs)
    assert (plain - shifted).abs().max() > 1e-4 and torch.equal(plain, again)
    assert len(net._pos_cache) == 1  # offset tables are not cached
