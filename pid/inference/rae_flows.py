"""LDM flows of the RAE backbones, which generate with upstream code that pid does not vendor.

* dinov2: class-conditional ImageNet-512 with the RAE repository (DiT^DH-XL + autoguidance);
  latents are DINOv2-B (with registers) tokens [1, 768, 32, 32]; captions are class names.
* siglip: text-to-image at 256 px with the Scale-RAE repository (Qwen LM + diffusion head);
  latents are SigLIP-2 tokens [1, 1152, 16, 16]; PiD decodes them 8x.

`from_ldm` asks this module for the repository path, defaults, prompts and a latent source. A source has
`.space` (the baseline decode, `decode(latent) -> [-1, 1]`), `.generate(index, item) -> [Capture]` and
`.caption_for(index, item)`. Both upstream stacks already sample in the normalised space PiD reads (RAE's DiT
on stats-normalised tokens, Scale-RAE's head on LayerNorm-ed tokens), so captures go to PiD unchanged.
Upstream names used: see docs/rae.md.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import os
import pickle
import sys
import tempfile
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import Tensor, nn

from pid.errors import CheckpointMismatchError, CheckpointNotFoundError, ConfigError
from pid.inference.cli import Settings

_UPSTREAM = {
    # kind: (environment variable, default path, clone URL, fixed LDM size, default LDM steps)
    "rae": ("RAE_REPO_PATH", "../RAE", "https://github.com/bytetriper/RAE", (512, 512), 50),
    "scale_rae": (
        "SCALE_RAE_REPO_PATH",
        "../Scale-RAE",
        "https://github.com/ZitengWangNYU/Scale-RAE",
        (256, 256),
        50,
    ),
}

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

# --- siglip / Scale-RAE ---------------------------------------------------------------------------------------
SCALE_RAE_TRANSFORMERS = "4.57.1"  # on other majors the LM silently emits degenerate tiled embeddings
SCALE_RAE_DECODER_HF_REPO = "nyu-visionx/siglip2_decoder"
SCALE_RAE_REPO_DECODER = (
    "decoder/XL_decoder_config.json",
    "decoder/siglip2_sop14_i224_web73M_ganw3_decXL.pt",
)


def _kind(cfg: Settings) -> tuple:
    kind = cfg.backbone.kind
    if kind not in _UPSTREAM:
        raise ConfigError(f"backbone kind {kind!r} is not an RAE flow")
    return _UPSTREAM[kind]


def repo_path(cfg: Settings) -> Path:
    """The upstream clone for this backbone; a one-line error saying what to clone where if absent."""
    env, default, url, *_ = _kind(cfg)
    path = Path(cfg.backbone.repo_path or os.environ.get(env) or default).expanduser()
    marker = path / "src" if cfg.backbone.kind == "rae" else path
    if not marker.is_dir() or not any(marker.iterdir()):
        raise ConfigError(
            f"backbone {cfg.backbone.name} generates with the upstream code at {path}, which is missing; "
            f"clone it with: git clone {url} {default} (or set {env} / backbone.repo_path=)"
        )
    return path


def ldm_size(cfg: Settings) -> tuple[int, int]:
    return _kind(cfg)[3]


def default_ldm_steps(cfg: Settings) -> int:
    return _kind(cfg)[4]


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
    _kind(cfg)  # rejects non-RAE backbones
    source_cls = RAESource if cfg.backbone.kind == "rae" else ScaleRAESource
    return source_cls(cfg, plan, torch.device(device), space=space)


# ----------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------


def _capture(label: str, latent: Tensor, sigma: float) -> Any:
    from pid.inference.step_capture import Capture

    return Capture(label, latent.float(), float(sigma))


def _use_upstream(root: Path, packages: Sequence[str]) -> None:
    """Put `root` first on sys.path and forget `packages` modules imported from anywhere else.

    The upstream top-level names (`stage1`, `stage2`, `scale_rae`) are generic, so a stale module from another
    clone (or an installed copy) must not shadow the clone this run was pointed at.
    """
    root = root.resolve()
    entry = str(root)
    if entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(0, entry)
    for name in list(sys.modules):
        if name.split(".")[0] not in packages:
            continue
        file = getattr(sys.modules[name], "__file__", None)
        if file is None or not Path(file).resolve().is_relative_to(root):
            del sys.modules[name]
    importlib.invalidate_caches()


def _import(module: str, root: Path, url: str) -> types.ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot import {module} from the upstream clone at {root} ({first}); "
            f"it must be a complete clone of {url} with its requirements installed"
        ) from None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    # The upstream samplers keep fp32 weights; bf16/fp16 comes only from autocast (as RAE's sample_ddp.py).
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class UpstreamDecodeSpace:
    """The baseline decode through upstream code, shaped like a pid latent space: `decode(latent) -> [-1, 1]`."""

    def __init__(
        self, decode_unit: Callable[[Tensor], Tensor], name: str, module: nn.Module | None = None
    ) -> None:
        self._decode_unit = decode_unit  # normalised latent -> [0, 1] pixels
        self.name = name
        self.module = module  # the upstream model behind it (for inspection)

    def __repr__(self) -> str:
        return f"<UpstreamDecodeSpace {self.name!r}>"

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        return self._decode_unit(latent).float().clamp(0.0, 1.0) * 2 - 1


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
            f"{path} is not a readable PyTorch checkpoint ({_one_line(exc, 160)})"
        ) from None
    if isinstance(state, Mapping) and "ema" in state:
        state = state["ema"]
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointMismatchError(
            f"{path} does not fit DiTwDDTHead(hidden_size={arch['hidden_size']}): {_one_line(exc)}"
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
        url = _UPSTREAM["rae"][2]
        _use_upstream(repo / "src", ("stage1", "stage2"))
        dit_cls = _import("stage2.models.DDT", repo, url).DiTwDDTHead
        transport = _import("stage2.transport", repo, url)
        if space is None:
            rae = build_upstream_rae(_import("stage1", repo, url).RAE, cfg, repo, device, plan.dtype)
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
        with _autocast(self.device, self.plan.dtype):
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
            _capture(f"{k:02d}xt", traj[k : k + 1], self.times[k].item()) for k in self.plan.capture_steps
        ]
        return [*captures, _capture("x0", traj[-1:], 0.0)]


# ----------------------------------------------------------------------------------------------------------
# siglip: Scale-RAE (Qwen LM + diffusion head) with the Scale-RAE SigLIP-2 decoder
# ----------------------------------------------------------------------------------------------------------


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def check_scale_rae_transformers() -> None:
    """Scale-RAE's LM needs transformers 4.57.1: other majors produce garbage without failing, so refuse them."""
    installed = _transformers_version()
    if installed.split(".")[0] != SCALE_RAE_TRANSFORMERS.split(".")[0]:
        raise ConfigError(
            f"backbone siglip generates with Scale-RAE, which needs transformers=={SCALE_RAE_TRANSFORMERS} "
            f"(installed: {installed}, whose Qwen2 makes its LM emit degenerate image embeddings); run it in an "
            f"environment with pip install transformers=={SCALE_RAE_TRANSFORMERS}"
        )
    if installed != SCALE_RAE_TRANSFORMERS:
        logger.warning(
            "Scale-RAE was validated with transformers {}, found {}", SCALE_RAE_TRANSFORMERS, installed
        )


