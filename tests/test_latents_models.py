"""Latent spaces with (tiny, random) weights: encode/decode, key conversions, `load()` from a checkpoint folder."""

import json

import pytest
import torch
from safetensors.torch import save_file

import pid.latents as latents
from pid.errors import CheckpointMismatchError, CheckpointNotFoundError, ConfigError
from pid.latents.flux import FLUX1_VAE_CONFIG, FluxLatentSpace, convert_bfl_vae, load_autoencoder_kl
from pid.latents.flux2 import FLUX2_VAE_CONFIG, Flux2LatentSpace
from pid.latents.qwenimage import QWEN_VAE_CONFIG, QwenImageLatentSpace, load_qwen_vae
from pid.latents.rae import (
    DinoV2LatentSpace,
    RAEAutoencoder,
    ViTLayer,
    load_vit_decoder,
    sincos_pos_embed,
    strip_final_norm_affine,
)
from pid.latents.scale_rae import ScaleRAEAutoencoder, strip_post_layernorm
from pid.latents.sdxl import SDXLLatentSpace

from tiny_vaes import (
    TinyWan2dVAE,
    diffusers_to_bfl,
    sample_images,
    tiny_autoencoder_kl,
    tiny_dinov2,
    tiny_flux2_config,
    tiny_flux2_vae,
    tiny_kl_config,
    tiny_qwen_config,
    tiny_qwen_vae,
    tiny_siglip,
    tiny_vit_decoder_config,
    tiny_vit_decoder_state,
    tiny_wan2d,
)


