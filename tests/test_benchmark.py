"""benchmarks/decode.py in its CPU mode: runs in seconds, writes JSON + markdown."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pid_decode_benchmark", ROOT / "benchmarks" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_tiny_run_writes_json_and_markdown(bench, tmp_path):
    argv = ["--device", "cpu", "--config", "tiny", "--sizes", "128x128", "--batch", "1,2"]
    report = bench.main([*argv, "--runs", "1", "--warmup", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "decode_benchmark.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert data["environment"]["torch"] and "git_commit" in data["environment"]
    assert data["settings"]["config"] == "tiny" and data["settings"]["steps"] == 4
    rows = data["results"]
    assert [(r["size"], r["batch"], r["mode"]) for r in rows] == [
        ("128x128", 1, "full"),
        ("128x128", 2, "full"),
    ]
    for r in rows:
        assert r["median_s"] > 0 and r["peak_activation_bytes"] > 0
        assert 0.8 < r["estimate_over_measured"] < 1.2
        assert r["vae"]["median_s"] > 0 and r["vae"]["output"] == "32x32"
    md = (tmp_path / "decode_benchmark.md").read_text()
    assert "| size | batch | mode | PiD s |" in md and "| 128x128 | 2 | full |" in md
    assert "torch " in md and "cores" in md


def test_cpu_tiled_and_chunked_modes(bench, tmp_path):
    argv = ["--device", "cpu", "--config", "tiny", "--sizes", "128x192", "--batch", "1", "--no-vae"]
    argv += [
        "--runs",
        "1",
        "--warmup",
        "0",
        "--tile",
        "128",
        "--overlap",
        "64",
        "--chunk",
        "16",
        "--out",
        str(tmp_path),
    ]
    (row,) = bench.main(argv)["results"]
    assert row["mode"] == "tiled" and row["tile"] == 128 and row["chunk"] == 16
    assert "vae" not in row and row["median_s"] > 0
    assert "| 128x192 | 1 | tiled 128/64 chunk 16 |" in (tmp_path / "decode_benchmark.md").read_text()


@pytest.mark.skipif(
    not os.environ.get("PID_REFERENCE_CHECKOUT"),
    reason="set PID_REFERENCE_CHECKOUT to an nv-tlabs/PiD checkout",
)
def test_reference_mode(bench, tmp_path):
    argv = ["--device", "cpu", "--config", "tiny", "--sizes", "128x128", "--batch", "1", "--no-vae"]
    argv += ["--runs", "1", "--reference", os.environ["PID_REFERENCE_CHECKOUT"], "--out", str(tmp_path)]
    (row,) = bench.main(argv)["results"]
    ref = row["reference"]
    assert ref["max_abs_diff_vs_ours"] < 1e-4
    assert ref["time_ratio_ours_over_ref"] > 0 and ref["peak_ratio_ours_over_ref"] > 0
