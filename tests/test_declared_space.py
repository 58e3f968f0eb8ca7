"""Declared latent spaces (issue 18): any diffusers VAE by file or options, decoders that carry their space."""

from __future__ import annotations

import json

import pytest
import torch
from declared_spaces import MEAN32, STD32, write_decoder, write_spaces

import pid.latents
from pid.decoder import PiDDecoder
from pid.errors import CheckpointNotFoundError, ConfigError
from pid.latents import DeclaredLatentSpace

from tiny import tiny_caption_encoder


@pytest.fixture(scope="module")
def spaces(tmp_path_factory):
    return write_spaces(tmp_path_factory.mktemp("spaces"))


def _images(h=32, w=48):
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_4ch_by_file_scale_shift_round_trip(spaces):
    space = pid.latents.get(str(spaces["sd15"])).load(device="cpu")
    assert isinstance(space, DeclaredLatentSpace) and space.name == "sd15" and space.noise_form == "vp"
    assert (space.channels, space.downsample, space.size_multiple) == (4, 8, 8)
    images = _images()
    raw = space._encode_raw(images)
    z = space.encode(images)
    assert z.shape == (2, 4, 4, 6)
    torch.testing.assert_close(z, (raw - 0.1) * 0.18215)  # the VAE config's factors
    torch.testing.assert_close(space.denormalize(z), raw, atol=1e-5, rtol=1e-5)
    decoded = space.decode(z)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1
    torch.testing.assert_close(decoded, space._decode_raw(raw).clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_32ch_by_options_per_channel_mean_std(spaces):
    space = pid.latents.resolve({"vae": str(spaces["vae32_folder"]), "name": "v32"}).load(device="cpu")
    raw = space._encode_raw(_images())
    z = space.encode(_images())
    mean, std = torch.tensor(MEAN32).view(1, -1, 1, 1), torch.tensor(STD32).view(1, -1, 1, 1)
    # diffusers' convention (SDXL pipeline with latents_mean): the config's scaling_factor applies on top
    torch.testing.assert_close(z, (raw - mean) / std * 0.18215)
    torch.testing.assert_close(space.denormalize(z), raw, atol=1e-5, rtol=1e-5)
    # the same VAE, declared by a JSON file, with explicit numbers instead of the config's
    by_file = pid.latents.get(str(spaces["vae32"])).load(device="cpu")
    torch.testing.assert_close(by_file.encode(_images()), z)
    # declared statistics: exactly (z - mean) / std (the config's default scaling_factor is not applied)
    stats = pid.latents.declare(vae=str(spaces["vae32_folder"]), latents_mean=[0.5] * 32,
                                latents_std=[2.0] * 32).load(device="cpu")
    torch.testing.assert_close(stats.encode(_images()), (raw - 0.5) / 2.0)
    explicit = pid.latents.declare(vae=str(spaces["vae32_folder"]), normalization="affine", scaling_factor=2.0,
                                   shift_factor=0.5).load(device="cpu")
    torch.testing.assert_close(explicit.encode(_images()), (raw - 0.5) * 2.0)
    # 2x2 patchify (FLUX.2's layout): 128 channels at stride 16, stats repeated per patch position
    patched = pid.latents.declare(vae=str(spaces["vae32_folder"]), patchify=2).load(device="cpu")
    zp = patched.encode(_images())
    assert zp.shape == (2, 128, 2, 3) and (patched.channels, patched.downsample) == (128, 16)
    torch.testing.assert_close(patched.denormalize(zp), raw, atol=1e-5, rtol=1e-5)


def test_batchnorm_normalisation_matches_flux2_family():
    from tiny_vaes import tiny_flux2_vae

    vae = tiny_flux2_vae()
    declared = pid.latents.declare(vae="unused/placeholder", normalization="batchnorm", patchify=2).attach(vae)
    builtin = pid.latents.get("flux2").attach(vae)
    images = _images()
    torch.testing.assert_close(declared.encode(images), builtin.encode(images))
    assert declared.channels == builtin.channels == 128


def test_entry_point_space_implements_the_interface():
    space = pid.latents.resolve("pid.latents.sdxl:SDXLLatentSpace")
    assert type(space).__name__ == "SDXLLatentSpace" and space.noise_form == "vp"
    with pytest.raises(ConfigError, match="cannot import latent space"):
        pid.latents.resolve("no_such_module.x:Space")


def test_bad_declarations_are_one_line(tmp_path, spaces):
    with pytest.raises(ConfigError, match="unknown latent space fields: scale") as err:
        pid.latents.resolve({"vae": "x/y", "scale": 1})
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as err:
        pid.latents.declare(vae=str(tmp_path / "missing_vae")).load(device="cpu")
    assert "\n" not in str(err.value)
    single = tmp_path / "vae.safetensors"
    single.write_bytes((spaces["sd15_folder"] / "vae" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="needs its diffusers config; give vae_config="):
        pid.latents.declare(vae=str(single)).load(device="cpu")
    with pytest.raises(ConfigError, match="declares 16 channels but its VAE AutoencoderKL makes 4"):
        pid.latents.declare(vae=str(spaces["sd15_folder"]), channels=16).load(device="cpu")


def test_single_file_vae_with_its_config(tmp_path, spaces):
    single = tmp_path / "sd15_vae.safetensors"
    folder = spaces["sd15_folder"] / "vae"
    single.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    space = pid.latents.declare(vae=str(single), vae_config=str(folder / "config.json")).load(device="cpu")
    reference = pid.latents.get(str(spaces["sd15"])).load(device="cpu")
    torch.testing.assert_close(space.encode(_images()), reference.encode(_images()))


def test_decoder_file_carries_its_space_and_decodes_with_no_flags(tmp_path, spaces):
    path = write_decoder(tmp_path / "sd15_decoder.safetensors", 4, spaces["sd15"])
    decoder = PiDDecoder.from_pretrained(checkpoint=path, device="cpu", text_encoder=tiny_caption_encoder())
    assert decoder.record.backbone == "sd15" and decoder.latent_channels == 4
    space = decoder.latent_space.load(device="cpu")
    assert space.spec.vae.endswith("sd15") and space.noise_form == "vp"
    z = space.encode(_images(16, 16)[:1])
    out = decoder.decode(z, caption="a cat", steps=1)
    assert out.shape == (1, 3, 64, 64) and 0 <= out.min() and out.max() <= 1
    # asking for a built-in backbone with it is a one-line error naming both
    with pytest.raises(ConfigError, match="declared latent space 'sd15', not backbone flux"):
        PiDDecoder.from_pretrained("flux", checkpoint=path, device="cpu", text_encoder=tiny_caption_encoder())


def test_channel_mismatch_between_decoder_and_space_is_one_line(tmp_path, spaces):
    path = write_decoder(tmp_path / "d4.safetensors", 4, None)
    with pytest.raises(ConfigError) as err:
        PiDDecoder.from_pretrained(checkpoint=path, latent_space=spaces["vae32"], device="cpu",
                                   text_encoder=tiny_caption_encoder())
    message = str(err.value)
    assert "decodes 4-channel latents but latent space vae32 has 32 channels" in message and "\n" not in message
    from pid.convert import main as convert_main

    code = convert_main([str(path), str(tmp_path / "x.safetensors"), "--latent-space", str(spaces["vae32"])])
    assert code == 2 and not (tmp_path / "x.safetensors").exists()


def test_metadata_round_trip(spaces):
    from pid.latents.declared import SPACE_SPEC_KEY, space_from_metadata, space_metadata

    entries = space_metadata(pid.latents.get(str(spaces["vae32"])))
    assert entries["pid.latent_space"] == "vae32" and json.loads(entries[SPACE_SPEC_KEY])["channels"] == 32
    assert space_from_metadata(entries).spec == pid.latents.get(str(spaces["vae32"])).spec
    assert space_metadata("zimage-turbo") == {"pid.latent_space": "flux"}  # built-ins: the family name only
    # what pid.train.export writes for a run whose backbone is a declaration file (plan.py's latent_space=)
    assert space_metadata(str(spaces["vae32"])) == entries


def test_models_never_import_checkpoints():
    """pid.checkpoints imports the network config from pid.models.configs; the other direction would be a cycle."""
    import ast
    from pathlib import Path

    import pid.models

    for path in Path(pid.models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(n.startswith(("pid.checkpoints", "pid.latents", "pid.decoder")) for n in names), path


def test_trainer_run_for_a_declared_space_exports_a_decoder_that_knows_it(tmp_path):
    """latent_space= reaches the run (plan.py hook) and pid.train.export writes the declaration beside the net."""
    from safetensors import safe_open

    from pid.train.export import export

    from tiny_vaes import tiny_autoencoder_kl
    from train_harness import make_images, make_init, train

    tiny_autoencoder_kl(16, seed=3, scaling_factor=0.5, shift_factor=0.2).save_pretrained(tmp_path / "vae16")
    declaration = tmp_path / "my16.yaml"
    declaration.write_text("vae: vae16\nchannels: 16\n")
    make_images(tmp_path / "images")
    make_init(tmp_path / "init.pth")
    assert train(tmp_path, f"latent_space={declaration}", "steps=1", "ckpt_every=1") == 0
    exported = export(tmp_path / "runs" / "my16_teacher", tmp_path / "my16_pid.safetensors")
    with safe_open(str(exported), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["pid.latent_space"] == "my16" and json.loads(meta["pid.latent_space.spec"])["channels"] == 16
    decoder = PiDDecoder.from_pretrained(checkpoint=exported, device="cpu", text_encoder=tiny_caption_encoder())
    assert decoder.record.backbone == "my16" and decoder.record.sampler == "undistilled"  # a teacher
    space = decoder.latent_space.load(device="cpu")
    raw = space._encode_raw(_images())
    torch.testing.assert_close(space.encode(_images()), (raw - 0.2) * 0.5)


def test_video_vae_declared_matches_the_qwenimage_family(tmp_path):
    """A Wan-style 3-D VAE (AutoencoderKLQwenImage) declared from its folder: the time axis is handled and the
    config's per-channel statistics give the built-in Qwen-Image normalisation."""
    from tiny_vaes import tiny_qwen_vae

    vae = tiny_qwen_vae()
    vae.save_pretrained(tmp_path / "qwen_vae")
    declared = pid.latents.declare(vae=str(tmp_path / "qwen_vae"), name="myqwen").load(device="cpu")
    assert type(declared.vae).__name__ == "AutoencoderKLQwenImage" and declared.downsample == 8
    builtin = pid.latents.get("qwenimage").attach(vae)
    images = _images()
    torch.testing.assert_close(declared.encode(images), builtin.encode(images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(declared.decode(declared.encode(images)), builtin.decode(builtin.encode(images)),
                               atol=1e-4, rtol=1e-4)
