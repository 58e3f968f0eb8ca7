"""prompts -> LDM (diffusers) -> captured latents -> baseline VAE decode and PiD decode -> images.

    python -m pid.inference.from_ldm backbone=flux prompt="a red fox in snow" save_xt_steps=[24]
    python -m pid.inference.from_ldm --backbone flux --prompt "a red fox" --save_xt_steps 24 26   # reference flags
    torchrun --nproc_per_node=8 -m pid.inference.from_ldm backbone=sd3 prompt_file=prompts.txt

Outputs, under `<output_dir>/<run tag>/`: `pid/step_<label>/<index>.<fmt>` (PiD, full size),
`vae/step_<label>/<index>.<fmt>` (the LDM's own VAE decode, LDM size), `compare/step_<label>/...`
(baseline upscaled | PiD) and `metadata.jsonl` (one line per image). Existing outputs are
skipped unless `overwrite=true`, so an interrupted run resumes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from pid.checkpoints import lookup
from pid.errors import ConfigError, PiDError
from pid.inference import distributed as dist
from pid.inference.cli import (
    COMMON_FLAGS,
    chunk_setting,
    compose,
    parse_resolution,
    resolve_decoder,
    run_cli,
    translate_reference_flags,
)
from pid.inference.io import (
    append_jsonl,
    build_run_tag,
    make_comparison,
    read_prompt_file,
    sample_name,
    should_skip,
    signed_to_uint8,
    unit_to_uint8,
    write_image,
)
from pid.tiling import decode_within_memory

FROM_LDM_FLAGS = {
    **COMMON_FLAGS,
    "--prompt": ("prompt", 1),
    "--prompt_file": ("prompt_file", 1),
    "--resolution": ("resolution", 1),
    "--save_xt_steps": ("save_xt_steps", "+"),
    "--backbone_model_id": ("model_id", 1),
    "--ldm_inference_steps": ("ldm_steps", 1),
    "--guidance_scale": ("guidance_scale", 1),
    "--cpu_offload": ("cpu_offload", 0),
    "--rae_repo_path": ("backbone.repo_path", 1),
    "--rae_class_ids": ("backbone.class_ids", "+"),
    "--rae_class_range": ("backbone.class_range", 2),
    "--scale_rae_repo_path": ("backbone.repo_path", 1),
    "--rae_decoder_ckpt": ("backbone.decoder_ckpt", 1),
    "--rae_stats_path": ("backbone.stats_path", 1),
    "--rae_dit_main_ckpt": ("backbone.dit_main_ckpt", 1),
    "--rae_dit_guid_ckpt": ("backbone.dit_guid_ckpt", 1),
    "--rae_cfg_scale": ("backbone.cfg_scale", 1),
    "--rae_cfg_interval": ("backbone.cfg_interval", 2),
    "--num_inference_steps": ("ldm_steps", 1),
    "--scale_rae_model_path": ("backbone.model_path", 1),
    "--scale_rae_pretrained_encoder": ("backbone.pretrained_encoder", 1),
    "--scale_rae_decoder_config": ("backbone.decoder_config", 1),
    "--scale_rae_decoder_ckpt": ("backbone.decoder_ckpt", 1),
    "--scale_rae_guidance_level": ("backbone.guidance_level", 1),
    "--scale_rae_max_new_tokens": ("backbone.max_new_tokens", 1),
    "--scale_rae_prompt_prefix": ("backbone.prompt_prefix", 1),
}

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def load_config(argv: Sequence[str]) -> DictConfig:
    """The composed config for these command-line arguments (Hydra overrides or reference flags)."""
    argv = list(argv)
    # `--backbone X` must select the Hydra group, so translate before composing.
    return compose("from_ldm", translate_reference_flags(argv, FROM_LDM_FLAGS))


@dataclass
class RunPlan:
    """Everything resolved from the config before any model is loaded (so bad input fails fast)."""

    backbone: str
    ckpt_type: str
    scale: int
    output_size: tuple[int, int]  # (H, W) of PiD's output
    ldm_size: tuple[int, int]  # (H, W) the LDM runs at
    prompts: list[str]
    capture_steps: list[int]
    ldm_steps: int
    pid_seed: int
    dtype: torch.dtype
    out_dir: Path


def plan_run(cfg: DictConfig) -> RunPlan:
    """Validate the config and resolve defaults; raises ConfigError / InputError with one-line messages."""
    from pid.inference.pipelines import get_pipeline_spec
    from pid.latents import get as get_latent_space

    backbone = cfg.backbone.name
    upstream = cfg.backbone.kind != "diffusers"
    if upstream:
        from pid.inference import rae_flows

        rae_flows.repo_path(cfg)  # fails fast, saying what to clone where
        if cfg.backbone.kind == "scale_rae":
            rae_flows.check_scale_rae_transformers()  # before any model loads
        default_steps = rae_flows.default_ldm_steps(cfg)
    else:
        default_steps = get_pipeline_spec(backbone).default_steps
    record, scale = resolve_decoder(cfg)
    ckpt_type = record.ckpt_type
    if upstream:
        # The RAE LDMs generate at one fixed size (dinov2 512 px, siglip 256 px).
        native = rae_flows.ldm_size(cfg)
        requested = parse_resolution(cfg.resolution)
        output_size = (native[0] * scale, native[1] * scale)
        if requested is not None and requested != output_size:
            raise ConfigError(
                f"{backbone} generates at {native[1]}x{native[0]} only, so resolution must be "
                f"{output_size[1]} at scale {scale}; got {requested[1]}x{requested[0]}"
            )
    else:
        output_size = parse_resolution(cfg.resolution) or (record.default_resolution,) * 2
    out_h, out_w = output_size
    if out_h % scale or out_w % scale:
        raise ConfigError(f"resolution {out_w}x{out_h} must be divisible by scale {scale} (the LDM runs at resolution / scale)")
    ldm_size = (out_h // scale, out_w // scale)
    space = get_latent_space(backbone)
    try:
        space.check_size(*ldm_size)
    except ConfigError as exc:
        raise ConfigError(f"resolution {out_w}x{out_h} (LDM {ldm_size[1]}x{ldm_size[0]}): {exc}") from None

    if upstream and rae_flows.is_class_conditional(cfg):
        prompts = rae_flows.class_prompts(cfg)
    else:
        if (cfg.prompt is None) == (cfg.prompt_file is None):
            raise ConfigError('give exactly one of prompt="..." or prompt_file=path.txt')
        prompts = [str(cfg.prompt)] if cfg.prompt is not None else read_prompt_file(cfg.prompt_file)

    ldm_steps = int(cfg.ldm_steps) if cfg.ldm_steps is not None else default_steps
    capture_steps = sorted({int(s) for s in (cfg.save_xt_steps or [])})
    bad = [s for s in capture_steps if not 1 <= s <= ldm_steps]
    if bad:
        raise ConfigError(f"save_xt_steps {bad} out of range [1, {ldm_steps}] (the LDM runs {ldm_steps} steps)")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.save_format not in ("png", "jpg"):
        raise ConfigError(f"save_format must be png or jpg, got {cfg.save_format!r}")

    pid_steps = cfg.pid_steps or (4 if record.sampler == "distilled" else 25)
    # LDM settings, size and seed are in the tag so runs that differ in them never resume into (or
    # overwrite) each other's files.
    ldm_tag = f"ldm{ldm_steps}" + (f"g{cfg.guidance_scale}" if cfg.guidance_scale is not None else "")
    if cfg.model_id:
        ldm_tag += "_" + Path(str(cfg.model_id)).name
    tag = build_run_tag(
        backbone, record.hub_path, pid_steps=pid_steps, cfg_scale=cfg.pid_cfg_scale, shift=cfg.pid_shift,
        note=cfg.note or "",
    ) + f"_{ldm_tag}_{out_w}x{out_h}_seed{int(cfg.seed)}"
    return RunPlan(
        backbone=backbone,
        ckpt_type=ckpt_type,
        scale=scale,
        output_size=output_size,
        ldm_size=ldm_size,
        prompts=prompts,
        capture_steps=capture_steps,
        ldm_steps=ldm_steps,
        pid_seed=int(cfg.seed if cfg.pid_seed is None else cfg.pid_seed),
        dtype=DTYPES[cfg.dtype],
        out_dir=Path(cfg.output_dir) / tag,
    )


def output_paths(out_dir: Path, index: int, label: str, fmt: str) -> dict[str, Path]:
    name = f"{sample_name(index)}.{fmt}"
    return {
        "pid": out_dir / "pid" / f"step_{label}" / name,
        "vae": out_dir / "vae" / f"step_{label}" / name,
        "compare": out_dir / "compare" / f"step_{label}" / name,
    }


def build_decoder(cfg: DictConfig, plan: RunPlan, device: torch.device):
    from pid.decoder import PiDDecoder

    decoder = PiDDecoder.from_pretrained(
        plan.backbone,
        plan.ckpt_type,
        device=device,
        checkpoint=cfg.pid_checkpoint,
        checkpoint_dir=cfg.checkpoint_dir,
        text_encoder=cfg.text_encoder,
    )
    if cfg.compile:
        decoder.compile()
    return decoder


@dataclass
class Capture:
    """One latent to decode: label ("24xt" / "x0"), normalised [1, C, h, w] latent, sigma in PiD's frame."""

    label: str
    latent: torch.Tensor
    sigma: float