@pytest.fixture
def ckpt_dir(tmp_path, monkeypatch):
    """An empty checkpoint folder that is the only local root searched."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PID_CHECKPOINT_DIR", raising=False)
    root = tmp_path / "ckpts"
    root.mkdir()
    return root


def assert_images(images: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert images.shape == shape and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0


# ----------------------------------------------------------------------------------------------
# Conv VAEs: encode / decode with tiny random weights
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "make_vae", "channels"),
    [
        ("flux", lambda: tiny_autoencoder_kl(16), 16),
        ("zimage-turbo", lambda: tiny_autoencoder_kl(16), 16),
        ("sd3", lambda: tiny_autoencoder_kl(16), 16),
        ("sdxl", lambda: tiny_autoencoder_kl(4, quant=True), 4),
        ("flux2", tiny_flux2_vae, 128),
        ("qwenimage", tiny_qwen_vae, 16),
    ],
)
def test_encode_decode_shapes_and_ranges(backbone, make_vae, channels):
    vae = make_vae()
    space = latents.get(backbone).attach(vae)
    images = sample_images(2, 32)
    z = space.encode(images)
    cell = space.downsample
    assert z.shape == (2, channels, 32 // cell, 32 // cell) and z.dtype == torch.float32
    assert torch.equal(z, space.encode(images))  # posterior mean: no sampling
    assert_images(space.decode(z), (2, 3, 32, 32))
    assert space.channels == channels and space.is_loaded


def test_encode_is_the_normalised_posterior_mean():
    vae = tiny_autoencoder_kl(16)
    images = sample_images(1, 32)
    mean = vae.encode(images).latent_dist.mean
    torch.testing.assert_close(latents.get("sd3").attach(vae).encode(images), 1.5305 * (mean - 0.0609))
    expected = vae.decode(mean, return_dict=False)[0].clamp(-1, 1)
    torch.testing.assert_close(latents.get("sd3").attach(vae).decode(1.5305 * (mean - 0.0609)), expected)


def test_flux2_batchnorm_uses_the_vae_running_statistics():
    vae = tiny_flux2_vae()
    space = latents.get("flux2").attach(vae)
    raw = torch.randn(2, 32, 4, 6)
    patched = space.normalize(raw)
    mean, var = vae.bn.running_mean.view(1, -1, 1, 1), vae.bn.running_var.view(1, -1, 1, 1)
    from diffusers import Flux2Pipeline

    torch.testing.assert_close(
        patched, (Flux2Pipeline._patchify_latents(raw) - mean) / torch.sqrt(var + 1e-4)
    )
    torch.testing.assert_close(space.denormalize(patched), raw, atol=1e-5, rtol=1e-5)
    # BatchNorm2d in eval mode is the same map
    torch.testing.assert_close(patched, vae.bn(Flux2Pipeline._patchify_latents(raw)))


def test_klein_final_raw_latent_is_repatchified_and_normalised():
    vae = tiny_flux2_vae()
    space = latents.get("flux2-klein-4b").from_pipeline(type("Pipe", (), {"vae": vae})())
    z = torch.randn(1, 128, 3, 5)
    raw = space.denormalize(z)  # what Flux2KleinPipeline returns for output_type="latent"
    assert raw.shape == (1, 32, 6, 10)
    torch.testing.assert_close(space.from_pipeline_latent(raw, 48, 80), z, atol=1e-5, rtol=1e-5)


def test_zimage_reads_its_affine_from_the_vae_config_and_flux_does_not():
    vae = tiny_autoencoder_kl(16, scaling_factor=0.5, shift_factor=0.25)
    z = torch.randn(1, 16, 2, 2)
    torch.testing.assert_close(latents.get("zimage").attach(vae).normalize(z), 0.5 * (z - 0.25))
    torch.testing.assert_close(latents.get("flux").attach(vae).normalize(z), 0.3611 * (z - 0.1159))


def test_geometry_follows_an_attached_vae():
    vae = tiny_autoencoder_kl(
        1,
        block_out_channels=[8],
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
    )
    space = latents.get("flux").attach(vae)  # like the /1, 1-channel VAE of a tiny test pipeline
    assert (space.channels, space.downsample, space.size_multiple) == (1, 1, 2)
    z = space.from_pipeline_latent(torch.randn(1, 16 * 16, 4), 32, 32)
    assert z.shape == (1, 1, 32, 32)


def test_attach_rejects_the_wrong_kind_of_module():
    with pytest.raises(ConfigError, match="BatchNorm"):
        latents.get("flux2").attach(tiny_autoencoder_kl(16))
    with pytest.raises(ConfigError, match="AutoencoderKLQwenImage"):
        latents.get("qwenimage").attach(tiny_autoencoder_kl(16))
    with pytest.raises(ConfigError):
        latents.get("flux").attach(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError):
        latents.get("dinov2").attach(tiny_autoencoder_kl(16))


# ----------------------------------------------------------------------------------------------
# Original-layout files -> diffusers
# ----------------------------------------------------------------------------------------------


def test_bfl_conversion_matches_diffusers_ldm_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = tiny_autoencoder_kl(16).state_dict()
    bfl = diffusers_to_bfl(state)
    assert "encoder.down.0.block.0.norm1.weight" in bfl and bfl["decoder.mid.attn_1.q.weight"].ndim == 4
    by_diffusers = convert_ldm_vae_checkpoint(bfl, tiny_kl_config())
    ours = convert_bfl_vae(bfl)
    assert set(ours) == set(by_diffusers) == set(state)
    for key in state:
        assert torch.equal(ours[key], state[key]) and torch.equal(
            by_diffusers[key].view_as(state[key]), state[key]
        )


def test_synthesized_bfl_state_dict_loads_and_decodes_identically():
    vae = tiny_autoencoder_kl(16)
    loaded = load_autoencoder_kl(diffusers_to_bfl(vae.state_dict()), tiny_kl_config(), "tiny ae.safetensors")
    assert not any(p.is_meta for p in loaded.parameters())
    z = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(loaded.decode(z).sample, vae.decode(z).sample)


def test_full_size_flux_and_flux2_layouts_convert_strictly():
    """Real FLUX.1 / FLUX.2 configs on the meta device: the original key set maps onto diffusers exactly."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    for cls, config, flux2 in [
        (AutoencoderKL, FLUX1_VAE_CONFIG, False),
        (AutoencoderKLFlux2, FLUX2_VAE_CONFIG, True),
    ]:
        with torch.device("meta"):
            reference = cls.from_config(config).state_dict()
        bfl = diffusers_to_bfl(reference, flux2=flux2)
        if flux2:
            assert "encoder.quant_conv.weight" in bfl and "bn.running_var" in bfl
            del bfl["bn.num_batches_tracked"]  # files may omit BatchNorm's counter
        vae = load_autoencoder_kl(bfl, config, "meta", cls=cls)
        loaded = vae.state_dict()
        assert set(loaded) == set(reference)
        assert all(loaded[k].shape == v.shape for k, v in reference.items())
        if not flux2:
            # SD's 4-ch VAE has 83,653,863; 16 channels add 165,912 and drop the 92 quant-conv weights
            assert sum(p.numel() for p in vae.parameters()) == 83_819_683


