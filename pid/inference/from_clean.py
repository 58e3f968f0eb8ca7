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

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger
from tqdm.auto import tqdm

from pid.errors import ConfigError, PiDError
from pid.inference import distributed as dist
from pid.inference import runs, validate
from pid.inference.atomic import StagedFiles
from pid.inference.cli import (
    EXIT_ITEMS_FAILED,
    EntryPoint,
    Settings,
    check_output_dir,
    parse_command,
    plan_or_run,
    run_cli,
)
from pid.inference.decoder_settings import (
    check_pid_steps,
    chunk_setting,
    declared_space,
    resolve_decoder,
    unused_sampler_knobs,
)
from pid.inference.from_ldm import COMMON_FLAGS, COMMON_NO_EFFECT, DTYPES
from pid.inference.io import (
    ManifestEntry,
    load_image,
    read_manifest,
    sample_name,
    sigma_dir,
    signed_to_uint8,
    unit_to_uint8,
    write_csv,
    write_image,
)
from pid.inference.lifecycle import report_item_failure
from pid.metrics import resize_to, summarize
from pid.preflight import plan_files
from pid.tiling import decode_within_memory

FROM_CLEAN = EntryPoint(
    "from_clean",
    flags={
        **COMMON_FLAGS,
        "--input_path": "input_path",
        "--manifest": "manifest",
        "--prompt": "prompt",
        "--degrade_sigmas": "degrade_sigmas",
        "--max_side": "max_side",
    },
    no_effect=COMMON_NO_EFFECT,
)
MODULE = "pid.inference.from_clean"
METRICS = ("psnr", "ssim", "delta_e2000")
SIGMA_DECIMALS = 3  # sigma_0.200/: two sigmas closer than this would share their files


def load_config(argv: Sequence[str]) -> Settings:
    """The settings for these command-line arguments (key=value or upstream --flags)."""
    return parse_command(FROM_CLEAN, list(argv)).settings


@dataclass
class Sample:
    index: int
    image: Path
    prompt: str
    sample_id: str
    missing: str | None = None  # why the image cannot be found, when it cannot


@dataclass
class CleanPlan:
    backbone: str
    record: Any
    checkpoint: dict[str, Any]
    scale: int
    sigmas: list[float]
    samples: list[Sample]
    pid_steps: int
    out_dir: Path
    identity: dict[str, Any] = field(default_factory=dict)
    space: Any = None  # a declared latent space (not loaded); None for the backbone's built-in one

    @property
    def ckpt_type(self) -> str:
        return self.record.ckpt_type

    def describe(self, rank: int, world_size: int) -> dict[str, Any]:
        """The dry run's JSON object."""
        mine = [s for _, s in dist.shard(self.samples, rank, world_size)]
        return {
            "entry": "from_clean", "backbone": self.backbone, "ckpt_type": self.ckpt_type,
            "checkpoint": self.checkpoint, "net_config": self.record.net_config, "scale": self.scale,
            "pid_steps": self.pid_steps, "output_dir": str(self.out_dir), "degrade_sigmas": self.sigmas,
            "rank": rank, "world_size": world_size,
            "images": [str(s.image) for s in mine if s.missing is None],
            "prompts": [s.prompt for s in mine if s.missing is None],
            "missing": [{"image": str(s.image), "reason": s.missing} for s in mine if s.missing],
            "files": plan_files(self.backbone, self.checkpoint, self.identity["decoder"]["text_encoder"]),
        }


def _sample_from(index: int, entry: ManifestEntry, fallback_prompt: str | None) -> Sample:
    return Sample(index, entry.image, entry.prompt or fallback_prompt or "", f"{sample_name(index)}_{entry.image.stem}",
                  entry.missing_reason())


