"""Validation during training: decode a held-out set with the EMA weights and score it beside the init's.

The task is the training task: each held-out image (a from_clean manifest: `{"image", "prompt"}` per line),
shrunk to at most `resolution` and cropped to the decoder's multiple, is the target; its x4 downsample is
encoded by the frozen VAE, noised at each `val_sigmas` value ((1 - σ) z + σ ε, fixed ε per image), and decoded
with the undistilled sampler (DPM-Solver++ with text CFG, as `PiDDecoder` samples a teacher). PSNR / SSIM /
CIEDE2000 come from `pid.metrics`, as in from_clean.

The held-out set is encoded once when the run starts (so with a prepare cache, the VAE and Gemma-2 can be
dropped again). The init's scores are computed once, before the first step, and cached in `val/init.json`;
every validation appends one line per σ to `val.jsonl` and saves the first `images` decodes under
`val/step_XXXXXXXXX/`. On one process the EMA weights are swapped into the network (no copy) and back; on
several, every rank decodes its share of the set and rank 0 writes the records (`pid.training.val_ranks`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import Tensor, nn

from pid.inference.atomic import append_jsonl, write_json
from pid.inference.io import read_manifest, unit_to_uint8, write_image
from pid.metrics import summarize
from pid.training.degradation import DOWNSCALE, downsample
from pid.training.schedules import dynamic_shift
from pid.training.val_ranks import ValRanks, ema_weights, on_device, scored_weights

VAL_FILE = "val.jsonl"
VAL_DIR = "val"
INIT_FILE = "init.json"
METRICS = ("psnr", "ssim", "delta_e2000")


@dataclass(frozen=True)
class ValConfig:
    manifest: str
    every: int  # steps between validations (and one at the end)
    sigmas: tuple[float, ...] = (0.0,)
    steps: int = 25  # sampler steps per decode (mode=distill: the student's distilled sampler, 1..4)
    cfg_scale: float = 5.0  # text CFG (1: none)
    images: int = 4  # decodes saved per validation
    resolution: int = 2048  # longest side of a held-out image
    seed: int = 0
    teacher_steps: int = 25  # mode=distill: the teacher's undistilled steps of the reference decodes


@dataclass
class ValItem:
    item_id: str
    prompt: str
    target: Tensor  # [1, 3, H, W] in [0, 1], CPU
    latents: dict[float, Tensor]  # sigma -> the (noised) normalised latent of downsample(image), on the device
    caption_embeds: Tensor  # [1, L, D], on the device
    position: int = -1  # its place among the readable images of the whole set: its decode seed, its order


def val_multiple(latent_downsample: int, patch_size: int) -> int:
    """Image sides must be multiples of this: the x4 LQ image a whole number of latent cells, the output of
    patches."""
    return math.lcm(DOWNSCALE * latent_downsample, patch_size)


def load_val_items(cfg: ValConfig, multiple: int, encode_lq: Callable[[Tensor], Tensor],
                   encode_captions: Callable[[Sequence[str]], Tensor], device: torch.device,
                   ranks: ValRanks = ValRanks()) -> tuple[list[ValItem], list[str]]:
    """Read, crop and encode this rank's held-out images once (an unreadable image is skipped with a
    warning); returns them and the ids of the readable images of the whole set, in manifest order."""
    from pid.inference.io import load_image

    items = []
    for index, entry in enumerate(read_manifest(cfg.manifest)):
        if not ranks.mine(index):
            continue
        try:
            image = load_image(entry.image, multiple=multiple, max_side=cfg.resolution)  # [1,3,H,W] in [-1,1]
        except Exception as exc:  # noqa: BLE001 - one bad held-out image must not end a training run
            logger.warning("validation: skipping {} ({})", entry.image, exc)
            continue
        with torch.no_grad():
            clean = encode_lq(downsample(image.to(device))).float()
            embeds = encode_captions([entry.prompt or ""]).to(device=device, dtype=torch.float32)
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed + index)
        eps = torch.randn(clean.shape, generator=generator).to(device)  # the same ε at every σ
        latents = {s: clean if s == 0 else (1.0 - s) * clean + s * eps for s in cfg.sigmas}
        items.append(ValItem(f"{index:03d}_{entry.image.stem}", entry.prompt or "", ((image + 1) / 2).clamp(0, 1),
                             latents, embeds, position=index))
    readable = [item_id for _, item_id in ranks.gather([(item.position, item.item_id) for item in items])]
    for item in items:  # from manifest index to place among the readable images (they differ after a skip)
        item.position = readable.index(item.item_id)
    return items, readable


class NegativeCaption:
    """The decoder's caption encoder during validation: it only ever encodes the CFG negative prompt, which is
    encoded once when the run starts (Gemma-2 need not stay resident)."""

    def __init__(self, embeds: Tensor) -> None:
        self.embeds = embeds

    def encode(self, captions: Sequence[str]) -> Tensor:
        from pid.text_encoder import NEGATIVE_PROMPT

        if list(captions) != [NEGATIVE_PROMPT]:
            raise ValueError("validation decodes pass caption_embeds; only the negative prompt is encoded here")
        return self.embeds


def undistilled_decoder(net: nn.Module, backbone: str, null_embeds: Tensor) -> Any:
    """A `PiDDecoder` over `net` that samples as a teacher (undistilled: DPM-Solver++ with text CFG)."""
    from pid.checkpoints import CheckpointRecord
    from pid.decoder import PiDDecoder

    cfg = net.cfg
    record = CheckpointRecord(backbone=backbone, ckpt_type="training", folder="", net_config=cfg.name,
                              scale=cfg.sr_scale, latent_space=backbone, sampler="undistilled")
    return PiDDecoder(net, record, NegativeCaption(null_embeds))  # sets eval mode; the callers restore it


def decode_item(decoder: Any, item: ValItem, sigma: float, cfg: ValConfig, steps: int | None = None) -> Tensor:
    """One undistilled validation decode, [1, 3, H, W] in [0, 1] on the CPU: the training's shift at this size,
    the start noise seeded per image, `steps` (default `cfg.steps`) DPM-Solver++ steps with text CFG."""
    size = tuple(item.target.shape[-2:])
    return decoder.decode(item.latents[sigma], caption_embeds=item.caption_embeds, degrade_sigma=sigma,
                          steps=steps or cfg.steps, seed=cfg.seed + item.position, output_size=size,
                          cfg_scale=cfg.cfg_scale, shift=dynamic_shift(*size)).cpu()


def gathered(ranks: ValRanks, rows: list[dict[str, Any]], images: dict[str, str]) -> dict[str, Any]:
    """Every rank's rows (each with its "position", dropped here) and saved images, in manifest order:
    {"mean", "per_image", "images"}."""
    every = ranks.gather([(row.pop("position"), (row, images.get(row["id"]))) for row in rows])
    per_image = [row for _, (row, _) in every]
    keys = [k for k in per_image[0] if k != "id"]
    return {"mean": {k: sum(r[k] for r in per_image) / len(per_image) for k in keys}, "per_image": per_image,
            "images": {row["id"]: image for _, (row, image) in every if image is not None}}


class Validator:
    """Scores the EMA weights every `cfg.every` steps beside the init's. `items` are this rank's share of the
    held-out set, `item_ids` the whole set's; `copy` the unsharded copy an FSDP2 run scores with."""

    def __init__(self, cfg: ValConfig, run_dir: Path, backbone: str, items: list[ValItem], item_ids: list[str],
                 null_embeds: Tensor, device: torch.device, copy: nn.Module | None = None,
                 ranks: ValRanks = ValRanks()) -> None:
        self.cfg, self.run_dir, self.backbone = cfg, run_dir, backbone
        self.items, self.item_ids, self.null_embeds = items, item_ids, null_embeds
        self.device, self.copy, self.ranks = device, copy, ranks
        self.init: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        """What the cached init scores depend on."""
        digest = hashlib.sha256(Path(self.cfg.manifest).read_bytes()).hexdigest()[:16]
        identity = {**asdict(self.cfg), "every": None, "images": None, "sigmas": list(self.cfg.sigmas),
                    "manifest_sha256": digest, "items": list(self.item_ids)}
        identity.pop("teacher_steps")  # mode=distill only
        return identity

    def score(self, net: nn.Module, folder: Path | None) -> dict[float, dict[str, Any]]:
        """sigma -> {"mean": metrics, "per_image": [...], "images": {item id: path relative to the run}}, over
        the whole set (this rank decodes its share)."""
        decoder = undistilled_decoder(net, self.backbone, self.null_embeds)
        out: dict[float, dict[str, Any]] = {}
        for sigma in self.cfg.sigmas:
            rows, images = [], {}
            for item in self.items:
                decoded = decode_item(decoder, item, sigma, self.cfg)
                scores = summarize(decoded, item.target)
                rows.append({"id": item.item_id, "position": item.position, **{m: scores[m][0] for m in METRICS}})
                if folder is not None and item.position < self.cfg.images:
                    path = folder / f"{item.item_id}_sigma_{sigma:.3f}.png"
                    write_image(path, unit_to_uint8(decoded[0]))
                    images[item.item_id] = path.relative_to(self.run_dir).as_posix()
            out[sigma] = gathered(self.ranks, rows, images)
        return out

    def prepare_init(self, net: nn.Module) -> None:
        """The init's scores: read from `val/init.json` when it was made for this validation set, else computed
        now (the net, or the FSDP2 run's copy, must hold the init weights) and cached, with the targets saved
        beside them."""
        path = self.run_dir / VAL_DIR / INIT_FILE
        identity = json.loads(json.dumps(self.identity()))
        cached = None
        if self.ranks.writer and path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("identity") == identity:
                cached = saved["scores"]
        cached = self.ranks.decide(cached)
        if cached is not None:
            self.init = {float(s): v for s, v in cached.items()}
            return
        for item in self.items:
            if item.position < self.cfg.images:
                write_image(self.run_dir / VAL_DIR / "target" / f"{item.item_id}.png", unit_to_uint8(item.target[0]))
        scored = self.copy if self.copy is not None else net
        was_training = scored.training
        scored.eval()
        try:
            with on_device(scored, self.device):
                self.init = self.score(scored, self.run_dir / VAL_DIR / "init")
        finally:
            scored.train(was_training)
        if self.ranks.writer:
            write_json(path, {"identity": identity, "scores": {str(s): v for s, v in self.init.items()}})
            logger.info("validation: init {}", _line(self.init))

    def __call__(self, step: int, net: nn.Module, ema: dict[str, Tensor]) -> list[dict[str, Any]]:
        """Score the EMA weights at `step`; append one line per σ to val.jsonl; returns those records."""
        assert self.init is not None, "prepare_init first"
        with scored_weights(net, ema, self.copy, self.device) as scored:
            scores = self.score(scored, self.run_dir / VAL_DIR / f"step_{step:09d}")
        records = []
        for sigma, result in scores.items():
            init = self.init[sigma]
            record = {"step": step, "sigma": sigma, "ema": result["mean"], "init": init["mean"],
                      "images": result["images"], "init_images": init["images"],
                      "targets": {i: f"{VAL_DIR}/target/{i}.png" for i in result["images"]},
                      "per_image": [{"id": e["id"], "ema": {m: e[m] for m in METRICS},
                                     "init": {m: i[m] for m in METRICS}}
                                    for e, i in zip(result["per_image"], init["per_image"])]}
            if self.ranks.writer:
                append_jsonl(self.run_dir / VAL_FILE, record)
            records.append(record)
        if self.ranks.writer:
            logger.info("validation at step {}: ema {} (init {})", step, _line(scores), _line(self.init))
        return records


