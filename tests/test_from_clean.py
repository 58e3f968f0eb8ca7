"""from_clean end to end: tiny VAE + tiny PiD, metrics/report/grids, bad images, resume, flags."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from pid.errors import ConfigError
from pid.inference.from_clean import load_config, plan_run, run
from pid.latents import get as get_space

from tiny import tiny_decoder
from tiny_vaes import tiny_autoencoder_kl


def _write_images(folder):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (32, 40, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (folder / "empty.jpg").write_bytes(b"")
    Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(folder / "tiny.png")
    lines = [
        {"image": "imgs/rgb.png", "prompt": "a red fox in snow"},
        {"image": "imgs/gray.png"},
        {"image": "imgs/rgba.png", "prompt": "a cat"},
        {"image": "imgs/corrupt.png", "prompt": "x"},
        {"image": "imgs/missing.png", "prompt": "x"},
        {"image": "imgs/empty.jpg", "prompt": "x"},
        {"image": "imgs/tiny.png", "prompt": "x"},
    ]
    manifest = folder.parent / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return manifest


@pytest.fixture()
def setup(tmp_path):
    manifest = _write_images(tmp_path / "data" / "imgs")
    space = get_space("sd3").attach(tiny_autoencoder_kl(latent_channels=16))
    return manifest, space, tiny_decoder("sd3", "2k")


def test_end_to_end_metrics_grids_and_bad_images(setup, tmp_path):
    manifest, space, decoder = setup
    cfg = load_config(["backbone=sd3", f"manifest={manifest}", "degrade_sigmas=[0.3,0]", "pid_steps=1",
                       f"output_dir={tmp_path / 'out'}", "device=cpu", "prompt=fallback caption"])
    summary = run(cfg, decoder=decoder, latent_space=space)
    out = next((tmp_path / "out").iterdir())
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    # 3 good images x 2 sigmas x 2 decoders
    assert len(rows) == 12
    assert {r["decoder"] for r in rows} == {"vae", "pid"} and {float(r["sigma"]) for r in rows} == {0.0, 0.3}
    for r in rows:
        assert 0 < float(r["psnr"]) < 100 and -1 <= float(r["ssim"]) <= 1 and float(r["delta_e2000"]) >= 0
    reasons = {json.dumps(f) for f in summary["failures"]}
    assert len(summary["failures"]) == 4, reasons
    assert any("corrupt.png" in r and "cannot be decoded" in r for r in reasons)
    assert any("missing.png" in r and "does not exist" in r for r in reasons)
    assert any("empty.jpg" in r and "empty" in r for r in reasons)
    assert any("tiny.png" in r and "smaller" in r for r in reasons)
    assert set(summary["means"]) == {"0.000", "0.300"}
    saved = json.loads((out / "summary.json").read_text())
    assert saved["means"]["0.300"]["pid"]["count"] == 3
    grid = np.asarray(Image.open(out / "grid" / "sigma_0.300" / "00000000_rgb.png"))
    # rgb.png 56x40 -> centre crop to 48x32 (sd3 needs multiples of 16) -> PiD 4x: 192x128; 3 panels x 2 rows
    assert grid.shape == (2 * 128 + 4, 3 * 192 + 8, 3)
    assert (out / "pid" / "sigma_0.000" / "00000001_gray.png").is_file()
    assert (out / "input" / "00000002_rgba.png").is_file()
    assert (out / "report.html").is_file() and (out / "failures.jsonl").is_file()


def test_noise_changes_outputs_and_resume_skips(setup, tmp_path):
    manifest, space, decoder = setup
    args = ["backbone=sd3", f"manifest={manifest}", "degrade_sigmas=[0,0.5]", "pid_steps=1",
            f"output_dir={tmp_path / 'out'}", "device=cpu"]
    run(load_config(args), decoder=decoder, latent_space=space)
    out = next((tmp_path / "out").iterdir())
    clean = np.asarray(Image.open(out / "vae" / "sigma_0.000" / "00000000_rgb.png"), dtype=float)
    noisy = np.asarray(Image.open(out / "vae" / "sigma_0.500" / "00000000_rgb.png"), dtype=float)
    assert np.abs(clean - noisy).mean() > 1.0
    first = (out / "metrics.csv").read_text()

    calls = []
    original = decoder.decode
    decoder.decode = lambda *a, **k: calls.append(1) or original(*a, **k)
    run(load_config(args), decoder=decoder, latent_space=space)
    assert calls == []  # every good image was done; bad ones are retried but fail before decoding
    assert (out / "metrics.csv").read_text() == first


def test_validation_errors():
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        plan_run(load_config(["backbone=flux", "input_path=x.png", "degrade_sigmas=[1.5]"]))
    with pytest.raises(ConfigError, match="exactly one of"):
        plan_run(load_config(["backbone=flux"]))
    cfg = load_config(["--backbone", "sd3", "--input_path", "a.png", "--degrade_sigmas", "0", "0.3", "--seed", "7"])
    assert list(cfg.degrade_sigmas) == [0, 0.3] and cfg.seed == 7 and cfg.input_path == "a.png"


def test_dinov2_backbone_resizes_internally_and_reports_metrics(tmp_path):
    from test_latents_models import tiny_rae

    from pid.checkpoints import lookup
    from pid.decoder import PiDDecoder

    from tiny import tiny_caption_encoder, tiny_net

    manifest = _write_images(tmp_path / "data" / "imgs")
    space = get_space("dinov2").attach(tiny_rae())
    record = lookup("dinov2", "2k")
    decoder = PiDDecoder(tiny_net(record.net_config, latent_channels=16), record, tiny_caption_encoder())
    cfg = load_config(["backbone=dinov2", f"manifest={manifest}", "pid_steps=1", "scale=1",
                       f"output_dir={tmp_path / 'out'}", "device=cpu"])
    summary = run(cfg, decoder=decoder, latent_space=space)
    out = next((tmp_path / "out").iterdir())
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 6 and len(summary["failures"]) == 4
    # the encoder sees 448 px whatever the input; its 32x32 grid decodes to 512 px (PiD x1 here)
    assert {r["output_size"] for r in rows} == {"512x512"}
    assert rows[0]["input_size"] == "48x32"
