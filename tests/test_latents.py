"""Latent spaces without weights: registry, pinned constants, pipeline layouts, noise forms, sizes."""

import inspect
from types import SimpleNamespace

import pytest
import torch

import pid.latents as latents
from pid.errors import ConfigError, InputError
from pid.latents.base import (
    grid_to_tokens,
    pack_2x2,
    patchify_2x2,
    tokens_to_grid,
    unpack_2x2,
    unpatchify_2x2,
)
from pid.latents.flux import FluxLatentSpace
from pid.latents.flux2 import BN_EPS
from pid.latents.qwenimage import LATENTS_MEAN, LATENTS_STD
from pid.latents.rae import STATS_EPS
from pid.latents.scale_rae import LN_EPS, layer_norm_channels

BACKBONES = [
    "flux", "zimage", "zimage-turbo", "flux2", "flux2-klein-4b", "flux2-klein-9b",
    "sd3", "sdxl", "qwenimage", "qwenimage-2512", "dinov2", "siglip",
]  # fmt: skip

FAMILY = {
    "flux": ("flux", 16, 8, 16, "flow"),
    "zimage": ("flux", 16, 8, 16, "flow"),
    "zimage-turbo": ("flux", 16, 8, 16, "flow"),
    "flux2": ("flux2", 128, 16, 16, "flow"),
    "flux2-klein-4b": ("flux2", 128, 16, 16, "flow"),
    "flux2-klein-9b": ("flux2", 128, 16, 16, "flow"),
    "sd3": ("sd3", 16, 8, 16, "flow"),
    "sdxl": ("sdxl", 4, 8, 8, "vp"),
    "qwenimage": ("qwenimage", 16, 8, 16, "flow"),
    "qwenimage-2512": ("qwenimage", 16, 8, 16, "flow"),
    "dinov2": ("dinov2", 768, 16, 16, "flow"),
    "siglip": ("siglip", 1152, 16, 16, "flow"),
}


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_names_are_the_twelve_backbones():
    assert latents.names() == BACKBONES


@pytest.mark.parametrize("backbone", BACKBONES)
def test_get_returns_the_family_without_weights(backbone):
    space = latents.get(backbone)
    name, channels, downsample, multiple, noise = FAMILY[backbone]
    assert (space.name, space.backbone) == (name, backbone)
    assert (space.channels, space.downsample, space.size_multiple, space.noise_form) == (
        channels, downsample, multiple, noise,
    )  # fmt: skip
    assert not space.is_loaded


def test_aliases_and_spelling_are_forgiven():
    assert latents.get("Z_Image-Turbo").backbone == "zimage-turbo"
    assert latents.get("FLUX.1").backbone == "flux"
    assert latents.get("qwen-image-2512").name == "qwenimage"
    assert latents.get("klein-9b").backbone == "flux2-klein-9b"
    assert latents.get("scale-rae").name == "siglip"
    assert set(latents.ALIASES.values()) <= set(BACKBONES)


def test_get_builds_a_fresh_object_each_time():
    assert latents.get("flux") is not latents.get("flux")


def test_unknown_backbone_is_a_one_line_config_error_listing_names():
    with pytest.raises(ConfigError) as err:
        latents.get("flux3")
    message = str(err.value)
    assert "\n" not in message and "'flux3'" in message
    assert all(name in message for name in BACKBONES)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("backbone", ["flux", "flux2", "sd3", "sdxl", "qwenimage", "dinov2", "siglip"])
def test_encode_and_decode_without_weights_say_to_call_load(backbone):
    space = latents.get(backbone)
    size = space.native_resolution if backbone in ("dinov2", "siglip") else 32
    with pytest.raises(ConfigError, match=r"load\(\)"):
        space.encode(torch.zeros(1, 3, size, size))
    with pytest.raises(ConfigError, match=r"load\(\)"):
        space.decode(torch.zeros(1, space.channels, 2, 2))


