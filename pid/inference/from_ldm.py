"""prompts -> LDM (diffusers, or the upstream RAE code) -> captured latents -> baseline VAE decode and PiD decode.

    python -m pid.inference.from_ldm backbone=zimage-turbo prompt="a red fox in snow" save_xt_steps=7
    python -m pid.inference.from_ldm --backbone flux --prompt "a red fox" --save_xt_steps 24 26   # upstream flags
    python -m pid.inference.from_ldm backbone=flux prompt="a red fox" --dry_run                  # print the plan
    torchrun --nproc_per_node=8 -m pid.inference.from_ldm backbone=sd3 prompt_file=prompts.txt

The command is parsed once (`pid.inference.cli`) and resolved into a `RunPlan` before any model loads; the run
consumes the plan. Outputs, under `<output_dir>/<run tag>/`: `pid/step_<label>/<index>.<fmt>` (PiD),
`vae/step_<label>/...` (the LDM's own VAE, LDM size), `compare/step_<label>/...`, one record per prompt in
`records/` and, rebuilt from them, `metadata.jsonl` (one line per image), `failures.jsonl`, `summary.json`.
A re-run redoes exactly the prompts whose identity (prompt, seeds, LDM and decoder settings, checkpoint file)
changed, or whose files are missing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from tqdm.auto import tqdm

from pid.errors import ConfigError
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
    declared_space,
    parse_resolution,
    resolve_decoder,
    unused_sampler_knobs,
)
from pid.inference.io import (
    distinct_tag,
    make_comparison,
    resolve_prompt_file,
    sample_name,
    signed_to_uint8,
    step_label,
    unit_to_uint8,
    write_image,
)
from pid.inference.lifecycle import report_item_failure
from pid.inference.step_capture import Capture
from pid.preflight import plan_files
from pid.tiling import decode_within_memory

COMMON_FLAGS = {
    "--checkpoint_path": "pid_checkpoint",
    "--pid_ckpt_type": "pid_ckpt_type",
    "--seed": "seed",
    "--cfg_scale": "pid_cfg_scale",
    "--pid_inference_steps": "pid_steps",
    "--shift": "pid_shift",
    "--scale": "scale",
    "--compile": "compile",
    "--output_dir": "output_dir",
    "--save_format": "save_format",
    "--note": "note",
    "--backbone": "backbone",
    "--dtype": "dtype",
    "--text_encoder": "text_encoder",
    "--overwrite": "overwrite",
    "--pid_revision": "pid_revision",
}
# Upstream flags that are accepted so pasted commands run, but change nothing here: (values they take, why).
COMMON_NO_EFFECT = {
    "--experiment": (1, "the decoder follows backbone + pid_ckpt_type, or pid_checkpoint"),
    "--config_file": (1, "the decoder's network config follows the checkpoint"),
    "--load_ema_to_reg": (0, "the released files hold the EMA weights already"),
    "--upload": (0, "outputs stay on local disk"),
    "--group_name": (1, "outputs stay on local disk"),
}
FROM_LDM = EntryPoint(
    "from_ldm",
    flags={
        **COMMON_FLAGS,
        "--prompt": "prompt",
        "--prompt_file": "prompt_file",
        "--resolution": "resolution",
        "--save_xt_steps": "save_xt_steps",
        "--backbone_model_id": "model_id",
        "--ldm_inference_steps": "ldm_steps",
        "--num_inference_steps": "ldm_steps",
        "--guidance_scale": "guidance_scale",
        "--cpu_offload": "cpu_offload",
        "--ldm_stop_at": "ldm_stop_at",
        "--rae_repo_path": "backbone.repo_path",
        "--rae_class_ids": "backbone.class_ids",
        "--rae_class_range": "backbone.class_range",
        "--scale_rae_repo_path": "backbone.repo_path",
        "--rae_decoder_ckpt": "backbone.decoder_ckpt",
        "--rae_stats_path": "backbone.stats_path",
        "--rae_dit_main_ckpt": "backbone.dit_main_ckpt",
        "--rae_dit_guid_ckpt": "backbone.dit_guid_ckpt",
        "--rae_cfg_scale": "backbone.cfg_scale",
        "--rae_cfg_interval": "backbone.cfg_interval",
        "--scale_rae_model_path": "backbone.model_path",
        "--scale_rae_pretrained_encoder": "backbone.pretrained_encoder",
        "--scale_rae_decoder_config": "backbone.decoder_config",
        "--scale_rae_decoder_ckpt": "backbone.decoder_ckpt",
        "--scale_rae_guidance_level": "backbone.guidance_level",
        "--scale_rae_max_new_tokens": "backbone.max_new_tokens",
        "--scale_rae_prompt_prefix": "backbone.prompt_prefix",
    },
    no_effect=COMMON_NO_EFFECT,
)
MODULE = "pid.inference.from_ldm"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def load_config(argv: Sequence[str]) -> Settings:
    """The settings for these command-line arguments (key=value or upstream --flags)."""
    return parse_command(FROM_LDM, list(argv)).settings


@dataclass
class RunPlan:
    """Everything resolved from the command before any model loads (so bad input fails fast)."""

    backbone: str
    kind: str  # "diffusers" | "rae" | "scale_rae"
    record: Any  # pid.checkpoints.CheckpointRecord
    checkpoint: dict[str, Any]  # {"folder", "hub_file", "local_file"}
    scale: int
    output_size: tuple[int, int]  # (H, W) of PiD's output
    ldm_size: tuple[int, int]  # (H, W) the LDM runs at
    ldm_model: str
    prompts: list[str]
    capture_steps: list[int]
    ldm_steps: int
    ldm_stop_at: int | None
    pid_steps: int
    pid_seed: int
    dtype: torch.dtype
    out_dir: Path
    identity: dict[str, Any] = field(default_factory=dict)  # what decides every item's pixels, but the prompt
    space: Any = None  # a declared latent space (not loaded); None for the backbone's built-in one
    pipeline: Any = None  # the PipelineSpec of an unregistered pipeline (pipeline_class= / model_id=)

    @property
    def ckpt_type(self) -> str:
        return self.record.ckpt_type

    @property
    def labels(self) -> list[str]:
        stops_early = self.ldm_stop_at is not None and self.ldm_stop_at < self.ldm_steps
        return [step_label(k) for k in self.capture_steps] + ([] if stops_early else [step_label(None)])

    def describe(self, rank: int, world_size: int) -> dict[str, Any]:
        """The dry run's JSON object."""
        mine = [prompt for _, prompt in dist.shard(self.prompts, rank, world_size)]
        return {
            "entry": "from_ldm", "backbone": self.backbone, "ckpt_type": self.ckpt_type,
            "checkpoint": self.checkpoint, "net_config": self.record.net_config, "scale": self.scale,
            "pid_steps": self.pid_steps, "pid_seed": self.pid_seed, "output_dir": str(self.out_dir),
            "ldm_model": self.ldm_model, "ldm_steps": self.ldm_steps, "ldm_stop_at": self.ldm_stop_at,
            "ldm_size": list(self.ldm_size), "output_size": list(self.output_size),
            "capture_steps": list(self.capture_steps), "labels": self.labels,
            "rank": rank, "world_size": world_size, "prompts": mine,
            "files": plan_files(self.backbone, self.checkpoint, self.identity["decoder"]["text_encoder"],
                                self.ldm_model if self.kind == "diffusers" else None),  # pid.preflight
        }


