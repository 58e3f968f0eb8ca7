"""The PiD network: PixelDiT backbone + latent adapter with sigma-aware gates.

Read top to bottom: `SigmaGate` -> `LatentAdapter` -> `PiDNet.forward`.

    v = net(x_t, t, caption_embeds, lq_latent, degrade_sigma)

x_t [B, 3, H, W] noisy image (flow frame, [-1, 1] scale), t [B] network time (= 1000 * t_flow),
caption_embeds [B, Lt, text_dim], lq_latent [B, C, h, w] in the LDM's normalised space,
degrade_sigma [B] noise level of that latent in [0, 1]. Returns the velocity v = eps - x0.
`pixel_offset` (keyword) places x_t inside a larger image for tiled decoding: the absolute pixel
embedding then uses the whole-image coordinates (RoPE stays per input).
H and W must be multiples of the patch size; the latent is aligned to the patch grid by
nearest-neighbour resizing, so any (H, W) works, though training used H = h * lsdf * sr.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pid.models.configs import PiDNetConfig
from pid.models.pixeldit import (
    FinalLayer,
    LinearEmbedder,
    MMDiTBlock,
    PiTBlock,
    TextEmbedder,
    TimestepEmbedder,
    pixel_sincos_embedding,
    rope_1d_angles,
    rope_2d_angles,
    rope_table,
)


class SigmaGate(nn.Module):
    """x + sigmoid(content_proj([x, q]) - exp(log_alpha) * sigma) * q.

    A noisier latent (larger sigma) closes the gate, leaving the decoder more generative freedom.
    `per_dim` gates each channel (v1); `per_token` uses one scalar per token (v1.5).
    """

    def __init__(self, dim: int, per_dim: bool) -> None:
        super().__init__()
        self.content_proj = nn.Linear(2 * dim, dim if per_dim else 1)
        self.log_alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, q: Tensor, sigma: Tensor) -> Tensor:
        logits = self.content_proj(torch.cat([x, q], dim=-1))
        offset = torch.exp(self.log_alpha.float()) * sigma.float()[:, None, None]
        return x + torch.sigmoid(logits - offset) * q


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x))))))."""

    def __init__(self, width: int, groups: int, padding_mode: str) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(groups, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1, padding_mode=padding_mode),
            nn.GroupNorm(groups, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1, padding_mode=padding_mode),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


@dataclass
class LatentFeatures:
    """Adapter outputs for one latent at one output size; independent of x_t and t.

    `heads[k]` [B, L, D] is injected before MMDiT block k * interval; `pit` [B, L, D] (v1.5)
    before the pixel blocks; `sigma` [B] is the latent's noise level.
    """

    heads: list[Tensor]
    pit: Tensor | None
    sigma: Tensor
    grid: tuple[int, int]
    # Training only: the aux RGB head's reconstruction of the LQ image [B, 3, H/sr', W/sr'] (v1.5).
    lq_rgb: Tensor | None = None


@dataclass
class TrainingOutputs:
    """What a training forward returns besides the velocity.

    `velocity` [B, 3, H, W] (None when only features were asked for); `pred_lq_rgb`
    [B, 3, H/4, W/4] (the aux RGB head, when asked for); `block_features` one [B, D, H/P, W/P]
    map per requested patch block, taken after that block (the discriminator's input).
    """

    velocity: Tensor | None
    pred_lq_rgb: Tensor | None = None
    block_features: list[Tensor] = field(default_factory=list)


