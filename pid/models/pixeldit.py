"""PixelDiT building blocks: norms, positional encodings, embedders, MMDiT and PiT blocks.

Shapes use B batch, L patch tokens (raster order, token n = r * Ws + c), Lt text tokens,
D patch width, P patch size, Cp pixel width, Da pixel-attention width. Everything here is
independent of checkpoints and latents; `pid_net.py` assembles the network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------
# Norms and small layers
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight.

    Normalises in fp32 and multiplies the input-dtype result by the (fp32) weight, so under bf16
    autocast the residual streams stay fp32 — the reference's numerics.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """w2(SiLU(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PixelMLP(nn.Module):
    """fc2(GELU(fc1 x)) with exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LinearEmbedder(nn.Module):
    """A single `proj` Linear (named so checkpoint keys read `<name>.proj.*`)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class TextEmbedder(nn.Module):
    """Caption hidden states -> patch width: RMSNorm(Linear(x))."""

    def __init__(self, text_dim: int, dim: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim, dim)
        self.norm = RMSNorm(dim, eps)

    def forward(self, y: Tensor) -> Tensor:
        return self.norm(self.proj(y))


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the network time (1000 * t) followed by a 2-layer MLP.

    Frequencies are max_period^(-k/half) with max_period 10 (not 10000), cosine half first.
    """

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoid(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        k = torch.arange(half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(self.max_period) * k / half)
        angles = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        emb = self.sinusoid(t)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


# ----------------------------------------------------------------------------------------------
# Positional encodings
# ----------------------------------------------------------------------------------------------


def rope_2d_angles(
    grid_h: int,
    grid_w: int,
    head_dim: int,
    theta: float,
    ref_grid: int,
    extent: float,
    device: torch.device | None = None,
) -> Tensor:
    """Angles [L, head_dim / 2] of the NTK-aware 2-D RoPE on a grid_h x grid_w token grid.

    Coordinates are normalised to linspace(0, extent) per axis; each axis scales its base by
    (n / ref_grid)^(a / (a - 2)), a = head_dim / 2; x and y frequencies interleave (x first).
    """
    a = head_dim // 2
    exponent = a / (a - 2)
    theta_w = theta * (grid_w / ref_grid) ** exponent
    theta_h = theta * (grid_h / ref_grid) ** exponent
    k = torch.arange(head_dim // 4, device=device, dtype=torch.float64)
    omega_w = (theta_w ** (-4.0 * k / head_dim)).float()
    omega_h = (theta_h ** (-4.0 * k / head_dim)).float()
    xs = torch.linspace(0, extent, grid_w, device=device, dtype=torch.float32)
    ys = torch.linspace(0, extent, grid_h, device=device, dtype=torch.float32)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # raster order: row-major
    phi_x = xx.reshape(-1, 1) * omega_w[None]
    phi_y = yy.reshape(-1, 1) * omega_h[None]
    return torch.stack([phi_x, phi_y], dim=-1).reshape(grid_h * grid_w, a)


def rope_1d_angles(length: int, head_dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """Angles [length, head_dim / 2] of 1-D RoPE: position p, pair m -> p * theta^(-2m / d)."""
    m = torch.arange(head_dim // 2, device=device, dtype=torch.float64)
    freqs = (theta ** (-2.0 * m / head_dim)).float()
    pos = torch.arange(length, device=device, dtype=torch.float32)
    return pos[:, None] * freqs[None]


def rope_table(angles: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin tables [1, 1, N, d/2] for `apply_rope` (fp32)."""
    return torch.cos(angles)[None, None], torch.sin(angles)[None, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (x[2m], x[2m+1]) of x [B, H, N, d] by the tabled angles (fp32)."""
    x32 = x.float().unflatten(-1, (-1, 2))
    x_even, x_odd = x32[..., 0], x32[..., 1]
    out = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return out.flatten(-2)


def pixel_sincos_embedding(
    height: int,
    width: int,
    dim: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    offset: tuple[int, int] = (0, 0),
) -> Tensor:
    """Fixed [H, W, dim] embedding of absolute pixel coordinates (i, j) = offset + (row, column).

    [sin(j w), cos(j w), sin(i w), cos(i w)] (column part first), w_m = 10000^(-m / (dim/4)),
    computed in float64 as the reference does. `offset` places a window inside a larger image.
    """
    quarter = dim // 4
    top, left = offset
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    cols = torch.arange(left, left + width, dtype=torch.float64, device=device)[:, None] * omega[None]
    rows = torch.arange(top, top + height, dtype=torch.float64, device=device)[:, None] * omega[None]
    col_part = torch.cat([torch.sin(cols), torch.cos(cols)], dim=-1)  # [W, dim/2]
    row_part = torch.cat([torch.sin(rows), torch.cos(rows)], dim=-1)  # [H, dim/2]
    emb = torch.cat([col_part[None].expand(height, -1, -1), row_part[:, None].expand(-1, width, -1)], dim=-1)
    return emb.to(dtype)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unmasked SDPA on [B, H, N, d]; dtypes are matched so fused (flash) kernels stay eligible."""
    dtype = v.dtype
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v)


class JointAttention(nn.Module):
    """MMDiT joint attention over [text, image] with per-stream qkv, qk-norm and RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv_x = nn.Linear(dim, 3 * dim, bias=False)
        self.qkv_y = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm_x = RMSNorm(head_dim, eps)
        self.k_norm_x = RMSNorm(head_dim, eps)
        self.q_norm_y = RMSNorm(head_dim, eps)
        self.k_norm_y = RMSNorm(head_dim, eps)
        self.proj_x = nn.Linear(dim, dim)
        self.proj_y = nn.Linear(dim, dim)

    def _heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # channel = part * D + head * d + e  ->  three [B, H, N, d]
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(
        self, x: Tensor, y: Tensor, rope_x: tuple[Tensor, Tensor], rope_y: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        qx, kx, vx = self._heads(self.qkv_x(x))
        qy, ky, vy = self._heads(self.qkv_y(y))
        qx, kx = apply_rope(self.q_norm_x(qx), *rope_x), apply_rope(self.k_norm_x(kx), *rope_x)
        qy, ky = apply_rope(self.q_norm_y(qy), *rope_y), apply_rope(self.k_norm_y(ky), *rope_y)
        out = attention(torch.cat([qy, qx], 2), torch.cat([ky, kx], 2), torch.cat([vy, vx], 2))
        out = out.transpose(1, 2).flatten(2)  # [B, Lt + L, D]
        text_len = y.shape[1]
        return out[:, text_len:], out[:, :text_len]


class MMDiTBlock(nn.Module):
    """Dual-stream transformer block: both streams adaLN-modulated by c, joint attention, SwiGLU.

    `last=True` (the final block) skips the text-stream update, whose result is never used.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float) -> None:
        super().__init__()
        self.norm_x1 = RMSNorm(dim, eps)
        self.norm_y1 = RMSNorm(dim, eps)
        self.attn = JointAttention(dim, num_heads, eps)
        self.norm_x2 = RMSNorm(dim, eps)
        self.norm_y2 = RMSNorm(dim, eps)
        self.mlp_x = SwiGLU(dim, mlp_hidden)
        self.mlp_y = SwiGLU(dim, mlp_hidden)
        self.adaLN_modulation_img = nn.Sequential(nn.Linear(dim, 6 * dim))
        self.adaLN_modulation_txt = nn.Sequential(nn.Linear(dim, 6 * dim))

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        c: Tensor,
        rope_x: tuple[Tensor, Tensor],
        rope_y: tuple[Tensor, Tensor],
        last: bool = False,
    ) -> tuple[Tensor, Tensor]:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation_img(c).chunk(6, dim=-1)
        t_shift_a, t_scale_a, t_gate_a, t_shift_m, t_scale_m, t_gate_m = self.adaLN_modulation_txt(c).chunk(
            6, dim=-1
        )
        attn_x, attn_y = self.attn(
            self.norm_x1(x) * (1 + scale_a) + shift_a,
            self.norm_y1(y) * (1 + t_scale_a) + t_shift_a,
            rope_x,
            rope_y,
        )
        x = x + gate_a * self.attn.proj_x(attn_x)
        x = x + gate_m * self.mlp_x(self.norm_x2(x) * (1 + scale_m) + shift_m)
        if last:
            return x, y
        y = y + t_gate_a * self.attn.proj_y(attn_y)
        y = y + t_gate_m * self.mlp_y(self.norm_y2(y) * (1 + t_scale_m) + t_shift_m)
        return x, y