def _line(scores: dict[float, dict[str, Any]]) -> str:
    return "; ".join(f"σ={s:g} psnr {v['mean']['psnr']:.2f} ssim {v['mean']['ssim']:.3f} "
                     f"ΔE {v['mean']['delta_e2000']:.2f}" for s, v in scores.items())


def open_validator(cfg: ValConfig, run_dir: Path, backbone: str, net: nn.Module,
                   encode_lq: Callable[[Tensor], Tensor], encode_captions: Callable[[Sequence[str]], Tensor],
                   device: torch.device) -> Validator:
    """Encode this rank's share of the held-out set and make the init's scores (cached in the run folder).
    Every rank calls it (on several processes it gathers)."""
    from pid.text_encoder import NEGATIVE_PROMPT
    from pid.training.val_ranks import plain_copy

    ranks = ValRanks.current()
    multiple = val_multiple(net.cfg.latent_downsample, net.cfg.patch_size)
    items, item_ids = load_val_items(cfg, multiple, encode_lq, encode_captions, device, ranks)
    if not item_ids:
        from pid.errors import InputError

        raise InputError(f"val_manifest {cfg.manifest}: no image could be read; fix the manifest or drop it")
    with torch.no_grad():
        null_embeds = encode_captions([NEGATIVE_PROMPT]).to(device=device, dtype=torch.float32)
    validator = Validator(cfg, run_dir, backbone, items, item_ids, null_embeds, device, plain_copy(net), ranks)
    validator.prepare_init(net)
    return validator


__all__ = ["VAL_FILE", "ValConfig", "Validator", "ema_weights", "load_val_items", "open_validator"]