def plan_run(settings: Settings) -> CleanPlan:
    """Validate the settings and resolve every default; raises one-line ConfigError / InputError."""
    space = declared_space(settings)
    backbone = space.name if space is not None else settings.backbone.name
    validate.check_device(settings.get("device"))
    validate.check_decode_settings(settings)
    validate.check_text_encoder(settings.get("text_encoder"))
    record, scale = resolve_decoder(settings, space)
    sigmas = sorted({float(s) for s in (settings.degrade_sigmas if settings.degrade_sigmas is not None else [0.0])})
    bad = [s for s in sigmas if not 0.0 <= s <= 1.0 or math.isnan(s)]
    if bad or not sigmas:
        raise ConfigError(f"degrade_sigmas must be values in [0, 1], got {settings.degrade_sigmas}")
    fine = [s for s in sigmas if round(s, SIGMA_DECIMALS) != s]
    if fine:
        raise ConfigError(f"degrade_sigmas have {SIGMA_DECIMALS} decimals at most (each names its folder, "
                          f"{sigma_dir(fine[0])}/), got {fine[0]}; round it")
    if (settings.manifest is None) == (settings.input_path is None):
        raise ConfigError("give exactly one of manifest=images.jsonl or input_path=image.png")
    if settings.manifest is not None:
        samples = [_sample_from(i, e, settings.prompt) for i, e in enumerate(read_manifest(settings.manifest))]
    else:
        path = Path(settings.input_path).expanduser()
        missing = None if path.is_file() else f"image {path} does not exist"
        samples = [Sample(0, path, settings.prompt or "", path.stem, missing)]
    for sample in samples:
        if not sample.prompt and sample.missing is None:
            logger.warning("{}: no caption (manifest or prompt=); decoding with an empty caption", sample.image)
    if settings.max_side is not None and settings.max_side < 16:
        raise ConfigError(f"max_side must be at least 16 px, got {settings.max_side}")
    pid_steps = check_pid_steps(settings, record)
    validate.check_seeds(settings, len(samples))
    check_output_dir(settings.output_dir)
    checkpoint = runs.describe_decoder_file(record, settings)
    decoder = runs.decoder_identity(settings, record, checkpoint, scale, None, pid_steps, None)
    identity = {"backbone": backbone, "decoder": decoder, "vae_dtype": settings.get("dtype"),
                "max_side": settings.max_side, "save_format": settings.save_format}
    if space is not None:  # the declared VAE and normalisation decide the pixels too
        identity["latent_space"] = space.spec.to_dict()
    ignored = set(unused_sampler_knobs(settings, record))
    tag = runs.run_tag(
        backbone, checkpoint, pid_steps=pid_steps,
        cfg_scale=None if "pid_cfg_scale" in ignored else settings.pid_cfg_scale,
        shift=None if "pid_shift" in ignored else settings.pid_shift, note=settings.note or "",
    ) + f"_x{scale}_seed{int(settings.seed)}"
    out_dir = Path(settings.output_dir).expanduser() / tag
    validate.check_writable_folder(out_dir, "run folder")
    return CleanPlan(backbone, record, checkpoint, scale, sigmas, samples, pid_steps, out_dir, identity, space)


def _paths(plan: CleanPlan, sample: Sample, sigma: float, fmt: str) -> dict[str, Path]:
    folder = sigma_dir(sigma)
    return {
        "input": plan.out_dir / "input" / f"{sample.sample_id}.{fmt}",
        "pid": plan.out_dir / "pid" / folder / f"{sample.sample_id}.{fmt}",
        "vae": plan.out_dir / "vae" / folder / f"{sample.sample_id}.{fmt}",
        "grid": plan.out_dir / "grid" / folder / f"{sample.sample_id}.png",
    }


