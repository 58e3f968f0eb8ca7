"""Prepare a training cache: each image's LQ latent and caption embeddings, computed once (see pid.training.cache
for the layout and `python -m pid.train.prepare --help` for the command).

    lq_latent      = latent_space.encode(downsample(pixels))    normalised, [C, h, w]; pixels = the training crop
    caption embeds = CaptionEncoder.encode([text]) per present caption field, and once for "" (caption dropout)

Shards are consecutive runs of `shard_size` indexed images; rank r of a torchrun launch writes shards r, r+W, ...;
a shard whose file exists with this cache's identity is skipped, so a killed or failed run resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import Tensor
from tqdm.auto import tqdm

from pid.errors import ConfigError, PiDError
from pid.inference import distributed as dist
from pid.inference.cli import Settings, check_output_dir
from pid.inference.io import atomic_output, read_jsonl, to_json, write_json
from pid.training.buckets import BucketSpec
from pid.training.cache import (
    CACHE_FORMAT,
    check_identity,
    identity_digest,
    read_shard_metadata,
    shard_name,
)
from pid.training.data import SkipLog, TrainIndex, build_index, load_pixels
from pid.training.degradation import downsample

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def encode_lq_latent(space: Any, pixels: Tensor) -> Tensor:
    """[B,3,H,W] training pixels -> [B,C,h,w] normalised latent of their LQ image (fp32, on the CPU)."""
    device = next(space.vae.parameters()).device if hasattr(space.vae, "parameters") else torch.device("cpu")
    return space.encode(downsample(pixels.to(device))).float().cpu()


@dataclass
class PreparePlan:
    index: TrainIndex
    out_dir: Path
    backbone: str
    shard_size: int
    identity: dict[str, Any]
    index_skips: list[dict[str, Any]] = field(default_factory=list)

    @property
    def shards(self) -> list[list[int]]:
        n = len(self.index.items)
        return [list(range(s, min(s + self.shard_size, n))) for s in range(0, n, self.shard_size)]

    def describe(self, rank: int, world_size: int) -> dict[str, Any]:
        mine = [s for s in range(len(self.shards)) if s % world_size == rank]
        return {"entry": "train_prepare", "backbone": self.backbone, "output_dir": str(self.out_dir),
                "rank": rank, "world_size": world_size, "shard_size": self.shard_size,
                "shards": len(self.shards), "my_shards": mine, "data": self.index.describe(),
                "skipped_count": len(self.index_skips), "skipped": self.index_skips[:50], "identity": self.identity}


def plan_prepare(settings: Settings) -> PreparePlan:
    """Validate the settings and index the data (image headers only); loads no model, writes nothing."""
    if not settings.data:
        raise ConfigError("data= is required: a folder of images + .txt captions, a .jsonl manifest or a "
                          "WebDataset root")
    if not settings.out:
        raise ConfigError("out= is required: the folder the cache is written to")
    if int(settings.shard_size) < 1:
        raise ConfigError(f"shard_size must be at least 1, got {settings.shard_size}")
    spec = BucketSpec(settings.buckets, int(settings.resolution))
    out_dir = check_output_dir(settings.out)
    skips: list[dict[str, Any]] = []
    index = build_index(settings.data, spec, skip_log=skips.append)
    _check_lq_sizes(settings.backbone.name, index)
    identity = {
        "backbone": settings.backbone.name, "buckets": spec.to_dict(),
        "data": str(Path(settings.data).expanduser().resolve()),
        "text_encoder": settings.text_encoder, "text_encoder_revision": settings.text_encoder_revision,
        "pid_revision": settings.pid_revision, "checkpoint_dir": settings.checkpoint_dir, "dtype": settings.dtype,
        "shard_size": int(settings.shard_size),
    }
    check_identity(out_dir, identity, bool(settings.overwrite))
    return PreparePlan(index, out_dir, settings.backbone.name, int(settings.shard_size), identity, skips)


def _check_lq_sizes(backbone: str, index: TrainIndex) -> None:
    """Every bucket's LQ image (a quarter of the crop) must suit the backbone's VAE (checked before it loads)."""
    from pid.latents import get as get_latent_space

    space = get_latent_space(backbone)
    sizes = index.spec.buckets()
    for bucket in index.bucket_counts():
        width, height = sizes[bucket]
        try:
            space.check_size(height // 4, width // 4)
        except ConfigError as err:
            raise ConfigError(f"bucket {bucket} ({width}x{height}, LQ {width // 4}x{height // 4}) does not suit "
                              f"backbone {backbone}: {err}; choose another resolution=") from None


def _load_encoders(settings: Settings, plan: PreparePlan, device: torch.device) -> tuple[Any, Any]:
    from pid.latents import get as get_latent_space
    from pid.text_encoder import DEFAULT_TEXT_ENCODER, CaptionEncoder

    dtype = DTYPES[settings.dtype] if settings.get("dtype") else None
    kwargs: dict[str, Any] = {"device": device, "checkpoint_dir": settings.checkpoint_dir}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if settings.get("pid_revision"):
        kwargs["revision"] = settings.pid_revision
    space = get_latent_space(plan.backbone).load(**kwargs)
    encoder = CaptionEncoder.from_pretrained(settings.text_encoder or DEFAULT_TEXT_ENCODER, device=device,
                                             dtype=dtype, revision=settings.text_encoder_revision)
    return space, encoder


def _embed_dtype(encoder: Any) -> torch.dtype:
    """Embeddings are stored in the dtype the encoder computes in, which is lossless (bf16 on CUDA)."""
    try:
        return next(encoder.model.parameters()).dtype
    except (AttributeError, StopIteration):
        return torch.float32


def prepare_shard(plan: PreparePlan, number: int, space: Any, encoder: Any,
                  skip: Callable[[dict[str, Any]], None]) -> int:
    """Encode one shard and write it atomically; returns the number of images stored."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    keys: list[str] = []
    store_dtype = _embed_dtype(encoder)
    for index in plan.shards[number]:
        item, placement = plan.index.items[index], plan.index.placements[index]
        try:
            pixels = load_pixels(item, placement)
        except (PiDError, OSError, ValueError) as err:
            skip({"key": item.key, "image": item.where, "reason": str(err), "stage": "prepare"})
            continue
        slot = len(keys)
        with torch.no_grad():
            tensors[f"{slot}.lq_latent"] = encode_lq_latent(space, pixels[None])[0].contiguous()
            names = [name for name, _ in item.captions]
            embeds = encoder.encode([text for _, text in item.captions])
        for name, embed in zip(names, embeds):
            tensors[f"{slot}.{name}"] = embed.to("cpu", store_dtype).contiguous()
        keys.append(item.key)
    metadata = {"keys": to_json(keys, indent=None), "identity": identity_digest(plan.identity),
                "planned": to_json([plan.index.items[i].key for i in plan.shards[number]], indent=None)}
    with atomic_output(plan.out_dir / shard_name(number)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return len(keys)


def shard_done(plan: PreparePlan, number: int) -> bool:
    meta = read_shard_metadata(plan.out_dir / shard_name(number))
    planned = to_json([plan.index.items[i].key for i in plan.shards[number]], indent=None)
    return bool(meta) and meta.get("identity") == identity_digest(plan.identity) and meta.get("planned") == planned


def _write_header(plan: PreparePlan) -> None:
    """cache.json and items.jsonl (rank 0, before any shard): what the cache is and which images it covers."""
    write_json(plan.out_dir / "cache.json", {"format": CACHE_FORMAT, "identity": plan.identity})
    lines = "".join(to_json(item.to_json(), indent=None) + "\n" for item in plan.index.items)
    with atomic_output(plan.out_dir / "items.jsonl") as tmp:
        tmp.write_text(lines, encoding="utf-8")


def _write_index(plan: PreparePlan) -> dict[str, Any]:
    """index.json from the shards on disk (rank 0, after every rank finished)."""
    import json

    shards, missing = [], []
    for number in range(len(plan.shards)):
        meta = read_shard_metadata(plan.out_dir / shard_name(number))
        if not shard_done(plan, number) or meta is None:
            missing.append(number)
            continue
        shards.append({"file": shard_name(number), "keys": json.loads(meta["keys"])})
    index = {"format": CACHE_FORMAT, "identity": plan.identity, "images": sum(len(s["keys"]) for s in shards),
             "shards": shards, "null_caption": "null_caption.safetensors"}
    if not missing:
        write_json(plan.out_dir / "index.json", index)
    return {**index, "missing_shards": missing}


def run(settings: Settings, plan: PreparePlan | None = None, latent_space: Any = None,
        caption_encoder: Any = None) -> dict[str, Any]:
    """Write the cache (this rank's shards); `latent_space` / `caption_encoder` may be passed in (tests)."""
    from safetensors.torch import save_file

    plan = plan or plan_prepare(settings)
    env = dist.init_distributed()
    device = torch.device(settings.device) if settings.get("device") else dist.rank_device()
    skipped_path = plan.out_dir / "skipped.jsonl"
    skip = SkipLog(skipped_path)
    if env.rank == 0:
        if settings.get("overwrite"):
            (plan.out_dir / "index.json").unlink(missing_ok=True)
            skipped_path.unlink(missing_ok=True)
            for path in (plan.out_dir / "shards").glob("*.safetensors"):
                path.unlink()
        known = {(r.get("key"), r.get("image")) for r in (read_jsonl(skipped_path) if skipped_path.is_file() else [])}
        for record in plan.index_skips:
            if (record["key"], record["image"]) not in known:
                skip(record)
        _write_header(plan)
    dist.barrier()
    mine = [s for s in range(len(plan.shards)) if s % env.world_size == env.rank]
    todo = [s for s in mine if not shard_done(plan, s)]
    logger.info("rank {}/{}: {} shards, {} to do; cache in {}", env.rank, env.world_size, len(mine), len(todo),
                plan.out_dir)
    stored = 0
    if todo or (env.rank == 0 and not (plan.out_dir / "null_caption.safetensors").is_file()):
        if latent_space is None or caption_encoder is None:
            space, encoder = _load_encoders(settings, plan, device)
            latent_space, caption_encoder = latent_space or space, caption_encoder or encoder
        if env.rank == 0:
            null = caption_encoder.encode([""])[0].to("cpu", _embed_dtype(caption_encoder)).contiguous()
            with atomic_output(plan.out_dir / "null_caption.safetensors") as tmp:
                save_file({"embed": null}, str(tmp))
        for number in tqdm(todo, desc=f"shards (rank {env.rank})", disable=not dist.is_main()):
            stored += prepare_shard(plan, number, latent_space, caption_encoder, skip)
    failures = dist.gather_objects(skip.records)
    dist.barrier()
    summary: dict[str, Any] = {"output_dir": str(plan.out_dir), "shards_written": len(todo), "images_encoded": stored}
    if dist.is_main():
        index = _write_index(plan)
        every_skip = read_jsonl(skipped_path) if skipped_path.is_file() else []
        summary.update(images=index["images"], shards=len(plan.shards), missing_shards=index["missing_shards"],
                       skipped=len(every_skip))
        print(f"cache: {index['images']} images in {len(index['shards'])} shards ({len(todo)} written now); "
              f"skipped: {len(every_skip)}; {plan.out_dir}")
        for record in every_skip:
            print(f"SKIPPED {record.get('image')}: {record.get('reason')}")
    dist.barrier()
    summary["exit_code"] = 1 if any(failures) or plan.index_skips or summary.get("skipped") else 0
    return summary


__all__ = ["PreparePlan", "encode_lq_latent", "plan_prepare", "prepare_shard", "run", "shard_done"]