class DiffusersSource:
    """Runs a diffusers pipeline for a prompt and returns its captured latents in PiD's space."""

    def __init__(self, cfg: DictConfig, plan: RunPlan, pipe: Any, device: torch.device) -> None:
        from pid.inference.pipelines import get_pipeline_spec
        from pid.latents import get as get_latent_space

        self.cfg, self.plan, self.pipe, self.device = cfg, plan, pipe, device
        self.spec = get_pipeline_spec(plan.backbone)
        self.space = get_latent_space(plan.backbone).from_pipeline(pipe)  # the LDM's own VAE: no second copy

    def generate(self, index: int, prompt: str) -> list[Capture]:
        from pid.inference.pipelines import call_kwargs
        from pid.inference.step_capture import StepCapture

        cfg, plan = self.cfg, self.plan
        capture = StepCapture(plan.capture_steps, plan.ldm_steps)
        gen_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        generator = torch.Generator(gen_device).manual_seed(int(cfg.seed) + index)
        kwargs = call_kwargs(
            self.spec,
            prompt=prompt,
            height=plan.ldm_size[0],
            width=plan.ldm_size[1],
            num_inference_steps=plan.ldm_steps,
            guidance_scale=cfg.guidance_scale,
            generator=generator,
            capture=capture,
            overrides=OmegaConf.to_container(cfg.ldm_kwargs) if cfg.ldm_kwargs else None,
        )
        final = self.pipe(**kwargs).images
        out = []
        for item in capture.results(final, self.pipe.scheduler):
            latent = self.space.from_pipeline_latent(item.latent, *plan.ldm_size)
            latent, sigma = self.space.to_training_frame(latent.float(), item.sigma)  # SDXL: Euler -> VP frame
            out.append(Capture(item.label, latent, float(sigma)))
        return out


