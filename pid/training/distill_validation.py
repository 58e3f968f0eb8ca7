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
scoring). The held-out set is read and encoded as in `pid.training.validation`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
from pid.training.schedules import dynamic_shift
from pid.training.validation import (
    METRICS,
    VAL_DIR,
    VAL_FILE,
    NegativeCaption,
    ValConfig,
    ValItem,
    ema_weights,
    mean_scores,
    undistilled_decoder,
)

TEACHER_FILE = "teacher.json"
VS_TEACHER = tuple(f"{m}_vs_teacher" for m in METRICS)


def distilled_decoder(net: nn.Module, backbone: str, null_embeds: Tensor) -> Any:
    """A `PiDDecoder` over `net` that samples as a released student (the 4-step SDE re-noise sampler)."""
    from pid.checkpoints import CheckpointRecord
    from pid.decoder import PiDDecoder

    cfg = net.cfg
    record = CheckpointRecord(backbone=backbone, ckpt_type="training", folder="", net_config=cfg.name,
                              scale=cfg.sr_scale, latent_space=backbone, sampler="distilled")
    return PiDDecoder(net, record, NegativeCaption(null_embeds))  # sets eval mode; the callers restore it


@contextmanager
def on_device(net: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """`net` on `device` for the block (a teacher offloaded to the CPU between uses comes back after)."""
    home = next(net.parameters()).device
    moved = home != device
    if moved:
        net.to(device)
    try:
        yield net
    finally:
        if moved:
            net.to(home)


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
    many-step decode (rank 0)."""

    def __init__(self, cfg: ValConfig, run_dir: Path, backbone: str, items: list[ValItem], null_embeds: Tensor,
                 teacher_source: str, device: torch.device) -> None:
        self.cfg, self.run_dir, self.backbone = cfg, run_dir, backbone
        self.items, self.null_embeds, self.device = items, null_embeds, device
        self.teacher_source = teacher_source
        self.fingerprint = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]
        self.teacher: dict[float, dict[str, Any]] | None = None  # sigma -> its scores vs the ground truth
        self.references: dict[tuple[str, float], Tensor] = {}  # (item id, sigma) -> the teacher's decode
        self.done = self.recorded()

    def identity(self) -> dict[str, Any]:
        """What the cached teacher decodes depend on (not the student's steps, nor how often it is scored)."""
        digest = hashlib.sha256(Path(self.cfg.manifest).read_bytes()).hexdigest()[:16]
        return {**asdict(self.cfg), "every": None, "images": None, "steps": None, "sigmas": list(self.cfg.sigmas),
                "manifest_sha256": digest, "items": [i.item_id for i in self.items], "teacher": self.teacher_source}

    def recorded(self) -> set[tuple[int, float]]:
        """(step, σ) pairs val.jsonl already holds for this validation set (a rerun does not score them again)."""
        path = self.run_dir / VAL_FILE
        if not path.is_file():
            return set()
        done = set()
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # the torn last line of a killed run
                continue
            if isinstance(row, dict) and row.get("validation") == self.fingerprint:
                done.add((int(row["step"]), float(row["sigma"])))
        return done

    def teacher_path(self, item: ValItem, sigma: float) -> Path:
        return self.run_dir / VAL_DIR / "teacher" / f"{item.item_id}_{_sigma_name(sigma)}.png"

    def prepare_teacher(self, teacher: nn.Module) -> None:
        """The teacher's decodes and scores: read from the run folder when made for this validation set, else
        decoded now (undistilled sampler, text CFG) and cached."""
        path = self.run_dir / VAL_DIR / TEACHER_FILE
        identity = json.loads(json.dumps(self.identity()))
        cached = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        complete = all(self.teacher_path(i, s).is_file() for i in self.items for s in self.cfg.sigmas)
        if cached.get("identity") != identity or not complete:
            self.decode_teacher(teacher, path, identity)
        else:
            self.teacher = {float(s): v for s, v in cached["scores"].items()}
        self.references = {(i.item_id, s): read_png(self.teacher_path(i, s))
                           for i in self.items for s in self.cfg.sigmas}

    @torch.no_grad()
    def decode_teacher(self, teacher: nn.Module, path: Path, identity: dict[str, Any]) -> None:
        for item in self.items[: self.cfg.images]:
            write_image(self.run_dir / VAL_DIR / "target" / f"{item.item_id}.png", unit_to_uint8(item.target[0]))
        scores: dict[float, dict[str, Any]] = {}
        was_training = teacher.training
        with on_device(teacher, self.device):
            decoder = undistilled_decoder(teacher, self.backbone, self.null_embeds)
            try:
                for sigma in self.cfg.sigmas:
                    rows, images = [], {}
                    for index, item in enumerate(self.items):
                        size = tuple(item.target.shape[-2:])
                        decoded = decoder.decode(item.latents[sigma], caption_embeds=item.caption_embeds,
                                                 degrade_sigma=sigma, steps=self.cfg.teacher_steps,
                                                 seed=self.cfg.seed + index, output_size=size,
                                                 cfg_scale=self.cfg.cfg_scale, shift=dynamic_shift(*size)).cpu()
                        file = write_image(self.teacher_path(item, sigma), unit_to_uint8(decoded[0]))
                        row = summarize(read_png(file), item.target)  # the 8-bit decode, as the student sees it
                        rows.append({"id": item.item_id, **{m: row[m][0] for m in METRICS}})
                        if index < self.cfg.images:
                            images[item.item_id] = file.relative_to(self.run_dir).as_posix()
                    scores[sigma] = {"mean": mean_scores(rows), "per_image": rows, "images": images}
            finally:
                teacher.train(was_training)
        self.teacher = scores
        write_json(path, {"identity": identity, "steps": self.cfg.teacher_steps,
                          "scores": {str(s): v for s, v in scores.items()}})
        logger.info("validation: teacher ({} steps) {}", self.cfg.teacher_steps, _line(scores))

    @torch.no_grad()
    def score_student(self, student: nn.Module, sigmas: list[float], step: int) -> dict[float, dict[str, Any]]:
        """sigma -> {"mean", "per_image", "images"} of the student (the EMA weights swapped in by the caller)."""
        decoder = distilled_decoder(student, self.backbone, self.null_embeds)
        folder = self.run_dir / VAL_DIR / f"step_{step:09d}"
        out: dict[float, dict[str, Any]] = {}
        for sigma in sigmas:
            rows, images = [], {}
            for index, item in enumerate(self.items):
                decoded = decoder.decode(item.latents[sigma], caption_embeds=item.caption_embeds,
                                         degrade_sigma=sigma, steps=self.cfg.steps, seed=self.cfg.seed + index,
                                         output_size=tuple(item.target.shape[-2:])).cpu()
                truth = summarize(decoded, item.target)
                versus = summarize(decoded, self.references[(item.item_id, sigma)])
                rows.append({"id": item.item_id, **{m: truth[m][0] for m in METRICS},
                             **{f"{m}_vs_teacher": versus[m][0] for m in METRICS}})
                if index < self.cfg.images:
                    path = write_image(folder / f"{item.item_id}_{_sigma_name(sigma)}.png", unit_to_uint8(decoded[0]))
                    images[item.item_id] = path.relative_to(self.run_dir).as_posix()
            keys = (*METRICS, *VS_TEACHER)
            out[sigma] = {"mean": {k: sum(r[k] for r in rows) / len(rows) for k in keys}, "per_image": rows,
                          "images": images}
        return out

    def __call__(self, step: int, student: nn.Module, ema: dict[str, Tensor], teacher: nn.Module
                 ) -> list[dict[str, Any]]:
        """Score the student's EMA weights at iteration `step`; append one line per σ to val.jsonl (σ values
        already recorded at this step are skipped); returns the new records."""
        sigmas = [s for s in self.cfg.sigmas if (step, s) not in self.done]
        if not sigmas:
            logger.info("validation at iteration {}: already in {}", step, VAL_FILE)
            return []
        if self.teacher is None:
            self.prepare_teacher(teacher)
        assert self.teacher is not None
        with ema_weights(student, ema):
            scores = self.score_student(student, sigmas, step)
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
            append_jsonl(self.run_dir / VAL_FILE, record)
            self.done.add((step, sigma))
            records.append(record)
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
    """Encode the held-out set once; the teacher's decodes wait for the first validation."""
    from pid.errors import InputError
    from pid.training.validation import load_val_items, val_multiple

    multiple = val_multiple(student.cfg.latent_downsample, student.cfg.patch_size)
    items = load_val_items(cfg, multiple, encode_lq, encode_captions, device)
    if not items:
        raise InputError(f"val_manifest {cfg.manifest}: no image could be read; fix the manifest or drop it")
    return DistillValidator(cfg, run_dir, backbone, items, null_embeds, teacher_source, device)


__all__ = ["DistillValidator", "distilled_decoder", "open_distill_validator"]
