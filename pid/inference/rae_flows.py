"""LDM flows of the RAE backbones, which generate with upstream code that pid does not vendor.

* dinov2: class-conditional ImageNet-512 with the RAE repository (DiT^DH-XL + autoguidance);
  latents are DINOv2-B (with registers) tokens [1, 768, 32, 32]; captions are class names.
* siglip: text-to-image at 256 px with the Scale-RAE repository (Qwen LM + diffusion head);
  latents are SigLIP-2 tokens [1, 1152, 16, 16]; PiD decodes them 8x.

`from_ldm` asks this module for prompts and a latent source (`make_source`), `pid.inference.rae_upstream` for the
repository path and defaults. The dinov2 flow is below, the siglip one in `pid.inference.scale_rae_flow`, the
upstream plumbing both share in `rae_upstream`. A source has
`.space` (the baseline decode, `decode(latent) -> [-1, 1]`), `.generate(index, item) -> [Capture]` and
`.caption_for(index, item)`. Both upstream stacks already sample in the normalised space PiD reads (RAE's DiT
on stats-normalised tokens, Scale-RAE's head on LayerNorm-ed tokens), so captures go to PiD unchanged.
Upstream names used: see docs/rae.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import Tensor, nn

from pid.errors import CheckpointMismatchError, CheckpointNotFoundError, ConfigError
from pid.inference.cli import Settings
from pid.inference.rae_upstream import (
    UPSTREAM,
    UpstreamDecodeSpace,
    import_upstream,
    one_line,
    repo_path,
    to_capture,
    upstream_autocast,
    upstream_kind,
    use_upstream,
)
from pid.inference.scale_rae_flow import (
    ScaleRAESource,
)

# --- dinov2 / RAE: RAE's configs/stage2/sampling/ImageNet512/DiTDH-XL_DINOv2-B_decXL_AG.yaml --------------
RAE_LATENT_SHAPE = (768, 32, 32)
NUM_CLASSES = 1000
NULL_CLASS = 1000  # the DiTs' unconditional label
RAE_TIME_SHIFT = math.sqrt(math.prod(RAE_LATENT_SHAPE) / 4096)  # sqrt(C*H*W / 4096) ~ 13.856
RAE_INPUT_SIZE = 448  # DINOv2 input side (32 x 32 patches of 14 px)
_DIT_COMMON: dict[str, Any] = dict(
    input_size=32, patch_size=1, in_channels=768, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=NUM_CLASSES,
    use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False, use_pos_embed=True,
)  # fmt: skip
DIT_MAIN_ARCH: dict[str, Any] = dict(hidden_size=[1152, 2048], depth=[28, 2], num_heads=[16, 16])
DIT_GUIDANCE_ARCH: dict[str, Any] = dict(hidden_size=[384, 2048], depth=[12, 2], num_heads=[6, 16])
_DIT_DIR = "models/DiTs/Dinov2/wReg_base/ImageNet512"
DIT_FILES = {"dit_main_ckpt": f"{_DIT_DIR}/DiTDH-XL_ep400/stage2_model.pt",
             "dit_guid_ckpt": f"{_DIT_DIR}/DiTDH-S_ep20/stage2_model.pt"}  # fmt: skip
RAE_DECODER_CONFIG = "configs/decoder/ViTXL"
RAE_DIT_DOWNLOAD = "hf download nyu-visionx/RAE-collections --local-dir models"
CLASS_NAMES_FILE = Path(__file__).with_name("data") / "imagenet_classes.txt"


def is_class_conditional(cfg: Settings) -> bool:
    return cfg.backbone.kind == "rae"


def class_prompts(cfg: Settings) -> list[str]:
    """ImageNet class ids to generate, as strings (the item list that from_ldm shards)."""
    ids, span = cfg.backbone.class_ids, cfg.backbone.class_range
    if (ids is None) == (span is None):
        raise ConfigError(
            "dinov2 needs exactly one of backbone.class_ids=[...] or backbone.class_range=[START,END]"
        )
    if span is not None:
        if isinstance(span, str | int) or len(span) != 2:
            raise ConfigError(f"backbone.class_range must be [START, END], got {span}")
        start, end = (int(v) for v in span)
        if not 0 <= start < end <= NUM_CLASSES:
            raise ConfigError(
                f"backbone.class_range must satisfy 0 <= START < END <= 1000, got [{start}, {end})"
            )
        ids = list(range(start, end))
    elif isinstance(ids, str | int):
        ids = [ids]  # backbone.class_ids=207
    out = []
    for value in ids:
        if not 0 <= int(value) < NUM_CLASSES:
            raise ConfigError(f"class id {value} is outside [0, 1000)")
        out.append(str(int(value)))
    return out


def load_class_names(path: str | Path = CLASS_NAMES_FILE) -> list[str]:
    """The 1000 human-readable ImageNet-1k class names; line i is class i ("tench", ..., "golden retriever")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ImageNet class-name file {path} is missing; reinstall pid")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != NUM_CLASSES:
        raise ConfigError(f"expected 1000 ImageNet class names in {path}, got {len(names)}")
    return names