def test_mismatched_file_is_reported_with_key_names():
    state = diffusers_to_bfl(tiny_autoencoder_kl(16).state_dict())
    del state["encoder.conv_in.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointMismatchError, match=r"missing: encoder\.conv_in\.weight.*unexpected: extra"
    ):
        load_autoencoder_kl(state, tiny_kl_config(), "bad.safetensors")
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        load_autoencoder_kl(tiny_autoencoder_kl(4).state_dict(), tiny_kl_config(16), "sdxl-in-flux")


def test_old_diffusers_attention_names_are_renamed():
    state = tiny_autoencoder_kl(4, quant=True).state_dict()
    old = {
        k.replace("to_q", "query")
        .replace("to_k", "key")
        .replace("to_v", "value")
        .replace("to_out.0", "proj_attn"): v
        for k, v in state.items()
    }
    loaded = load_autoencoder_kl(old, tiny_kl_config(4, quant=True), "old sdxl_vae")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_wan2d_state_dict_loads_and_matches_the_2d_vae_numerically():
    wan = tiny_wan2d()
    state = wan.state_dict()
    assert "encoder.downsamples.0.residual.2.weight" in state and state["encoder.conv1.weight"].ndim == 4
    vae = load_qwen_vae(state, tiny_qwen_config(), "tiny QwenImage_VAE_2d.pth")
    assert vae.encoder.conv_in.weight.shape[2] == 3 and not vae.encoder.conv_in.weight[:, :, :2].any()
    space = latents.get("qwenimage").attach(vae.eval())
    images = sample_images(2, 32)
    mean, std = space.stats()
    expected = (wan.encode_mean(images) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    z = space.encode(images)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-4)
    decoded = wan.decode_raw(wan.encode_mean(images)).clamp(-1, 1)
    torch.testing.assert_close(space.decode(z), decoded, atol=1e-5, rtol=1e-4)


