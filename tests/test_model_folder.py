"""pipelines.check_model_folder: a local LDM folder is checked before anything loads."""

import json

import pytest

from pid.errors import CheckpointNotFoundError, ConfigError
from pid.inference.pipelines import check_model_folder, get_pipeline_spec, load_pipeline


def _folder(tmp_path, class_name, name="pipe"):
    folder = tmp_path / name
    folder.mkdir()
    if class_name is not None:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42"}))
    return folder


def test_matching_folder_and_hub_ids_pass(tmp_path):
    check_model_folder("flux", _folder(tmp_path, "FluxPipeline"))
    check_model_folder("flux2-klein-9b", _folder(tmp_path, "Flux2KleinPipeline", "klein"))
    check_model_folder("flux", None)
    check_model_folder("flux", "black-forest-labs/FLUX.1-schnell")  # a hub id: checked when downloaded


def test_wrong_pipeline_class_names_it_and_the_backbone_it_fits(tmp_path):
    folder = _folder(tmp_path, "ZImagePipeline")
    with pytest.raises(ConfigError) as err:
        check_model_folder("flux", folder)
    msg = str(err.value)
    assert "\n" not in msg and "ZImagePipeline" in msg and "FluxPipeline" in msg
    assert "zimage / zimage-turbo" in msg
    with pytest.raises(ConfigError, match="no PiD backbone uses that class"):
        check_model_folder("sdxl", _folder(tmp_path, "StableDiffusionPipeline", "sd15"))


def test_folder_without_model_index_and_missing_folder(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no model_index.json"):
        check_model_folder("sd3", _folder(tmp_path, None))
    bad = _folder(tmp_path, None, "broken")
    (bad / "model_index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable model_index.json"):
        check_model_folder("sd3", bad)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        check_model_folder("sd3", tmp_path / "nope")
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path, "QwenImagePipeline", "relative")
    with pytest.raises(ConfigError, match="qwenimage / qwenimage-2512"):
        check_model_folder("sdxl", "relative")  # an existing relative folder counts as local


def test_load_pipeline_checks_before_loading(tmp_path, monkeypatch):
    import diffusers

    monkeypatch.setattr(diffusers.FluxPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ConfigError, match="ZImagePipeline"):
        load_pipeline(get_pipeline_spec("flux"), _folder(tmp_path, "ZImagePipeline"), device="cpu")