def test_rae_spaces_have_no_pipeline():
    with pytest.raises(ConfigError, match="load"):
        latents.get("dinov2").from_pipeline(SimpleNamespace(vae=object()))
    with pytest.raises(ConfigError):
        latents.get("flux").from_pipeline(SimpleNamespace())


# ----------------------------------------------------------------------------------------------
# Constants (one place each, pinned)
# ----------------------------------------------------------------------------------------------


def test_affine_constants_are_pinned():
    z = randn(2, 16, 4, 4)
    torch.testing.assert_close(latents.get("flux").normalize(z), 0.3611 * (z - 0.1159))
    torch.testing.assert_close(latents.get("zimage").normalize(z), 0.3611 * (z - 0.1159))
    torch.testing.assert_close(latents.get("sd3").normalize(z), 1.5305 * (z - 0.0609))
    torch.testing.assert_close(latents.get("sdxl").normalize(z[:, :4]), 0.13025 * z[:, :4])
    assert (FluxLatentSpace.scaling_factor, FluxLatentSpace.shift_factor) == (0.3611, 0.1159)


def test_qwen_constants_match_the_spec_and_diffusers():
    from diffusers import AutoencoderKLQwenImage

    assert LATENTS_MEAN[:3] == (-0.7571, -0.7089, -0.9113) and LATENTS_MEAN[-1] == -0.2921
    assert LATENTS_STD[:3] == (2.8184, 1.4541, 2.3275) and LATENTS_STD[-1] == 1.9160
    # diffusers' class defaults are Qwen/Qwen-Image's VAE config
    params = inspect.signature(AutoencoderKLQwenImage.__init__).parameters
    assert list(LATENTS_MEAN) == list(params["latents_mean"].default)
    assert list(LATENTS_STD) == list(params["latents_std"].default)
    raw = randn(1, 16, 1, 3, 3)
    mean, std = torch.tensor(LATENTS_MEAN).view(1, 16, 1, 1), torch.tensor(LATENTS_STD).view(1, 16, 1, 1)
    torch.testing.assert_close(latents.get("qwenimage").normalize(raw), (raw[:, :, 0] - mean) / std)


def test_eps_constants_are_pinned():
    assert (BN_EPS, STATS_EPS, LN_EPS) == (1e-4, 1e-5, 1e-6)
    x = randn(2, 8, 3, 3) * 3 + 1
    expected = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(layer_norm_channels(x), expected)


@pytest.mark.parametrize("backbone", ["flux", "zimage", "sd3", "sdxl", "qwenimage"])
def test_normalize_then_denormalize_is_identity_without_weights(backbone):
    space = latents.get(backbone)
    z = randn(2, space.channels, 4, 6)
    raw = space.denormalize(z)
    torch.testing.assert_close(space.normalize(raw), z)
    torch.testing.assert_close(space.denormalize(space.normalize(raw)), raw)


def test_qwen_denormalize_restores_the_time_axis():
    space = latents.get("qwenimage")
    assert space.denormalize(randn(1, 16, 2, 2)).shape == (1, 16, 1, 2, 2)
    with pytest.raises(InputError):
        space.normalize(randn(1, 16, 2, 2, 2))


def test_siglip_layernorm_is_idempotent_and_not_inverted():
    space = latents.get("siglip")
    z = space.normalize(randn(2, 32, 4, 4) * 5 + 2)
    torch.testing.assert_close(space.normalize(space.denormalize(z)), z, atol=1e-5, rtol=1e-5)
    assert space.denormalize(z) is z


# ----------------------------------------------------------------------------------------------
# Pipeline layouts, proven equal to diffusers' own static helpers
# ----------------------------------------------------------------------------------------------


