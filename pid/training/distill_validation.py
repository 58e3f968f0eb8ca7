"""Validation during distillation (`mode=distill`): the student's EMA weights decode the held-out set with the
distilled sampler (`val_steps`, default 4, as released students) and are scored against

* the ground truth (PSNR / SSIM / CIEDE2000 from `pid.metrics`, as teacher validation), and
* the frozen teacher's many-step decode (the undistilled sampler: DPM-Solver++ with text CFG against the
  negative prompt, `val_teacher_steps` steps): `psnr_vs_teacher`, `ssim_vs_teacher`, `delta_e2000_vs_teacher`.

The teacher never changes, so its decodes are made once, at the first validation, and cached in the run folder
(`val/teacher/<item>_sigma_<σ>.png` for every held-out image, `val/teacher.json` with its own scores against the
ground truth). The student is always compared with the 8-bit PNGs, so a resumed run scores exactly as an
uninterrupted one. Every validation appends one line per σ to `val.jsonl`; a rerun skips the (step, σ) pairs
that file already holds (a run killed between a validation and its checkpoint redoes the iterations, not the
scoring). The held-out set is read and encoded as in `pid.training.validation`; on several processes every
rank decodes its share (the teacher's too) and rank 0 writes the records (`pid.training.val_ranks`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger
from torch import Tensor, nn

from pid.inference.atomic import append_jsonl, write_json
from pid.inference.io import unit_to_uint8, write_image
from pid.metrics import summarize
from pid.training.val_ranks import ValRanks, on_device, scored_weights
from pid.training.validation import (
    METRICS,
    VAL_DIR,
    VAL_FILE,
    NegativeCaption,
    ValConfig,
    ValItem,
    decode_item,
    gathered,
    undistilled_decoder,
)

TEACHER_FILE = "teacher.json"


def distilled_decoder(net: nn.Module, backbone: str, null_embeds: Tensor) -> Any:
    """A `PiDDecoder` over `net` that samples as a released student (the 4-step SDE re-noise sampler)."""
    from pid.checkpoints import CheckpointRecord
    from pid.decoder import PiDDecoder

    cfg = net.cfg
    record = CheckpointRecord(backbone=backbone, ckpt_type="training", folder="", net_config=cfg.name,
                              scale=cfg.sr_scale, latent_space=backbone, sampler="distilled")
    return PiDDecoder(net, record, NegativeCaption(null_embeds))  # sets eval mode; the callers restore it


def read_png(path: Path) -> Tensor:
    """An 8-bit RGB PNG as [1, 3, H, W] in [0, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def _sigma_name(sigma: float) -> str:
    return f"sigma_{sigma:.3f}"


class DistillValidator:
    """Scores the student's EMA weights every `cfg.every` iterations against the ground truth and the teacher's
    many-step decode. `items` are this rank's share of the held-out set, `item_ids` the whole set's; `copy` the
    unsharded student copy an FSDP2 run scores with."""

    def __init__(self, cfg: ValConfig, run_dir: Path, backbone: str, items: list[ValItem], item_ids: list[str],
                 null_embeds: Tensor, teacher_source: str, device: torch.device, copy: nn.Module | None = None,
                 ranks: ValRanks = ValRanks()) -> None:
        self.cfg, self.run_dir, self.backbone = cfg, run_dir, backbone
        self.items, self.item_ids, self.null_embeds, self.device = items, item_ids, null_embeds, device
        self.teacher_source, self.copy, self.ranks = teacher_source, copy, ranks
        self.fingerprint = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]
        self.teacher: dict[float, dict[str, Any]] | None = None  # sigma -> its scores vs the ground truth
        self.references: dict[tuple[str, float], Tensor] = {}  # (item id, sigma) -> the teacher's decode
        self.done = self.recorded()

    def identity(self) -> dict[str, Any]:
        """What the cached teacher decodes depend on (not the student's steps, nor how often it is scored)."""
        digest = hashlib.sha256(Path(self.cfg.manifest).read_bytes()).hexdigest()[:16]
        return {**asdict(self.cfg), "every": None, "images": None, "steps": None, "sigmas": list(self.cfg.sigmas),
                "manifest_sha256": digest, "items": list(self.item_ids), "teacher": self.teacher_source}

    def recorded(self) -> set[tuple[int, float]]:
        """(step, σ) pairs val.jsonl already holds for this validation set (a rerun does not score them again)."""
        path = self.run_dir / VAL_FILE
        if not self.ranks.writer or not path.is_file():
            return self.ranks.decide(set())
        done = set()
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # the torn last line of a killed run
                continue
            if isinstance(row, dict) and row.get("validation") == self.fingerprint:
                done.add((int(row["step"]), float(row["sigma"])))
        return self.ranks.decide(done)

    def teacher_path(self, item_id: str, sigma: float) -> Path:
        return self.run_dir / VAL_DIR / "teacher" / f"{item_id}_{_sigma_name(sigma)}.png"

    def prepare_teacher(self, teacher: nn.Module) -> None:
        """The teacher's decodes and scores: read from the run folder when made for this validation set, else
        decoded now (undistilled sampler, text CFG) and cached."""
        path = self.run_dir / VAL_DIR / TEACHER_FILE
        identity = json.loads(json.dumps(self.identity()))
        scores = None
        if self.ranks.writer and path.is_file():
            cached = json.loads(path.read_text(encoding="utf-8"))
            complete = all(self.teacher_path(i, s).is_file() for i in self.item_ids for s in self.cfg.sigmas)
            if cached.get("identity") == identity and complete:
                scores = cached["scores"]
        scores = self.ranks.decide(scores)
        if scores is None:
            self.decode_teacher(teacher, path, identity)
        else:
            self.teacher = {float(s): v for s, v in scores.items()}
        self.references = {(i.item_id, s): read_png(self.teacher_path(i.item_id, s))
                           for i in self.items for s in self.cfg.sigmas}

    @torch.no_grad()
    def decode_teacher(self, teacher: nn.Module, path: Path, identity: dict[str, Any]) -> None:
        for item in self.items:
            if item.position < self.cfg.images:
                write_image(self.run_dir / VAL_DIR / "target" / f"{item.item_id}.png", unit_to_uint8(item.target[0]))
        scores: dict[float, dict[str, Any]] = {}
        was_training = teacher.training
        with on_device(teacher, self.device):
            decoder = undistilled_decoder(teacher, self.backbone, self.null_embeds)
            try:
                for sigma in self.cfg.sigmas:
                    rows, images = [], {}
                    for item in self.items:
                        decoded = decode_item(decoder, item, sigma, self.cfg, steps=self.cfg.teacher_steps)
                        file = write_image(self.teacher_path(item.item_id, sigma), unit_to_uint8(decoded[0]))
                        row = summarize(read_png(file), item.target)  # the 8-bit decode, as the student sees it
                        rows.append({"id": item.item_id, "position": item.position,
                                     **{m: row[m][0] for m in METRICS}})
                        if item.position < self.cfg.images:
                            images[item.item_id] = file.relative_to(self.run_dir).as_posix()
                    scores[sigma] = gathered(self.ranks, rows, images)
            finally:
                teacher.train(was_training)
        self.teacher = scores
        if self.ranks.writer:
            write_json(path, {"identity": identity, "steps": self.cfg.teacher_steps,
                              "scores": {str(s): v for s, v in scores.items()}})
            logger.info("validation: teacher ({} steps) {}", self.cfg.teacher_steps, _line(scores))

    @torch.no_grad()
    def score_student(self, student: nn.Module, sigmas: list[float], step: int) -> dict[float, dict[str, Any]]:
        """sigma -> {"mean", "per_image", "images"} of the student (holding the EMA weights: the caller's
        `scored_weights`), over the whole set (this rank decodes its share)."""
        decoder = distilled_decoder(student, self.backbone, self.null_embeds)
        folder = self.run_dir / VAL_DIR / f"step_{step:09d}"
        out: dict[float, dict[str, Any]] = {}
        for sigma in sigmas:
            rows, images = [], {}
            for item in self.items:
                decoded = decoder.decode(item.latents[sigma], caption_embeds=item.caption_embeds,
                                         degrade_sigma=sigma, steps=self.cfg.steps,
                                         seed=self.cfg.seed + item.position,
                                         output_size=tuple(item.target.shape[-2:])).cpu()
                truth = summarize(decoded, item.target)
                versus = summarize(decoded, self.references[(item.item_id, sigma)])
                rows.append({"id": item.item_id, "position": item.position, **{m: truth[m][0] for m in METRICS},
                             **{f"{m}_vs_teacher": versus[m][0] for m in METRICS}})
                if item.position < self.cfg.images:
                    path = write_image(folder / f"{item.item_id}_{_sigma_name(sigma)}.png", unit_to_uint8(decoded[0]))
                    images[item.item_id] = path.relative_to(self.run_dir).as_posix()
            out[sigma] = gathered(self.ranks, rows, images)
        return out

    def __call__(self, step: int, student: nn.Module, ema: dict[str, Tensor], teacher: nn.Module
                 ) -> list[dict[str, Any]]:
        """Score the student's EMA weights at iteration `step`; append one line per σ to val.jsonl (σ values
        already recorded at this step are skipped); returns the new records."""
        sigmas = [s for s in self.cfg.sigmas if (step, s) not in self.done]
        if not sigmas:
            if self.ranks.writer:
                logger.info("validation at iteration {}: already in {}", step, VAL_FILE)
            return []
        if self.teacher is None:
            self.prepare_teacher(teacher)
        assert self.teacher is not None
        with scored_weights(student, ema, self.copy, self.device) as scored:
            scores = self.score_student(scored, sigmas, step)
        records = []
        for sigma, result in scores.items():
            reference = self.teacher[sigma]
            record = {"step": step, "sigma": sigma, "validation": self.fingerprint, "student_steps": self.cfg.steps,
                      "teacher_steps": self.cfg.teacher_steps, "ema": result["mean"], "teacher": reference["mean"],
                      "images": result["images"], "teacher_images": reference["images"],
                      "targets": {i: f"{VAL_DIR}/target/{i}.png" for i in result["images"]},
                      "per_image": [{"id": e["id"], "ema": {k: v for k, v in e.items() if k != "id"},
                                     "teacher": {m: t[m] for m in METRICS}}
                                    for e, t in zip(result["per_image"], reference["per_image"])]}
            if self.ranks.writer:
                append_jsonl(self.run_dir / VAL_FILE, record)
            self.done.add((step, sigma))
            records.append(record)
        if self.ranks.writer:
            logger.info("validation at iteration {}: student {} (teacher {})", step, _line(scores), _line(self.teacher))
        return records