def resolve_scale_rae_decoder(cfg: Settings, repo: Path) -> tuple[Path, Path]:
    """(JSON config, weights) of the Scale-RAE decoder: explicit paths, else the clone's `decoder/`, else PiD's
    local `checkpoints/scale_rae/decoder/` (the same files), else a download of nyu-visionx/siglip2_decoder."""
    from pid.checkpoints import resolve_hub_path
    from pid.latents.scale_rae import SigLIPLatentSpace

    b = cfg.backbone
    config_value, ckpt_value = b.get("decoder_config"), b.get("decoder_ckpt")
    if config_value or ckpt_value:
        if not (config_value and ckpt_value):
            raise ConfigError(
                "give both backbone.decoder_config and backbone.decoder_ckpt (the Scale-RAE decoder), or neither"
            )
        pair = (Path(str(config_value)).expanduser(), Path(str(ckpt_value)).expanduser())
        for key, path in zip(("decoder_config", "decoder_ckpt"), pair):
            if not path.is_file():
                raise CheckpointNotFoundError(f"backbone.{key} {path} does not exist")
        return pair
    in_repo = (repo / SCALE_RAE_REPO_DECODER[0], repo / SCALE_RAE_REPO_DECODER[1])
    if all(p.is_file() for p in in_repo):
        return in_repo
    with contextlib.suppress(CheckpointNotFoundError):
        checkpoint_dir = cfg.get("checkpoint_dir")
        return (
            resolve_hub_path(SigLIPLatentSpace.decoder_config_file, checkpoint_dir, download=False),
            resolve_hub_path(SigLIPLatentSpace.decoder_file, checkpoint_dir, download=False),
        )
    from huggingface_hub import hf_hub_download

    logger.info("downloading the Scale-RAE decoder from {}", SCALE_RAE_DECODER_HF_REPO)
    try:
        return (
            Path(hf_hub_download(SCALE_RAE_DECODER_HF_REPO, "config.json")),
            Path(hf_hub_download(SCALE_RAE_DECODER_HF_REPO, "model.pt")),
        )
    except Exception as exc:  # offline, no access, no such repo: all end in the same advice
        raise CheckpointNotFoundError(
            f"the Scale-RAE decoder is neither in {repo / 'decoder'} nor in PiD's checkpoints/scale_rae/decoder, "
            f"and {SCALE_RAE_DECODER_HF_REPO} could not be downloaded ({type(exc).__name__}); download it with: "
            f"hf download {SCALE_RAE_DECODER_HF_REPO} config.json model.pt (or set backbone.decoder_config/decoder_ckpt)"
        ) from None


