"""The prepare cache: encoding once equals encoding on the fly; the CLI as a user runs it (resume, bad input)."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from pid.errors import ConfigError, InputError
from pid.inference import distributed as pdist
from pid.latents import get as get_space
from pid.train.prepare import load_config
from pid.training import prepare
from pid.training.cache import LatentCache
from pid.training.loaders import open_loader

from cli_driver import cli_env, run_module
from tiny import tiny_caption_encoder
from tiny_vaes import tiny_autoencoder_kl

MODULE = "pid.train.prepare"


def _png(width: int, height: int, seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _dataset(tmp_path: Path, corrupt: bool = False) -> Path:
    """Five images in two buckets of the 256 fixed table, captions with one to three fields."""
    folder = tmp_path / "data"
    folder.mkdir()
    lines = []
    for i, (w, h) in enumerate([(256, 256), (300, 280), (260, 270), (400, 300), (330, 250)]):
        (folder / f"p{i}.png").write_bytes(_png(w, h, i))
        line = {"image": f"p{i}.png", "prompt": f"a long caption {i}"}
        if i % 2:
            line["prompt_short"] = f"short {i}"
        if i == 4:
            line["prompt_medium"] = "a medium caption"
        lines.append(line)
    if corrupt:
        (folder / "bad.png").write_bytes(b"\x89PNG but not really")
        lines.append({"image": "bad.png", "prompt": "broken"})
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def test_cached_latents_and_embeddings_equal_encoding_on_the_fly(tmp_path):
    manifest = _dataset(tmp_path)
    space = get_space("flux").attach(tiny_autoencoder_kl(latent_channels=16))
    encoder = tiny_caption_encoder()
    out = tmp_path / "cache"
    settings = load_config([f"data={manifest}", f"out={out}", "resolution=256", "shard_size=2"])
    summary = prepare.run(settings, latent_space=space, caption_encoder=encoder)
    assert summary["exit_code"] == 0 and summary["images"] == 5 and summary["shards_written"] == 3
    cache = LatentCache(out)
    assert len(cache) == 5
    loader = open_loader(out, 1, seed=0)  # data= a prepare cache: batches carry the cached tensors
    assert loader.index.kind == "cache" and len(loader.index) == 5
    with pytest.raises(ConfigError, match="resolution=256"):
        open_loader(out, 1, resolution=512)
    seen = set()
    for _, batch in zip(range(10), loader):
        seen.update(batch.keys)
        assert batch.lq_latent.shape[1:] == (16, batch.pixels.shape[2] // 32, batch.pixels.shape[3] // 32)
        torch.testing.assert_close(batch.lq_latent, prepare.encode_lq_latent(space, batch.pixels), rtol=0, atol=0)
        torch.testing.assert_close(batch.caption_embeds, encoder.encode(batch.captions), rtol=0, atol=0)
        torch.testing.assert_close(batch.null_caption_embed, encoder.encode([""])[0], rtol=0, atol=0)
    assert len(seen) == 5
    # every caption field of every image is stored, so any later draw finds its embedding
    for item in cache.train_index().items:
        for name, text in item.captions:
            torch.testing.assert_close(cache.tensor(item.key, name), encoder.encode([text])[0], rtol=0, atol=0)


def test_a_rerun_skips_finished_shards_and_redoes_a_missing_one(tmp_path):
    manifest = _dataset(tmp_path)
    space = get_space("flux").attach(tiny_autoencoder_kl(latent_channels=16))
    encoder = tiny_caption_encoder()
    out = tmp_path / "cache"
    settings = load_config([f"data={manifest}", f"out={out}", "resolution=256", "shard_size=2"])
    prepare.run(settings, latent_space=space, caption_encoder=encoder)
    shards = sorted((out / "shards").glob("*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()
    (out / "index.json").unlink()
    again = prepare.run(load_config([f"data={manifest}", f"out={out}", "resolution=256", "shard_size=2"]),
                        latent_space=space, caption_encoder=encoder)
    assert again["shards_written"] == 1 and again["images"] == 5
    assert shards[0].stat().st_mtime_ns == stamps[shards[0]] and shards[2].stat().st_mtime_ns == stamps[shards[2]]
    # other settings on the same folder: refused before anything is written
    with pytest.raises(ConfigError, match="buckets differ"):
        prepare.plan_prepare(load_config([f"data={manifest}", f"out={out}", "buckets=multires", "resolution=256",
                                          "shard_size=2"]))
    with pytest.raises(InputError, match="index.json"):
        LatentCache(tmp_path / "nothing")


@pytest.mark.slow
def test_prepare_cli_writes_the_cache_lists_a_bad_image_and_resumes(tmp_path, hub_cache_env):
    manifest = _dataset(tmp_path, corrupt=True)
    out = tmp_path / "cache"
    args = ("backbone=flux", f"data={manifest}", f"out={out}", "resolution=256", "shard_size=3")
    done = run_module(MODULE, *args, env=hub_cache_env, cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # one bad image: the rest is done, the bad one reported
    assert "cache: 5 images in 2 shards (2 written now); skipped: 1" in done.stdout
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in skipped] == ["bad.png"]
    cache = LatentCache(out)
    assert len(cache) == 5 and cache.backbone == "flux"
    assert cache.tensor(cache.train_index().items[0].key, "lq_latent").shape == (16, 8, 8)
    stamp = (out / "shards" / "shard_000000.safetensors").stat().st_mtime_ns
    rerun = run_module(MODULE, *args, env=hub_cache_env, cwd=tmp_path)
    assert rerun.returncode == 1 and "(0 written now); skipped: 1" in rerun.stdout, rerun.stderr
    assert (out / "shards" / "shard_000000.safetensors").stat().st_mtime_ns == stamp
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 1  # listed once, not once per run


@pytest.mark.slow
def test_prepare_cli_bad_input_is_one_line_and_exit_2_before_anything_is_written(tmp_path):
    manifest = _dataset(tmp_path)
    out = tmp_path / "cache"
    for args, words in [
        ((f"data={manifest}", f"out={out}", "resolutoin=256"), "unknown option resolutoin"),
        ((f"data={manifest}", f"out={out}", "resolution=100"), "multiple of 64"),
        ((f"data={tmp_path / 'missing'}", f"out={out}"), "does not exist"),
    ]:
        done = run_module(MODULE, *args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, done.stderr)
    assert not out.exists()
    # the dry run of torchrun's rank 1 of 2: its shards, nothing loaded or written
    plan = run_module(MODULE, f"data={manifest}", f"out={out}", "resolution=256", "shard_size=2", "--dry_run",
                      cwd=tmp_path, env=cli_env(RANK="1", WORLD_SIZE="2"))
    assert plan.returncode == 0, plan.stderr
    described = json.loads(plan.stdout)
    assert described["data"]["images"] == 5 and described["shards"] == 3 and described["my_shards"] == [1]
    assert described["data"]["buckets"] == {"1,1": {"count": 3, "size_wh": [256, 256]},
                                            "4,3": {"count": 2, "size_wh": [320, 192]}}
    assert not out.exists()
    with pytest.raises(ConfigError, match="out= is required"):
        prepare.plan_prepare(load_config([f"data={manifest}"]))
    with pytest.raises(ConfigError, match="buckets must be one of fixed, multires"):
        load_config([f"data={manifest}", f"out={out}", "buckets=tiles"])


class _StubSpace:
    """Pure-torch stand-ins (no diffusers / transformers import in the spawned ranks): latent = conv(avgpool8)."""

    def __init__(self) -> None:
        self.vae = torch.nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.vae.weight.copy_(torch.arange(12.0).reshape(4, 3, 1, 1) / 10)
            self.vae.bias.zero_()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae(F.avg_pool2d(images, 8))


class _StubCaptions:
    def __init__(self) -> None:
        self.model = torch.nn.Linear(1, 1)

    def encode(self, texts: list[str]) -> torch.Tensor:
        codes = torch.tensor([[float(sum(map(ord, t)) % 97)] for t in texts])
        return torch.sin(codes[:, :, None] * torch.arange(1.0, 25.0).reshape(1, 6, 4))


def _prepare_worker(rank: int, world: int, port: int, manifest: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    settings = load_config([f"data={manifest}", f"out={out}", "resolution=256", "shard_size=2", "device=cpu"])
    summary = prepare.run(settings, latent_space=_StubSpace(), caption_encoder=_StubCaptions())
    assert summary["shards_written"] == (2 if rank == 0 else 1)
    pdist.cleanup()


def test_two_gloo_ranks_split_the_shards_and_build_the_same_cache_as_one(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    manifest = _dataset(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_prepare_worker, args=(2, port, str(manifest), str(tmp_path / "two")), nprocs=2, join=True)
    settings = load_config([f"data={manifest}", f"out={tmp_path / 'one'}", "resolution=256", "shard_size=2"])
    prepare.run(settings, latent_space=_StubSpace(), caption_encoder=_StubCaptions())
    two, one = LatentCache(tmp_path / "two"), LatentCache(tmp_path / "one")
    assert two.where == one.where and len(two) == 5
    for item in one.train_index().items:
        for name in ["lq_latent", *(field for field, _ in item.captions)]:
            assert torch.equal(two.tensor(item.key, name), one.tensor(item.key, name))


def test_the_cache_gives_the_same_losses_as_encoding_on_the_fly(tmp_path):
    """The trainer's step inputs from a prepare cache (cached latent, cached caption / "" embeddings) and from
    the frozen encoders run now give the same teacher losses with the same draws (one caption dropped)."""
    from types import SimpleNamespace

    from pid.training import dynamic_shift, teacher_losses
    from pid.training.loop import Encoders, caption_embeds_of, draw_batch, lq_latent_of

    from tiny import tiny_net

    manifest = _dataset(tmp_path)
    space = get_space("flux").attach(tiny_autoencoder_kl(latent_channels=16))
    encoder = tiny_caption_encoder()
    out = tmp_path / "cache"
    settings = load_config([f"data={manifest}", f"out={out}", "resolution=256", "shard_size=2"])
    assert prepare.run(settings, latent_space=space, caption_encoder=encoder)["exit_code"] == 0
    batch = next(iter(open_loader(out, 2, seed=0)))
    assert batch.lq_latent is not None and batch.caption_embeds is not None
    net = tiny_net("v1pt5_latent16ch", aux_rgb_head=True).train()
    pixels = batch.pixels.float()
    on_the_fly = SimpleNamespace(pixels=pixels, captions=batch.captions, keys=batch.keys)  # no cached tensors
    live = Encoders(encode_lq=space.encode, encode_captions=encoder.encode)
    cached = Encoders(None, None)
    captions = [batch.captions[0], ""]  # the second caption dropped: the cache's "" embedding stands in
    _, draws = draw_batch(0, 7, 0, captions, (16, pixels.shape[2] // 32, pixels.shape[3] // 32),
                          tuple(pixels.shape[1:]), torch.device("cpu"), caption_dropout=0.0, lq_dropout=0.0)
    losses = {}
    for name, source, encoders in (("cache", batch, cached), ("live", on_the_fly, live)):
        inputs = {"pixels": pixels, "lq_latent": lq_latent_of(source, encoders, pixels),
                  "caption_embeds": caption_embeds_of(source, captions, encoders, torch.device("cpu"))}
        with torch.no_grad():
            losses[name] = teacher_losses(net, inputs, draws, shift=dynamic_shift(*pixels.shape[-2:]))
    for key in ("diffusion", "align", "total"):
        assert torch.isfinite(losses["cache"][key]) and float(losses["cache"][key]) > 0
        torch.testing.assert_close(losses["cache"][key], losses["live"][key], rtol=0, atol=0)


def test_the_trainer_reads_a_prepare_cache_at_its_own_buckets_and_refuses_others(tmp_path):
    """`python -m pid.train data=<cache>`: the plan (and the memory estimate) take the cache's resolution and
    bucket mode when none is given; another one is a one-line refusal naming the fix, exit 2."""
    from cli_driver import run_module
    from train_harness import make_init

    manifest = _dataset(tmp_path)
    out = tmp_path / "cache"
    settings = load_config([f"data={manifest}", f"out={out}", "resolution=256", "shard_size=5"])
    space = get_space("flux").attach(tiny_autoencoder_kl(latent_channels=16))
    assert prepare.run(settings, latent_space=space, caption_encoder=tiny_caption_encoder())["exit_code"] == 0
    make_init(tmp_path / "init.pth")
    common = ["pid.train", f"data={out}", f"init={tmp_path / 'init.pth'}", f"output_dir={tmp_path / 'runs'}"]
    done = run_module(*common, "--dry_run")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert (plan["resolution"], plan["buckets"], plan["data"]["format"]) == (256, "fixed", "prepare cache")
    assert plan["estimated_peak_memory_per_gpu"]["image"] in {"256x256", "292x224", "224x292"}
    assert json.loads(run_module(*common, "resolution=256", "--dry_run").stdout)["resolution"] == 256
    for asked, words in (("resolution=512", "made with resolution=256, not 512"),
                         ("buckets=multires", "made with buckets=fixed, not multires")):
        done = run_module(*common, asked, "--dry_run")
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "prepare another cache" in lines[0], done.stderr
        assert not (tmp_path / "runs").exists()