def caption_for_item(cfg: Settings, item: str) -> str:
    """The caption PiD gets for a from_ldm item without building a source: a class name, or the prompt itself."""
    return load_class_names()[int(item)] if is_class_conditional(cfg) else item


def make_source(
    cfg: Settings, plan: Any, device: torch.device, *, space: Any = None
) -> RAESource | ScaleRAESource:
    """A latent source (`.space`, `.generate(index, item)`, `.caption_for(index, item)`) for the RAE flows.

    `space`: an object with `decode(latent) -> [-1, 1]` for the baseline instead of the upstream decoder
    (e.g. a loaded `pid.latents` space; tests use tiny ones).
    """
    upstream_kind(cfg)  # rejects non-RAE backbones
    source_cls = RAESource if cfg.backbone.kind == "rae" else ScaleRAESource
    return source_cls(cfg, plan, torch.device(device), space=space)


# ----------------------------------------------------------------------------------------------------------
# dinov2: RAE (DINOv2-B + ViT-XL decoder) and DiT^DH-XL with autoguidance
# ----------------------------------------------------------------------------------------------------------


def rae_time_schedule(num_points: int, shift: float = RAE_TIME_SHIFT) -> Tensor:
    """The times of RAE's ODE trajectory points: t_k = 1 - linspace(0, 1 - 1/1000, n)[k], then shifted
    t <- s t / (1 + (s - 1) t). t_0 ~ 1 is noise, t_{n-1} ~ 0 clean; float32 like upstream's `ode.t`."""
    t = 1 - torch.linspace(0.0, 1.0 - 1.0 / 1000, num_points)
    return shift * t / (1 + (shift - 1) * t)


def _cfg_interval(value: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"backbone.cfg_interval must be [T_MIN, T_MAX], got {value}") from None
    if not low < high:
        raise ConfigError(f"backbone.cfg_interval must have T_MIN < T_MAX, got [{low}, {high}]")
    return low, high


def _pid_file(value: Any, cfg: Settings, what: str) -> Path:
    """A local file; a relative `checkpoints/<rel>` default is found like any PiD hub file (checkpoint_dir,
    $PID_CHECKPOINT_DIR, ./checkpoints, else downloaded), so the run need not start in the repo root."""
    from pid.checkpoints import resolve_hub_path

    path = Path(str(value)).expanduser()
    if path.is_file():
        return path
    if not path.is_absolute() and path.parts[:1] == ("checkpoints",) and len(path.parts) > 1:
        return resolve_hub_path("/".join(path.parts[1:]), cfg.get("checkpoint_dir"))
    raise CheckpointNotFoundError(f"{what} {path} does not exist")