def _siglip_constants(pretrained_encoder: str) -> tuple[int, tuple, tuple]:
    """(token width, image mean, image std) the decoder uses; read from the hub only for a non-default encoder."""
    from pid.latents.rae import hf_pretrained
    from pid.latents.scale_rae import SCALE_RAE_DECODER, SIGLIP_MEAN, SIGLIP_REPO, SIGLIP_STD

    if pretrained_encoder == SIGLIP_REPO:
        return SCALE_RAE_DECODER.hidden_size, SIGLIP_MEAN, SIGLIP_STD
    from transformers import AutoConfig, AutoImageProcessor

    config = hf_pretrained(AutoConfig, pretrained_encoder)
    width = int(getattr(config, "vision_config", config).hidden_size)
    processor = hf_pretrained(AutoImageProcessor, pretrained_encoder)
    return width, tuple(processor.image_mean), tuple(processor.image_std)


def load_scale_rae_space(
    config_path: Path, ckpt_path: Path, pretrained_encoder: str, device: torch.device, dtype: torch.dtype
) -> Any:
    """PiD's siglip latent space around the Scale-RAE decoder files (decoder only: no SigLIP tower)."""
    from pid.checkpoints import read_checkpoint_file
    from pid.latents import get as get_latent_space
    from pid.latents.base import finish_module
    from pid.latents.rae import ViTDecoderConfig, load_vit_decoder
    from pid.latents.scale_rae import SCALE_RAE_DECODER, ScaleRAEAutoencoder

    width, mean, std = _siglip_constants(pretrained_encoder)
    # As Scale-RAE does: the decoder's input width is the encoder's, whatever the JSON says.
    decoder_cfg = ViTDecoderConfig.from_json(config_path, base=SCALE_RAE_DECODER, hidden_size=width)
    decoder = load_vit_decoder(read_checkpoint_file(ckpt_path), decoder_cfg, str(ckpt_path))
    space = get_latent_space("siglip")
    rae = ScaleRAEAutoencoder(None, finish_module(decoder, device, dtype), space.native_resolution)
    rae.pixel_mean.copy_(torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
    rae.pixel_std.copy_(torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
    return space.attach(rae.to(device))


def _drop_stale_mask(stock_forward: Callable[..., Any]) -> Callable[..., Any]:
    """Stock `Qwen2Model.forward`, minus an attention mask whose length is not sequence + cache length.

    Scale-RAE's greedy loop passes a (1, 1) placeholder mask every step; old Qwen2 rebuilt the causal mask
    from scratch in that case, current versions feed it to SDPA and fail. Without it they build the right one.
    """
    signature = inspect.signature(stock_forward)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind_partial(self, *args, **kwargs)
        except TypeError:
            return stock_forward(self, *args, **kwargs)
        arguments = bound.arguments
        extra = arguments.get(var_keyword, {}) if var_keyword else {}
        mask = arguments.get("attention_mask", extra.get("attention_mask"))
        if mask is not None:
            embeds = arguments.get("inputs_embeds", extra.get("inputs_embeds"))
            ids = arguments.get("input_ids", extra.get("input_ids"))
            length = embeds.shape[1] if embeds is not None else ids.shape[-1]
            caches = (arguments.get(n, extra.get(n)) for n in ("past_key_values", "cache"))  # 4.x / 5.x name
            cache = next((c for c in caches if c is not None), None)
            seen = (
                int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
            )
            if mask.shape[-1] != length + seen:
                if "attention_mask" in arguments:
                    arguments["attention_mask"] = None
                else:
                    extra["attention_mask"] = None
        return stock_forward(*bound.args, **bound.kwargs)

    return forward


def patch_scale_rae_model(model: nn.Module) -> None:
    """The compatibility patches Scale-RAE needs on current transformers (applied to this instance only)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

    inner = getattr(model, "model", model)
    # Scale-RAE's Qwen2 reads `self._attn_implementation`, which moved to the config.
    attn = getattr(getattr(inner, "config", None), "_attn_implementation", None) or "sdpa"
    for module in (model, inner):
        with contextlib.suppress(AttributeError, TypeError):
            object.__setattr__(module, "_attn_implementation", attn)
    # Its inner-model forward is a copy of an old Qwen2Model.forward: use the installed one instead.
    inner.forward = types.MethodType(_drop_stale_mask(Qwen2Model.forward), inner)
    # load_pretrained_model leaves dropout on.
    model.eval()
    inner.eval()
    head = getattr(model, "diff_head", None)
    if head is not None:
        head.eval()


class XtCapture:
    """Counts the diffusion head's sampling steps and keeps x_t after the requested ones.

    Installed as the head's `inference_flow.p_sample_loop` (on that instance): the same loop as Scale-RAE's
    `RectifiedFlow.p_sample_loop` (regular steps over `used_timesteps`, then a final Euler or "ucgm" step),
    recording `(x_t, t_next)` after step K. Nothing in the clone is modified.
    """

    def __init__(self, flow: Any, steps: Sequence[int]) -> None:
        self.flow = flow
        self.steps = frozenset(int(k) for k in steps)
        self.captured: dict[int, tuple[Tensor, float]] = {}
        self.count = 0  # steps taken by the last sampling call

    @property
    def total_steps(self) -> int:
        return len(self.flow.used_timesteps) - 1

    def install(self) -> XtCapture:
        self.flow.p_sample_loop = self.p_sample_loop
        return self

    def reset(self) -> None:
        self.captured, self.count = {}, 0

    def p_sample_loop(
        self,
        model: Callable,
        shape: Sequence[int],
        x_end: Tensor | None = None,
        clip_denoised: bool = False,
        denoised_fn: Callable | None = None,
        cond_fn: Any = None,
        model_kwargs: dict | None = None,
        device: Any = None,
        progress: bool = False,
    ) -> Tensor:
        flow = self.flow
        x = (flow.get_x_end(shape, device) if x_end is None else x_end).to(device)
        carry: tuple = (x, None, None) if flow.step_type == "ucgm" else (x,)
        used, times = flow.used_timesteps, flow.sampler_timesteps

        def step(fn: Callable, current: int, following: int) -> tuple:
            t_curr = torch.tensor(times[current]).to(device).repeat(x.size(0)).to(x.dtype)
            t_next = torch.tensor(times[following]).to(device).repeat(x.size(0)).to(x.dtype)
            out = fn(model, *carry, t_curr, t_next, denoised_fn, model_kwargs)
            self.count += 1
            if self.count in self.steps:
                self.captured[self.count] = (out[0].detach().clone(), float(times[following]))
            return out

        self.count = 0
        for i in reversed(range(1, len(used) - 1)):
            carry = step(flow.step_fn, used[i], used[i - 1])
        final = flow.step_fn if flow.step_type == "ucgm" else flow.euler_forward
        carry = step(final, used[-2], used[-1])
        return carry[0].clamp(-1, 1) if clip_denoised else carry[0]

    def latent(self, step: int, head: Any) -> tuple[Tensor, float]:
        """x_t after `step` as decoder-ready tokens (B, L, D), as the head post-processes its final sample."""
        if step not in self.captured:
            raise RuntimeError(
                f"x_t capture for step {step} did not fire (the diffusion head ran {self.count} steps); "
                "is diff_head.inference_flow.p_sample_loop still Scale-RAE's sampling entry point?"
            )
        x, t_next = self.captured[step]
        if getattr(head, "use_cfg", False):
            x = x.chunk(2)[0]  # conditional half
        tokens = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])  # BCHW -> (B, L, D)
        if getattr(head, "normalize_data", False):
            tokens = tokens * head.data_std.to(tokens) + head.data_mean.to(tokens)
        return tokens, t_next


class ScaleRAESource:
    """siglip: one prompt per item; the Qwen LM's diffusion head produces 16x16 SigLIP-2 tokens."""

    def __init__(self, cfg: Settings, plan: Any, device: torch.device, space: Any = None) -> None:
        self.cfg, self.plan, self.device = cfg, plan, device
        b = cfg.backbone
        check_scale_rae_transformers()
        self.prefix = str(b.prompt_prefix or "")
        self.guidance_level = float(b.guidance_level)
        self.max_new_tokens = int(b.max_new_tokens)
        if self.max_new_tokens < 1:
            raise ConfigError(f"backbone.max_new_tokens must be positive, got {self.max_new_tokens}")
        if cfg.get("ldm_steps") is not None:
            logger.warning("siglip ignores ldm_steps: the Scale-RAE diffusion head has a fixed step count")
        repo = repo_path(cfg)
        decoder_files = resolve_scale_rae_decoder(cfg, repo) if space is None else None
        url = _UPSTREAM["scale_rae"][2]
        _use_upstream(repo, ("scale_rae",))
        builder = _import("scale_rae.model.builder", repo, url)
        mm_utils = _import("scale_rae.mm_utils", repo, url)
        self._conversation = _import("scale_rae.conversation", repo, url)
        self._tokenize = mm_utils.tokenizer_image_token
        self._image_token = _import("scale_rae.constants", repo, url).IMAGE_TOKEN_INDEX
        _import("scale_rae.utils", repo, url).disable_torch_init()
        model_path = str(b.model_path)
        logger.info("siglip: loading Scale-RAE {} from {}", model_path, repo)
        self.tokenizer, self.model, _, _ = builder.load_pretrained_model(
            model_path=model_path,
            model_base=None,
            model_name=mm_utils.get_model_name_from_path(model_path),
            device=str(device),
            device_map={"": str(device)},
            torch_dtype=plan.dtype,
        )
        patch_scale_rae_model(self.model)
        self.capture = self._install_capture(repo, url) if plan.capture_steps else None
        self.token_ids = {
            name: self.tokenizer.convert_tokens_to_ids(token)
            for name, token in (("start_image_token_id", "<im_start>"), ("end_image_token_id", "<im_end>"),
                                ("eos_token_id", "<|im_end|>"))
        }  # fmt: skip
        if space is None:
            space = load_scale_rae_space(*decoder_files, str(b.pretrained_encoder), device, plan.dtype)
        self.space = space

    def _install_capture(self, repo: Path, url: str) -> XtCapture:
        diffloss = _import("scale_rae.model.diffusion_loss.diffloss", repo, url)
        head = getattr(self.model, "diff_head", None)
        if head is None:
            raise ConfigError(
                "save_xt_steps needs Scale-RAE's diffusion-head LM; this model has no diff_head"
            )
        if not isinstance(head, diffloss.FullSequenceRectifiedFlowProjector):
            raise ConfigError(
                "save_xt_steps supports only a FullSequenceRectifiedFlowProjector diffusion head (one trajectory "
                f"per image), got {type(head).__name__}"
            )
        capture = XtCapture(head.inference_flow, self.plan.capture_steps)
        bad = [k for k in self.plan.capture_steps if k > capture.total_steps]
        if bad:
            raise ConfigError(
                f"save_xt_steps {bad} out of range [1, {capture.total_steps}] (the Scale-RAE diffusion head "
                f"samples in {capture.total_steps} steps)"
            )
        return capture.install()

    def caption_for(self, index: int, item: str) -> str:
        return item  # the original caption: the prefix is for the LM only

    @torch.no_grad()
    def generate(self, index: int, prompt: str) -> list[Any]:
        seed = int(self.cfg.seed) + index
        torch.manual_seed(seed)  # the LM and the head sample from the global generators
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
        if self.capture is not None:
            self.capture.reset()
        conv = self._conversation.conv_templates["qwen_2"].copy()
        conv.append_message(conv.roles[0], self.prefix + prompt)
        conv.append_message(conv.roles[1], None)
        ids = self._tokenize(conv.get_prompt(), self.tokenizer, self._image_token, return_tensors="pt")
        ids = ids.unsqueeze(0).to(getattr(self.model, "device", self.device))
        _, embeds = self.model.generate(
            ids,
            images=None,
            output_image=True,
            do_sample=True,
            temperature=0.0,
            use_customize_greedy=True,
            top_p=None,
            num_beams=1,
            max_new_tokens=self.max_new_tokens,
            use_cache=True,
            guidance_level=self.guidance_level,
            **self.token_ids,
        )
        if embeds is None or embeds.ndim < 2 or embeds.shape[0] == 0:
            raise RuntimeError(f"Scale-RAE returned no image embeddings for prompt: {prompt!r}")
        captures = []
        for k in self.plan.capture_steps:
            tokens, t_next = self.capture.latent(k, self.model.diff_head)
            captures.append(_capture(f"{k:02d}xt", _grid(tokens), t_next))
        return [*captures, _capture("x0", _grid(embeds.unsqueeze(0) if embeds.ndim == 2 else embeds), 0.0)]


def _grid(tokens: Tensor) -> Tensor:
    """(1, 256, 1152) raster tokens -> (1, 1152, 16, 16)."""
    from pid.latents.rae import tokens_as_grid

    return tokens_as_grid(tokens[:1])