def test_flux_pack_matches_flux_pipeline():
    from diffusers import FluxPipeline

    z = randn(2, 16, 6, 8)
    tokens = FluxPipeline._pack_latents(z, 2, 16, 6, 8)
    torch.testing.assert_close(pack_2x2(z), tokens, rtol=0, atol=0)
    torch.testing.assert_close(unpack_2x2(tokens, 6, 8), z, rtol=0, atol=0)
    space = latents.get("flux")
    torch.testing.assert_close(space.to_pipeline_latent(z), tokens, rtol=0, atol=0)
    # 48x64 px; a size FluxPipeline floors (52x70 -> 48x64) unpacks the same way
    for h, w in [(48, 64), (52, 70)]:
        expected = FluxPipeline._unpack_latents(tokens, h, w, 8)
        torch.testing.assert_close(space.from_pipeline_latent(tokens, h, w), expected, rtol=0, atol=0)
    assert pack_2x2(z)[0, 0].tolist() == [
        z[0, c, py, px].item() for c in range(16) for py in (0, 1) for px in (0, 1)
    ]


def test_zimage_sd3_sdxl_pipeline_latents_pass_through():
    z = randn(1, 16, 4, 4)
    for backbone in ("zimage", "zimage-turbo", "sd3", "sdxl"):
        space = latents.get(backbone)
        assert space.from_pipeline_latent(z, 32, 32) is z
        assert space.to_pipeline_latent(z) is z
    with pytest.raises(InputError):
        latents.get("sd3").from_pipeline_latent(z[0], 32, 32)


def test_flux2_layouts_match_flux2_pipelines():
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    raw = randn(2, 32, 6, 10)
    patched = Flux2Pipeline._patchify_latents(raw)
    torch.testing.assert_close(patchify_2x2(raw), patched, rtol=0, atol=0)
    torch.testing.assert_close(unpatchify_2x2(patched), raw, rtol=0, atol=0)
    torch.testing.assert_close(unpatchify_2x2(patched), Flux2KleinPipeline._unpatchify_latents(patched))
    assert patched[0, 1 * 4 + 1 * 2 + 0, 0, 0] == raw[0, 1, 1, 0]  # channel = c*4 + py*2 + px

    tokens = Flux2Pipeline._pack_latents(patched)
    torch.testing.assert_close(grid_to_tokens(patched), tokens, rtol=0, atol=0)
    ids = Flux2Pipeline._prepare_latent_ids(patched)
    expected = Flux2Pipeline._unpack_latents_with_ids(tokens, ids)
    space = latents.get("flux2-klein-4b")
    torch.testing.assert_close(space.from_pipeline_latent(tokens, 48, 80), expected, rtol=0, atol=0)
    torch.testing.assert_close(space.to_pipeline_latent(patched), tokens, rtol=0, atol=0)
    torch.testing.assert_close(tokens_to_grid(tokens, 3, 5), patched, rtol=0, atol=0)


def test_flux2_raw_klein_output_needs_the_vae_statistics():
    space = latents.get("flux2-klein-9b")
    with pytest.raises(ConfigError, match=r"load\(\)"):
        space.from_pipeline_latent(randn(1, 32, 4, 4), 32, 32)
    with pytest.raises(InputError):
        space.from_pipeline_latent(randn(1, 7, 4, 4), 32, 32)


def test_qwen_pack_matches_qwen_pipeline():
    from diffusers import QwenImagePipeline

    z = randn(2, 16, 4, 6)
    tokens = QwenImagePipeline._pack_latents(z.unsqueeze(2), 2, 16, 4, 6)
    space = latents.get("qwenimage-2512")
    torch.testing.assert_close(space.to_pipeline_latent(z), tokens, rtol=0, atol=0)
    expected = QwenImagePipeline._unpack_latents(tokens, 32, 48, 8)[:, :, 0]
    torch.testing.assert_close(space.from_pipeline_latent(tokens, 32, 48), expected, rtol=0, atol=0)
    torch.testing.assert_close(space.from_pipeline_latent(z.unsqueeze(2), 32, 48), z)


def test_packed_token_count_must_fit_the_image_size():
    with pytest.raises(InputError, match="tokens"):
        latents.get("flux").from_pipeline_latent(randn(1, 12, 64), 64, 64)
    with pytest.raises(InputError, match="grid"):
        latents.get("flux2").from_pipeline_latent(randn(1, 12, 128), 64, 64)