def _dit_file(cfg: Settings, repo: Path, key: str) -> Path:
    value = cfg.backbone.get(key)
    path = Path(str(value)).expanduser() if value else repo / DIT_FILES[key]
    if not path.is_file():
        hint = (
            f"fix backbone.{key}"
            if value
            else f"download the DiTs inside the RAE clone: cd {repo} && {RAE_DIT_DOWNLOAD}"
        )
        raise CheckpointNotFoundError(f"RAE DiT checkpoint {path} not found; {hint}")
    return path


def load_dit(
    dit_cls: type[nn.Module], arch: Mapping[str, Any], path: Path, device: torch.device
) -> nn.Module:
    """An upstream DiTwDDTHead with its checkpoint's EMA weights (strict), kept in fp32 like upstream sampling."""
    model = dit_cls(**_DIT_COMMON, **arch)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointMismatchError(
            f"{path} is not a readable PyTorch checkpoint ({one_line(exc, 160)})"
        ) from None
    if isinstance(state, Mapping) and "ema" in state:
        state = state["ema"]
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointMismatchError(
            f"{path} does not fit DiTwDDTHead(hidden_size={arch['hidden_size']}): {one_line(exc)}"
        ) from None
    return model.to(device).eval().requires_grad_(False)


@contextlib.contextmanager
def _loadable_decoder_config(config_dir: Path) -> Iterator[Path]:
    """RAE's ViTXL config.json ships `"patch_size": "SHOULD BE RELOADED"` (RAE overwrites it after loading),
    which transformers 5's strict config validation rejects. RAE gets a patched temporary copy; the clone is
    never edited."""
    config_file = config_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{config_file} is missing; the RAE clone looks incomplete")
    raw = json.loads(config_file.read_text())
    if isinstance(raw.get("patch_size"), int):
        yield config_dir
        return
    raw["patch_size"] = 16
    with tempfile.TemporaryDirectory(prefix="pid_rae_decoder_") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(raw, indent=2))
        yield Path(tmp)