class PixelAttention(nn.Module):
    """Self-attention over the patch tokens of one image (PiT), qk-norm + 2-D RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        return self.proj(attention(q, k, v).transpose(1, 2).flatten(2))


class PiTBlock(nn.Module):
    """Pixel-level block: per-pixel adaLN from the patch condition, attention on compressed patches.

    z: pixel tokens [B*L, P*P, Cp]; s_cond: [B*L, D]. The per-pixel modulation is the memory peak
    at large sizes ([B*L, 6*Cp*P*P]); `chunk_tokens` processes the per-pixel parts in slices of
    patch tokens (the attention itself always sees the whole image), recomputing each slice's
    modulation in the second pass instead of keeping all of it.
    """

    def __init__(
        self,
        dim: int,
        pixel_dim: int,
        attn_dim: int,
        num_heads: int,
        patch_size: int,
        mlp_ratio: int,
        eps: float,
    ) -> None:
        super().__init__()
        self.pixels = patch_size * patch_size
        self.pixel_dim = pixel_dim
        self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 6 * pixel_dim * self.pixels))
        self.norm1 = RMSNorm(pixel_dim, eps)
        self.compress_to_attn = nn.Linear(self.pixels * pixel_dim, attn_dim)
        self.attn = PixelAttention(attn_dim, num_heads, eps)
        self.expand_from_attn = nn.Linear(attn_dim, self.pixels * pixel_dim)
        self.norm2 = RMSNorm(pixel_dim, eps)
        self.mlp = PixelMLP(pixel_dim, pixel_dim * mlp_ratio)

    def _modulation(self, s_cond: Tensor) -> tuple[Tensor, ...]:
        # output index = pixel * 6Cp + chunk * Cp + channel
        return self.adaLN_modulation(s_cond).unflatten(-1, (self.pixels, 6 * self.pixel_dim)).chunk(6, dim=-1)

    def _compress(self, z: Tensor, mod: tuple[Tensor, ...]) -> Tensor:
        shift_a, scale_a = mod[0], mod[1]
        return self.compress_to_attn((self.norm1(z) * (1 + scale_a) + shift_a).flatten(1))

    def _expand(self, z: Tensor, mod: tuple[Tensor, ...], attn_out: Tensor) -> Tensor:
        gate_a, shift_m, scale_m, gate_m = mod[2:]
        z = z + gate_a * self.expand_from_attn(attn_out).unflatten(-1, (self.pixels, self.pixel_dim))
        return z + gate_m * self.mlp(self.norm2(z) * (1 + scale_m) + shift_m)

    def forward(
        self, z: Tensor, s_cond: Tensor, batch: int, rope: tuple[Tensor, Tensor], chunk_tokens: int | None = None
    ) -> Tensor:
        n = z.shape[0]
        if not chunk_tokens or chunk_tokens >= n:
            mod = self._modulation(s_cond)  # kept for both halves: fastest when it fits
            attn_out = self.attn(self._compress(z, mod).unflatten(0, (batch, -1)), rope).flatten(0, 1)
            return self._expand(z, mod, attn_out)
        # Chunked: the modulation of a slice lives only while that slice is processed (computed twice).
        slices = [slice(i, i + chunk_tokens) for i in range(0, n, chunk_tokens)]
        compressed = torch.cat([self._compress(z[sl], self._modulation(s_cond[sl])) for sl in slices])
        attn_out = self.attn(compressed.unflatten(0, (batch, -1)), rope).flatten(0, 1)
        out: Tensor | None = None
        for sl in slices:
            piece = self._expand(z[sl], self._modulation(s_cond[sl]), attn_out[sl])
            if out is None:  # allocate once the result dtype (autocast-dependent) is known
                out = z.new_empty(z.shape, dtype=piece.dtype)
            out[sl] = piece
        assert out is not None
        return out


class FinalLayer(nn.Module):
    """RMSNorm then Linear(Cp -> 3) per pixel (no modulation)."""

    def __init__(self, pixel_dim: int, out_channels: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(pixel_dim, eps)
        self.linear = nn.Linear(pixel_dim, out_channels)

    def forward(self, z: Tensor) -> Tensor:
        return self.linear(self.norm(z))
