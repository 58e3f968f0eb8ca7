"""Registry, file resolution, safe loading, config detection and conversion."""

import os
import pickle

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
    assert len({r.folder for r in REGISTRY.values()}) == 13  # 10 distilled + 3 undistilled files


def test_aliases_share_files_and_keep_their_name():
    z = lookup("zimage-turbo", "2k")
    assert z.backbone == "zimage-turbo" and z.folder == lookup("flux", "2k").folder
    assert lookup("flux2-klein-9b", "2kto4k_v1pt5").net_config == "v1pt5_flux2_latent128ch"
    assert lookup("siglip", "2k").scale == 8
    assert lookup("sdxl").ckpt_type == "2kto4k" and default_ckpt_type("qwenimage") == "2kto4k_v1pt5"
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
    assert "zimage-turbo" in backbones() and ckpt_types("flux") == ["2k", "2kto4k_v1pt5", "undistilled"]


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
    with pytest.raises(CheckpointMismatchError, match="refusing to unpickle|not a readable"):
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
    assert resolve_hub_path("sd3_vae", is_dir=True) == tmp_path / "checkpoints" / "sd3_vae"
    with pytest.raises(CheckpointNotFoundError, match="hf download nvidia/PiD checkpoints/ae.safetensors"):
        resolve_hub_path("ae.safetensors")


def test_convert_cli_writes_safetensors_with_same_names(tmp_path):
    from pid.convert import main

    _, state = _tiny_state()
    src = tmp_path / "model_ema_bf16.pth"
    torch.save(state, src)
    assert main([str(src)]) == 0
    out = read_checkpoint_file(tmp_path / "model_ema_bf16.safetensors")
    assert set(out) == set(state)
    assert all(torch.equal(out[k], state[k]) for k in state)
    assert main([str(src)]) == 2  # refuses to overwrite silently
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
