"""`PiDDecoder`: network + checkpoint record + caption encoder + sampler, with the device policy.

    decoder = PiDDecoder.from_pretrained("flux", ckpt_type="2k")
    images = decoder.decode(lq_latent, caption="a red fox in snow", seed=0)   # [B, 3, H, W] in [0, 1]

Precision: on CUDA the reference recipe — fp32 weights under bf16 autocast, the latent rounded
to bf16; `dtype=torch.bfloat16` stores bf16 weights (half the memory, slightly less accurate) and
also runs under autocast; on CPU with fp32 weights, plain fp32.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger
from torch import Tensor
from tqdm.auto import tqdm

from pid.checkpoints import (
    CheckpointRecord,
    carried_ckpt_type,
    ckpt_types,
    load_network_weights,
    lookup,
    resolve_checkpoint,
)
from pid.errors import ConfigError
from pid.models import PiDNet, build_pid_net
from pid.models.pid_net import LatentFeatures
from pid.sampling import (
    DEFAULT_SHIFT,
    distilled_schedule,
    dynamic_shift,
    sample_distilled,
    sample_dpm_solver,
    undistilled_schedule,
)
from pid.text_encoder import NEGATIVE_PROMPT, CaptionEncoder

NETWORK_TIME_SCALE = 1000.0  # the network sees 1000 * t
UNDISTILLED_DEFAULT_STEPS = 25
UNDISTILLED_DEFAULT_CFG = 5.0


@dataclass
class DecodeInputs:
    """One decode's validated inputs on the decoder's device (see `PiDDecoder.prepare_inputs`)."""

    lq_latent: Tensor  # [B, C, h, w] fp32 (bf16-rounded under autocast, as the reference)
    embeds: Tensor  # [B, Lt, text_dim] fp32
    sigma: Tensor  # [B] fp32
    size: tuple[int, int]  # output (H, W)
    generator: torch.Generator
    noise: Tensor  # [B, 3, H, W] fp32: the first draw from `generator`


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class PiDDecoder:
    """Decode LDM latents to images with a PiD network.

    net: a built `PiDNet` (see `pid.models.build_pid_net`); record: the checkpoint record (sampler
    kind, scale, shift); None means a distilled decoder. text_encoder: a `CaptionEncoder`, or
    None when callers pass `caption_embeds` themselves.
    """

    def __init__(
        self,
        net: PiDNet,
        record: CheckpointRecord | None = None,
        text_encoder: CaptionEncoder | None = None,
        autocast: bool | None = None,
    ) -> None:
        self.net = net.eval()
        self.record = record
        self.text_encoder = text_encoder
        self._autocast = autocast
        self._compiled: dict[tuple[int, int], torch.nn.Module] = {}
        self.compile_mode: str | None = None
        self._compile_backend = "inductor"
        self.latent_space: Any = None  # a declared latent space the decoder's file carried (not loaded)

    # ------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        backbone: str | None = None,
        ckpt_type: str | None = "2k",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        checkpoint: str | os.PathLike | None = None,
        text_encoder: CaptionEncoder | str | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        download: bool = True,
        revision: str | None = None,
        text_encoder_revision: str | None = None,
        latent_space: Any = None,
    ) -> PiDDecoder:
        """Build the released decoder for (backbone, ckpt_type) and load its weights strictly.

        ckpt_type "2k" falls back to the backbone's own default where it has no 2k decoder
        (sdxl, qwenimage: 2kto4k); None always takes that default.
        text_encoder: a CaptionEncoder, a repo id / local folder of Gemma-2, or None for the
        default `Efficient-Large-Model/gemma-2-2b-it`.
        A weight file that carries its own network config (`pid.checkpoints.NET_CONFIG_KEY`, e.g. a
        fine-tuned decoder of another size) is built with it, provided it reads this backbone's latents.
        A weight file that carries a declared latent space (`pid.latents.declared.SPACE_SPEC_KEY`) needs no
        backbone: `from_pretrained(checkpoint="my_decoder.safetensors")`; so does one made for a built-in
        backbone by `python -m pid.train.export`. `latent_space`: a declared space (file, mapping, spec or
        object, see `pid.latents.resolve`) for a file that does not carry one. The decoder's `latent_space` is
        then that space (no weights loaded).
        revision: branch, tag or commit of nvidia/PiD for downloads; text_encoder_revision: the same
        for the Gemma-2 repo.
        """
        from pid.latents.declared import check_space_fits, custom_record, declared_space_of

        device = torch.device(device) if device is not None else default_device()
        space, carried_backbone = declared_space_of(checkpoint, backbone, latent_space)
        if space is not None:
            if checkpoint is None:
                raise ConfigError(f"latent space {space.name} has no released decoder; give checkpoint=<decoder file>")
            path = resolve_checkpoint(custom_record(space.name, None, checkpoint), checkpoint)
            config, state = load_network_weights(path)
            record = custom_record(space.name, config, path)
            check_space_fits(config.latent_channels, space, path)
        else:
            backbone = backbone or carried_backbone
            if backbone is None:
                raise ConfigError("name the backbone (e.g. from_pretrained('flux')), or give a checkpoint= file that "
                                  "carries its latent space")
            if ckpt_type == "2k" and checkpoint is not None:  # the default: a pid.train export names its own type
                ckpt_type = carried_ckpt_type(checkpoint, backbone) or ckpt_type
            if ckpt_type == "2k" and "2k" not in ckpt_types(backbone):
                ckpt_type = None
            record = lookup(backbone, ckpt_type)
            path = resolve_checkpoint(record, checkpoint, checkpoint_dir, download, revision=revision)
            config, state = load_network_weights(path, record)
        logger.info("loading PiD {}/{} from {}", record.backbone, record.ckpt_type, path)
        net = build_pid_net(config, device=device, dtype=dtype or torch.float32, state_dict=state)
        if not isinstance(text_encoder, CaptionEncoder):
            kwargs = {"name_or_path": text_encoder} if text_encoder else {}
            text_encoder = CaptionEncoder.from_pretrained(device=device, revision=text_encoder_revision, **kwargs)
        decoder = cls(net, record, text_encoder)
        decoder.latent_space = space
        return decoder

    # ------------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def scale(self) -> int:
        return self.net.cfg.sr_scale

    @property
    def output_stride(self) -> int:
        """Output pixels per latent cell."""
        return self.net.cfg.output_stride

    @property
    def latent_channels(self) -> int:
        return self.net.cfg.latent_channels

    @property
    def distilled(self) -> bool:
        return self.record is None or self.record.sampler == "distilled"

    @property
    def uses_autocast(self) -> bool:
        if self._autocast is not None:
            return self._autocast
        # CUDA: the reference recipe (fp32 weights, bf16 autocast). bf16 weights need autocast anywhere,
        # since the sampler state stays fp32.
        return self.device.type == "cuda" or next(self.net.parameters()).dtype == torch.bfloat16

    def _autocast_ctx(self):
        if not self.uses_autocast:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------------------------------
    # Speed knobs
    # ------------------------------------------------------------------------------------------

    def compile(
        self, mode: str = "default", text_encoder: bool = True, backend: str = "inductor"
    ) -> PiDDecoder:
        """torch.compile the network (one static graph per output size, built on first use) and the
        caption encoder. `mode` "max-autotune" adds autotuning and CUDA graphs on GPUs."""
        self.compile_mode = mode
        self._compile_backend = backend
        self._compiled.clear()
        if "positional_tables" not in vars(self.net):
            # The positional tables are cached in Python; keep them out of the graph. Done here, not with a
            # decorator, because the decorator imports torch._dynamo (seconds) whenever pid is imported.
            self.net.positional_tables = torch.compiler.disable(self.net.positional_tables)
        if text_encoder and self.text_encoder is not None:
            options = {"mode": mode} if backend == "inductor" else {}
            self.text_encoder.model = torch.compile(
                self.text_encoder.model, backend=backend, dynamic=False, **options
            )
        return self

    def set_pixel_chunking(self, tokens: int | None) -> None:
        """Process the per-pixel work of the PiT blocks in slices of `tokens` patches (None = off)."""
        self.net.pixel_chunk_tokens = tokens

    def _net_for(self, size: tuple[int, int]):
        if self.compile_mode is None:
            return self.net
        if size not in self._compiled:
            options = {"mode": self.compile_mode} if self._compile_backend == "inductor" else {}
            self._compiled[size] = torch.compile(
                self.net, backend=self._compile_backend, dynamic=False, **options
            )
        return self._compiled[size]

    # ------------------------------------------------------------------------------------------
    # Conditioning
    # ------------------------------------------------------------------------------------------

    def encode_captions(self, captions: str | Sequence[str]) -> Tensor:
        """[B, 300, text_dim] caption embeddings on the decoder's device."""
        if self.text_encoder is None:
            raise ConfigError("this decoder has no text encoder; pass caption_embeds= or build it with one")
        return self.text_encoder.encode(captions).to(self.device)

    def output_size_for(
        self, lq_latent: Tensor, output_size: int | tuple[int, int] | None = None
    ) -> tuple[int, int]:
        """`output_size` as (H, W); by default latent size x latent stride x scale (64 -> 2048 for Flux 4x)."""
        if output_size is None:
            return lq_latent.shape[-2] * self.output_stride, lq_latent.shape[-1] * self.output_stride
        if isinstance(output_size, int):
            return output_size, output_size
        return int(output_size[0]), int(output_size[1])

    def _check_inputs(self, lq_latent: Tensor, size: tuple[int, int]) -> None:
        if lq_latent.ndim != 4:
            raise ConfigError(f"lq_latent must be [B, C, h, w], got shape {tuple(lq_latent.shape)}")
        if lq_latent.shape[1] != self.latent_channels:
            name = f"{self.record.backbone}/{self.record.ckpt_type} " if self.record else ""
            raise ConfigError(
                f"the {name}decoder takes {self.latent_channels}-channel latents, got {lq_latent.shape[1]} "
                f"channels; pick the decoder of the backbone that made this latent"
            )
        patch = self.net.cfg.patch_size
        height, width = size
        if height % patch or width % patch or height <= 0 or width <= 0:
            raise ConfigError(
                f"output size {height}x{width} must be a positive multiple of {patch}; "
                f"e.g. {max(patch, round(height / patch) * patch)}x{max(patch, round(width / patch) * patch)}"
            )

    # ------------------------------------------------------------------------------------------
    # Decoding
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(
        self,
        lq_latent: Tensor,
        caption: str | Sequence[str] | None = None,
        caption_embeds: Tensor | None = None,
        degrade_sigma: float | Sequence[float] | Tensor = 0.0,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        output_size: int | tuple[int, int] | None = None,
        cfg_scale: float | None = None,
        shift: float | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Decode `lq_latent` [B, C, h, w] (the LDM's normalised latent) to images in [0, 1].

        caption: one string for the whole batch or one per sample (default ""); or give
        `caption_embeds` [B or 1, Lt, text_dim]. degrade_sigma: the latent's noise level (scalar
        or per sample), 0 for a clean latent. steps: 1-4 for distilled decoders (default 4),
        any for undistilled ones (default 25, with text CFG `cfg_scale`, default 5).
        generator / seed: the initial noise is one randn([B, 3, H, W]) from it, then one draw
        of that shape per re-noising step; default seed 0. output_size: (H, W) or N (default
        latent size x stride). Returns fp32 [B, 3, H, W] on the decoder's device.
        """
        inputs = self.prepare_inputs(
            lq_latent, caption, caption_embeds, degrade_sigma, generator, seed, output_size
        )
        with self._autocast_ctx():
            # The adapter does not depend on x_t or t: once per decode, not once per step.
            features = self.net.encode_latent(inputs.lq_latent, inputs.sigma, inputs.size)
        negative, cfg = self.guidance(cfg_scale, inputs.embeds.shape[0])
        velocity = self.velocity_fn(self._net_for(inputs.size), inputs.embeds, features, negative, cfg)
        return self.sample(velocity, inputs, steps, shift, progress)

    def prepare_inputs(
        self,
        lq_latent: Tensor,
        caption: str | Sequence[str] | None = None,
        caption_embeds: Tensor | None = None,
        degrade_sigma: float | Sequence[float] | Tensor = 0.0,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        output_size: int | tuple[int, int] | None = None,
    ) -> DecodeInputs:
        """Validated, device-placed inputs of one decode, and its initial noise (see `decode`)."""
        device = self.device
        batch = lq_latent.shape[0]
        size = self.output_size_for(lq_latent, output_size)
        self._check_inputs(lq_latent, size)
        embeds = self._caption_embeds(caption, caption_embeds, batch)
        lq_latent = lq_latent.to(device)
        if self.uses_autocast:
            lq_latent = lq_latent.to(torch.bfloat16)  # the reference hands PiD a bf16 latent
        lq_latent = lq_latent.float()
        sigma = torch.as_tensor(degrade_sigma, dtype=torch.float32, device=device).reshape(-1)
        sigma = sigma.expand(batch) if sigma.numel() == 1 else sigma
        if sigma.shape != (batch,):
            raise ConfigError(f"degrade_sigma needs 1 or {batch} values, got {sigma.numel()}")
        if bool(((sigma < 0) | (sigma > 1)).any()):
            raise ConfigError(f"degrade_sigma must lie in [0, 1], got {sigma.tolist()}")
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(0 if seed is None else int(seed))
        noise = torch.randn(
            (batch, 3, *size), generator=generator, device=generator.device, dtype=torch.float32
        )
        return DecodeInputs(lq_latent, embeds, sigma, size, generator, noise.to(device))

    def guidance(self, cfg_scale: float | None, batch: int) -> tuple[Tensor | None, float]:
        """(negative caption embeddings or None, CFG scale): text CFG only for undistilled decoders."""
        if self.distilled:
            return None, 1.0
        cfg = UNDISTILLED_DEFAULT_CFG if cfg_scale is None else float(cfg_scale)
        if cfg == 1.0:
            return None, cfg
        return self.encode_captions([NEGATIVE_PROMPT]).expand(batch, -1, -1), cfg

    def sample(
        self,
        velocity: Callable[[Tensor, float], Tensor],
        inputs: DecodeInputs,
        steps: int | None = None,
        shift: float | None = None,
        progress: bool = False,
        calls_per_step: int = 1,
    ) -> Tensor:
        """Run this decoder's sampler from `inputs.noise` with `velocity`; images in [0, 1]."""
        bar = tqdm(desc="PiD", unit="call", disable=not progress, leave=False)
        tick = lambda *_: bar.update(calls_per_step)  # noqa: E731
        if self.distilled:
            schedule = distilled_schedule(4 if steps is None else steps)
            bar.total = (len(schedule) - 1) * calls_per_step
            x0 = sample_distilled(velocity, inputs.noise, schedule, inputs.generator, callback=tick)
        else:
            steps = UNDISTILLED_DEFAULT_STEPS if steps is None else steps
            if shift is None and self.record is not None and self.record.dynamic_shift is not None:
                shift = dynamic_shift(*inputs.size, *self.record.dynamic_shift)
            schedule = undistilled_schedule(steps, DEFAULT_SHIFT if shift is None else shift)
            bar.total = steps * calls_per_step
            x0 = sample_dpm_solver(velocity, inputs.noise, schedule, callback=tick)
        bar.close()
        return ((x0.clamp(-1, 1) + 1) / 2).float()

    def _caption_embeds(
        self, caption: str | Sequence[str] | None, caption_embeds: Tensor | None, batch: int
    ) -> Tensor:
        if caption_embeds is None:
            captions = (
                [caption or ""] * batch if caption is None or isinstance(caption, str) else list(caption)
            )
            if len(captions) != batch:
                raise ConfigError(f"got {len(captions)} captions for a batch of {batch} latents")
            caption_embeds = self.encode_captions(captions)
        caption_embeds = caption_embeds.to(self.device, torch.float32)
        if caption_embeds.shape[0] == 1 and batch > 1:
            caption_embeds = caption_embeds.expand(batch, -1, -1)
        if caption_embeds.ndim != 3 or caption_embeds.shape[0] != batch:
            raise ConfigError(f"caption_embeds must be [{batch}, Lt, D], got {tuple(caption_embeds.shape)}")
        if caption_embeds.shape[-1] != self.net.cfg.text_dim:
            raise ConfigError(
                f"caption_embeds have width {caption_embeds.shape[-1]}, the network expects {self.net.cfg.text_dim}"
            )
        return caption_embeds

    def velocity_fn(
        self,
        net,
        embeds: Tensor,
        features: LatentFeatures,
        negative: Tensor | None = None,
        cfg_scale: float = 1.0,
        pixel_offset: tuple[int, int] = (0, 0),
    ) -> Callable[[Tensor, float], Tensor]:
        """v(x, t_flow) of `net` under this decoder's precision, with text CFG when `negative` is given.
        `pixel_offset`: where x sits in a larger image (tiled decoding)."""
        batch = embeds.shape[0]

        def velocity(x: Tensor, t_flow: float) -> Tensor:
            t = torch.full((batch,), t_flow, dtype=torch.float32, device=x.device) * NETWORK_TIME_SCALE
            with self._autocast_ctx():
                if negative is None:
                    return net(x, t, embeds, latent_features=features, pixel_offset=pixel_offset).float()
                # text-only CFG: both branches see the same latent and sigma
                both = LatentFeatures(
                    heads=[torch.cat([h, h]) for h in features.heads],
                    pit=None if features.pit is None else torch.cat([features.pit, features.pit]),
                    sigma=torch.cat([features.sigma, features.sigma]),
                    grid=features.grid,
                )
                out = net(
                    torch.cat([x, x]), torch.cat([t, t]), torch.cat([embeds, negative]), latent_features=both
                )
                cond, uncond = out.float().chunk(2)
                return uncond + cfg_scale * (cond - uncond)

        return velocity