def test_full_size_wan2d_layout_loads_shape_correctly():
    with torch.device("meta"):
        state = TinyWan2dVAE(dim=96, z_dim=16, num_res=2).state_dict()
    assert state["decoder.upsamples.3.resample.1.weight"].shape == (192, 384, 3, 3)  # upsample halves
    vae = load_qwen_vae(state, QWEN_VAE_CONFIG, "QwenImage_VAE_2d.pth (meta)")
    assert vae.decoder.up_blocks[0].upsamplers[0].resample[1].weight.shape == (192, 384, 3, 3)
    assert vae.encoder.down_blocks[0].norm1.gamma.shape == (96, 1, 1, 1)
    truncated = dict(state)
    del truncated["decoder.upsamples.14.residual.6.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"up_blocks\.3\.resnets\.2\.conv2"):
        load_qwen_vae(truncated, QWEN_VAE_CONFIG, "truncated")


# ----------------------------------------------------------------------------------------------
# load() from a checkpoint folder laid out like the hub repo
# ----------------------------------------------------------------------------------------------


def test_flux_load_from_checkpoint_dir(ckpt_dir, monkeypatch):
    vae = tiny_autoencoder_kl(16)
    save_file(diffusers_to_bfl(vae.state_dict()), ckpt_dir / "ae.safetensors")
    monkeypatch.setattr(FluxLatentSpace, "vae_config", tiny_kl_config())
    space = latents.get("zimage").load(device="cpu", checkpoint_dir=str(ckpt_dir))
    images = sample_images(1, 32)
    torch.testing.assert_close(space.encode(images), latents.get("flux").attach(vae).encode(images))
    assert not space.vae.training and not any(p.requires_grad for p in space.vae.parameters())


def test_flux2_load_from_checkpoint_dir_in_bf16(ckpt_dir, monkeypatch):
    vae = tiny_flux2_vae()
    state = diffusers_to_bfl(vae.state_dict(), flux2=True)
    del state["bn.num_batches_tracked"]
    save_file(state, ckpt_dir / "flux2_ae.safetensors")
    monkeypatch.setattr(Flux2LatentSpace, "vae_config", tiny_flux2_config())
    space = latents.get("flux2").load(device="cpu", dtype=torch.bfloat16, checkpoint_dir=str(ckpt_dir))
    assert space.vae.encoder.conv_in.weight.dtype == torch.bfloat16
    assert space.vae.bn.running_var.dtype == torch.float32
    torch.testing.assert_close(space.vae.bn.running_mean, vae.bn.running_mean)
    z = space.encode(sample_images(1, 32))
    assert z.dtype == torch.float32 and z.shape == (1, 128, 2, 2)


def test_sd3_load_from_a_diffusers_folder(ckpt_dir):
    vae = tiny_autoencoder_kl(16, scaling_factor=1.5305, shift_factor=0.0609)
    vae.save_pretrained(ckpt_dir / "sd3_vae" / "vae")
    space = latents.get("sd3").load(device="cpu", checkpoint_dir=str(ckpt_dir))
    z = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(space.decode(z), latents.get("sd3").attach(vae).decode(z))


def test_sdxl_load_single_file(ckpt_dir, monkeypatch):
    vae = tiny_autoencoder_kl(4, quant=True)
    save_file(vae.state_dict(), ckpt_dir / "sdxl_vae.safetensors")
    monkeypatch.setattr(SDXLLatentSpace, "vae_config", tiny_kl_config(4, quant=True))
    space = latents.get("sdxl").load(device="cpu", checkpoint_dir=str(ckpt_dir))
    assert space.encode(sample_images(1, 32)).shape == (1, 4, 4, 4)


def test_qwen_load_2d_pth(ckpt_dir, monkeypatch):
    wan = tiny_wan2d()
    torch.save(wan.state_dict(), ckpt_dir / "QwenImage_VAE_2d.pth")
    monkeypatch.setattr(QwenImageLatentSpace, "vae_config", tiny_qwen_config())
    space = latents.get("qwenimage").load(device="cpu", checkpoint_dir=str(ckpt_dir))
    assert space.encode(sample_images(1, 32)).shape == (1, 16, 4, 4)


@pytest.mark.parametrize(("backbone", "command"), [
    ("flux", "hf download nvidia/PiD checkpoints/ae.safetensors"),
    ("sd3", r'hf download nvidia/PiD --include "checkpoints/sd3_vae/\*"'),
    ("qwenimage", "hf download nvidia/PiD checkpoints/QwenImage_VAE_2d.pth"),
    ("dinov2", "hf download nvidia/PiD checkpoints/rae/decoders/dinov2"),
])  # fmt: skip
def test_missing_weights_name_the_download_command(ckpt_dir, monkeypatch, backbone, command):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match=command):
        latents.get(backbone).load(device="cpu", checkpoint_dir=str(ckpt_dir))


# ----------------------------------------------------------------------------------------------
# RAE (DINOv2) and Scale-RAE (SigLIP)
# ----------------------------------------------------------------------------------------------


def tiny_rae() -> RAEAutoencoder:
    cfg = tiny_vit_decoder_config()
    decoder = load_vit_decoder(tiny_vit_decoder_state(cfg), cfg, "tiny decoder")
    gen = torch.Generator().manual_seed(0)
    mean, var = torch.randn(16, 32, 32, generator=gen) * 0.1, torch.rand(16, 32, 32, generator=gen) + 0.5
    return RAEAutoencoder(strip_final_norm_affine(tiny_dinov2()), decoder.eval(), mean, var)


def tiny_scale_rae() -> ScaleRAEAutoencoder:
    cfg = tiny_vit_decoder_config(patch_size=14, num_patches=256)
    decoder = load_vit_decoder(tiny_vit_decoder_state(cfg), cfg, "tiny decoder")
    return ScaleRAEAutoencoder(strip_post_layernorm(tiny_siglip()), decoder.eval())


