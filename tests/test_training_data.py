"""Training data: the reference's buckets (goldens), caption sampling, the three sources, skipped images, rank
sharding and resuming. Tiny images on the CPU; no model."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pid.errors import ConfigError
from pid.training.buckets import IMAGE_RES_SIZE_INFO, BucketSpec, multires_grid
from pid.training.data import (
    SkipLog,
    TrainLoader,
    build_index,
    load_pixels,
    pick_caption_field,
    place_pixels,
)
from pid.training.loaders import describe_data, open_loader

GOLDEN = json.loads((Path(__file__).parent / "data" / "training_golden" / "data_buckets.json").read_text())


# ------------------------------------------------------------------------------------------------------------
# Buckets against the reference's numbers


def test_bucket_tables_equal_the_reference():
    table = {res: {ar: tuple(wh) for ar, wh in per.items()} for res, per in GOLDEN["IMAGE_RES_SIZE_INFO(W,H)"].items()}
    assert table == IMAGE_RES_SIZE_INFO
    grids = GOLDEN["multires_grid(level,W,H) [multi_resolution_aspect_ratio._build_grid]"]
    assert set(grids) == {"3072", "3840", "4096"}
    for max_res, grid in grids.items():
        assert multires_grid(int(max_res)) == {ar: [tuple(e) for e in entries] for ar, entries in grid.items()}


@pytest.mark.parametrize("max_res", ["3072", "3840", "4096"])
def test_multires_level_choice_resize_and_crop_equal_the_reference(max_res):
    spec = BucketSpec("multires", int(max_res))
    for example in GOLDEN["multires_examples"][max_res]:
        native = tuple(example["native_WxH"])
        placement = spec.place(*native)
        if example.get("dropped"):
            assert placement is None, native
            continue
        assert placement.bucket == example["bucket_key"]
        assert placement.crop == tuple(example["target_crop_WxH"])
        assert placement.resize_or(native) == tuple(example["lanczos_resize_WxH_before_center_crop"])
        assert placement.crop_offset(native) == tuple(example["center_crop_offset_xy"])


def test_fixed_2048_aspect_ratio_adaptive_resize_and_rescue_equal_the_reference():
    spec = BucketSpec("fixed", 2048)
    actions = set()
    for example in GOLDEN["fixed_res_2048_examples"]:
        native = tuple(example["native_WxH"])
        placement = spec.place(*native)
        action = example.get("action", "resize")
        actions.add(action)
        if action == "dropped":
            assert placement is None, native
            continue
        assert placement.bucket == example["aspect_ratio"]
        assert placement.crop == tuple(example["crop_WxH"])
        expected = example.get("rescue_resize_WxH", example["adaptive_resize_WxH"])
        assert placement.resize_or(native) == tuple(expected), native
        assert placement.rescued == (action == "lanczos upscale (rescue)")
    assert actions == {"resize", "dropped", "lanczos upscale (rescue)"}  # the golden covers all three paths


def test_small_buckets_are_multiples_of_64_and_bad_resolutions_are_one_line_errors():
    for spec in (BucketSpec(resolution=256), BucketSpec(resolution=512), BucketSpec("multires", 512)):
        for width, height in spec.buckets().values():
            assert width % 64 == 0 and height % 64 == 0 and width >= 64 and height >= 64
    assert BucketSpec(resolution=256).place(256, 256).bucket == "1,1"
    assert BucketSpec("multires", 512).place(600, 600).bucket == "L512_1,1"
    for bad in (dict(resolution=100), dict(mode="multires", resolution=2560), dict(mode="tiles")):
        with pytest.raises(ConfigError):
            BucketSpec(**bad)


def test_caption_fields_are_drawn_one_to_one_to_one_as_the_reference():
    golden = GOLDEN["caption_field_counts_3000_draws_random.seed0"]
    rng = random.Random(0)
    fields = (("prompt", "long"), ("prompt_medium", "medium"), ("prompt_short", "short"))
    counts = {name: 0 for name, _ in fields}
    for _ in range(3000):
        counts[pick_caption_field(fields, rng)] += 1
    assert counts == golden
    # absent fields are never drawn
    assert {pick_caption_field((("prompt_short", "s"),), rng) for _ in range(20)} == {"prompt_short"}


# ------------------------------------------------------------------------------------------------------------
# Sources


def _image_bytes(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _folder(tmp_path: Path, sizes: list[tuple[int, int]], captions: bool = True) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (w, h) in enumerate(sizes):
        (folder / f"img{i:02d}.png").write_bytes(_image_bytes(w, h, i))
        if captions:
            (folder / f"img{i:02d}.txt").write_text(f"caption {i}\n")
    return folder


def test_folder_source_pixels_are_the_lanczos_resize_and_centre_crop_in_minus_one_one(tmp_path):
    folder = _folder(tmp_path, [(400, 300), (256, 256)])
    index = build_index(folder, BucketSpec(resolution=256))
    assert [i.key for i in index.items] == ["img00", "img01"]
    assert [p.bucket for p in index.placements] == ["4,3", "1,1"]
    pixels = load_pixels(index.items[0], index.placements[0])
    assert pixels.shape == (3, 192, 320) and pixels.dtype == torch.float32
    # the reference: PIL Lanczos to 320x240, to_tensor, (x - 0.5) / 0.5, centre crop rows 24..216
    resized = np.asarray(Image.open(folder / "img00.png").convert("RGB").resize((320, 240), Image.Resampling.LANCZOS))
    expected = (torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.equal(pixels, expected[:, 24:216, :])
    assert pixels.min() >= -1 and pixels.max() <= 1
    untouched = load_pixels(index.items[1], index.placements[1])  # already the crop size: no resize
    native = np.asarray(Image.open(folder / "img01.png").convert("RGB"))
    assert torch.equal(untouched, place_pixels(native, index.placements[1]))


def test_manifest_source_reads_every_caption_field_and_resolves_paths_like_from_clean(tmp_path, monkeypatch):
    folder = _folder(tmp_path, [(256, 256), (256, 256)], captions=False)
    manifest = tmp_path / "lists" / "train.jsonl"
    manifest.parent.mkdir()
    lines = [{"image": str(folder / "img00.png"), "prompt": "long one", "prompt_short": "short one"},
             {"image": "images/img01.png", "prompt": "second", "prompt_medium": "", "prompt_short": "s2"}]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    monkeypatch.chdir(tmp_path)  # "images/img01.png" is not beside the manifest: found from the working folder
    index = build_index(manifest, BucketSpec(resolution=256))
    assert [i.caption_dict for i in index.items] == [{"prompt": "long one", "prompt_short": "short one"},
                                                     {"prompt": "second", "prompt_short": "s2"}]
    assert Path(index.items[1].path) == tmp_path / "images" / "img01.png"


def _write_webdataset(root: Path, ratio_dir: str, samples: list[tuple[str, bytes, dict]]) -> None:
    import webdataset as wds

    sub = root / ratio_dir
    for data_key in ("image", "caption"):
        (sub / data_key / "part_000000").mkdir(parents=True)
    with wds.TarWriter(str(sub / "image" / "part_000000" / "000000.tar")) as images, \
            wds.TarWriter(str(sub / "caption" / "part_000000" / "000000.tar")) as captions:
        for key, image, caption in samples:
            images.write({"__key__": key, "png": image})
            captions.write({"__key__": key, "json": json.dumps(caption).encode()})
    info = {"data_keys": ["caption", "image"], "data_list": ["part_000000/000000.tar"],
            "data_list_key_count": [len(samples)], "root": "/nowhere/else", "total_key_count": len(samples)}
    (sub / "wdinfo.json").write_text(json.dumps(info))


def test_webdataset_source_reads_aligned_tars_and_only_the_trained_aspect_ratios(tmp_path):
    root = tmp_path / "wds"
    _write_webdataset(root, "aspect_ratio_1_1", [
        ("ds__a", _image_bytes(256, 256, 1), {"prompt": "first", "prompt_medium": "m"}),
        ("ds__b", _image_bytes(300, 290, 2), {"caption": {"prompt": "nested", "prompt_short": "ns"}}),
    ])
    _write_webdataset(root, "aspect_ratio_21_9", [("ds__wide", _image_bytes(420, 180, 3), {"prompt": "wide"})])
    index = build_index(root, BucketSpec(resolution=256))
    assert [i.key for i in index.items] == ["ds__a", "ds__b"]  # 21:9 is not read, as the reference
    assert index.items[1].caption_dict == {"prompt": "nested", "prompt_short": "ns"}
    pixels = load_pixels(index.items[1], index.placements[1])
    assert pixels.shape == (3, 256, 256)
    expected = place_pixels(np.asarray(Image.open(io.BytesIO(_image_bytes(300, 290, 2))).convert("RGB")),
                            index.placements[1])
    assert torch.equal(pixels, expected)


def test_corrupt_unreadable_captionless_and_small_images_are_skipped_counted_and_listed(tmp_path):
    folder = _folder(tmp_path, [(256, 256)] * 4 + [(100, 100)])
    (folder / "img01.png").write_bytes(b"not an image at all")
    good = _image_bytes(256, 256, 7)
    (folder / "img02.png").write_bytes(good[: len(good) // 2])  # header fine, pixels cut off
    (folder / "img03.txt").unlink()
    skipped = tmp_path / "run" / "skipped.jsonl"
    log = SkipLog(skipped)
    index = build_index(folder, BucketSpec(resolution=256), skip_log=log)
    assert [i.key for i in index.items] == ["img00", "img02"]
    reasons = {r["key"]: r["reason"] for r in log.records}
    assert set(reasons) == {"img01", "img03", "img04"}
    assert "cannot be read" in reasons["img01"] and "img03.txt" in reasons["img03"] and "too small" in reasons["img04"]
    # the truncated image is found while loading: replaced by another image of its bucket, listed once
    loader = TrainLoader(index, global_batch=1, seed=0, skip_log=log)
    batches = [batch for _, batch in zip(range(4), loader)]
    assert all(b.keys == ["img00"] for b in batches)
    assert log.count == 4 and log.records[-1]["key"] == "img02" and log.records[-1]["stage"] == "load"
    listed = [json.loads(line) for line in skipped.read_text().splitlines()]
    assert [r["key"] for r in listed] == [r["key"] for r in log.records]


# ------------------------------------------------------------------------------------------------------------
# Batching, ranks, resuming


def _mixed_index(tmp_path: Path):
    sizes = [(256, 256)] * 7 + [(400, 300)] * 5  # two buckets
    return build_index(_folder(tmp_path, sizes), BucketSpec(resolution=256))


def _take(loader: TrainLoader, n: int) -> list:
    return [batch for _, batch in zip(range(n), loader)]


def test_batches_are_shape_uniform_and_deterministic_given_the_seed(tmp_path):
    index = _mixed_index(tmp_path)
    first = _take(TrainLoader(index, global_batch=2, seed=3), 8)
    again = _take(TrainLoader(index, global_batch=2, seed=3), 8)
    other = _take(TrainLoader(index, global_batch=2, seed=4), 8)
    for batch in first:
        assert batch.pixels.shape[0] == 2 and len({tuple(p.shape) for p in batch.pixels}) == 1
        assert batch.bucket in ("1,1", "4,3")
    assert [b.keys for b in first] == [b.keys for b in again]
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(first, again))
    assert [b.keys for b in first] != [b.keys for b in other]
    # an epoch covers every image at most once, leftovers of a bucket wait for the next epoch
    loader = TrainLoader(index, global_batch=2, seed=3)
    per_epoch = loader.batches_per_epoch()
    assert per_epoch == 3 + 2
    keys = [k for b in first[:per_epoch] for k in b.keys]
    assert len(keys) == len(set(keys)) == 10


def test_two_ranks_of_batch_b_see_what_one_rank_of_batch_2b_sees(tmp_path):
    index = _mixed_index(tmp_path)
    single = _take(TrainLoader(index, global_batch=4, seed=1), 6)
    rank0 = _take(TrainLoader(index, global_batch=4, seed=1, rank=0, world_size=2), 6)
    rank1 = _take(TrainLoader(index, global_batch=4, seed=1, rank=1, world_size=2), 6)
    for one, a, b in zip(single, rank0, rank1):
        assert a.bucket == b.bucket == one.bucket
        assert a.keys + b.keys == one.keys
        assert a.captions + b.captions == one.captions
        assert torch.equal(torch.cat([a.pixels, b.pixels]), one.pixels)
    with pytest.raises(ConfigError):
        TrainLoader(index, global_batch=3, world_size=2)


def test_a_resumed_loader_continues_exactly_across_epochs(tmp_path):
    index = _mixed_index(tmp_path)
    whole = _take(TrainLoader(index, global_batch=2, seed=5), 12)  # 5 batches per epoch: crosses two epochs
    loader = TrainLoader(index, global_batch=2, seed=5)
    _take(loader, 7)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["index"] == 2
    resumed = TrainLoader(index, global_batch=2, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    rest = _take(resumed, 5)
    assert [b.keys for b in rest] == [b.keys for b in whole[7:]]
    assert [b.captions for b in rest] == [b.captions for b in whole[7:]]
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(rest, whole[7:]))
    with pytest.raises(ConfigError, match="global_batch"):
        TrainLoader(index, global_batch=1, seed=5).load_state_dict(state)


def test_worker_processes_yield_the_same_batches(tmp_path):
    index = _mixed_index(tmp_path)
    inline = _take(TrainLoader(index, global_batch=2, seed=2), 4)
    workers = _take(TrainLoader(index, global_batch=2, seed=2, num_workers=1), 4)
    assert [b.keys for b in inline] == [b.keys for b in workers]
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(inline, workers))


def test_caption_fields_are_sampled_per_image_and_epoch(tmp_path):
    folder = _folder(tmp_path, [(256, 256)] * 4, captions=False)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(p), "prompt": f"L{p.stem}", "prompt_medium": f"M{p.stem}",
                                            "prompt_short": f"S{p.stem}"}) + "\n"
                                for p in sorted(folder.glob("*.png"))))
    index = build_index(manifest, BucketSpec(resolution=256))
    batches = _take(TrainLoader(index, global_batch=2, seed=0), 60)
    fields = [f for b in batches for f in b.caption_fields]
    counts = {name: fields.count(name) for name in ("prompt", "prompt_medium", "prompt_short")}
    # 120 independent draws (keys hold the temp path, so the draws change between runs): about 40 each, sd 5.2;
    # below 16 is 4.6 sd away (about 1e-6 per run), a field never drawn or drawn at half the rate is not
    assert min(counts.values()) >= 16
    for batch in batches:
        for caption, name in zip(batch.captions, batch.caption_fields):
            assert caption[0] == {"prompt": "L", "prompt_medium": "M", "prompt_short": "S"}[name]


def test_no_bucket_with_a_full_batch_is_a_clear_error(tmp_path):
    index = build_index(_folder(tmp_path, [(256, 256), (400, 300)]), BucketSpec(resolution=256))
    with pytest.raises(ConfigError, match="no bucket holds a full global batch"):
        TrainLoader(index, global_batch=2)


def test_open_loader_lists_index_skips_on_rank_0_only_and_describe_data_reads_headers_only(tmp_path):
    folder = _folder(tmp_path, [(256, 256)] * 4 + [(90, 90)])
    skipped = tmp_path / "run" / "skipped.jsonl"
    ranks = [open_loader(folder, 2, resolution=256, seed=1, rank=r, world_size=2, skipped_path=skipped)
             for r in (0, 1)]
    assert [len(loader.skipped) for loader in ranks] == [1, 1]  # both count it ...
    assert len(skipped.read_text().splitlines()) == 1  # ... rank 0 lists it
    single = open_loader(folder, 4, resolution=256, seed=1)
    a, b, one = next(iter(ranks[0])), next(iter(ranks[1])), next(iter(single))
    assert a.keys + b.keys == one.keys and a.pixels.shape == (2, 3, 256, 256)
    summary = describe_data(folder, resolution=256)
    assert summary["kind"] == "folder" and summary["images"] == 4
    assert summary["buckets"] == {"1,1": {"count": 4, "size_wh": [256, 256]}}
    assert [Path(r["image"]).name for r in summary["skipped"]] == ["img04.png"]
