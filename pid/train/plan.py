"""The command line, resolved once into a typed `TrainPlan`; the run reads nothing else.

Every check that can fail on bad input happens here, before any model loads or any file is written: a one-line
`ConfigError` naming the problem and the fix. Nothing is loaded or downloaded: parameter counts come from a
meta-device build, the init file is only located, the dataset is only listed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pid.errors import CheckpointMismatchError, ConfigError, InputError
from pid.inference.cli import Settings, check_output_dir
from pid.models.configs import (
    PiDNetConfig,
    get_net_config,
    net_config_from_value,
    net_config_to_dict,
    released_name,
)
from pid.train.memory import estimate_train_memory
from pid.training.validation import ValConfig

if TYPE_CHECKING:
    from pid.train.data_source import DataSummary
    from pid.train.distill_plan import DistillPlan

Mode = Literal["teacher", "full", "distill"]

# The hub's PixelDiT text-to-image backbone every v1.5 teacher starts from (spec §a.2, init ckpt).
PIXELDIT_FILE = "PixelDiT_finetune_2kto4k/model_ema_bf16.pth"
# The reference's per-mode optimiser defaults (teacher.py:87-90, finetune.py:105-108).
DEFAULT_LR = {"teacher": 5e-5, "full": 1e-5, "distill": 1e-5}
DEFAULT_WEIGHT_DECAY = {"teacher": 1e-3, "full": 0.0, "distill": 0.0}
# Per-mode defaults of options left null (teacher.py:72,91-97,142,149; finetune.py; distillation.py:72,92-98,169,176).
MODE_DEFAULTS = {
    "teacher": {"steps": 30000, "batch_size": 2, "warmup_steps": 2000, "ckpt_every": 5000},
    "full": {"steps": 30000, "batch_size": 2, "warmup_steps": 2000, "ckpt_every": 5000},
    "distill": {"steps": 3000, "batch_size": 1, "warmup_steps": 100, "ckpt_every": 100},
}
RUN_FILE = "run.json"


@dataclass(frozen=True)
class InitSource:
    """Where the starting weights come from. kind: pixeldit | released | file (ours, a .pth or a DCP folder)."""

    kind: str
    path: str | None  # the local file / folder when known (a hub file may still need a download)
    hub_file: str | None = None  # path inside nvidia/PiD for pixeldit / released
    ckpt_type: str | None = None  # released only
    download_command: str | None = None

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class TrainPlan:
    mode: Mode
    backbone: str
    net_config: PiDNetConfig
    init: InitSource
    trainable_params: int
    frozen_params: int
    data: DataSummary
    resolution: int
    bucket_mode: str
    steps: int
    batch_size: int
    grad_accum: int
    world_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    ema_rate: float
    caption_dropout: float
    lq_dropout: float
    seed: int
    run_dir: Path
    ckpt_every: int
    keep_checkpoints: int
    log_every: int
    progress: bool
    device: str | None
    activation_checkpointing: bool
    checkpoint_dir: str | None = None
    pid_revision: str | None = None
    text_encoder: str | None = None
    text_encoder_revision: str | None = None
    resume_step: int | None = None
    val: ValConfig | None = None  # validation on a held-out manifest (None: off)
    num_workers: int | None = None  # data loading processes per rank (None: 4 on a GPU, 0 on the CPU)
    distill: DistillPlan | None = None  # mode=distill only

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (else the rerun is another run)."""
        return {"mode": self.mode, "backbone": self.backbone, "net_config": net_config_to_dict(self.net_config),
                "init": self.init.kind, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "world_size": self.world_size, "seed": self.seed, "resolution": self.resolution,
                "buckets": self.bucket_mode,
                "data": self.data.source,
                **({"distill": self.distill.identity()} if self.distill is not None else {})}

    def describe(self, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """The dry run's JSON object."""
        largest = _largest_bucket(self.data.buckets, self.resolution)
        if self.mode == "distill":
            from pid.train.distill_plan import describe_distill

            common = TrainPlan.describe(replace(self, mode="teacher", distill=None), rank, world_size)
            return {**common, **describe_distill(self, largest)}
        memory = estimate_train_memory(
            self.net_config, self.trainable_params, self.frozen_params, largest[0], largest[1], self.batch_size,
            cuda=True, checkpointing=self.activation_checkpointing, world_size=self.world_size,
            sharded=self.mode == "full" and self.world_size > 1)
        return {
            "entry": "train", "mode": self.mode, "backbone": self.backbone,
            "net_config": released_name(self.net_config) or net_config_to_dict(self.net_config),
            "init": self.init.describe(),
            "trainable_params": self.trainable_params, "frozen_params": self.frozen_params,
            "data": asdict(self.data), "resolution": self.resolution, "buckets": self.bucket_mode,
            "num_workers": "auto (4 on a GPU, 0 on the CPU)" if self.num_workers is None else self.num_workers,
            "steps": self.steps, "resume_from_step": self.resume_step, "batch_size_per_gpu": self.batch_size,
            "grad_accum": self.grad_accum, "world_size": world_size, "global_batch": self.global_batch,
            "lr": self.lr, "weight_decay": self.weight_decay, "warmup_steps": self.warmup_steps,
            "grad_clip": self.grad_clip, "ema_rate": self.ema_rate,
            "parallelism": "fsdp2" if self.mode == "full" and self.world_size > 1 else
            ("ddp" if self.world_size > 1 else "single"),
            "estimated_peak_memory_per_gpu": {**memory.describe(), "image": f"{largest[1]}x{largest[0]}",
                                              "bf16_autocast": True},
            "output_dir": str(self.run_dir), "rank": rank,
            "validation": None if self.val is None else {**asdict(self.val), "sigmas": list(self.val.sigmas)},
        }


def _largest_bucket(buckets: dict[str, dict[str, Any]], resolution: int) -> tuple[int, int]:
    """(H, W) of the largest bucket with images, else a square of `resolution`."""
    sizes = [(b["size_wh"][1], b["size_wh"][0]) for b in buckets.values() if b.get("count")]
    return max(sizes, key=lambda hw: hw[0] * hw[1]) if sizes else (resolution, resolution)


# ------------------------------------------------------------------------------------------------------------
# Resolution of each part


def resolve_init(settings: Settings, backbone: str) -> InitSource:
    from pid.checkpoints import (
        CheckpointRecord,
        ckpt_types,
        describe_checkpoint,
        find_local,
        hub_download_command,
        lookup,
    )

    value = str(settings.init).strip()
    if value == "pixeldit":
        local = find_local(PIXELDIT_FILE, settings.checkpoint_dir)
        hub = f"checkpoints/{PIXELDIT_FILE}"
        if local is None:
            from pid.checkpoints import cached_hub_file

            local = cached_hub_file(hub, settings.pid_revision)
        return InitSource("pixeldit", str(local) if local else None, hub,
                          download_command=hub_download_command(hub, settings.pid_revision))
    if value == "released":
        ckpt_type = settings.pid_ckpt_type
        if ckpt_type is None:
            ckpt_type = "undistilled" if "undistilled" in ckpt_types(backbone) else None
        record: CheckpointRecord = lookup(backbone, ckpt_type)
        where = describe_checkpoint(record, None, settings.checkpoint_dir, settings.pid_revision)
        return InitSource("released", where["local_file"], where["hub_file"], record.ckpt_type,
                          where["download_command"])
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"init {value!r} is neither pixeldit, released nor an existing file or DCP folder")
    if path.is_dir() and not (path / ".metadata").is_file():
        raise ConfigError(f"init folder {path} is not a torch.distributed.checkpoint folder (no .metadata)")
    if path.is_file() and path.suffix not in (".pth", ".pt", ".safetensors"):
        raise ConfigError(f"init file {path} must be .safetensors, .pth or a DCP folder")
    return InitSource("file", str(path.absolute()))