def test_rae_tokens_become_a_raster_grid():
    tokens = randn(1, 16, 8)
    grid = latents.get("siglip").from_pipeline_latent(tokens, 256, 256)
    assert grid.shape == (1, 8, 4, 4) and grid[0, :, 1, 2].equal(tokens[0, 6])


# ----------------------------------------------------------------------------------------------
# Noise forms and the SDXL frame conversion (hand-computed)
# ----------------------------------------------------------------------------------------------


def test_flow_noise_against_hand_computed_values():
    z = randn(2, 16, 4, 4)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    noisy = latents.get("flux").add_noise(z, 0.25, torch.Generator().manual_seed(7))
    torch.testing.assert_close(noisy, 0.75 * z + 0.25 * eps)


def test_vp_noise_against_hand_computed_values():
    z = randn(2, 4, 4, 4)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    noisy = latents.get("sdxl").add_noise(z, 0.6, torch.Generator().manual_seed(3))
    torch.testing.assert_close(noisy, 0.8 * z + 0.6 * eps)  # sqrt(1 - 0.36) = 0.8
    full = latents.get("sdxl").add_noise(z, 1.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(full, eps)


def test_per_sample_sigma_and_zero_sigma():
    z = randn(2, 16, 2, 2)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    noisy = latents.get("qwenimage").add_noise(z, torch.tensor([0.0, 0.5]), torch.Generator().manual_seed(1))
    torch.testing.assert_close(noisy[0], z[0])
    torch.testing.assert_close(noisy[1], 0.5 * z[1] + 0.5 * eps[1])
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    assert latents.get("flux").add_noise(z, 0.0, gen) is z
    assert torch.equal(gen.get_state(), state)  # sigma 0 draws nothing


def test_sigma_outside_unit_interval_is_rejected():
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        latents.get("flux").add_noise(randn(1, 16, 2, 2), 1.5)
    with pytest.raises(ConfigError):
        latents.get("sdxl").add_noise(randn(1, 4, 2, 2), torch.tensor(-0.1))


def test_sdxl_training_frame_against_hand_computed_values():
    x = randn(1, 4, 2, 2)
    frame, sigma = latents.get("sdxl").to_training_frame(x, 0.75)  # d = sqrt(0.5625 + 1) = 1.25
    torch.testing.assert_close(frame, x / 1.25)
    assert sigma == pytest.approx(0.6)
    frame, sigma = latents.get("sdxl").to_training_frame(x, 0.0)
    assert frame is x and sigma == 0.0
    frames, sigmas = latents.get("sdxl").to_training_frame(torch.cat([x, x]), torch.tensor([0.75, 0.0]))
    torch.testing.assert_close(frames, torch.cat([x / 1.25, x]))
    torch.testing.assert_close(sigmas, torch.tensor([0.6, 0.0]))


@pytest.mark.parametrize("backbone", ["flux", "flux2", "sd3", "qwenimage", "zimage-turbo", "dinov2"])
def test_flow_training_frame_is_identity(backbone):
    x = randn(1, 4, 2, 2)
    frame, sigma = latents.get(backbone).to_training_frame(x, 0.4)
    assert frame is x and sigma == 0.4


# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------


def test_check_size_names_the_nearest_valid_sizes():
    latents.get("flux").check_size(1024, 768)
    with pytest.raises(ConfigError) as err:
        latents.get("flux").check_size(1000, 1030)
    message = str(err.value)
    assert "\n" not in message and "16" in message
    assert "1024x992" in message and "1040x1008" in message  # WxH below and above
    latents.get("sdxl").check_size(1000, 1000)  # SDXL needs only /8
    with pytest.raises(ConfigError, match="8x8"):
        latents.get("sdxl").check_size(3, 3)
    with pytest.raises(ConfigError, match="multiples of 16"):
        latents.get("flux2").check_size(520, 512)


def test_latent_size():
    assert latents.get("flux").latent_size(512, 768) == (64, 96)
    assert latents.get("flux2").latent_size(512, 768) == (32, 48)
    assert latents.get("dinov2").latent_size(512, 512) == (32, 32)
    assert latents.get("siglip").latent_size(256, 256) == (16, 16)