def make_source(cfg: DictConfig, plan: RunPlan, device: torch.device, pipe: Any = None):
    """The latent source for the configured backbone (diffusers pipeline, or upstream RAE code)."""
    if cfg.backbone.kind != "diffusers":
        from pid.inference import rae_flows

        return rae_flows.make_source(cfg, plan, device)
    if pipe is None:
        from pid.inference.pipelines import get_pipeline_spec, load_pipeline

        pipe = load_pipeline(
            get_pipeline_spec(plan.backbone), cfg.model_id, dtype=plan.dtype, device=device,
            cpu_offload=cfg.cpu_offload,
        )
    return DiffusersSource(cfg, plan, pipe, device)


def run(cfg: DictConfig, pipe: Any = None, decoder: Any = None, source: Any = None) -> dict[str, Any]:
    """Run from_ldm for a composed config. `pipe`, `decoder` or a ready latent `source` may be passed in
    (tests, embedding). Returns the summary (rank 0: gathered over ranks): counts, failures, timings.
    """
    plan = plan_run(cfg)
    env = dist.init_distributed()
    device = torch.device(cfg.device) if cfg.device else dist.rank_device()
    items = dist.shard(plan.prompts, env.rank, env.world_size)
    fmt = cfg.save_format
    labels = [f"{k:02d}xt" for k in plan.capture_steps] + ["x0"]
    todo = [
        (index, prompt)
        for index, prompt in items
        if not should_skip(
            [p for label in labels for key, p in output_paths(plan.out_dir, index, label, fmt).items()
             if key != "compare" or cfg.comparison],
            cfg.overwrite,
        )
    ]
    logger.info(
        "rank {}/{}: {} prompts, {} to do ({} done); outputs in {}",
        env.rank, env.world_size, len(items), len(todo), len(items) - len(todo), plan.out_dir,
    )
    summary: dict[str, Any] = {"rank": env.rank, "prompts": len(items), "skipped": len(items) - len(todo),
                               "images": 0, "failed": [], "ldm_s": 0.0, "pid_s": 0.0, "vae_s": 0.0}
    if todo:
        # PiD (and Gemma) first: when memory is short, every caption is encoded now and Gemma leaves
        # the GPU before the LDM arrives, so the two never share it.
        if decoder is None:
            decoder = build_decoder(cfg, plan, device)
        if offload_caption_encoder(cfg, device):
            if source is None and cfg.backbone.kind != "diffusers":
                from pid.inference import rae_flows

                captions = [rae_flows.caption_for_item(cfg, p) for _, p in todo]  # class names, not ids
            elif source is None or not hasattr(source, "caption_for"):
                captions = [prompt for _, prompt in todo]
            else:
                captions = [source.caption_for(i, p) for i, p in todo]
            precompute_captions(decoder, captions)
        if source is None:
            source = make_source(cfg, plan, device, pipe)
        for index, prompt in tqdm(todo, desc=f"prompts (rank {env.rank})", disable=not dist.is_main()):
            try:
                start = time.perf_counter()
                captures = source.generate(index, prompt)
                ldm_s = time.perf_counter() - start
                summary["ldm_s"] += ldm_s
                caption = getattr(source, "caption_for", lambda i, p: p)(index, prompt)
                _decode_and_save(cfg, plan, decoder, source.space, index, caption, captures, ldm_s, summary)
            except PiDError as exc:
                logger.error("[{}] {}", index, exc)
                summary["failed"].append({"index": index, "prompt": prompt, "error": str(exc)})
            except (RuntimeError, ValueError) as exc:  # one bad prompt must not end the batch
                logger.exception("[{}] failed", index)
                summary["failed"].append({"index": index, "prompt": prompt, "error": f"{type(exc).__name__}: {exc}"})
    gathered = dist.gather_objects(summary)
    total = _merge(gathered)
    if dist.is_main():
        _print_summary(plan, total)
    dist.barrier()
    return total if dist.is_main() else summary


