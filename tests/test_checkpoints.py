"""Registry, file resolution, safe loading, config detection and conversion."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from pid.checkpoints import (
    REGISTRY,
    backbones,
    check_state_dict,
    ckpt_types,
    default_ckpt_type,
    detect_net_config,
    load_pid_state_dict,
    lookup,
    read_checkpoint_file,
    resolve_checkpoint,
    resolve_hub_path,
    strip_network_prefix,
)
from pid.errors import CheckpointMismatchError, CheckpointNotFoundError, ConfigError
from pid.models import build_pid_net

from tiny import tiny_config

REFERENCE_PAIRS = {
    ("flux", "2k"),
    ("flux2", "2k"),
    ("sd3", "2k"),
    ("zimage", "2k"),
    ("zimage-turbo", "2k"),
    ("dinov2", "2k"),
    ("siglip", "2k"),
    ("sd3", "2kto4k"),
    ("sdxl", "2kto4k"),
    ("flux", "2kto4k_v1pt5"),
    ("flux2", "2kto4k_v1pt5"),
    ("qwenimage", "2kto4k_v1pt5"),
    ("zimage", "2kto4k_v1pt5"),
    ("zimage-turbo", "2kto4k_v1pt5"),
    ("qwenimage-2512", "2kto4k_v1pt5"),
    ("flux2-klein-4b", "2k"),
    ("flux2-klein-4b", "2kto4k_v1pt5"),
    ("flux2-klein-9b", "2k"),
    ("flux2-klein-9b", "2kto4k_v1pt5"),
}


def test_registry_covers_reference_pairs_and_undistilled():
    assert REFERENCE_PAIRS <= set(REGISTRY)
    for backbone in ("flux", "flux2", "qwenimage"):
        rec = lookup(backbone, "undistilled")
        assert rec.sampler == "undistilled" and rec.folder.endswith("_undistilled")
    # 10 distilled + 3 undistilled files of the later registry + the README's 3 `2kto4k` ones
    assert len({r.folder for r in REGISTRY.values()}) == 16


def test_aliases_share_files_and_keep_their_name():
    z = lookup("zimage-turbo", "2k")
    assert z.backbone == "zimage-turbo" and z.folder == lookup("flux", "2k").folder
    assert lookup("flux2-klein-9b", "2kto4k_v1pt5").net_config == "v1pt5_flux2_latent128ch"
    assert lookup("siglip", "2k").scale == 8
    assert lookup("sdxl").ckpt_type == "2kto4k" and default_ckpt_type("qwenimage") == "2kto4k"
    assert (
        lookup("flux", "2k").hub_path
        == "checkpoints/PiD_res2k_sr4x_official_flux_distill_4step/model_ema_bf16.pth"
    )


def test_lookup_errors_are_one_line_and_list_valid_types():
    with pytest.raises(ConfigError) as err:
        lookup("sdxl", "2k")
    msg = str(err.value)
    assert "\n" not in msg and "2kto4k" in msg and "sdxl" in msg
    with pytest.raises(ConfigError, match="unknown backbone 'nope'"):
        lookup("nope", "2k")
    assert "zimage-turbo" in backbones()
    assert ckpt_types("flux") == ["2k", "2kto4k", "2kto4k_v1pt5", "undistilled"]


def _tiny_state(prefix="net."):
    net = build_pid_net(tiny_config())
    return net, {f"{prefix}{k}": v.to(torch.bfloat16) for k, v in net.state_dict().items()}


def test_pth_round_trip_strips_prefix_and_drops_training_extras(tmp_path):
    net, state = _tiny_state()
    state["net_ema.s_embedder.proj.weight"] = torch.zeros(1)
    state["fake_score.anything"] = torch.zeros(1)
    state["discriminator.head"] = torch.zeros(1)
    path = tmp_path / "model_ema_bf16.pth"
    torch.save(state, path)
    loaded = load_pid_state_dict(path)
    assert set(loaded) == set(net.state_dict())
    rebuilt = build_pid_net(tiny_config(), state_dict=loaded)
    assert next(rebuilt.parameters()).dtype == torch.float32
    for k, v in net.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v.to(torch.bfloat16).float())


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    net, state = _tiny_state()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_pid_state_dict(path)
    assert set(loaded) == set(net.state_dict())


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refuses_pickles_that_are_not_plain_tensor_dicts(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"net.x": _Payload()}, fh)
    with pytest.raises(CheckpointMismatchError, match="pickled objects other than tensors|is not a PyTorch checkpoint"):
        read_checkpoint_file(path)
    path2 = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path2)
    with pytest.raises(CheckpointMismatchError, match="flat"):
        read_checkpoint_file(path2)


def test_truncated_file_names_missing_keys_and_detects_config(tmp_path):
    from pid.models import build_pid_net as build

    full = build("v1pt5_latent16ch", device="meta")
    expected = {k: v.shape for k, v in full.state_dict().items()}
    truncated = {k: torch.empty(s, device="meta") for k, s in list(expected.items())[:-3]}
    with pytest.raises(CheckpointMismatchError) as err:
        check_state_dict(truncated, expected, "v1pt5_latent16ch")
    msg = str(err.value)
    assert "3 missing" in msg and list(expected)[-1] in msg


def test_wrong_checkpoint_for_config_says_what_it_looks_like():
    sdxl = {
        k: torch.empty(v.shape, device="meta")
        for k, v in build_pid_net("v1_sdxl_latent4ch", device="meta").state_dict().items()
    }
    assert detect_net_config(sdxl) == "v1_sdxl_latent4ch"
    flux_expected = {
        k: v.shape for k, v in build_pid_net("v1_latent16ch", device="meta").state_dict().items()
    }
    with pytest.raises(CheckpointMismatchError, match="sdxl/2kto4k"):
        check_state_dict(sdxl, flux_expected, "v1_latent16ch")
    for name in [
        "v1_latent16ch",
        "v1_flux2_latent128ch",
        "v1_dinov2_latent768ch",
        "v1_siglip_latent1152ch_sr8",
        "v1pt5_latent16ch",
        "v1pt5_flux2_latent128ch",
    ]:
        sd = {
            k: torch.empty(v.shape, device="meta")
            for k, v in build_pid_net(name, device="meta").state_dict().items()
        }
        assert detect_net_config(sd) == name


def test_resolution_order_and_offline_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PID_CHECKPOINT_DIR", raising=False)
    record = lookup("flux", "2k")
    with pytest.raises(CheckpointNotFoundError) as err:
        resolve_checkpoint(record)
    msg = str(err.value)
    assert f"hf download nvidia/PiD {record.hub_path} --local-dir ." in msg and "\n" not in msg

    env_root = tmp_path / "elsewhere"
    (env_root / record.folder).mkdir(parents=True)
    (env_root / record.folder / "model_ema_bf16.pth").write_bytes(b"x")
    monkeypatch.setenv("PID_CHECKPOINT_DIR", str(env_root))
    assert resolve_checkpoint(record) == env_root / record.folder / "model_ema_bf16.pth"

    local = tmp_path / "checkpoints" / record.folder
    local.mkdir(parents=True)
    (local / "model_ema_bf16.safetensors").write_bytes(b"x")
    monkeypatch.delenv("PID_CHECKPOINT_DIR")
    assert resolve_checkpoint(record).name == "model_ema_bf16.safetensors"

    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        resolve_checkpoint(record, checkpoint=tmp_path / "missing.pth")
    (tmp_path / "checkpoints" / "sd3_vae").mkdir()
    with pytest.raises(CheckpointNotFoundError, match='--include "checkpoints/sd3_vae/'):
        resolve_hub_path("sd3_vae", is_dir=True)  # an empty folder (interrupted download) is not a copy
    (tmp_path / "checkpoints" / "sd3_vae" / "config.json").write_text("{}")
    assert resolve_hub_path("sd3_vae", is_dir=True) == tmp_path / "checkpoints" / "sd3_vae"
    with pytest.raises(CheckpointNotFoundError, match="hf download nvidia/PiD checkpoints/ae.safetensors"):
        resolve_hub_path("ae.safetensors")


def test_convert_cli_writes_safetensors_with_same_names(tmp_path):
    from pid.convert import main

    _, state = _tiny_state()
    src = tmp_path / "model_ema_bf16.pth"
    torch.save(state, src)
    from dataclasses import asdict

    inline = json.dumps({k: v for k, v in asdict(tiny_config()).items() if v is not None})
    assert main([str(src), "--net-config", inline]) == 0
    out = read_checkpoint_file(tmp_path / "model_ema_bf16.safetensors")
    assert set(out) == set(state)
    assert all(torch.equal(out[k], state[k]) for k in state)
    assert main([str(src), "--net-config", inline]) == 2  # refuses to overwrite silently
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_converted_files_follow_the_umask(tmp_path, umask, mode):
    import stat
    from dataclasses import asdict

    from pid.convert import convert

    _, state = _tiny_state()
    src = tmp_path / "model_ema_bf16.pth"
    torch.save(state, src)
    inline = json.dumps({k: v for k, v in asdict(tiny_config()).items() if v is not None})
    old = os.umask(umask)
    try:
        outputs = [convert(src, tmp_path / "a.safetensors", net_config=inline),
                   convert(src, tmp_path / "b.pth", net_config=inline)]
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in outputs] == [mode, mode]


# ----------------------------------------------------------------------------------------------
# Every (backbone, ckpt_type) pair of the upstream README (spec inference.md §1.2 + §1.2a)
# ----------------------------------------------------------------------------------------------

_F1, _F2, _Q = "flux", "flux2", "qwenimage"
# backbone -> (latent family, {ckpt_type: (folder, net config, scale, hub dir)})
_V1_16, _V1_128 = "v1_latent16ch", "v1_flux2_latent128ch"
_V15_16, _V15_128 = "v1pt5_latent16ch", "v1pt5_flux2_latent128ch"
_DEP = "checkpoints_deprecated"
_FAMILY_TABLE = {
    _F1: {
        "2k": ("PiD_res2k_sr4x_official_flux_distill_4step", _V1_16, 4, "checkpoints"),
        "2kto4k": ("PiD_res2kto4k_sr4x_official_flux_distill_4step", _V1_16, 4, _DEP),
        "2kto4k_v1pt5": ("PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step", _V15_16, 4, "checkpoints"),
        "undistilled": ("PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled", _V15_16, 4, "checkpoints"),
    },
    _F2: {
        "2k": ("PiD_res2k_sr4x_official_flux2_distill_4step", _V1_128, 4, "checkpoints"),
        "2kto4k": ("PiD_res2kto4k_sr4x_official_flux2_distill_4step_2606", _V1_128, 4, _DEP),
        "2kto4k_v1pt5": ("PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step", _V15_128, 4, "checkpoints"),
        "undistilled": ("PiD_v1pt5_res2kto4k_sr4x_official_flux2_undistilled", _V15_128, 4, "checkpoints"),
    },
    _Q: {
        "2kto4k": ("PiD_res2kto4k_sr4x_official_qwenimage_distill_4step", _V1_16, 4, _DEP),
        "2kto4k_v1pt5": ("PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step", _V15_16, 4, "checkpoints"),
        "undistilled": ("PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_undistilled", _V15_16, 4, "checkpoints"),
    },
    "sd3": {
        "2k": ("PiD_res2k_sr4x_official_sd3_distill_4step", _V1_16, 4, "checkpoints"),
        "2kto4k": ("PiD_res2kto4k_sr4x_official_sd3_distill_4step", _V1_16, 4, "checkpoints"),
    },
    "sdxl": {"2kto4k": ("PiD_res2kto4k_sr4x_official_sdxl_distill_4step", "v1_sdxl_latent4ch", 4, "checkpoints")},
    "dinov2": {"2k": ("PiD_res2k_sr4x_official_dinov2_distill_4step", "v1_dinov2_latent768ch", 4, "checkpoints")},
    "siglip": {"2k": ("PiD_res2k_sr8x_official_siglip_distill_4step", "v1_siglip_latent1152ch_sr8", 8, "checkpoints")},
}
_BACKBONE_FAMILY = {
    "flux": _F1, "zimage": _F1, "zimage-turbo": _F1,
    "flux2": _F2, "flux2-klein-4b": _F2, "flux2-klein-9b": _F2,
    "qwenimage": _Q, "qwenimage-2512": _Q,
    "sd3": "sd3", "sdxl": "sdxl", "dinov2": "dinov2", "siglip": "siglip",
}  # fmt: skip
ALL_PAIRS = sorted(
    (backbone, ckpt_type) for backbone, family in _BACKBONE_FAMILY.items() for ckpt_type in _FAMILY_TABLE[family]
)
# The upstream README's own table (2k / 2kto4k) must be a subset of what we serve.
README_TABLE = {
    **{b: ("2k", "2kto4k") for b in ("flux", "flux2", "flux2-klein-4b", "flux2-klein-9b", "sd3", "zimage",
                                     "zimage-turbo")},
    **{b: ("2kto4k",) for b in ("sdxl", "qwenimage", "qwenimage-2512")},
    **{b: ("2k",) for b in ("dinov2", "siglip")},
}  # fmt: skip


def test_registry_is_exactly_the_table():
    assert set(REGISTRY) == set(ALL_PAIRS)
    for backbone, types in README_TABLE.items():
        assert set(types) <= set(ckpt_types(backbone)), backbone


@pytest.mark.parametrize(("backbone", "ckpt_type"), ALL_PAIRS)
def test_every_pair_builds_and_loads_strictly(backbone, ckpt_type):
    folder, net_config, scale, hub_dir = _FAMILY_TABLE[_BACKBONE_FAMILY[backbone]][ckpt_type]
    record = lookup(backbone, ckpt_type)
    assert (record.backbone, record.folder, record.net_config, record.scale) == (backbone, folder, net_config, scale)
    assert record.hub_path == f"{hub_dir}/{folder}/model_ema_bf16.pth"
    assert record.hub_paths[0] == record.hub_path and len(record.hub_paths) == 2
    assert record.sampler == ("undistilled" if ckpt_type == "undistilled" else "distilled")
    if ckpt_type == "2kto4k":
        assert record.dynamic_shift == (4.0, 1024)
    if hub_dir == _DEP:
        assert record.newer == "2kto4k_v1pt5" and record.deprecated
    else:
        assert record.newer is None and not record.deprecated
    assert f"hf download nvidia/PiD {record.hub_path} --local-dir ." == record.download_command
    # build on meta, then a strict (assign) load of a synthesized state dict in the released names
    skeleton = build_pid_net(record, device="meta")
    assert skeleton.cfg.sr_scale == scale
    state = {f"net.{k}": torch.empty(v.shape, device="meta") for k, v in skeleton.state_dict().items()}
    state["net_ema.extra"] = torch.empty(1, device="meta")  # training extras are dropped
    bare = strip_network_prefix(state)
    check_state_dict(bare, {k: v.shape for k, v in skeleton.state_dict().items()}, net_config)
    skeleton.load_state_dict(bare, strict=True, assign=True)
    assert detect_net_config(bare) == net_config


def test_defaults_follow_the_upstream_readme():
    expected = {b: "2k" for b in README_TABLE} | {"sdxl": "2kto4k", "qwenimage": "2kto4k", "qwenimage-2512": "2kto4k"}
    assert {b: default_ckpt_type(b) for b in README_TABLE} == expected
    assert lookup("qwenimage").folder == "PiD_res2kto4k_sr4x_official_qwenimage_distill_4step"


def _place(root, record, name="model_ema_bf16.pth"):
    folder = root / record.folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"x")
    return folder / name


def test_deprecated_decoders_are_found_in_both_local_layouts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PID_CHECKPOINT_DIR", raising=False)
    record = lookup("zimage-turbo", "2kto4k")
    assert record.folder == "PiD_res2kto4k_sr4x_official_flux_distill_4step"
    # ./checkpoints_deprecated/<folder> (a download made after the move)
    placed = _place(tmp_path / "checkpoints_deprecated", record)
    assert resolve_checkpoint(record) == placed
    placed.unlink()
    # ./checkpoints/<folder> (the June download)
    placed = _place(tmp_path / "checkpoints", record)
    assert resolve_checkpoint(record) == placed
    placed.unlink()
    # a whole-repo copy given as checkpoint_dir, and a `checkpoints` root's sibling folder
    repo = tmp_path / "repo"
    placed = _place(repo / "checkpoints_deprecated", record)
    assert resolve_checkpoint(record, checkpoint_dir=repo) == placed
    monkeypatch.setenv("PID_CHECKPOINT_DIR", str(repo / "checkpoints"))
    assert resolve_checkpoint(record) == placed


def test_offline_message_names_the_current_hub_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PID_CHECKPOINT_DIR", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    record = lookup("flux2", "2kto4k")
    with pytest.raises(CheckpointNotFoundError) as err:
        resolve_checkpoint(record)
    msg = str(err.value)
    assert "\n" not in msg
    assert (
        "hf download nvidia/PiD checkpoints_deprecated/PiD_res2kto4k_sr4x_official_flux2_distill_4step_2606/"
        "model_ema_bf16.pth --local-dir ." in msg
    )


def test_hub_download_tries_the_current_folder_then_the_other(tmp_path, monkeypatch):
    from hub_fakes import entry_not_found

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PID_CHECKPOINT_DIR", raising=False)
    asked = []

    def fake_download(repo, filename, revision=None, **kwargs):
        asked.append((repo, filename, revision))
        if filename.startswith("checkpoints_deprecated/"):
            raise entry_not_found("404")
        return str(tmp_path / "got.pth")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    record = lookup("flux", "2kto4k")
    assert resolve_checkpoint(record, revision="v1") == tmp_path / "got.pth"
    assert asked == [
        ("nvidia/PiD", record.hub_path, "v1"),
        ("nvidia/PiD", f"checkpoints/{record.folder}/model_ema_bf16.pth", "v1"),
    ]
    asked.clear()
    monkeypatch.setattr(
        "huggingface_hub.hf_hub_download",
        lambda *a, **k: (_ for _ in ()).throw(entry_not_found("404")),
    )
    with pytest.raises(CheckpointNotFoundError, match="checkpoints_deprecated/.* or checkpoints/.* is neither"):
        resolve_checkpoint(record)


def test_describe_checkpoint_never_downloads(tmp_path, monkeypatch):
    from pid.checkpoints import describe_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PID_CHECKPOINT_DIR", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: pytest.fail("downloaded"))
    record = lookup("qwenimage", "2kto4k")
    info = describe_checkpoint(record)
    assert info["folder"] == record.folder and info["local_file"] is None and info["newer"] == "2kto4k_v1pt5"
    assert info["hub_file"] == f"checkpoints_deprecated/{record.folder}/model_ema_bf16.pth"
    placed = _place(tmp_path / "checkpoints", record)
    assert describe_checkpoint(record)["local_file"] == str(placed)
    fast = _place(tmp_path / "checkpoints", record, "model_ema_bf16.safetensors")
    assert describe_checkpoint(record)["local_file"] == str(fast)
    explicit = tmp_path / "mine.pth"
    assert describe_checkpoint(record, checkpoint=explicit)["local_file"] is None
    explicit.write_bytes(b"x")
    assert describe_checkpoint(record, checkpoint=explicit)["local_file"] == str(explicit)


# ----------------------------------------------------------------------------------------------
# Checkpoints that carry their own network config
# ----------------------------------------------------------------------------------------------


def _tiny_pth(tmp_path, base="v1_latent16ch"):
    from tiny import tiny_net

    net = tiny_net(base)
    path = tmp_path / "finetune.pth"
    torch.save({f"net.{k}": v.to(torch.bfloat16) for k, v in net.state_dict().items()}, path)
    return net, path


def test_convert_embeds_a_custom_config_and_the_decoder_builds_it(tmp_path):
    import json
    from dataclasses import asdict

    from pid.checkpoints import NET_CONFIG_KEY, load_network_weights, read_checkpoint
    from pid.convert import main
    from pid.decoder import PiDDecoder

    from tiny import tiny_caption_encoder

    net, src = _tiny_pth(tmp_path)
    assert main([str(src)]) == 2  # a custom-size network must be named
    spec = tmp_path / "net.json"
    spec.write_text(json.dumps({"base": "v1_latent16ch", **{k: getattr(net.cfg, k) for k in (
        "hidden_size", "num_heads", "patch_depth", "pixel_hidden_size", "pixel_attn_hidden_size",
        "pixel_num_heads", "text_dim", "adapter_width")}}))  # fmt: skip
    assert main([str(src), "--net-config", str(spec)]) == 0
    out = tmp_path / "finetune.safetensors"
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        assert json.loads(handle.metadata()[NET_CONFIG_KEY])["hidden_size"] == 64
    _, embedded = read_checkpoint(out)
    assert asdict(embedded) == asdict(net.cfg) | {"name": embedded.name}

    cfg, state = load_network_weights(out, lookup("zimage-turbo", "2k"))
    assert cfg.hidden_size == 64 and set(state) == set(net.state_dict())
    decoder = PiDDecoder.from_pretrained(
        "zimage-turbo", "2k", device="cpu", checkpoint=out, text_encoder=tiny_caption_encoder()
    )
    assert decoder.net.cfg.hidden_size == 64
    image = decoder.decode(torch.randn(1, 16, 2, 2), caption="a cat", steps=1)
    assert image.shape == (1, 3, 64, 64)

    # .pth output: a weights_only-loadable top-level entry
    assert main([str(out), str(tmp_path / "again.pth")]) == 0
    raw = torch.load(tmp_path / "again.pth", weights_only=True)
    assert isinstance(raw[NET_CONFIG_KEY], dict) and raw[NET_CONFIG_KEY]["hidden_size"] == 64
    cfg2, _ = load_network_weights(tmp_path / "again.pth", lookup("flux", "2k"))
    assert cfg2 == cfg


def test_embedded_config_must_fit_the_backbone(tmp_path):
    from pid.checkpoints import load_network_weights
    from pid.convert import convert

    from tiny import tiny_config

    _, src = _tiny_pth(tmp_path)
    out = convert(src, net_config=tiny_config())
    with pytest.raises(CheckpointMismatchError) as err:
        load_network_weights(out, lookup("flux2", "2k"))
    msg = str(err.value)
    assert "\n" not in msg and "16-channel" in msg and "128 channels" in msg and "flux2" in msg
    with pytest.raises(CheckpointMismatchError, match="fit"):
        convert(src, tmp_path / "x.safetensors", net_config=tiny_config(hidden_size=128, num_heads=4))


def test_unusable_embedded_config_is_one_line(tmp_path):
    from safetensors.torch import save_file

    from pid.checkpoints import NET_CONFIG_KEY, read_checkpoint

    path = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={NET_CONFIG_KEY: '{"hidden_sise": 3}'})
    with pytest.raises(CheckpointMismatchError, match="unknown network config fields: hidden_sise"):
        read_checkpoint(path)
    save_file({"x": torch.zeros(1)}, str(path), metadata={NET_CONFIG_KEY: "v9_latent"})
    with pytest.raises(CheckpointMismatchError, match="unknown network config 'v9_latent'"):
        read_checkpoint(path)
    save_file({"x": torch.zeros(1)}, str(path), metadata={NET_CONFIG_KEY: "v1_sdxl_latent4ch"})
    assert read_checkpoint(path)[1].latent_channels == 4


@pytest.mark.parametrize("carried, expected", [("undistilled", "undistilled"), ("2kto4k_v1pt5", "2kto4k_v1pt5"),
                                               ("no-such-type", None), (None, None)])
def test_an_exported_decoder_names_its_own_sampler(tmp_path, carried, expected):
    """A pid.train export says whether it is a teacher (undistilled) or a student; a type the backbone lacks, or
    none, is not followed (the backbone's default applies)."""
    from safetensors.torch import save_file

    from pid.checkpoints import carried_ckpt_type

    decoder = tmp_path / "mine.safetensors"
    save_file({"w": torch.zeros(1)}, str(decoder), metadata={"pid.ckpt_type": carried} if carried else None)
    assert carried_ckpt_type(decoder, "flux") == expected


def test_the_cli_follows_the_decoder_files_sampler_unless_pid_ckpt_type_is_given(tmp_path):
    """Without pid_ckpt_type= the CLI follows the file (a teacher export runs the undistilled sampler, not
    silently the 4-step one); an explicit pid_ckpt_type= wins; a file that names nothing gets the default."""
    from safetensors.torch import save_file

    from cli_driver import dry_run

    image = Path(__file__).resolve().parents[1] / "assets" / "coffee.jpg"
    teacher, plain = tmp_path / "teacher.safetensors", tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(teacher), metadata={"pid.ckpt_type": "undistilled"})
    save_file({"w": torch.zeros(1)}, str(plain))
    for decoder, extra, expected in ((teacher, (), "undistilled"), (teacher, ("pid_ckpt_type=2k",), "2k"),
                                     (plain, (), "2k")):
        plan = dry_run("pid.inference.from_clean", "backbone=flux", f"pid_checkpoint={decoder}",
                       f"input_path={image}", *extra, cwd=tmp_path)
        assert plan["ckpt_type"] == expected, (decoder.name, extra)