def test_dinov2_encode_decode():
    rae = tiny_rae()
    space = latents.get("dinov2").attach(rae)
    images = sample_images(1, 512)
    z = space.encode(images)
    assert z.shape == (1, 16, 32, 32) and space.channels == 16
    raw = rae.encode_features(images)
    torch.testing.assert_close(z, (raw - rae.latent_mean) / torch.sqrt(rae.latent_var + 1e-5))
    torch.testing.assert_close(space.denormalize(z), raw, atol=1e-5, rtol=1e-5)
    assert_images(space.decode(z), (1, 3, 512, 512))
    # any input size is squashed to 448 px, so the grid stays 32x32
    assert space.encode(sample_images(1, 256)).shape == (1, 16, 32, 32)


def test_dinov2_tokens_skip_cls_and_registers_and_use_an_affine_free_norm():
    rae = tiny_rae()
    x = torch.randn(1, 3, 448, 448)
    hidden = rae.encoder(pixel_values=x).last_hidden_state
    assert hidden.shape[1] == 1 + 4 + 1024
    grid = rae.encode_features(torch.zeros(1, 3, 448, 448))
    assert grid.shape == (1, 16, 32, 32)
    torch.testing.assert_close(grid.mean(1), torch.zeros(1, 32, 32), atol=1e-5, rtol=0)


def test_siglip_encode_decode():
    sr = tiny_scale_rae()
    space = latents.get("siglip").attach(sr)
    z = space.encode(sample_images(2, 256))
    assert z.shape == (2, 16, 16, 16)
    torch.testing.assert_close(z.mean(1), torch.zeros(2, 16, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(1, unbiased=False), torch.ones(2, 16, 16), atol=1e-3, rtol=0)
    assert_images(space.decode(z), (2, 3, 256, 256))


# transformers 5 renamed ViTMAELayer's parameters; the published RAE files keep the 4.x names this module uses.
_TRANSFORMERS5_NAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}


def test_vit_layer_matches_transformers_vit_mae_layer():
    """Same maths as the `ViTMAELayer` the RAE decoders were trained with (names mapped to transformers 5)."""
    from transformers import ViTMAEConfig
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer

    cfg = tiny_vit_decoder_config()
    ours = _randomized(ViTLayer(cfg))
    theirs = ViTMAELayer(
        ViTMAEConfig(
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=48,
            layer_norm_eps=1e-12,
            hidden_act="gelu",
            qkv_bias=True,
            attn_implementation="eager",  # transformers 4 leaves it unset on a config built by hand
        )
    ).eval()
    state = ours.state_dict()
    expected_names = set(theirs.state_dict())
    if not set(state) <= expected_names:
        state = {_rename_v5(k): v for k, v in state.items()}
    theirs.load_state_dict(state, strict=True)
    x = torch.randn(2, 7, 32)
    out = theirs(x)
    torch.testing.assert_close(ours(x), out[0] if isinstance(out, tuple) else out, atol=1e-5, rtol=1e-5)


def _rename_v5(key: str) -> str:
    for old, new in _TRANSFORMERS5_NAMES.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    return key