def offload_caption_encoder(cfg: DictConfig, device: torch.device) -> bool:
    """`caption_encoder_offload`: true/false, or null = only on CUDA devices with less than 48 GiB."""
    choice = cfg.get("caption_encoder_offload")
    if choice is not None:
        return bool(choice)
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_properties(device).total_memory < 48 * 2**30


def precompute_captions(decoder, captions: list[str]) -> None:
    """Encode every caption now, keep the embeddings on the CPU and move the caption encoder off the GPU."""
    encoder = decoder.text_encoder
    if encoder is None:
        return
    encoder.precompute(captions)
    encoder.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("encoded {} captions; caption encoder moved to the CPU", len(set(captions)))


def _decode_and_save(cfg, plan: RunPlan, decoder, space, index: int, caption: str, captures: list[Capture],
                     ldm_s: float, summary: dict[str, Any]) -> None:
    embeds = decoder.encode_captions([caption])  # once per prompt, reused for every captured step
    # PiD decodes up to `pid_batch` captures of this prompt in one call (per-sample sigma). The noise of a
    # batch is one draw of [B, 3, H, W], so pid_batch > 1 gives different (still reproducible) samples.
    batch = max(1, int(cfg.get("pid_batch") or 1))
    decoded: list[tuple[torch.Tensor, float]] = []
    for start in range(0, len(captures), batch):
        group = captures[start : start + batch]
        t0 = time.perf_counter()
        images = decode_within_memory(
            decoder,
            torch.cat([c.latent for c in group]),
            chunk=chunk_setting(cfg),
            tile_size=cfg.pid_tile,
            overlap=cfg.pid_tile_overlap,
            caption_embeds=embeds,
            degrade_sigma=[min(max(c.sigma, 0.0), 1.0) for c in group],
            steps=cfg.pid_steps,
            seed=plan.pid_seed,
            output_size=plan.output_size,
            cfg_scale=cfg.pid_cfg_scale,
            shift=cfg.pid_shift,
        )
        seconds = (time.perf_counter() - t0) / len(group)
        decoded.extend((image[None], seconds) for image in images)
    for item, (image, pid_s) in zip(captures, decoded, strict=True):
        latent, sigma = item.latent, item.sigma
        paths = output_paths(plan.out_dir, index, item.label, cfg.save_format)
        t0 = time.perf_counter()
        with torch.no_grad():
            baseline = space.decode(latent).float().clamp(-1, 1)  # [1, 3, h, w] in [-1, 1]
        vae_s = time.perf_counter() - t0
        summary["vae_s"] += vae_s
        summary["pid_s"] += pid_s
        write_image(paths["vae"], signed_to_uint8(baseline[0]))
        write_image(paths["pid"], unit_to_uint8(image[0]))
        if cfg.comparison:
            write_image(paths["compare"], make_comparison((baseline[0] + 1) / 2, image[0]))
        append_jsonl(
            plan.out_dir / "metadata.jsonl",
            {
                "index": index,
                "prompt": caption,
                "step": item.label,
                "sigma": sigma,
                "ldm_seed": int(cfg.seed) + index,
                "pid_seed": plan.pid_seed,
                "backbone": plan.backbone,
                "pid_ckpt_type": plan.ckpt_type,
                "checkpoint": lookup(plan.backbone, plan.ckpt_type).hub_path,
                "ldm_size": list(plan.ldm_size),
                "output_size": list(plan.output_size),
                "ldm_steps": plan.ldm_steps,
                "pid_steps": cfg.pid_steps or (4 if decoder.distilled else 25),
                "pid": str(paths["pid"]),
                "vae": str(paths["vae"]),
                "seconds": {"ldm": round(ldm_s, 4), "vae": round(vae_s, 4), "pid": round(pid_s, 4)},
            },
        )
        summary["images"] += 1
        logger.info("[{}] step={} sigma={:.4f} -> {}", index, item.label, sigma, paths["pid"])


