"""Validation records for the multi-process tests: a held-out set whose images' places differ from their
manifest lines, and the check that a 2-rank run's val.jsonl holds what one process's does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train_harness import make_images

HELD_OUT_IDS = ["000_img0", "002_img1", "003_img2"]  # the readable ones, in manifest order


def held_out_with_an_unreadable_image(work: Path) -> Path:
    """Three readable held-out images and, second in the manifest, one that is not (rank 1's first share; a
    truncated file, skipped with a warning): the images' places in the set, their decode seeds, differ from
    their manifest lines."""
    make_images(work / "held", count=3)
    (work / "held" / "gone.png").write_bytes((work / "held" / "img0.png").read_bytes()[:40])
    lines = [{"image": "held/img0.png", "prompt": "a red fox"}, {"image": "held/gone.png", "prompt": "gone"},
             {"image": "held/img1.png", "prompt": "a blue lake, 湖"}, {"image": "held/img2.png", "prompt": ""}]
    manifest = work / "val.jsonl"
    manifest.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return manifest


def val_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "val.jsonl").read_text(encoding="utf-8").splitlines()]


def _same_scores(two: dict, one: dict, where: str) -> None:
    assert two.keys() == one.keys(), where
    for key, value in one.items():  # PSNR in dB, SSIM, ΔE: the two runs' weights agree to fp32 rounding
        assert two[key] == pytest.approx(value, abs=0.02), f"{where} {key}"


def assert_same_validation(two_dir: Path, one_dir: Path, weights: tuple[str, ...], saved: int) -> list[dict]:
    """The 2-rank run's val.jsonl holds what the 1-rank run's does: the same rows, every readable image in
    manifest order, the first `saved` images' decodes on disk, scores equal to rounding. Returns its rows."""
    two, one = val_rows(two_dir), val_rows(one_dir)
    assert [(r["step"], r["sigma"]) for r in two] == [(r["step"], r["sigma"]) for r in one] and len(one) >= 2
    for row_two, row_one in zip(two, one):
        where = f"step {row_one['step']} σ {row_one['sigma']}"
        assert [e["id"] for e in row_two["per_image"]] == [e["id"] for e in row_one["per_image"]] == HELD_OUT_IDS
        for name in weights:
            _same_scores(row_two[name], row_one[name], f"{where} {name}")
            for a, b in zip(row_two["per_image"], row_one["per_image"]):
                _same_scores(a[name], b[name], f"{where} {name} {a['id']}")
        assert list(row_two["images"]) == list(row_one["images"]) == HELD_OUT_IDS[:saved], where
        for path in row_two["images"].values():
            assert (two_dir / path).is_file(), path
    return two