class LatentAdapter(nn.Module):
    """The "lq_proj" ControlNet-style adapter: latent -> per-patch features + their gates."""

    def __init__(self, cfg: PiDNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width, pad = cfg.adapter_width, cfg.adapter_padding
        self.latent_proj = nn.Sequential(
            nn.Conv2d(cfg.adapter_in_channels, width, 3, padding=1, padding_mode=pad),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1, padding_mode=pad),
            *[ResBlock(width, cfg.adapter_groups, pad) for _ in range(cfg.adapter_res_blocks)],
        )
        self.output_heads = nn.ModuleList(
            nn.Linear(width, cfg.hidden_size) for _ in range(cfg.num_injections)
        )
        if cfg.pit_inject:
            self.pit_head = nn.Linear(width, cfg.hidden_size)
        if cfg.aux_rgb_head:
            # Training-only auxiliary RGB head of v1.5 (colour-alignment loss); never run at inference.
            self.rgb_patch = cfg.patch_size // cfg.sr_scale
            out = cfg.in_channels * self.rgb_patch**2
            self.lq_aux_rgb_head = nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, out)
            )
        self.gate_modules = nn.ModuleList(
            SigmaGate(cfg.hidden_size, per_dim=cfg.gate == "per_dim") for _ in range(cfg.num_injections)
        )

    def tokens(self, lq_latent: Tensor, grid: tuple[int, int]) -> Tensor:
        """The CNN's features on the patch grid as tokens [B, L, width], raster order."""
        z = lq_latent.to(self.latent_proj[0].weight.dtype)
        if self.cfg.latent_unpatchify > 1:
            # channel c * u^2 + a * u + b -> channel c at (u * i + a, u * j + b)
            z = F.pixel_shuffle(z, self.cfg.latent_unpatchify)
        z = F.interpolate(z, size=grid, mode="nearest")  # legacy nearest: src = floor(dst * in / out)
        return self.latent_proj(z).flatten(2).transpose(1, 2)

    def forward(self, lq_latent: Tensor, grid: tuple[int, int]) -> tuple[list[Tensor], Tensor | None]:
        tokens = self.tokens(lq_latent, grid)
        heads = [head(tokens) for head in self.output_heads]
        pit = self.pit_head(tokens) if self.cfg.pit_inject else None
        return heads, pit

    def predict_lq_rgb(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """Aux RGB head: each token -> a (P/sr)^2 RGB patch, assembled into [B, 3, gh*P/sr, gw*P/sr]."""
        if not self.cfg.aux_rgb_head:
            raise RuntimeError("this network has no aux RGB head (PiDNetConfig.aux_rgb_head=False)")
        batch, (grid_h, grid_w), k = tokens.shape[0], grid, self.rgb_patch
        rgb = self.lq_aux_rgb_head(tokens).type_as(tokens)
        rgb = rgb.view(batch, grid_h, grid_w, self.cfg.in_channels, k, k).permute(0, 3, 1, 4, 2, 5)
        return rgb.reshape(batch, self.cfg.in_channels, grid_h * k, grid_w * k)


class PiDNet(nn.Module):
    """PixelDiT text-to-image backbone conditioned on an LDM latent (see module docstring)."""

    def __init__(self, cfg: PiDNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim, eps, patch = cfg.hidden_size, cfg.norm_eps, cfg.patch_size
        self.y_pos_embedding = nn.Parameter(torch.zeros(1, cfg.text_max_length, dim))
        self.pixel_embedder = LinearEmbedder(cfg.in_channels, cfg.pixel_hidden_size)
        self.s_embedder = LinearEmbedder(cfg.in_channels * patch * patch, dim)
        self.t_embedder = TimestepEmbedder(dim, cfg.timestep_freq_dim, cfg.timestep_max_period)
        self.y_embedder = TextEmbedder(cfg.text_dim, dim, eps)
        self.patch_blocks = nn.ModuleList(
            MMDiTBlock(dim, cfg.num_heads, cfg.mlp_hidden, eps) for _ in range(cfg.patch_depth)
        )
        self.pixel_blocks = nn.ModuleList(
            PiTBlock(
                dim,
                cfg.pixel_hidden_size,
                cfg.pixel_attn_hidden_size,
                cfg.pixel_num_heads,
                patch,
                cfg.pixel_mlp_ratio,
                eps,
            )
            for _ in range(cfg.pixel_depth)
        )
        self.final_layer = FinalLayer(cfg.pixel_hidden_size, cfg.in_channels, eps)
        self.lq_proj = LatentAdapter(cfg)
        if cfg.pit_inject:
            self.pit_lq_gate = SigmaGate(dim, per_dim=cfg.gate == "per_dim")
        # Per-pixel work of the PiT blocks in slices of this many patch tokens (None = all at once).
        self.pixel_chunk_tokens: int | None = None
        self._pos_cache: dict[tuple, tuple[Tensor, ...]] = {}

    # ------------------------------------------------------------------------------------------
    # Positional tables (cached per grid size and device; not part of the state dict)
    # ------------------------------------------------------------------------------------------

    def positional_tables(
        self,
        height: int,
        width: int,
        text_len: int,
        device: torch.device,
        pixel_offset: tuple[int, int] = (0, 0),
    ) -> tuple[Tensor, ...]:
        """(RoPE cos/sin of the patch blocks, of the text, of the pixel blocks; pixel sin-cos table).

        Cached per size; a table at a non-zero `pixel_offset` (a tile of a larger image) is made
        per call instead, so tiling a huge image does not fill the cache with per-tile tables.
        """
        key = (height, width, text_len, str(device))
        cfg = self.cfg
        if key not in self._pos_cache:
            grid_h, grid_w = height // cfg.patch_size, width // cfg.patch_size
            patch_hd = cfg.hidden_size // cfg.num_heads
            pixel_hd = cfg.pixel_attn_hidden_size // cfg.pixel_num_heads
            rope_args = (cfg.rope_theta, cfg.rope_ref_grid, cfg.rope_extent, device)
            self._pos_cache[key] = (
                *rope_table(rope_2d_angles(grid_h, grid_w, patch_hd, *rope_args)),
                *rope_table(rope_1d_angles(text_len, patch_hd, cfg.text_rope_theta, device)),
                *rope_table(rope_2d_angles(grid_h, grid_w, pixel_hd, *rope_args)),
                pixel_sincos_embedding(height, width, cfg.pixel_hidden_size, device),
            )
        tables = self._pos_cache[key]
        if tuple(pixel_offset) == (0, 0):
            return tables
        offset = (int(pixel_offset[0]), int(pixel_offset[1]))
        return (*tables[:-1], pixel_sincos_embedding(height, width, cfg.pixel_hidden_size, device, offset=offset))

    # ------------------------------------------------------------------------------------------
    # Latent adapter (once per decode)
    # ------------------------------------------------------------------------------------------

    def encode_latent(
        self,
        lq_latent: Tensor,
        degrade_sigma: Tensor | float,
        size: tuple[int, int],
        *,
        lq_rgb: bool = False,
    ) -> LatentFeatures:
        """Adapter features for decoding `lq_latent` to an image of `size` = (H, W).

        They do not depend on x_t or t, so a sampler computes them once and passes them to
        every step as `forward(..., latent_features=...)`. `lq_rgb=True` (training) also runs
        the aux RGB head.
        """
        height, width = size
        grid = (height // self.cfg.patch_size, width // self.cfg.patch_size)
        if lq_rgb:
            tokens = self.lq_proj.tokens(lq_latent, grid)
            heads = [head(tokens) for head in self.lq_proj.output_heads]
            pit = self.lq_proj.pit_head(tokens) if self.cfg.pit_inject else None
            rgb = self.lq_proj.predict_lq_rgb(tokens, grid)
        else:
            (heads, pit), rgb = self.lq_proj(lq_latent, grid), None
        sigma = _per_sample(degrade_sigma, lq_latent.shape[0], lq_latent.device)
        return LatentFeatures(heads=heads, pit=pit, sigma=sigma, grid=grid, lq_rgb=rgb)

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------

    def forward(
        self,
        x_t: Tensor,
        t: Tensor | float,
        caption_embeds: Tensor,
        lq_latent: Tensor | None = None,
        degrade_sigma: Tensor | float = 0.0,
        *,
        latent_features: LatentFeatures | None = None,
        pixel_offset: tuple[int, int] = (0, 0),
        train_outputs: bool = False,
        lq_rgb: bool = False,
        feature_blocks: Collection[int] = (),
        features_only: bool = False,
    ) -> Tensor | TrainingOutputs:
        """The velocity [B, 3, H, W]; with `train_outputs=True` a `TrainingOutputs` instead (see
        `forward_train`). Training goes through here too, so DDP / FSDP wrappers see the call."""
        if not train_outputs:
            if lq_rgb or feature_blocks or features_only:
                raise ValueError("lq_rgb / feature_blocks / features_only need train_outputs=True")
            velocity, _ = self._run(
                x_t, t, caption_embeds, lq_latent, degrade_sigma, latent_features, pixel_offset
            )
            return velocity
        if features_only and not feature_blocks:
            raise ValueError("features_only=True needs feature_blocks")
        if latent_features is None:
            if lq_latent is None:
                raise ValueError("PiDNet needs lq_latent (or precomputed latent_features)")
            size = (x_t.shape[-2], x_t.shape[-1])
            latent_features = self.encode_latent(lq_latent, degrade_sigma, size, lq_rgb=lq_rgb)
        elif lq_rgb and latent_features.lq_rgb is None:
            raise ValueError("lq_rgb=True needs latent_features computed with encode_latent(..., lq_rgb=True)")
        velocity, maps = self._run(
            x_t,
            t,
            caption_embeds,
            None,
            degrade_sigma,
            latent_features,
            pixel_offset,
            feature_blocks=frozenset(feature_blocks),
            features_only=features_only,
        )
        rgb = latent_features.lq_rgb if lq_rgb else None
        return TrainingOutputs(velocity=velocity, pred_lq_rgb=rgb, block_features=maps)

    def forward_train(
        self,
        x_t: Tensor,
        t: Tensor | float,
        caption_embeds: Tensor,
        lq_latent: Tensor,
        degrade_sigma: Tensor | float = 0.0,
        *,
        lq_rgb: bool = False,
        feature_blocks: Collection[int] = (),
        features_only: bool = False,
    ) -> TrainingOutputs:
        """The training forward: the velocity plus, on request, the aux RGB head's LQ image
        (`lq_rgb`, [B, 3, H/4, W/4]) and the token maps [B, D, H/P, W/P] after the given patch
        blocks (`feature_blocks`, 0-based). `features_only` stops after the last requested block
        (velocity None; no pixel blocks). Same as `self(..., train_outputs=True, ...)`."""
        return self(
            x_t,
            t,
            caption_embeds,
            lq_latent,
            degrade_sigma,
            train_outputs=True,
            lq_rgb=lq_rgb,
            feature_blocks=feature_blocks,
            features_only=features_only,
        )

    def _run(
        self,
        x_t: Tensor,
        t: Tensor | float,
        caption_embeds: Tensor,
        lq_latent: Tensor | None,
        degrade_sigma: Tensor | float,
        latent_features: LatentFeatures | None,
        pixel_offset: tuple[int, int],
        feature_blocks: frozenset[int] = frozenset(),
        features_only: bool = False,
    ) -> tuple[Tensor | None, list[Tensor]]:
        cfg = self.cfg
        batch, _, height, width = x_t.shape
        patch = cfg.patch_size
        if height % patch or width % patch:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
        grid_h, grid_w = height // patch, width // patch
        if latent_features is None:
            if lq_latent is None:
                raise ValueError("PiDNet needs lq_latent (or precomputed latent_features)")
            latent_features = self.encode_latent(lq_latent, degrade_sigma, (height, width))
        elif latent_features.grid != (grid_h, grid_w):
            raise ValueError(
                f"latent_features were computed for grid {latent_features.grid}, not {(grid_h, grid_w)}"
            )
        sigma = latent_features.sigma

        y = caption_embeds[:, : cfg.text_max_length]
        text_len = y.shape[1]
        rope_cos, rope_sin, text_cos, text_sin, pix_cos, pix_sin, pixel_pos = self.positional_tables(
            height, width, text_len, x_t.device, pixel_offset
        )

        # Patch tokens [B, L, 3*P*P], features ordered (channel, row-in-patch, col-in-patch).
        patches = x_t.reshape(batch, -1, grid_h, patch, grid_w, patch).permute(0, 2, 4, 1, 3, 5)
        s = self.s_embedder(patches.reshape(batch, grid_h * grid_w, -1))

        t_emb = self.t_embedder(_per_sample(t, batch, x_t.device))[:, None]  # [B, 1, D]
        c = F.silu(t_emb)
        y = self.y_embedder(y) + self.y_pos_embedding[:, :text_len]

        # Patch-level trunk with gated latent injection before every `interval`-th block.
        interval, last = cfg.inject_interval, cfg.patch_depth - 1
        maps: list[Tensor] = []
        for i, block in enumerate(self.patch_blocks):
            if i % interval == 0:
                k = i // interval
                s = self.lq_proj.gate_modules[k](s, latent_features.heads[k], sigma)
            s, y = block(s, y, c, (rope_cos, rope_sin), (text_cos, text_sin), last=i == last)
            if i in feature_blocks:
                maps.append(s.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2))
                if features_only and len(maps) == len(feature_blocks):
                    return None, maps

        s = F.silu(t_emb + s)
        if cfg.pit_inject:
            s = self.pit_lq_gate(s, latent_features.pit, sigma)
        s_cond = s.flatten(0, 1)  # [B*L, D]

        # Pixel tokens [B*L, P*P, Cp]: per-pixel embedding + absolute sin-cos position.
        z = self.pixel_embedder(x_t.permute(0, 2, 3, 1)) + pixel_pos.to(x_t.dtype)
        z = z.reshape(batch, grid_h, patch, grid_w, patch, -1).permute(0, 1, 3, 2, 4, 5)
        z = z.reshape(batch * grid_h * grid_w, patch * patch, -1)
        for block in self.pixel_blocks:
            z = block(z, s_cond, batch, (pix_cos, pix_sin), self.pixel_chunk_tokens)

        out = self.final_layer(z)  # [B*L, P*P, 3]
        out = out.reshape(batch, grid_h, grid_w, patch, patch, -1).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(batch, -1, height, width).to(x_t.dtype), maps




def _per_sample(value: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """A scalar or [B] value as an fp32 [B] tensor."""
    value = torch.as_tensor(value, dtype=torch.float32, device=device)
    if value.ndim == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"expected a scalar or a [{batch}] tensor, got shape {tuple(value.shape)}")
    return value