def default_net_config(backbone: str) -> PiDNetConfig:
    """The v1.5 network for the backbone's latents: the released v1.5 config where one exists, else the v1.5
    network with the latent space's channels, stride and the backbone's upscale factor."""
    from pid.checkpoints import ckpt_types, lookup
    from pid.latents import get as get_latent_space

    if "undistilled" in ckpt_types(backbone):
        return get_net_config(lookup(backbone, "undistilled").net_config)
    from pid.latents.declared import space_net_config

    space = get_latent_space(backbone)
    released = get_net_config(lookup(backbone).net_config) if ckpt_types(backbone) else None
    return space_net_config(space, sr_scale=released.sr_scale if released is not None else 4)


def file_net_config(path: str) -> PiDNetConfig | None:
    """The network a weight file or DCP folder carries or matches, reading headers / metadata only."""
    from pid.checkpoints import NET_CONFIG_KEY, _embedded_config, detect_net_config
    from pid.training.checkpoint import reference_checkpoint_shapes

    source = Path(path)
    if source.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(source), framework="pt") as handle:
            embedded = (handle.metadata() or {}).get(NET_CONFIG_KEY)
        if embedded is not None:
            return _embedded_config(embedded, source)
    shapes = reference_checkpoint_shapes(source)
    if isinstance(shapes, PiDNetConfig):
        return shapes
    detected = detect_net_config(shapes)
    return get_net_config(detected) if detected else None


