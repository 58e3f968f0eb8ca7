"""VAE round-trip evaluation: image -> VAE encode -> optional noise at each sigma -> PiD decode at
scale x beside the VAE's own decode, with metrics, a report and comparison grids.

    python -m pid.inference.from_clean backbone=flux manifest=assets/clean_image_manifest.jsonl degrade_sigmas=[0,0.3]
    python -m pid.inference.from_clean --backbone sd3 --input_path photo.jpg --prompt "..."   # reference flags

Outputs under `<output_dir>/<run tag>/`: `input/<id>.png` (cropped input), `vae/sigma_<s>/<id>.png`
(VAE round trip, native size), `pid/sigma_<s>/<id>.png` (PiD, scale x), `grid/sigma_<s>/<id>.png`
(input | VAE | PiD with an enlarged crop of one region), `metrics.csv` (PSNR, SSIM, CIEDE2000 per
image, sigma and decoder), `summary.json` (means per sigma, failures), `metrics.png` (means
against sigma; needs matplotlib). PiD's output is compared with the input after resizing it to
the input size with antialiased bicubic (`pid.metrics.resize_to`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pid.errors import ConfigError, PiDError
from pid.inference import distributed as dist
from pid.inference.cli import (
    COMMON_FLAGS,
    chunk_setting,
    compose,
    resolve_decoder,
    run_cli,
    translate_reference_flags,
)
from pid.inference.io import (
    ManifestEntry,
    build_run_tag,
    load_image,
    read_jsonl,
    read_manifest,
    sample_name,
    should_skip,
    signed_to_uint8,
    unit_to_uint8,
    write_csv,
    write_image,
    write_json,
)
from pid.metrics import resize_to, summarize
from pid.tiling import decode_within_memory

FROM_CLEAN_FLAGS = {
    **COMMON_FLAGS,
    "--input_path": ("input_path", 1),
    "--manifest": ("manifest", 1),
    "--prompt": ("prompt", 1),
    "--degrade_sigmas": ("degrade_sigmas", "+"),
    "--max_side": ("max_side", 1),
}
METRICS = ("psnr", "ssim", "delta_e2000")


def load_config(argv: Sequence[str]) -> DictConfig:
    return compose("from_clean", translate_reference_flags(list(argv), FROM_CLEAN_FLAGS))


@dataclass
class Sample:
    index: int
    image: Path
    prompt: str
    sample_id: str


@dataclass
class CleanPlan:
    backbone: str
    ckpt_type: str
    scale: int
    sigmas: list[float]
    samples: list[Sample]
    out_dir: Path


def plan_run(cfg: DictConfig) -> CleanPlan:
    backbone = cfg.backbone.name
    record, scale = resolve_decoder(cfg)
    ckpt_type = record.ckpt_type
    # Duplicates would only redo (and overwrite) the same work.
    sigmas = sorted({float(s) for s in (cfg.degrade_sigmas if cfg.degrade_sigmas is not None else [0.0])})
    bad = [s for s in sigmas if not 0.0 <= s <= 1.0 or math.isnan(s)]
    if bad or not sigmas:
        raise ConfigError(f"degrade_sigmas must be values in [0, 1], got {list(cfg.degrade_sigmas)}")
    if (cfg.manifest is None) == (cfg.input_path is None):
        raise ConfigError("give exactly one of manifest=images.jsonl or input_path=image.png")
    if cfg.manifest is not None:
        entries = read_manifest(cfg.manifest)
        samples = [
            Sample(i, e.image, e.prompt or cfg.prompt or "", f"{sample_name(i)}_{e.image.stem}")
            for i, e in enumerate(entries)
        ]
    else:
        path = Path(cfg.input_path)
        samples = [Sample(0, path, cfg.prompt or "", path.stem)]
    for sample in samples:
        if not sample.prompt:
            logger.warning("{}: no caption (manifest or prompt=); decoding with an empty caption", sample.image)
    if cfg.save_format not in ("png", "jpg"):
        raise ConfigError(f"save_format must be png or jpg, got {cfg.save_format!r}")
    pid_steps = cfg.pid_steps or (4 if record.sampler == "distilled" else 25)
    tag = build_run_tag(backbone, record.hub_path, pid_steps=pid_steps, note=cfg.note or "")
    tag += f"_x{scale}_seed{int(cfg.seed)}"
    return CleanPlan(backbone, ckpt_type, scale, sigmas, samples, Path(cfg.output_dir) / tag)


def _paths(plan: CleanPlan, sample: Sample, sigma: float, fmt: str) -> dict[str, Path]:
    folder = f"sigma_{sigma:.3f}"
    return {
        "pid": plan.out_dir / "pid" / folder / f"{sample.sample_id}.{fmt}",
        "vae": plan.out_dir / "vae" / folder / f"{sample.sample_id}.{fmt}",
        "grid": plan.out_dir / "grid" / folder / f"{sample.sample_id}.png",
    }


def run(cfg: DictConfig, decoder: Any = None, latent_space: Any = None) -> dict[str, Any]:
    """Run the evaluation; `decoder` / `latent_space` may be passed in (tests, embedding)."""
    from pid.latents import get as get_latent_space

    plan = plan_run(cfg)
    env = dist.init_distributed()
    device = torch.device(cfg.device) if cfg.device else dist.rank_device()
    mine = dist.shard(plan.samples, env.rank, env.world_size)
    rows_file = plan.out_dir / f"metrics.rank{env.rank}.jsonl"
    done_rows = read_jsonl(rows_file) if rows_file.is_file() and not cfg.overwrite else []
    done_keys = {(r["sample_id"], r["sigma"]) for r in done_rows}
    todo = [
        (i, s) for i, s in mine
        if cfg.overwrite or not all(
            (s.sample_id, sigma) in done_keys and should_skip(_paths(plan, s, sigma, cfg.save_format).values(), False)
            for sigma in plan.sigmas
        )
    ]
    logger.info("rank {}/{}: {} images, {} to do; outputs in {}", env.rank, env.world_size, len(mine), len(todo),
                plan.out_dir)
    failures: list[dict[str, Any]] = []
    rows = [r for r in done_rows if r["sample_id"] not in {s.sample_id for _, s in todo}]
    if todo:
        if latent_space is None:
            latent_space = get_latent_space(plan.backbone).load(device=device, checkpoint_dir=cfg.checkpoint_dir)
        if decoder is None:
            from pid.inference.from_ldm import build_decoder

            decoder = build_decoder(cfg, plan, device)
        for _, sample in tqdm(todo, desc=f"images (rank {env.rank})", disable=not dist.is_main()):
            try:
                new_rows = _evaluate(cfg, plan, decoder, latent_space, sample, device)
            except PiDError as exc:
                logger.error("{}: {}", sample.image, exc)
                failures.append({"image": str(sample.image), "reason": str(exc)})
                continue
            except (RuntimeError, ValueError, OSError) as exc:  # keep going past one bad image
                logger.exception("{} failed", sample.image)
                failures.append({"image": str(sample.image), "reason": f"{type(exc).__name__}: {exc}"})
                continue
            rows.extend(new_rows)
            from pid.inference.io import append_jsonl

            for row in new_rows:
                append_jsonl(rows_file, row)
    gathered = dist.gather_objects({"rows": rows, "failures": failures})
    summary: dict[str, Any] = {}
    if dist.is_main():
        all_rows = sorted((r for g in gathered for r in g["rows"]), key=lambda r: (r["index"], r["sigma"], r["decoder"]))
        all_failures = [f for g in gathered for f in g["failures"]]
        summary = _report(plan, all_rows, all_failures, plot=cfg.plot)
    dist.barrier()
    return summary


def _evaluate(cfg, plan: CleanPlan, decoder, space, sample: Sample, device) -> list[dict[str, Any]]:
    image = load_image(sample.image, multiple=space.size_multiple, max_side=cfg.max_side)  # [1,3,H,W] in [-1,1]
    height, width = image.shape[-2:]
    min_side = space.size_multiple
    if height < min_side or width < min_side:
        raise ConfigError(f"image {sample.image} is smaller than one latent cell ({min_side} px)")
    write_image(plan.out_dir / "input" / f"{sample.sample_id}.{cfg.save_format}", signed_to_uint8(image[0]))
    target = ((image + 1) / 2).clamp(0, 1)
    with torch.no_grad():
        clean = space.encode(image.to(device)).float()
    native = (clean.shape[-2] * space.downsample, clean.shape[-1] * space.downsample)
    output_size = (native[0] * plan.scale, native[1] * plan.scale)
    embeds = decoder.encode_captions([sample.prompt])
    rows = []
    for sigma in plan.sigmas:
        seed = int(cfg.seed) + sample.index
        generator = torch.Generator(clean.device).manual_seed(seed)  # same eps for every sigma
        latent = space.add_noise(clean, sigma, generator) if sigma > 0 else clean
        paths = _paths(plan, sample, sigma, cfg.save_format)
        start = time.perf_counter()
        with torch.no_grad():
            vae = ((space.decode(latent).float().clamp(-1, 1) + 1) / 2).cpu()
        vae_s = time.perf_counter() - start
        start = time.perf_counter()
        pid = decode_within_memory(
            decoder, latent, chunk=chunk_setting(cfg), tile_size=cfg.pid_tile, overlap=cfg.pid_tile_overlap,
            caption_embeds=embeds, degrade_sigma=sigma, steps=cfg.pid_steps, seed=seed,
            output_size=output_size, cfg_scale=cfg.pid_cfg_scale, shift=cfg.pid_shift,
        ).cpu()
        pid_s = time.perf_counter() - start
        write_image(paths["vae"], unit_to_uint8(vae[0]))
        write_image(paths["pid"], unit_to_uint8(pid[0]))
        write_image(paths["grid"], comparison_grid(target[0], vae[0], pid[0]))
        for name, decoded, seconds in (("vae", vae, vae_s), ("pid", pid, pid_s)):
            scores = summarize(resize_to(decoded, (height, width)), target)
            rows.append({
                "index": sample.index, "sample_id": sample.sample_id, "image": str(sample.image),
                "backbone": plan.backbone, "sigma": sigma, "decoder": name,
                "input_size": f"{width}x{height}", "output_size": f"{decoded.shape[-1]}x{decoded.shape[-2]}",
                **{m: scores[m][0] for m in METRICS}, "seconds": round(seconds, 4),
            })
        logger.info("[{}] sigma={:.3f} psnr vae={:.2f} pid={:.2f} -> {}", sample.index, sigma,
                    rows[-2]["psnr"], rows[-1]["psnr"], paths["pid"])
    return rows


def comparison_grid(target: torch.Tensor, vae: torch.Tensor, pid: torch.Tensor, crop_fraction: float = 0.25) -> np.ndarray:
    """Input | VAE | PiD at PiD's size on top; below, the same centre crop of each enlarged to a panel."""
    import cv2

    height, width = pid.shape[-2:]
    panels = [resize_to(x[None].float(), (height, width))[0] for x in (target, vae, pid)]
    ch, cw = max(8, int(height * crop_fraction)), max(8, int(width * crop_fraction))
    top, left = (height - ch) // 2, (width - cw) // 2
    crops = [
        torch.nn.functional.interpolate(p[None, :, top : top + ch, left : left + cw], size=(height, width), mode="nearest")[0]
        for p in panels
    ]
    gap = 4
    canvas = np.full((2 * height + gap, 3 * width + 2 * gap, 3), 255, dtype=np.uint8)
    for col, (full, crop) in enumerate(zip(panels, crops, strict=True)):
        x = col * (width + gap)
        canvas[:height, x : x + width] = unit_to_uint8(full)
        canvas[height + gap :, x : x + width] = unit_to_uint8(crop)
        # mark the enlarged region on the full view
        cv2.rectangle(canvas, (x + left, top), (x + left + cw - 1, top + ch - 1), (255, 0, 0), max(1, height // 256))
        label = ("input", "VAE", "PiD")[col]
        scale = max(0.4, height / 512)
        cv2.putText(canvas, label, (x + 6, int(24 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(canvas, label, (x + 6, int(24 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return canvas


def _report(plan: CleanPlan, rows: list[dict[str, Any]], failures: list[dict[str, Any]], plot: bool) -> dict[str, Any]:
    write_csv(plan.out_dir / "metrics.csv", rows)
    means: dict[str, dict[str, dict[str, float]]] = {}
    for sigma in plan.sigmas:
        for name in ("vae", "pid"):
            picked = [r for r in rows if r["sigma"] == sigma and r["decoder"] == name]
            if picked:
                means.setdefault(f"{sigma:.3f}", {})[name] = {
                    m: float(np.mean([min(r[m], 100.0) if m == "psnr" else r[m] for r in picked])) for m in METRICS
                } | {"count": len(picked)}
    summary = {"backbone": plan.backbone, "ckpt_type": plan.ckpt_type, "scale": plan.scale,
               "psnr_cap_db": 100.0, "means": means, "failures": failures, "output_dir": str(plan.out_dir)}
    write_json(plan.out_dir / "summary.json", summary)
    lines = [f"{'sigma':>6}  {'decoder':<7} {'PSNR':>7} {'SSIM':>7} {'dE2000':>7}  n"]
    for sigma, per in means.items():
        for name, vals in per.items():
            lines.append(f"{sigma:>6}  {name:<7} {vals['psnr']:7.2f} {vals['ssim']:7.4f} {vals['delta_e2000']:7.3f}  "
                         f"{vals['count']}")
    print("\n".join(lines))
    for failure in failures:
        print(f"FAILED {failure['image']}: {failure['reason']}")
    if plot and means:
        _plot(plan.out_dir / "metrics.png", means)
    return summary


def _plot(path: Path, means: dict[str, dict[str, dict[str, float]]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not installed (pip install -e '.[plots]'); skipping {}", path)
        return
    import io as _io

    from pid.inference.io import atomic_write_bytes

    sigmas = [float(s) for s in means]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, metric in zip(axes, METRICS, strict=True):
        for name in ("vae", "pid"):
            values = [means[s].get(name, {}).get(metric, float("nan")) for s in means]
            ax.plot(sigmas, values, marker="o", label=name.upper() if name == "vae" else "PiD")
        ax.set_xlabel("degrade sigma")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    def _main(args: Sequence[str]) -> None:
        try:
            run(load_config(args))
        finally:
            dist.cleanup()

    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ManifestEntry", "comparison_grid", "load_config", "main", "plan_run", "run"]
