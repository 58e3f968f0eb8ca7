"""Image/prompt/manifest reading, atomic writes, names and the comparison image."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from loguru import logger
from PIL import Image

from pid.errors import InputError
from pid.inference import io as pio


@pytest.fixture
def warnings_log():
    messages: list[str] = []
    logger.enable("pid")  # the library is quiet by default; these tests read its warnings
    handler = logger.add(lambda m: messages.append(str(m)), level="WARNING", format="{message}")
    yield messages
    logger.remove(handler)
    logger.disable("pid")


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "deep" / "out.bin"
    pio.atomic_write_bytes(target, b"first")
    pio.atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert _no_temp_files(target.parent)


def test_failed_write_keeps_old_file_and_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    pio.write_json(target, {"v": 1})

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        pio.write_json(target, {"v": 2})
    with pytest.raises(OSError):
        pio.write_image(tmp_path / "new.png", _rgb(8, 8))
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert not (tmp_path / "new.png").exists()
    assert _no_temp_files(tmp_path)


def test_write_json_and_csv(tmp_path):
    pio.write_json(tmp_path / "a.json", {"path": Path("x/y"), "psnr": float("inf"), "t": torch.tensor([1.5])})
    assert json.loads((tmp_path / "a.json").read_text()) == {"path": "x/y", "psnr": "inf", "t": [1.5]}
    pio.write_csv(tmp_path / "m.csv", [{"id": "0", "psnr": 30.5}, {"id": "1", "ssim": 0.9}])
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines == ["id,psnr,ssim", "0,30.5,", "1,,0.9"]


def test_append_jsonl_concurrent_and_after_torn_line(tmp_path):
    path = tmp_path / "metadata.jsonl"
    path.write_bytes(b'{"torn": ')  # a crash mid-line earlier

    def writer(worker: int) -> None:
        for i in range(40):
            pio.append_jsonl(path, {"worker": worker, "i": i, "text": "x" * 200})

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"torn": '
    records = [json.loads(line) for line in lines[1:]]
    assert sorted((r["worker"], r["i"]) for r in records) == [(w, i) for w in range(4) for i in range(40)]


def test_jsonl_round_trips_non_finite_floats(tmp_path):
    path = tmp_path / "rows.jsonl"
    pio.append_jsonl(path, {"psnr": float("inf"), "ssim": 1.0, "id": "a"})
    assert '"inf"' in path.read_text()  # strict JSON on disk
    assert pio.read_jsonl(path) == [{"psnr": float("inf"), "ssim": 1.0, "id": "a"}]
    assert pio.read_jsonl(path, restore_non_finite=False)[0]["psnr"] == "inf"


def test_read_jsonl_names_bad_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n\n{bad\n')
    with pytest.raises(InputError, match="line 3"):
        pio.read_jsonl(path)


# ----------------------------------------------------------------------------------------------------------------
# Image reading: the bad-image corpus


def _png_bytes(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", array)
    assert ok
    return encoded.tobytes()


@pytest.mark.parametrize(
    "name, make",
    [
        ("missing.png", None),
        ("empty.png", lambda: b""),
        ("garbage.png", lambda: b"this is not an image at all" * 10),
        ("truncated.png", lambda: _png_bytes(_rgb(64, 64))[:300]),
        ("truncated.jpg", lambda: cv2.imencode(".jpg", _rgb(64, 64))[1].tobytes()[:400]),
        ("header_only.png", lambda: b"\x89PNG\r\n\x1a\n"),
    ],
)
def test_bad_images_raise_one_line_input_error(tmp_path, name, make):
    path = tmp_path / name
    if make is not None:
        path.write_bytes(make())
    with pytest.raises(InputError) as info:
        pio.read_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(InputError, match="not a file"):
        pio.read_image(tmp_path)


def test_grayscale_image_becomes_rgb(tmp_path, warnings_log):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = pio.read_image(tmp_path / "g.png")
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    assert (out == gray[..., None]).all()
    assert any("converted" in m for m in warnings_log)


def test_rgba_is_composited_over_white(tmp_path, warnings_log):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = pio.read_image(tmp_path / "a.png")
    assert (out[:2] == [200, 0, 0]).all()
    assert (out[2:] == 255).all()
    assert any("alpha" in m for m in warnings_log)


def test_16bit_images(tmp_path, warnings_log):
    gray16 = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    out = pio.read_image(tmp_path / "g16.png")
    assert out.shape == (4, 5, 3)
    assert (out[..., 0] == (gray16 >> 8)).all()

    rgb16 = (np.arange(60, dtype=np.uint16).reshape(4, 5, 3) * 1000).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])  # cv2 writes BGR
    out = pio.read_image(tmp_path / "rgb16.png")
    assert (out == (rgb16 >> 8)).all()
    assert sum("16-bit" in m for m in warnings_log) == 2


def test_palette_and_cmyk_images(tmp_path):
    Image.fromarray(_rgb(8, 8)).convert("P").save(tmp_path / "p.png")
    Image.fromarray(_rgb(8, 8)).convert("CMYK").save(tmp_path / "c.jpg")
    assert pio.read_image(tmp_path / "p.png").shape == (8, 8, 3)
    assert pio.read_image(tmp_path / "c.jpg").shape == (8, 8, 3)


def test_tiny_image_is_rejected_by_crop(tmp_path):
    Image.fromarray(_rgb(8, 40)).save(tmp_path / "tiny.png")
    with pytest.raises(InputError, match="smaller than the required multiple of 16"):
        pio.load_image(tmp_path / "tiny.png")
    assert pio.load_image(tmp_path / "tiny.png", multiple=8).shape == (1, 3, 8, 40)


def test_load_image_crop_range_and_downsize(tmp_path):
    image = _rgb(37, 70)
    Image.fromarray(image).save(tmp_path / "x.png")
    tensor = pio.load_image(tmp_path / "x.png")
    assert tensor.shape == (1, 3, 32, 64) and tensor.dtype == torch.float32
    top, left = (37 - 32) // 2, (70 - 64) // 2
    expected = torch.from_numpy(image[top : top + 32, left : left + 64]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(tensor[0], expected)
    unit = pio.load_image(tmp_path / "x.png", signed=False)
    assert 0.0 <= unit.min() and unit.max() <= 1.0
    small = pio.load_image(tmp_path / "x.png", max_side=35)  # 70x37 -> 35x18 (area) -> crop 32x16
    assert small.shape == (1, 3, 16, 32)


# ----------------------------------------------------------------------------------------------------------------
# Image writing


def test_uint8_conversion_truncates():
    signed = torch.tensor([-1.0, 0.0, 0.999, 1.0, 5.0]).view(1, 1, 5).expand(3, 1, 5)
    assert pio.signed_to_uint8(signed)[0, :, 0].tolist() == [0, 127, 254, 255, 255]
    unit = torch.tensor([0.0, 0.5, 0.999, 1.0, -2.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert pio.unit_to_uint8(unit)[0, :, 0].tolist() == [0, 127, 254, 255, 0]
    video_layout = torch.zeros(3, 1, 2, 2)  # [C, 1, H, W] from the 5-D tokenizers
    assert pio.signed_to_uint8(video_layout).shape == (2, 2, 3)


def test_png_round_trip_is_exact_and_jpg_is_close(tmp_path):
    image = _rgb(16, 24)
    pio.write_image(tmp_path / "a.png", image)
    assert (pio.read_image(tmp_path / "a.png") == image).all()
    smooth = np.tile(np.linspace(0, 255, 24, dtype=np.uint8)[None, :, None], (16, 1, 3))
    pio.write_image(tmp_path / "a.jpg", smooth)
    assert np.abs(pio.read_image(tmp_path / "a.jpg").astype(int) - smooth).max() <= 8
    with pytest.raises(ValueError, match="unsupported"):
        pio.write_image(tmp_path / "a.gif", image)
    assert _no_temp_files(tmp_path)


def test_comparison_image(tmp_path):
    baseline = torch.full((1, 3, 16, 24), 0.25)
    pid = torch.full((3, 64, 96), 0.75)
    canvas = pio.make_comparison(baseline, pid, separator=4)
    assert canvas.shape == (64, 2 * 96 + 4, 3) and canvas.dtype == np.uint8
    assert (canvas[-1, 0] == 63).all()  # baseline upscaled (uniform stays uniform)
    assert (canvas[-1, -1] == 191).all()
    assert (canvas[:, 96:100] == 255).all()  # separator
    assert (canvas[:20, :60] != 63).any()  # a label was drawn


# ----------------------------------------------------------------------------------------------------------------
# Prompt files and manifests


def test_prompt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\ufeff# comment\n  a red fox  \n\n   \nsecond prompt\n#another\n", encoding="utf-8")
    assert pio.read_prompt_file(path) == ["a red fox", "second prompt"]
    (tmp_path / "empty.txt").write_text("\n# only comments\n\n")
    with pytest.raises(InputError, match="no prompts"):
        pio.read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="does not exist"):
        pio.read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputError, match="UTF-8"):
        pio.read_prompt_file(tmp_path / "bin.txt")


def test_manifest_paths_and_prompts(tmp_path):
    folder = tmp_path / "data"
    (folder / "imgs").mkdir(parents=True)
    manifest = folder / "m.jsonl"
    manifest.write_text(
        json.dumps({"image": "imgs/a.png", "prompt": " a cat "})
        + "\n\n"
        + json.dumps({"image": str(tmp_path / "abs.jpg")})
        + "\n"
    )
    entries = pio.read_manifest(manifest)
    assert [e.image for e in entries] == [folder.resolve() / "imgs/a.png", tmp_path / "abs.jpg"]
    assert [e.prompt for e in entries] == ["a cat", None]
    assert [e.line for e in entries] == [1, 3]
    with pytest.raises(InputError, match="line 1: image .* does not exist"):
        pio.read_manifest(manifest, check_images=True)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"image": "a.png"}\n{not json}\n', "line 2 is not valid JSON"),
        ('{"prompt": "x"}\n', 'line 1 has no "image"'),
        ('["a.png"]\n', "line 1 is not a JSON object"),
        ('{"image": "a.png", "prompt": 3}\n', "line 1"),
        ("\n\n", "no entries"),
    ],
)
def test_manifest_errors(tmp_path, content, message):
    path = tmp_path / "m.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        pio.read_manifest(path)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# Names, tags, resume


def test_names():
    assert pio.sample_name(7) == "00000007"
    assert pio.step_label(7) == "07xt" and pio.step_label(46) == "46xt" and pio.step_label(None) == "x0"
    assert pio.step_dir("x0") == "step_x0"
    assert pio.sigma_dir(0.3) == "sigma_0.300"


def test_run_tag():
    tag = pio.build_run_tag(
        "flux",
        "checkpoints/PiD_res2k_sr4x_official_flux_distill_4step/model_ema_bf16.pth",
        pid_steps=4,
        weights="ema",
    )
    assert tag == "flux_PiD_res2k_sr4x_official_flux_distill_4step_model_ema_bf16_steps4_ema"
    dcp = pio.build_run_tag(
        "sd3", "/runs/exp1/checkpoints/iter_000100", pid_steps=2, cfg_scale=1.0, note="a b/c"
    )
    # the note lost characters on its way to a folder name: a short hash of it keeps other notes apart
    assert re.fullmatch(r"sd3_exp1_iter_000100_cfg1\.0_steps2_note_a-b-c-[0-9a-f]{8}", dcp)
    assert pio.build_run_tag("sd3", "x.pth", pid_steps=2, note="a-b") == "sd3_x_steps2_note_a-b"


def test_should_skip(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert not pio.should_skip([a, b], overwrite=False)
    a.write_bytes(b"x")
    assert not pio.should_skip([a, b], overwrite=False)
    b.write_bytes(b"")  # an empty file is not a finished output
    assert not pio.should_skip([a, b], overwrite=False)
    b.write_bytes(b"y")
    assert pio.should_skip([a, b], overwrite=False)
    assert not pio.should_skip([a, b], overwrite=True)
    assert not pio.should_skip([], overwrite=False)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    from PIL import Image

    from pid.inference.io import load_image, read_image

    upright = np.zeros((4, 6, 3), dtype=np.uint8)
    upright[0, 0] = (255, 0, 0)  # a red corner top-left, a green one top-right: any turn or flip moves them
    upright[0, 5] = (0, 255, 0)
    # what a camera stores for each EXIF orientation: the inverse of the turn a viewer applies
    stored_as = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
                 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}[orientation]
    image = Image.fromarray(upright)
    if stored_as is not None:
        image = image.transpose(stored_as)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    image.save(path, exif=exif.tobytes())
    assert np.array_equal(read_image(path), upright)
    assert load_image(path, multiple=2).shape == (1, 3, 4, 6)