def _randomized(module: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return module.eval()


def test_sincos_table_matches_diffusers_mae_table():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    # output_type="pt": older diffusers (0.39) default to a deprecated numpy path that raises.
    expected = get_2d_sincos_pos_embed(64, 8, cls_token=True, extra_tokens=1, base_size=8, output_type="pt")
    torch.testing.assert_close(sincos_pos_embed(64, 8), expected.float(), atol=1e-6, rtol=0)


def test_decoder_resizes_other_token_grids_bilinearly():
    cfg = tiny_vit_decoder_config(num_patches=16, patch_size=2)
    decoder = load_vit_decoder(tiny_vit_decoder_state(cfg), cfg, "tiny")
    assert decoder(torch.randn(1, 64, 16)).shape == (1, 16, 12)
    assert decoder.unpatchify(decoder(torch.randn(1, 16, 16))).shape == (1, 3, 8, 8)


def test_dinov2_load_from_checkpoint_dir(ckpt_dir, monkeypatch, tmp_path):
    cfg = tiny_vit_decoder_config()
    decoder_dir = ckpt_dir / "rae/decoders/dinov2/wReg_base/ViTXL_n08_i512"
    stats_dir = ckpt_dir / "rae/stats/dinov2/wReg_base/imagenet1k_512"
    decoder_dir.mkdir(parents=True)
    stats_dir.mkdir(parents=True)
    state = tiny_vit_decoder_state(cfg)
    del state["decoder_pos_embed"]  # recomputed when a file leaves the fixed table out
    torch.save(state, decoder_dir / "model.pt")
    torch.save({"mean": torch.zeros(16, 32, 32), "var": torch.ones(16, 32, 32)}, stats_dir / "stat.pt")
    tiny_dinov2().save_pretrained(tmp_path / "dinov2")
    monkeypatch.setattr(DinoV2LatentSpace, "decoder_config", cfg)

    space = latents.get("dinov2").load(
        device="cpu", checkpoint_dir=str(ckpt_dir), encoder_path=str(tmp_path / "dinov2")
    )
    z = space.encode(sample_images(1, 512))
    assert z.shape == (1, 16, 32, 32)
    assert_images(space.decode(z), (1, 3, 512, 512))
    decoder_only = latents.get("dinov2").load(device="cpu", checkpoint_dir=str(ckpt_dir), with_encoder=False)
    torch.testing.assert_close(decoder_only.decode(z), space.decode(z))
    with pytest.raises(ConfigError, match="with_encoder"):
        decoder_only.encode(sample_images(1, 512))


def test_siglip_load_from_checkpoint_dir(ckpt_dir, tmp_path):
    cfg = tiny_vit_decoder_config(patch_size=14, num_patches=256)
    folder = ckpt_dir / "scale_rae/decoder"
    folder.mkdir(parents=True)
    torch.save(tiny_vit_decoder_state(cfg), folder / "siglip2_sop14_i224_web73M_ganw3_decXL.pt")
    config = {
        "hidden_size": 768,
        "decoder_hidden_size": 32,
        "decoder_num_hidden_layers": 1,
        "decoder_num_attention_heads": 2,
        "decoder_intermediate_size": 48,
        "patch_size": 14,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "model_type": "vit_mae",
    }
    (folder / "XL_decoder_config.json").write_text(json.dumps(config))
    tiny_siglip().save_pretrained(tmp_path / "siglip")

    space = latents.get("siglip").load(
        device="cpu", checkpoint_dir=str(ckpt_dir), encoder_path=str(tmp_path / "siglip")
    )
    assert space.vae.decoder.cfg.hidden_size == 16  # the JSON's 768 is overridden by the encoder width
    z = space.encode(sample_images(1, 256))
    assert z.shape == (1, 16, 16, 16)
    assert_images(space.decode(z), (1, 3, 256, 256))


def test_missing_hf_encoder_names_the_download_command(ckpt_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pid.latents.rae import load_dinov2_encoder

    with pytest.raises(CheckpointNotFoundError, match=f"hf download {tmp_path / 'nope'}"):
        load_dinov2_encoder(str(tmp_path / "nope"))


def test_siglip2_naflex_towers_get_patches_in_processor_order():
    from transformers import Siglip2VisionConfig, Siglip2VisionModel
    try:
        from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches
    except ModuleNotFoundError:  # transformers 4: the one image processor module, on channels-last images
        from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches as hwc

        def convert_image_to_patches(image, patch_size):
            return hwc(image.transpose(1, 2, 0), patch_size)

    from pid.latents.scale_rae import naflex_inputs

    x = torch.randn(2, 3, 28, 42)
    inputs = naflex_inputs(x, 14)
    assert inputs["spatial_shapes"].tolist() == [[2, 3], [2, 3]]
    assert torch.equal(
        inputs["pixel_values"][1], torch.from_numpy(convert_image_to_patches(x[1].numpy(), 14))
    )
    config = Siglip2VisionConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=14,
        num_patches=256,
    )  # fmt: skip
    torch.manual_seed(0)
    tower = strip_post_layernorm(Siglip2VisionModel(config).eval())
    sr = ScaleRAEAutoencoder(tower, tiny_scale_rae().decoder)
    assert latents.get("siglip").attach(sr).encode(sample_images(1, 256)).shape == (1, 16, 16, 16)