def training_net_config(settings: Settings, backbone: str, init: InitSource) -> PiDNetConfig:
    """The network to train: `net_config=` if given, else the init's, else the backbone's v1.5 network;
    always with the aux RGB head (the colour-alignment loss needs it)."""
    from pid.checkpoints import lookup

    if settings.net_config is not None:
        try:
            cfg = net_config_from_value(str(settings.net_config))
        except ValueError as exc:
            raise ConfigError(f"net_config: {exc}") from None
    elif init.kind == "released" and not init.path:
        cfg = get_net_config(lookup(backbone, init.ckpt_type).net_config)
    elif init.kind in ("file", "released"):
        try:
            found = file_net_config(str(init.path))
        except CheckpointMismatchError as exc:
            raise ConfigError(str(exc)) from None
        if found is None:
            raise ConfigError(f"init {init.path} carries no network config and matches no released network; "
                              "say which it is with net_config=<released name or JSON>")
        cfg = found
    else:
        cfg = default_net_config(backbone)
    return replace(cfg, aux_rgb_head=True)


def parameter_counts(cfg: PiDNetConfig, mode: str) -> tuple[int, int]:
    """(trainable, frozen) parameter counts, from a weightless meta-device build."""
    from pid.models import build_pid_net
    from pid.training.trainable import is_trainable

    trainable = frozen = 0
    for name, param in build_pid_net(cfg, device="meta").named_parameters():
        if is_trainable(name, mode, cfg.patch_depth):
            trainable += param.numel()
        else:
            frozen += param.numel()
    return trainable, frozen


def _positive(settings: Settings, key: str, minimum: float = 1) -> None:
    value = settings.get(key)
    if value is None or value < minimum or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"{key} must be >= {minimum:g}, got {value}")


def _probability(settings: Settings, key: str) -> float:
    value = float(settings.get(key))
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key} must be in [0, 1], got {value}")
    return value


