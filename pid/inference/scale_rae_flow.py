"""The siglip LDM flow of from_ldm: text-to-image at 256 px with the Scale-RAE repository (Qwen LM + diffusion
head); latents are SigLIP-2 tokens [1, 1152, 16, 16], which PiD decodes 8x. `pid.inference.rae_flows` makes the
source; upstream names used: see docs/rae.md."""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import Tensor, nn

from pid.errors import CheckpointNotFoundError, ConfigError
from pid.inference.cli import Settings
from pid.inference.rae_upstream import (
    UPSTREAM,
    import_upstream,
    repo_path,
    to_capture,
    use_upstream,
)

# --- siglip / Scale-RAE ---------------------------------------------------------------------------------------
SCALE_RAE_TRANSFORMERS = "4.57.1"  # on other majors the LM silently emits degenerate tiled embeddings
SCALE_RAE_DECODER_HF_REPO = "nyu-visionx/siglip2_decoder"
SCALE_RAE_REPO_DECODER = (
    "decoder/XL_decoder_config.json",
    "decoder/siglip2_sop14_i224_web73M_ganw3_decXL.pt",
)


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
        url = UPSTREAM["scale_rae"][2]
        use_upstream(repo, ("scale_rae",))
        builder = import_upstream("scale_rae.model.builder", repo, url)
        mm_utils = import_upstream("scale_rae.mm_utils", repo, url)
        self._conversation = import_upstream("scale_rae.conversation", repo, url)
        self._tokenize = mm_utils.tokenizer_image_token
        self._image_token = import_upstream("scale_rae.constants", repo, url).IMAGE_TOKEN_INDEX
        import_upstream("scale_rae.utils", repo, url).disable_torch_init()
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
        diffloss = import_upstream("scale_rae.model.diffusion_loss.diffloss", repo, url)
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
            captures.append(to_capture(f"{k:02d}xt", _grid(tokens), t_next))
        return [*captures, to_capture("x0", _grid(embeds.unsqueeze(0) if embeds.ndim == 2 else embeds), 0.0)]


def _grid(tokens: Tensor) -> Tensor:
    """(1, 256, 1152) raster tokens -> (1, 1152, 16, 16)."""
    from pid.latents.rae import tokens_as_grid

    return tokens_as_grid(tokens[:1])