def run(settings: Settings, decoder: Any = None, latent_space: Any = None,
        plan: CleanPlan | None = None) -> dict[str, Any]:
    """Run the evaluation; `decoder` / `latent_space` may be passed in (tests, embedding). Returns the summary
    (on rank 0) with `exit_code`."""
    from pid.latents import get as get_latent_space

    plan = plan or plan_run(settings)
    env = dist.init_distributed()
    device = torch.device(settings.device) if settings.device else dist.rank_device()
    store = runs.RecordStore(plan.out_dir, entry="from_clean")
    store.check_layout(overwrite=settings.overwrite)
    mine = dist.shard(plan.samples, env.rank, env.world_size)
    failures: list[dict[str, Any]] = []
    todo: list[tuple[Sample, str, dict[str, Any], list[float], str]] = []
    reasons: dict[str, str] = {}  # sample_id -> why it is (re)done
    current: dict[str, str] = {}  # sample_id -> item key of this run's images
    for _, sample in mine:
        if sample.missing:
            failures.append({"image": str(sample.image), "reason": sample.missing})
            continue
        try:
            digest = runs.sha256_file(sample.image)
        except PiDError as exc:
            failures.append({"image": str(sample.image), "reason": str(exc)})
            continue
        key, identity = runs.item_key({"image_sha256": digest, "prompt": sample.prompt,
                                       "seed": int(settings.seed) + sample.index, **plan.identity})
        current[sample.sample_id] = key
        reason = "overwrite" if settings.overwrite else store.needs_redo(sample.sample_id, key, identity)
        sigmas = list(plan.sigmas)
        if reason is None:
            have = {row["sigma"] for row in (store.load(sample.sample_id) or {}).get("rows", [])}
            sigmas = [s for s in plan.sigmas if s not in have]
            reason = "new sigma" if sigmas else None
        if reason:
            todo.append((sample, key, identity, sigmas, digest))
            reasons[sample.sample_id] = reason
    store.current = current
    logger.info("rank {}/{}: {} images, {} to do; outputs in {}", env.rank, env.world_size, len(mine), len(todo),
                plan.out_dir)
    if todo:
        if latent_space is None:
            kwargs: dict[str, Any] = {"device": device, "checkpoint_dir": settings.checkpoint_dir}
            if settings.get("dtype"):
                kwargs["dtype"] = DTYPES[settings.dtype]
            if settings.get("pid_revision"):
                kwargs["revision"] = settings.pid_revision
            latent_space = (plan.space if plan.space is not None else get_latent_space(plan.backbone)).load(**kwargs)
        if decoder is None:
            from pid.inference.from_ldm import build_decoder

            runs.require_decoder_file(plan.checkpoint)
            decoder = build_decoder(settings, plan, device)
        from pid.latents.declared import check_space_fits

        check_space_fits(decoder.latent_channels, latent_space, "the PiD decoder")
        for sample, key, identity, sigmas, digest in tqdm(todo, desc=f"images (rank {env.rank})",
                                                          disable=not dist.is_main()):
            kept: list[dict[str, Any]] = []
            if reasons[sample.sample_id] == "new sigma":
                kept = store.load(sample.sample_id)["rows"]  # type: ignore[index]
            # The previous record and files stay until this image's new files are all written (StagedFiles).
            try:
                with StagedFiles() as staged:
                    new_rows = _evaluate(settings, plan, decoder, latent_space, sample, sigmas, device, digest, staged)
                    rows = sorted(kept + new_rows, key=lambda r: (r["sigma"], r["decoder"] != "vae"))
                    store.replace(sample.sample_id, {"item_key": key, "identity": identity, "index": sample.index,
                                                     "sample_id": sample.sample_id, "image": str(sample.image),
                                                     "rows": rows}, staged)
            except Exception as exc:  # whatever one image raises ends only that image
                reason = report_item_failure(str(sample.image), exc, debug=settings.get("debug", False))
                failures.append({"image": str(sample.image), "reason": reason})
                continue
            if settings.get("report", True):
                with contextlib.suppress(OSError):  # kept current as images finish; the final write reports
                    _write_tables(plan, store, [], final=False)
                runs.refresh_report(plan.out_dir)
    gathered = dist.gather_objects({"failures": failures, "redone": runs.count_reasons(reasons.values()),
                                    "current": current})
    summary: dict[str, Any] = {}
    write_failed = False
    if dist.is_main():
        all_failures = [f for g in gathered for f in g["failures"]]
        redone = runs.merge_counts(g["redone"] for g in gathered)
        store.current = runs.current_items((s.sample_id for s in plan.samples if s.missing is None),
                                           (g["current"] for g in gathered))
        summary, write_failed = _report(plan, store, all_failures, redone, plot=settings.plot)
        if settings.get("report", True):
            runs.refresh_report(plan.out_dir, final=True)
    dist.barrier()
    failed = any(g["failures"] for g in gathered) or write_failed
    summary["exit_code"] = EXIT_ITEMS_FAILED if failed else 0
    return summary