def plan_run(settings: Settings, world_size: int = 1) -> TrainPlan:
    """Validate the settings and resolve every default; raises one-line ConfigErrors."""

    # The plain checks first: a typo costs no import of the model libraries (diffusers alone takes seconds).
    if settings.data is None:
        raise ConfigError("give the training images: data=<folder, manifest.jsonl, WebDataset root or cache>")
    for key, value in MODE_DEFAULTS[settings.mode].items():
        if settings.get(key) is None:
            setattr(settings, key, value)
    for key in ("steps", "batch_size", "grad_accum", "ckpt_every", "keep_checkpoints", "log_every"):
        _positive(settings, key)
    _positive(settings, "warmup_steps", 0)
    if settings.get("num_workers") is not None:
        _positive(settings, "num_workers", 0)
    lr = DEFAULT_LR[settings.mode] if settings.lr is None else float(settings.lr)
    weight_decay = DEFAULT_WEIGHT_DECAY[settings.mode] if settings.weight_decay is None else settings.weight_decay
    if not lr > 0 or not weight_decay >= 0:
        raise ConfigError(f"lr must be > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    if not settings.grad_clip > 0 or not 0 < settings.ema_rate < 1:
        raise ConfigError(f"grad_clip must be > 0 and ema_rate in (0, 1), got {settings.grad_clip}, "
                          f"{settings.ema_rate}")
    caption_dropout, lq_dropout = _probability(settings, "caption_dropout"), _probability(settings, "lq_dropout")
    if settings.resolution is not None:
        _positive(settings, "resolution")

    from pid.latents import canonical_name
    from pid.latents.declared import training_backbone
    from pid.train.data_source import data_geometry, summarize_data

    # latent_space= (a declared space's file, see docs/latents.md) takes the place of the backbone's family
    backbone = training_backbone(settings.get("latent_space")) or canonical_name(settings.backbone.name)
    spec = data_geometry(settings.data, settings.resolution, settings.buckets)  # a prepare cache: its own
    val = validation_config(settings, spec.resolution)
    init = resolve_init(settings, backbone)
    net_config = training_net_config(settings, backbone, init)
    distill = None
    if settings.mode == "distill":
        from pid.train.distill_plan import distill_parameter_counts, resolve_distill

        distill = resolve_distill(settings, init, net_config)
        net_config = replace(net_config, aux_rgb_head=False)  # the reference force-disables it for all three nets
        trainable, frozen = distill_parameter_counts(net_config)
    else:
        trainable, frozen = parameter_counts(net_config, settings.mode)
    data = summarize_data(settings.data, spec)
    if data.format == "prepare cache":
        from pid.training.cache import LatentCache

        made_for = canonical_name(LatentCache(data.source).backbone)
        if made_for != backbone:
            raise ConfigError(f"the prepare cache {data.source} holds {made_for} latents, not {backbone}; "
                              f"train with backbone={made_for} or prepare a cache for {backbone}")
    check_output_dir(settings.output_dir)
    run_dir = Path(settings.output_dir).expanduser().absolute() / (settings.run_name or f"{Path(backbone).stem}_{settings.mode}")
    plan = TrainPlan(
        mode=settings.mode, backbone=backbone, net_config=net_config, init=init, trainable_params=trainable,
        frozen_params=frozen, data=data, resolution=spec.resolution, bucket_mode=spec.mode,
        num_workers=settings.get("num_workers"), steps=int(settings.steps),
        batch_size=int(settings.batch_size), grad_accum=int(settings.grad_accum), world_size=world_size, lr=lr,
        weight_decay=float(weight_decay), warmup_steps=int(settings.warmup_steps), grad_clip=float(settings.grad_clip),
        ema_rate=float(settings.ema_rate), caption_dropout=caption_dropout, lq_dropout=lq_dropout,
        seed=int(settings.seed), run_dir=run_dir, ckpt_every=int(settings.ckpt_every),
        keep_checkpoints=int(settings.keep_checkpoints), log_every=int(settings.log_every),
        progress=bool(settings.progress),
        device=settings.device, activation_checkpointing=bool(settings.activation_checkpointing),
        checkpoint_dir=settings.checkpoint_dir, pid_revision=settings.pid_revision,
        text_encoder=settings.text_encoder, text_encoder_revision=settings.text_encoder_revision, distill=distill,
    )
    return replace(plan, resume_step=check_resume(plan), val=val)


def validation_config(settings: Settings, resolution: int) -> ValConfig | None:
    """`val_*` options as a ValConfig (None without val_manifest= or with val_every=0), held-out images shrunk
    to the training `resolution`; the manifest is read now so a bad one fails before anything loads."""
    from pid.inference.io import read_manifest
    from pid.sampling import MAX_DISTILLED_STEPS

    manifest = settings.get("val_manifest")
    if manifest is None or int(settings.get("val_every", 0)) == 0:
        return None
    _positive(settings, "val_every", 0)
    distill = settings.mode == "distill"
    if settings.get("val_steps") is None:
        settings.val_steps = 4 if distill else 25  # a released student's steps / the undistilled default
    _positive(settings, "val_steps")
    _positive(settings, "val_teacher_steps")
    if distill and int(settings.val_steps) > MAX_DISTILLED_STEPS:
        raise ConfigError(f"val_steps must be 1..{MAX_DISTILLED_STEPS} with mode=distill (the student's distilled "
                          f"sampler), got {settings.val_steps}")
    _positive(settings, "val_images", 0)
    sigmas = settings.get("val_sigmas") or [0.0]
    sigmas = tuple(sorted({float(s) for s in (sigmas if isinstance(sigmas, list) else [sigmas])}))
    if any(not 0.0 <= s <= 1.0 for s in sigmas):
        raise ConfigError(f"val_sigmas must be values in [0, 1], got {settings.val_sigmas}")
    cfg_scale = float(settings.get("val_cfg_scale"))
    if not cfg_scale >= 1.0:
        raise ConfigError(f"val_cfg_scale must be >= 1 (1 turns text CFG off), got {cfg_scale}")
    try:
        read_manifest(manifest, check_images=True)
    except InputError as exc:
        raise InputError(f"val_manifest: {exc}") from None
    return ValConfig(manifest=str(Path(manifest).expanduser().absolute()), every=int(settings.val_every),
                     sigmas=sigmas, steps=int(settings.val_steps), cfg_scale=cfg_scale,
                     images=int(settings.val_images), resolution=resolution, seed=int(settings.seed),
                     teacher_steps=int(settings.val_teacher_steps))


def check_resume(plan: TrainPlan) -> int | None:
    """The step a rerun resumes from (None: a new run); a run folder of another run is a one-line error."""
    from pid.training.checkpoint import latest_step

    step = latest_step(plan.run_dir)
    if step is None:
        return None
    saved_file = plan.run_dir / RUN_FILE
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text(encoding="utf-8")).get("identity", {})
        mine = json.loads(json.dumps(plan.identity()))
        changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if changed:
            raise ConfigError(
                f"{plan.run_dir} holds a run with other {', '.join(changed)}; resume it with its own settings, "
                "or start a new run with another run_name= or output_dir=")
    return step