def _size_error(what: str, out_w: int, out_h: int, cell: int, unit: str) -> ConfigError:
    def near(n: int) -> str:
        low, high = max(cell, n // cell * cell), (n // cell + 1) * cell
        return str(low) if low == n else f"{low} or {high}"

    return ConfigError(f"{what} {out_w}x{out_h} must be a multiple of {cell} {unit} on each side; nearest: "
                       f"width {near(out_w)}, height {near(out_h)}")


def plan_run(settings: Settings) -> RunPlan:
    """Validate the settings and resolve every default; raises one-line ConfigError / InputError."""
    from pid.latents import get as get_latent_space

    declared = declared_space(settings)
    backbone, kind = settings.backbone.name, settings.backbone.kind
    pipeline = None
    if declared is not None:  # any diffusers pipeline whose VAE makes this space
        backbone, kind = declared.name, "diffusers"
        pipeline = _custom_pipeline(settings, declared)
    elif settings.get("pipeline_class"):
        raise ConfigError("pipeline_class= is for declared latent spaces (latent_space= or a pid_checkpoint that "
                          "carries one); the registered backbones know their pipeline")
    upstream = kind != "diffusers"
    validate.check_device(settings.get("device"))
    validate.check_decode_settings(settings)
    validate.check_text_encoder(settings.get("text_encoder"))
    validate.check_ldm_kwargs(backbone, settings.get("ldm_kwargs"), diffusers=not upstream)
    if upstream:
        from pid.inference import rae_flows, rae_upstream

        rae_upstream.repo_path(settings)  # fails fast, saying what to clone where
        if kind == "scale_rae":
            from pid.inference.scale_rae_flow import check_scale_rae_transformers

            check_scale_rae_transformers()  # before any model loads
        default_steps = rae_upstream.default_ldm_steps(settings)
        ldm_model = str(rae_upstream.repo_path(settings))
    else:
        from pid.inference.pipelines import get_pipeline_spec

        spec = pipeline or get_pipeline_spec(backbone)
        default_steps = spec.default_steps
        ldm_model = str(settings.model_id or spec.default_model_id)
        if pipeline is None:
            _check_model_folder(backbone, settings.model_id)
    record, scale = resolve_decoder(settings, declared)
    space = declared if declared is not None else get_latent_space(backbone)
    if upstream:
        # The RAE LDMs generate at one fixed size (dinov2 512 px, siglip 256 px); upstream's --resolution for
        # them is that LDM size.
        native = rae_upstream.ldm_size(settings)
        asked = parse_resolution(settings.get("ldm_resolution"))
        if asked is not None and asked != native:
            raise ConfigError(f"{backbone} generates at {native[1]} px only (upstream --resolution {native[1]}); "
                              f"got {asked[1]}x{asked[0]}")
        output_size = (native[0] * scale, native[1] * scale)
        requested = parse_resolution(settings.resolution)
        if requested is not None and requested != output_size:
            raise ConfigError(
                f"{backbone} generates at {native[1]}x{native[0]} only, so resolution must be "
                f"{output_size[1]} at scale {scale}; got {requested[1]}x{requested[0]}"
            )
    else:
        if settings.get("ldm_resolution") is not None:
            raise ConfigError("ldm_resolution is for dinov2/siglip; for diffusers backbones set resolution= "
                              "(the output size; the LDM runs at resolution / scale)")
        output_size = parse_resolution(settings.resolution) or (record.default_resolution,) * 2
    out_h, out_w = output_size
    if max(output_size) > record.default_resolution:  # allowed, but outside what the decoder was trained for
        logger.warning("resolution {}x{} is above the {} decoder's {} px; pid_ckpt_type=2kto4k (or 2kto4k_v1pt5) "
                       "is trained for 4096", out_w, out_h, record.ckpt_type, record.default_resolution)
    cell = scale * space.size_multiple
    if out_h % cell or out_w % cell:
        raise _size_error("resolution", out_w, out_h, cell,
                          f"px (scale {scale} x the latent's {space.size_multiple} px cell)")
    ldm_size = (out_h // scale, out_w // scale)
    space.check_size(*ldm_size)

    if upstream and rae_flows.is_class_conditional(settings):
        prompts = rae_flows.class_prompts(settings)
    else:
        if (settings.prompt is None) == (settings.prompt_file is None):
            raise ConfigError('give exactly one of prompt="..." or prompt_file=path.txt (or a shipped set: creative)')
        if settings.prompt is not None:
            if not settings.prompt.strip():
                raise ConfigError("prompt is empty; give the text to generate")
            prompts = [settings.prompt]
        else:
            from pid.inference.io import read_prompt_file

            prompts = read_prompt_file(resolve_prompt_file(settings.prompt_file))

    ldm_steps = int(settings.ldm_steps) if settings.ldm_steps is not None else default_steps
    if ldm_steps < 1:
        raise ConfigError(f"ldm_steps must be >= 1, got {ldm_steps}")
    capture_steps = sorted(set(settings.save_xt_steps or []))
    stop_at = settings.get("ldm_stop_at")
    if stop_at is not None:
        if upstream:
            raise ConfigError("ldm_stop_at works with the diffusers backbones; dinov2/siglip run their own loop")
        if not 1 <= stop_at <= ldm_steps:
            raise ConfigError(f"ldm_stop_at {stop_at} out of range [1, {ldm_steps}] (the LDM runs {ldm_steps} steps)")
        later = [s for s in capture_steps if s > stop_at]
        if later:
            raise ConfigError(f"save_xt_steps {later} come after ldm_stop_at={stop_at}; the LDM stops before them")
        capture_steps = sorted({*capture_steps, stop_at})
    bad = [s for s in capture_steps if not 1 <= s <= ldm_steps]
    if bad:
        raise ConfigError(f"save_xt_steps {bad} out of range [1, {ldm_steps}] (the LDM runs {ldm_steps} steps)")
    pid_steps = check_pid_steps(settings, record)
    validate.check_seeds(settings, len(prompts))
    check_output_dir(settings.output_dir)
    checkpoint = runs.describe_decoder_file(record, settings)
    pid_seed = int(settings.seed if settings.pid_seed is None else settings.pid_seed)

    ldm_settings = {
        "ldm_model": ldm_model, "ldm_revision": settings.get("ldm_revision"), "ldm_steps": ldm_steps,
        "guidance_scale": settings.guidance_scale, "ldm_kwargs": settings.ldm_kwargs or {},
        "ldm_size": list(ldm_size), "dtype": settings.dtype, "capture_steps": capture_steps,
        "ldm_stop_at": stop_at, "backbone_options": settings.backbone.to_dict(),
    }
    decoder_settings = runs.decoder_identity(settings, record, checkpoint, scale, output_size, pid_steps, pid_seed)
    identity = {"backbone": backbone, "ldm": ldm_settings, "decoder": decoder_settings,
                "files": {"save_format": settings.save_format, "comparison": bool(settings.comparison)}}
    if declared is not None:
        identity["latent_space"] = declared.spec.to_dict()
        ldm_settings["pipeline_class"] = pipeline.pipeline_class
    ignored = set(unused_sampler_knobs(settings, record))
    tag = runs.run_tag(
        backbone, checkpoint, pid_steps=pid_steps,
        cfg_scale=None if "pid_cfg_scale" in ignored else settings.pid_cfg_scale,
        shift=None if "pid_shift" in ignored else settings.pid_shift, note=settings.note or "",
    )
    ldm_tag = f"ldm{ldm_steps}" + (f"g{settings.guidance_scale}" if settings.guidance_scale is not None else "")
    if settings.model_id:
        ldm_tag += "_" + distinct_tag(Path(str(settings.model_id)).name)
    if stop_at is not None and stop_at < ldm_steps:  # an LDM stopped early is another run than save_xt_steps
        ldm_tag += f"_stop{stop_at}"
    tag += f"_{ldm_tag}_{out_w}x{out_h}_seed{int(settings.seed)}"
    out_dir = Path(settings.output_dir).expanduser() / tag
    validate.check_writable_folder(out_dir, "run folder")
    return RunPlan(
        backbone=backbone, kind=kind, record=record, checkpoint=checkpoint, scale=scale, output_size=output_size,
        ldm_size=ldm_size, ldm_model=ldm_model, prompts=prompts, capture_steps=capture_steps, ldm_steps=ldm_steps,
        ldm_stop_at=stop_at, pid_steps=pid_steps, pid_seed=pid_seed, dtype=DTYPES[settings.dtype],
        out_dir=out_dir, identity=identity, space=declared, pipeline=pipeline,
    )


def _custom_pipeline(settings: Settings, space: Any) -> Any:
    """The PipelineSpec of `pipeline_class=` (default: the class a local `model_id=` folder names)."""
    from pid.inference.pipelines import custom_pipeline_spec, folder_pipeline_class

    if not settings.get("model_id"):
        raise ConfigError(f"latent space {space.name} has no registered LDM; give model_id=<hub id or pipeline "
                          "folder> (and pipeline_class= for a hub id, e.g. StableDiffusionPipeline)")
    pipeline_class = settings.get("pipeline_class") or folder_pipeline_class(settings.model_id)
    if not pipeline_class:
        raise ConfigError(f"say which diffusers pipeline {settings.model_id} is: pipeline_class=<e.g. "
                          "StableDiffusionPipeline or my_pkg.pipelines.MyPipeline>")
    return custom_pipeline_spec(space.name, pipeline_class, settings.model_id)


def _check_model_folder(backbone: str, model_id: str | None) -> None:
    """A local pipeline folder must hold the backbone's pipeline class (checked before anything loads)."""
    if model_id:
        from pid.inference.pipelines import check_model_folder

        check_model_folder(backbone, model_id)


def output_paths(out_dir: Path, index: int, label: str, fmt: str) -> dict[str, Path]:
    name = f"{sample_name(index)}.{fmt}"
    return {kind: out_dir / kind / f"step_{label}" / name for kind in ("pid", "vae", "compare")}


def build_decoder(settings: Settings, plan: Any, device: torch.device):
    from pid.decoder import PiDDecoder

    kwargs: dict[str, Any] = {}
    if settings.get("pid_revision"):
        kwargs["revision"] = settings.pid_revision
    space = getattr(plan, "space", None)  # a declared latent space: the decoder file is made for it
    decoder = PiDDecoder.from_pretrained(
        None if space is not None else plan.backbone, plan.ckpt_type, device=device,
        checkpoint=settings.pid_checkpoint, checkpoint_dir=settings.checkpoint_dir, text_encoder=settings.text_encoder,
        latent_space=space, **kwargs,
    )
    if settings.compile:
        decoder.compile()
    return decoder


class DiffusersSource:
    """Runs a diffusers pipeline for a prompt and returns its captured latents in PiD's space."""

    def __init__(self, settings: Settings, plan: RunPlan, pipe: Any, device: torch.device) -> None:
        from pid.inference.pipelines import get_pipeline_spec
        from pid.latents import get as get_latent_space

        self.settings, self.plan, self.pipe, self.device = settings, plan, pipe, device
        self.spec = plan.pipeline or get_pipeline_spec(plan.backbone)
        space = plan.space if plan.space is not None else get_latent_space(plan.backbone)
        self.space = space.from_pipeline(pipe)  # the LDM's own VAE: no second copy
        self.last_steps_run = plan.ldm_steps

    def generate(self, index: int, prompt: str) -> list[Capture]:
        from pid.inference.pipelines import call_kwargs
        from pid.inference.step_capture import StepCapture, to_decoder_frame

        settings, plan = self.settings, self.plan
        capture = StepCapture(plan.capture_steps, plan.ldm_steps, stop_at=plan.ldm_stop_at)
        gen_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        generator = torch.Generator(gen_device).manual_seed(int(settings.seed) + index)
        kwargs = call_kwargs(
            self.spec, prompt=prompt, height=plan.ldm_size[0], width=plan.ldm_size[1],
            num_inference_steps=plan.ldm_steps, guidance_scale=settings.guidance_scale, generator=generator,
            capture=capture, overrides=dict(settings.ldm_kwargs or {}),
        )
        final = self.pipe(**kwargs).images
        self.last_steps_run = capture.steps_run
        out = []
        for item in capture.results(final, self.pipe.scheduler):  # with stop_at: no x0, it was never computed
            latent, sigma = to_decoder_frame(self.space, item, *plan.ldm_size)  # e.g. SDXL: Euler -> VP frame
            out.append(Capture(item.label, latent, sigma))
        return out


def make_source(settings: Settings, plan: RunPlan, device: torch.device, pipe: Any = None):
    """The latent source for the configured backbone (diffusers pipeline, or upstream RAE code)."""
    if plan.kind != "diffusers":
        from pid.inference import rae_flows

        return rae_flows.make_source(settings, plan, device)
    if pipe is None:
        from pid.inference.pipelines import get_pipeline_spec, load_pipeline

        kwargs = {"revision": settings.ldm_revision} if settings.get("ldm_revision") else {}
        spec = plan.pipeline or get_pipeline_spec(plan.backbone)
        pipe = load_pipeline(spec, settings.model_id, dtype=plan.dtype, device=device,
                             cpu_offload=settings.cpu_offload, **kwargs)
    return DiffusersSource(settings, plan, pipe, device)


def run(settings: Settings, pipe: Any = None, decoder: Any = None, source: Any = None,
        plan: RunPlan | None = None) -> dict[str, Any]:
    """Run from_ldm. `pipe`, `decoder` or a ready latent `source` may be passed in (tests, embedding).
    Returns the summary (rank 0: gathered over ranks): counts, redone items and why, failures, timings."""
    plan = plan or plan_run(settings)
    env = dist.init_distributed()
    device = torch.device(settings.device) if settings.device else dist.rank_device()
    store = runs.RecordStore(plan.out_dir, entry="from_ldm")
    store.check_layout(overwrite=settings.overwrite)
    items = dist.shard(plan.prompts, env.rank, env.world_size)
    todo, reasons, current = [], [], {}
    for index, prompt in items:
        key, identity = runs.item_key({"prompt": prompt, "ldm_seed": int(settings.seed) + index, **plan.identity})
        current[sample_name(index)] = key
        reason = "overwrite" if settings.overwrite else store.needs_redo(sample_name(index), key, identity)
        if reason:
            todo.append((index, prompt, key, identity))
            reasons.append(reason)
    store.current = current
    redone = runs.count_reasons(reasons)
    logger.info("rank {}/{}: {} prompts, {} to do ({} up to date); outputs in {}", env.rank, env.world_size,
                len(items), len(todo), len(items) - len(todo), plan.out_dir)
    summary: dict[str, Any] = {"rank": env.rank, "prompts": len(items), "skipped": len(items) - len(todo),
                               "redone": redone, "images": 0, "failed": [], "ldm_s": 0.0, "pid_s": 0.0,
                               "vae_s": 0.0, "steps_run": 0, "steps_skipped": 0, "current": current}
    if todo:
        # PiD (and Gemma) first: when memory is short, every caption is encoded now and Gemma leaves
        # the GPU before the LDM arrives, so the two never share it.
        if decoder is None:
            runs.require_decoder_file(plan.checkpoint)
            decoder = build_decoder(settings, plan, device)
        if offload_caption_encoder(settings, device):
            if source is None and plan.kind != "diffusers":
                from pid.inference import rae_flows

                captions = [rae_flows.caption_for_item(settings, p) for _, p, _, _ in todo]  # class names
            elif source is None or not hasattr(source, "caption_for"):
                captions = [prompt for _, prompt, _, _ in todo]
            else:
                captions = [source.caption_for(i, p) for i, p, _, _ in todo]
            precompute_captions(decoder, captions)
        if source is None:
            source = make_source(settings, plan, device, pipe)
        for index, prompt, key, identity in tqdm(todo, desc=f"prompts (rank {env.rank})", disable=not dist.is_main()):
            name = sample_name(index)
            # The previous record and files stay until this item's new files are all written (StagedFiles):
            # a failure half-way, or a bad setting, loses nothing that was finished.
            try:
                with StagedFiles() as staged:
                    start = time.perf_counter()
                    captures = source.generate(index, prompt)
                    ldm_s = time.perf_counter() - start
                    steps_run = int(getattr(source, "last_steps_run", plan.ldm_steps))
                    caption = getattr(source, "caption_for", lambda i, p: p)(index, prompt)
                    rows, counts = _decode_and_save(settings, plan, decoder, source.space, index, caption, captures,
                                                    ldm_s, steps_run, staged)
                    store.replace(name, {"item_key": key, "identity": identity, "index": index, "prompt": prompt,
                                         "rows": rows}, staged)
            except Exception as exc:  # whatever one prompt raises (diffusers: IndexError too) ends only that prompt
                reason = report_item_failure(f"[{index}]", exc, debug=settings.get("debug", False))
                summary["failed"].append({"index": index, "prompt": prompt, "error": reason})
                continue
            for field_name, value in counts.items():
                summary[field_name] += value
            summary["ldm_s"] += ldm_s
            summary["steps_run"] += steps_run
            summary["steps_skipped"] += plan.ldm_steps - steps_run
            with contextlib.suppress(OSError):  # kept current as items finish; the final write reports problems
                store.write_metadata()
            if settings.get("report", True):
                runs.refresh_report(plan.out_dir)
    gathered = dist.gather_objects(summary)
    total = _merge(gathered)
    write_errors: list[str | None] = []
    if dist.is_main():
        store.current = runs.current_items((sample_name(i) for i in range(len(plan.prompts))),
                                           (s["current"] for s in gathered))
        write_errors.append(runs.try_write("metadata.jsonl", lambda: store.write_metadata(reload=True)))
        write_errors.append(runs.try_write("failures.jsonl", lambda: runs.write_failures(plan.out_dir,
                                                                                         total["failed"])))
        write_errors.append(runs.try_write("summary.json", lambda: runs.write_summary(plan.out_dir, {
            "entry": "from_ldm", "backbone": plan.backbone, "ckpt_type": plan.ckpt_type,
            "checkpoint": plan.checkpoint, "output_dir": str(plan.out_dir),
            **{k: v for k, v in total.items() if k != "failed"}, "failed": len(total["failed"]),
        })))
        if settings.get("report", True):
            runs.refresh_report(plan.out_dir, final=True)
        _print_summary(plan, total)
    dist.barrier()
    total["exit_code"] = EXIT_ITEMS_FAILED if total["failed"] or any(write_errors) else 0
    return total if dist.is_main() else summary | {"exit_code": total["exit_code"]}


def offload_caption_encoder(settings: Settings, device: torch.device) -> bool:
    """`caption_encoder_offload`: true/false, or unset = only on CUDA devices with less than 48 GiB."""
    choice = settings.get("caption_encoder_offload")
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


def _decode_and_save(settings: Settings, plan: RunPlan, decoder, space, index: int, caption: str,
                     captures: list[Capture], ldm_s: float, steps_run: int,
                     staged: StagedFiles) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Decode one prompt's captures with PiD and the baseline and stage their images; returns the metadata rows
    and the item's counts for the summary (images, pid_s, vae_s), added only once the item is done."""
    from pid.inference.decoder_settings import chunk_setting

    embeds = decoder.encode_captions([caption])  # once per prompt, reused for every captured step
    # PiD decodes up to `pid_batch` captures of this prompt in one call (per-sample sigma). The noise of a
    # batch is one draw of [B, 3, H, W], so pid_batch > 1 gives different (still reproducible) samples.
    batch = max(1, int(settings.get("pid_batch") or 1))
    decoded: list[tuple[torch.Tensor, float]] = []
    for start in range(0, len(captures), batch):
        group = captures[start : start + batch]
        t0 = time.perf_counter()
        images = decode_within_memory(
            decoder, torch.cat([c.latent for c in group]), chunk=chunk_setting(settings),
            tile_size=settings.pid_tile, overlap=settings.pid_tile_overlap, caption_embeds=embeds,
            degrade_sigma=[min(max(c.sigma, 0.0), 1.0) for c in group], steps=settings.pid_steps,
            seed=plan.pid_seed, output_size=plan.output_size, cfg_scale=settings.pid_cfg_scale,
            shift=settings.pid_shift,
        )
        seconds = (time.perf_counter() - t0) / len(group)
        decoded.extend((image[None], seconds) for image in images)
    rows = []
    counts = {"images": 0, "pid_s": 0.0, "vae_s": 0.0}
    for item, (image, pid_s) in zip(captures, decoded, strict=True):
        paths = output_paths(plan.out_dir, index, item.label, settings.save_format)
        t0 = time.perf_counter()
        with torch.no_grad():
            baseline = space.decode(item.latent).float().clamp(-1, 1)  # [1, 3, h, w] in [-1, 1]
        vae_s = time.perf_counter() - t0
        counts["vae_s"] += vae_s
        counts["pid_s"] += pid_s
        fmt = paths["pid"].suffix
        write_image(staged.path(paths["vae"]), signed_to_uint8(baseline[0]), fmt=fmt)
        write_image(staged.path(paths["pid"]), unit_to_uint8(image[0]), fmt=fmt)
        if settings.comparison:
            write_image(staged.path(paths["compare"]), make_comparison((baseline[0] + 1) / 2, image[0]), fmt=fmt)
        ldm_step = None if item.label == "x0" else int(item.label.removesuffix("xt"))
        rows.append({
            "index": index, "prompt": caption, "step": item.label, "ldm_step": ldm_step, "sigma": item.sigma,
            "ldm_seed": int(settings.seed) + index, "pid_seed": plan.pid_seed, "backbone": plan.backbone,
            "pid_ckpt_type": plan.ckpt_type, "checkpoint": plan.checkpoint.get("local_file") or plan.checkpoint.get(
                "hub_file"),
            "ldm_model": plan.ldm_model, "ldm_size": list(plan.ldm_size), "output_size": list(plan.output_size),
            "ldm_steps": plan.ldm_steps, "pid_steps": plan.pid_steps,
            "pid": runs.relative(paths["pid"], plan.out_dir), "vae": runs.relative(paths["vae"], plan.out_dir),
            "compare": runs.relative(paths["compare"], plan.out_dir) if settings.comparison else None,
            "seconds": {"ldm": round(ldm_s, 4), "vae": round(vae_s, 4), "pid": round(pid_s, 4)},
            "denoiser_steps": {"run": steps_run, "skipped": plan.ldm_steps - steps_run},
        })
        counts["images"] += 1
        logger.info("[{}] step={} sigma={:.4f} -> {}", index, item.label, item.sigma, paths["pid"])
    return rows, counts


def _merge(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"ranks": len(summaries), "prompts": 0, "skipped": 0, "images": 0, "failed": [],
                             "redone": {}, "ldm_s": 0.0, "pid_s": 0.0, "vae_s": 0.0, "steps_run": 0,
                             "steps_skipped": 0}
    for s in summaries:
        for key in ("prompts", "skipped", "images", "ldm_s", "pid_s", "vae_s", "steps_run", "steps_skipped"):
            total[key] += s[key]
        total["failed"].extend(s["failed"])
    total["redone"] = runs.merge_counts(s["redone"] for s in summaries)
    return total


def _print_summary(plan: RunPlan, total: dict[str, Any]) -> None:
    images = max(total["images"], 1)
    redone = ", ".join(f"{n} {why}" for why, n in sorted(total["redone"].items())) or "none"
    rows = [
        ("backbone / decoder", f"{plan.backbone} / {plan.ckpt_type} ({plan.scale}x)"),
        ("LDM size -> output", f"{plan.ldm_size[1]}x{plan.ldm_size[0]} -> {plan.output_size[1]}x{plan.output_size[0]}"),
        ("prompts (up to date)", f"{total['prompts']} ({total['skipped']})"),
        ("redone", redone),
        ("images written", str(total["images"])),
        ("failed", str(len(total["failed"]))),
        ("LDM steps run / skipped", f"{total['steps_run']} / {total['steps_skipped']}"),
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
    return run_cli(FROM_LDM, MODULE, lambda command: plan_or_run(command, plan_run, run), argv)


if __name__ == "__main__":
    raise SystemExit(main())