def _evaluate(settings: Settings, plan: CleanPlan, decoder, space, sample: Sample, sigmas: list[float], device,
              digest: str, staged: StagedFiles) -> list[dict[str, Any]]:
    """Encode, noise and decode one image at every sigma; stage its images, return its metric rows."""
    image = load_image(sample.image, multiple=space.size_multiple, max_side=settings.max_side)  # [1,3,H,W] in [-1,1]
    height, width = image.shape[-2:]
    min_side = space.size_multiple
    if height < min_side or width < min_side:
        raise ConfigError(f"image {sample.image} is smaller than one latent cell ({min_side} px)")
    fmt = settings.save_format
    input_path = _paths(plan, sample, sigmas[0], fmt)["input"]
    write_image(staged.path(input_path), signed_to_uint8(image[0]), fmt=input_path.suffix)
    target = ((image + 1) / 2).clamp(0, 1)
    with torch.no_grad():
        clean = space.encode(image.to(device)).float()
    native = (clean.shape[-2] * space.downsample, clean.shape[-1] * space.downsample)
    output_size = (native[0] * plan.scale, native[1] * plan.scale)
    embeds = decoder.encode_captions([sample.prompt])
    rows = []
    for sigma in sigmas:
        seed = int(settings.seed) + sample.index
        generator = torch.Generator(clean.device).manual_seed(seed)  # same eps for every sigma
        latent = space.add_noise(clean, sigma, generator) if sigma > 0 else clean
        paths = _paths(plan, sample, sigma, fmt)
        start = time.perf_counter()
        with torch.no_grad():
            vae = ((space.decode(latent).float().clamp(-1, 1) + 1) / 2).cpu()
        vae_s = time.perf_counter() - start
        start = time.perf_counter()
        pid = decode_within_memory(
            decoder, latent, chunk=chunk_setting(settings), tile_size=settings.pid_tile,
            overlap=settings.pid_tile_overlap, caption_embeds=embeds, degrade_sigma=sigma, steps=settings.pid_steps,
            seed=seed, output_size=output_size, cfg_scale=settings.pid_cfg_scale, shift=settings.pid_shift,
        ).cpu()
        pid_s = time.perf_counter() - start
        write_image(staged.path(paths["vae"]), unit_to_uint8(vae[0]), fmt=paths["vae"].suffix)
        write_image(staged.path(paths["pid"]), unit_to_uint8(pid[0]), fmt=paths["pid"].suffix)
        write_image(staged.path(paths["grid"]), comparison_grid(target[0], vae[0], pid[0]), fmt=".png")
        for name, decoded, seconds in (("vae", vae, vae_s), ("pid", pid, pid_s)):
            scores = summarize(resize_to(decoded, (height, width)), target)
            rows.append({
                "index": sample.index, "sample_id": sample.sample_id, "image": str(sample.image),
                "image_sha256": digest, "prompt": sample.prompt, "backbone": plan.backbone, "sigma": sigma,
                "decoder": name, "input_size": f"{width}x{height}",
                "output_size": f"{decoded.shape[-1]}x{decoded.shape[-2]}",
                **{m: scores[m][0] for m in METRICS}, "seconds": round(seconds, 4),
                "input": runs.relative(input_path, plan.out_dir), "output": runs.relative(paths[name], plan.out_dir),
                "grid": runs.relative(paths["grid"], plan.out_dir),
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


def _current_rows(plan: CleanPlan, store: runs.RecordStore, reload: bool) -> list[dict[str, Any]]:
    """The rows of this run's images (`store.current`) and sigmas (`reload`: every rank's records on disk)."""
    rows = [r for r in store.rows(reload) if r["sigma"] in plan.sigmas]
    return sorted(rows, key=lambda r: (r["index"], r["sigma"], r["decoder"] != "vae"))


def _means(plan: CleanPlan, rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    means: dict[str, dict[str, dict[str, float]]] = {}
    for sigma in plan.sigmas:
        for name in ("vae", "pid"):
            picked = [r for r in rows if r["sigma"] == sigma and r["decoder"] == name]
            if picked:
                means.setdefault(f"{sigma:.3f}", {})[name] = {
                    m: float(np.mean([min(r[m], 100.0) if m == "psnr" else r[m] for r in picked])) for m in METRICS
                } | {"count": len(picked)}
    return means


def _write_tables(plan: CleanPlan, store: runs.RecordStore, failures: list[dict[str, Any]],
                  final: bool, redone: dict[str, int] | None = None, plot: bool = False) -> dict[str, Any]:
    """metrics.csv and summary.json (and metrics.png with `plot`); `final` reads every rank's records."""
    rows = _current_rows(plan, store, reload=final)
    write_csv(plan.out_dir / "metrics.csv", rows)
    means = _means(plan, rows)
    summary = {"entry": "from_clean", "backbone": plan.backbone, "ckpt_type": plan.ckpt_type, "scale": plan.scale,
               "checkpoint": plan.checkpoint, "psnr_cap_db": 100.0, "means": means, "failures": failures,
               "redone": redone or {}, "output_dir": str(plan.out_dir)}
    runs.write_summary(plan.out_dir, summary)
    if plot and means:
        _plot(plan.out_dir / "metrics.png", means)
    return summary


def _report(plan: CleanPlan, store: runs.RecordStore, failures: list[dict[str, Any]], redone: dict[str, int],
            plot: bool) -> tuple[dict[str, Any], bool]:
    """Write the tables and failures.jsonl and print the means; (summary, whether a file could not be written)."""
    summary: dict[str, Any] = {}

    def tables() -> None:
        summary.update(_write_tables(plan, store, failures, final=True, redone=redone, plot=plot))

    errors = [runs.try_write("metrics.csv and summary.json", tables),
              runs.try_write("failures.jsonl", lambda: runs.write_failures(plan.out_dir, failures))]
    if not summary:  # the tables could not be written: the means are still printed
        summary = {"means": _means(plan, _current_rows(plan, store, reload=True)), "failures": failures,
                   "redone": redone}
    lines = [f"{'sigma':>6}  {'decoder':<7} {'PSNR':>7} {'SSIM':>7} {'dE2000':>7}  n"]
    for sigma, per in summary["means"].items():
        for name, vals in per.items():
            lines.append(f"{sigma:>6}  {name:<7} {vals['psnr']:7.2f} {vals['ssim']:7.4f} {vals['delta_e2000']:7.3f}  "
                         f"{vals['count']}")
    print("\n".join(lines))
    done = ", ".join(f"{n} {why}" for why, n in sorted(redone.items())) or "none"
    print(f"images redone: {done}; failed: {len(failures)}; outputs: {plan.out_dir}")
    for failure in failures:
        print(f"FAILED {failure['image']}: {failure['reason']}")
    return summary, any(errors)


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
    return run_cli(FROM_CLEAN, MODULE, lambda command: plan_or_run(command, plan_run, run), argv)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ManifestEntry", "comparison_grid", "load_config", "main", "plan_run", "run"]