def _line(scores: dict[float, dict[str, Any]]) -> str:
    parts = []
    for sigma, value in scores.items():
        mean = value["mean"]
        text = f"σ={sigma:g} psnr {mean['psnr']:.2f} ΔE {mean['delta_e2000']:.2f}"
        if "psnr_vs_teacher" in mean:
            text += f", vs teacher psnr {mean['psnr_vs_teacher']:.2f} ΔE {mean['delta_e2000_vs_teacher']:.2f}"
        parts.append(text)
    return "; ".join(parts)




def open_distill_validator(cfg: ValConfig, run_dir: Path, backbone: str, student: nn.Module,
                           encode_lq: Callable[[Tensor], Tensor],
                           encode_captions: Callable[[Sequence[str]], Tensor], null_embeds: Tensor,
                           teacher_source: str, device: torch.device) -> DistillValidator:
    """Encode this rank's share of the held-out set once; the teacher's decodes wait for the first validation.
    Every rank calls it (on several processes it gathers, and an FSDP2 student gets its unsharded copy)."""
    from pid.errors import InputError
    from pid.training.val_ranks import plain_copy
    from pid.training.validation import load_val_items, val_multiple

    ranks = ValRanks.current()
    multiple = val_multiple(student.cfg.latent_downsample, student.cfg.patch_size)
    items, item_ids = load_val_items(cfg, multiple, encode_lq, encode_captions, device, ranks)
    if not item_ids:
        raise InputError(f"val_manifest {cfg.manifest}: no image could be read; fix the manifest or drop it")
    return DistillValidator(cfg, run_dir, backbone, items, item_ids, null_embeds, teacher_source, device,
                            plain_copy(student), ranks)


__all__ = ["DistillValidator", "distilled_decoder", "open_distill_validator"]