def build_upstream_rae(
    rae_cls: type[nn.Module], cfg: Settings, repo: Path, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """Upstream `stage1.RAE` for DINOv2-B/448 with the ViT-XL decoder and ImageNet-512 statistics."""
    b = cfg.backbone
    decoder_ckpt = _pid_file(b.decoder_ckpt, cfg, "RAE decoder checkpoint (backbone.decoder_ckpt)")
    stats = _pid_file(b.stats_path, cfg, "RAE latent statistics (backbone.stats_path)")
    encoder = str(b.encoder)
    with _loadable_decoder_config(repo / RAE_DECODER_CONFIG) as config_dir:
        rae = rae_cls(
            encoder_cls="Dinov2withNorm",
            encoder_config_path=encoder,
            encoder_input_size=RAE_INPUT_SIZE,
            encoder_params={"dinov2_path": encoder, "normalize": True},
            decoder_config_path=str(config_dir),  # absolute: upstream resolves it against the CWD otherwise
            pretrained_decoder_path=str(decoder_ckpt),
            noise_tau=0.0,
            reshape_to_2d=True,
            normalization_stat_path=str(stats),
        )
    rae = rae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    # RAE keeps its statistics as plain tensor attributes, which .to() skips: cast them so decode stays in one dtype.
    for name in ("latent_mean", "latent_var", "encoder_mean", "encoder_std"):
        value = getattr(rae, name, None)
        if isinstance(value, Tensor):
            setattr(rae, name, value.to(device=device, dtype=dtype))
    return rae


def rae_decode_space(rae: nn.Module) -> UpstreamDecodeSpace:
    """Baseline = upstream `rae.decode` (de-normalise, ViT-XL decode, de-ImageNet-normalise) in its decoder dtype."""
    param = next(rae.decoder.parameters())

    def decode(latent: Tensor) -> Tensor:
        return rae.decode(latent.to(param.device, param.dtype))

    return UpstreamDecodeSpace(decode, "dinov2 (upstream RAE)", rae)


class RAESource:
    """dinov2: one ImageNet class per item, sampled as a full ODE trajectory by the upstream RAE DiTs."""

    def __init__(self, cfg: Settings, plan: Any, device: torch.device, space: Any = None) -> None:
        self.cfg, self.plan, self.device = cfg, plan, device
        b = cfg.backbone
        # Everything cheap and checkable first, so a bad setting fails before minutes of loading.
        self.cfg_scale = float(b.cfg_scale)
        self.cfg_interval = _cfg_interval(b.cfg_interval)
        self.class_names = load_class_names()
        repo = repo_path(cfg)
        dit_paths = {key: _dit_file(cfg, repo, key) for key in DIT_FILES}
        url = UPSTREAM["rae"][2]
        use_upstream(repo / "src", ("stage1", "stage2"))
        dit_cls = import_upstream("stage2.models.DDT", repo, url).DiTwDDTHead
        transport = import_upstream("stage2.transport", repo, url)
        if space is None:
            rae = build_upstream_rae(import_upstream("stage1", repo, url).RAE, cfg, repo, device, plan.dtype)
            space = rae_decode_space(rae)
        self.space = space
        self.main = load_dit(dit_cls, DIT_MAIN_ARCH, dit_paths["dit_main_ckpt"], device)
        self.guidance = load_dit(dit_cls, DIT_GUIDANCE_ARCH, dit_paths["dit_guid_ckpt"], device)
        points = int(plan.ldm_steps) + 1  # the trajectory holds the start and one point per step
        flow = transport.create_transport(
            path_type="Linear",
            prediction="velocity",
            time_dist_type="uniform",
            time_dist_shift=RAE_TIME_SHIFT,
        )
        self.sample_fn = transport.Sampler(flow).sample_ode(
            sampling_method="euler", num_steps=points, atol=1e-6, rtol=1e-3, reverse=False
        )
        self.times = rae_time_schedule(points)
        logger.info(
            "dinov2: RAE from {}, {} steps, autoguidance {} in {}, t {:.4f} -> {:.4f}",
            repo, plan.ldm_steps, self.cfg_scale, list(self.cfg_interval), self.times[0].item(), self.times[-1].item(),
        )  # fmt: skip

    def caption_for(self, index: int, item: str) -> str:
        return self.class_names[int(item)]

    @torch.no_grad()
    def trajectory(self, index: int, class_id: int) -> Tensor:
        """(steps + 1, 768, 32, 32): the conditional half of the sampled trajectory, noise first."""
        generator = torch.Generator(self.device).manual_seed(int(self.cfg.seed) + index)
        z = torch.randn((1, *RAE_LATENT_SHAPE), generator=generator, device=self.device, dtype=torch.float32)
        kwargs = dict(
            y=torch.tensor([class_id, NULL_CLASS], device=self.device),
            cfg_scale=self.cfg_scale,
            cfg_interval=self.cfg_interval,
            additional_model_forward=self.guidance.forward,
        )
        with upstream_autocast(self.device, self.plan.dtype):
            # autoguidance reads a doubled batch: [z, z] with labels [class, null]
            traj = self.sample_fn(torch.cat([z, z]), self.main.forward_with_autoguidance, **kwargs)
        expected = (len(self.times), 2, *RAE_LATENT_SHAPE)
        if tuple(traj.shape) != expected:
            raise RuntimeError(
                f"the RAE sampler returned a trajectory of shape {tuple(traj.shape)}, expected {expected}"
            )
        return traj[:, 0].float()

    def generate(self, index: int, item: str) -> list[Any]:
        traj = self.trajectory(index, int(item))
        captures = [
            to_capture(f"{k:02d}xt", traj[k : k + 1], self.times[k].item()) for k in self.plan.capture_steps
        ]
        return [*captures, to_capture("x0", traj[-1:], 0.0)]