def _merge(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"ranks": len(summaries), "prompts": 0, "skipped": 0, "images": 0, "failed": [],
                             "ldm_s": 0.0, "pid_s": 0.0, "vae_s": 0.0}
    for s in summaries:
        for key in ("prompts", "skipped", "images", "ldm_s", "pid_s", "vae_s"):
            total[key] += s[key]
        total["failed"].extend(s["failed"])
    return total


def _print_summary(plan: RunPlan, total: dict[str, Any]) -> None:
    images = max(total["images"], 1)
    rows = [
        ("backbone / decoder", f"{plan.backbone} / {plan.ckpt_type} ({plan.scale}x)"),
        ("LDM size -> output", f"{plan.ldm_size[1]}x{plan.ldm_size[0]} -> {plan.output_size[1]}x{plan.output_size[0]}"),
        ("prompts (skipped)", f"{total['prompts']} ({total['skipped']})"),
        ("images written", str(total["images"])),
        ("failed", str(len(total["failed"]))),
        ("LDM time", f"{total['ldm_s']:.2f} s"),
        ("VAE decode / image", f"{total['vae_s'] / images:.3f} s"),
        ("PiD decode / image", f"{total['pid_s'] / images:.3f} s"),
        ("outputs", str(plan.out_dir)),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    for failure in total["failed"]:
        print(f"FAILED [{failure['index']}] {failure['prompt'][:60]!r}: {failure['error']}")


def main(argv: Sequence[str] | None = None) -> int:
    def _main(args: Sequence[str]) -> None:
        try:
            run(load_config(args))
        finally:
            dist.cleanup()

    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
