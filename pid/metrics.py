"""Full-reference image metrics: PSNR, SSIM, mean CIEDE2000 colour difference, and the resize they share.

All metrics are pure functions of two same-shape image batches `[B, 3, H, W]` in [0, 1] (sRGB-encoded)
and return one value per image (`[B]`, float64). Values outside [0, 1] are clamped first, as saving would.

- `psnr`: 10·log10(1 / MSE) over all channels and pixels (data range 1). Identical images give +inf.
- `ssim`: Wang et al. 2004 with an 11-tap Gaussian window (σ = 1.5), K1 = 0.01, K2 = 0.03, "valid" filtering
  (no padding, as in the reference MATLAB code). `channels="rgb"` (default) computes SSIM per channel and
  averages the three; `channels="luma"` computes it once on Y' = 0.299 R + 0.587 G + 0.114 B (BT.601,
  full range).
- `delta_e2000`: sRGB -> linear (IEC 61966-2-1) -> XYZ (D65) -> CIELAB (D65 white), then the CIEDE2000 formula
  (Sharma, Wu & Dalal 2005; kL = kC = kH = 1), averaged over pixels.
- `resize_to`: bicubic with antialiasing (a proper low-pass when shrinking), clamped back to [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Linear sRGB -> XYZ, D65 (IEC 61966-2-1, as tabulated by Lindbloom); rows sum to the D65 white below.
_SRGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)
_LAB_EPSILON = 216.0 / 24389.0  # (6/29)^3, CIE's exact constants
_LAB_KAPPA = 24389.0 / 27.0


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"image shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(pred.shape)}")
    return pred.clamp(0.0, 1.0), target.clamp(0.0, 1.0)


def resize_to(image: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize `[B, C, H, W]` to `size` ((H, W), or an int) with antialiased bicubic, clamped to [0, 1].

    Antialiasing low-passes when shrinking (no aliasing); when enlarging it is plain bicubic. Same size:
    unchanged.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if image.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got {tuple(image.shape)}")
    if tuple(image.shape[-2:]) == (height, width):
        return image
    dtype = image.dtype
    work = image if dtype in (torch.float32, torch.float64) else image.float()
    out = F.interpolate(work, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0.0, 1.0).to(dtype)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image ([B], float64), data range 1; +inf where the images are identical."""
    pred, target = _check_pair(pred, target)
    mse = (pred.double() - target.double()).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / mse)  # mse == 0 -> +inf


def _gaussian_window(
    window_size: int, sigma: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    coords = torch.arange(window_size, dtype=torch.float64) - (window_size - 1) / 2.0
    weights = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return (weights / weights.sum()).to(dtype=dtype, device=device)


def _filter_valid(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    # Separable Gaussian, each channel on its own, no padding.
    channels = x.shape[1]
    size = window.numel()
    x = F.conv2d(x, window.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(x, window.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    channels: str = "rgb",
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Mean SSIM per image ([B], float64); see the module docstring for the exact definition."""
    pred, target = _check_pair(pred, target)
    if channels == "luma":
        luma = torch.tensor([0.299, 0.587, 0.114], dtype=pred.dtype, device=pred.device).view(1, 3, 1, 1)
        pred, target = (pred * luma).sum(1, keepdim=True), (target * luma).sum(1, keepdim=True)
    elif channels != "rgb":
        raise ValueError(f"channels must be 'rgb' or 'luma', got {channels!r}")
    height, width = pred.shape[-2:]
    if min(height, width) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size}, got {width}x{height}")
    # float32 keeps 4K images cheap; float64 inputs stay float64.
    work_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    x, y = pred.to(work_dtype), target.to(work_dtype)
    window = _gaussian_window(window_size, sigma, work_dtype, x.device)
    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = _filter_valid(x, window), _filter_valid(y, window)
    var_x = _filter_valid(x * x, window) - mu_x * mu_x
    var_y = _filter_valid(y * y, window) - mu_y * mu_y
    cov_xy = _filter_valid(x * y, window) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return ssim_map.double().mean(dim=(1, 2, 3))


def srgb_to_lab(image: torch.Tensor) -> torch.Tensor:
    """sRGB `[B, 3, H, W]` in [0, 1] -> CIELAB (D65) `[B, 3, H, W]` (L in [0, 100]), float64."""
    rgb = image.double().clamp(0.0, 1.0)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(_SRGB_TO_XYZ, dtype=torch.float64, device=image.device)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear)
    white = torch.tensor(_D65_WHITE, dtype=torch.float64, device=image.device).view(1, 3, 1, 1)
    t = xyz / white
    f = torch.where(
        t > _LAB_EPSILON, t.clamp_min(_LAB_EPSILON) ** (1.0 / 3.0), (_LAB_KAPPA * t + 16.0) / 116.0
    )
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=1)


def ciede2000(lab1: torch.Tensor, lab2: torch.Tensor, *, dim: int = 1) -> torch.Tensor:
    """CIEDE2000 colour difference between Lab tensors whose L, a, b sit along `dim` (kL = kC = kH = 1).

    Follows Sharma, Wu & Dalal (2005) step by step, including their conventions for hue at zero chroma and for
    the mean hue when hues are more than 180° apart. Returns float64 with `dim` removed.
    """
    lab1, lab2 = lab1.double(), lab2.double()
    l1, a1, b1 = lab1.unbind(dim)
    l2, a2, b2 = lab2.unbind(dim)
    pow25_7 = 25.0**7

    c_bar = (torch.hypot(a1, b1) + torch.hypot(a2, b2)) / 2.0
    g = 0.5 * (1.0 - torch.sqrt(c_bar**7 / (c_bar**7 + pow25_7)))
    a1p, a2p = (1.0 + g) * a1, (1.0 + g) * a2
    c1p, c2p = torch.hypot(a1p, b1), torch.hypot(a2p, b2)
    # atan2(0, 0) = 0, which is the paper's hue for zero chroma.
    h1p = torch.remainder(torch.rad2deg(torch.atan2(b1, a1p)), 360.0)
    h2p = torch.remainder(torch.rad2deg(torch.atan2(b2, a2p)), 360.0)

    chroma_product = c1p * c2p
    zero_chroma = chroma_product == 0
    dl = l2 - l1
    dc = c2p - c1p
    dh = h2p - h1p
    dh = torch.where(dh > 180.0, dh - 360.0, torch.where(dh < -180.0, dh + 360.0, dh))
    dh = torch.where(zero_chroma, torch.zeros_like(dh), dh)
    dh_big = 2.0 * torch.sqrt(chroma_product) * torch.sin(torch.deg2rad(dh) / 2.0)

    l_bar = (l1 + l2) / 2.0
    c_bar_p = (c1p + c2p) / 2.0
    h_sum = h1p + h2p
    h_bar = torch.where(
        (h1p - h2p).abs() <= 180.0,
        h_sum / 2.0,
        torch.where(h_sum < 360.0, (h_sum + 360.0) / 2.0, (h_sum - 360.0) / 2.0),
    )
    h_bar = torch.where(zero_chroma, h_sum, h_bar)

    t = (
        1.0
        - 0.17 * torch.cos(torch.deg2rad(h_bar - 30.0))
        + 0.24 * torch.cos(torch.deg2rad(2.0 * h_bar))
        + 0.32 * torch.cos(torch.deg2rad(3.0 * h_bar + 6.0))
        - 0.20 * torch.cos(torch.deg2rad(4.0 * h_bar - 63.0))
    )
    d_theta = 30.0 * torch.exp(-(((h_bar - 275.0) / 25.0) ** 2))
    r_c = 2.0 * torch.sqrt(c_bar_p**7 / (c_bar_p**7 + pow25_7))
    l_term = (l_bar - 50.0) ** 2
    s_l = 1.0 + 0.015 * l_term / torch.sqrt(20.0 + l_term)
    s_c = 1.0 + 0.045 * c_bar_p
    s_h = 1.0 + 0.015 * c_bar_p * t
    r_t = -torch.sin(torch.deg2rad(2.0 * d_theta)) * r_c

    term_l, term_c, term_h = dl / s_l, dc / s_c, dh_big / s_h
    return torch.sqrt((term_l**2 + term_c**2 + term_h**2 + r_t * term_c * term_h).clamp_min(0.0))


def delta_e2000(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CIEDE2000 difference per image ([B], float64) between two sRGB batches in [0, 1]."""
    pred, target = _check_pair(pred, target)
    return ciede2000(srgb_to_lab(pred), srgb_to_lab(target), dim=1).mean(dim=(1, 2))


def summarize(pred: torch.Tensor, target: torch.Tensor) -> dict[str, list[float]]:
    """PSNR, SSIM (rgb) and ΔE2000 of a batch as plain lists, ready for JSON/CSV (inf stays float('inf'))."""
    return {
        "psnr": [float(v) for v in psnr(pred, target)],
        "ssim": [float(v) for v in ssim(pred, target)],
        "delta_e2000": [float(v) for v in delta_e2000(pred, target)],
    }


__all__ = ["ciede2000", "delta_e2000", "psnr", "resize_to", "srgb_to_lab", "ssim", "summarize"]
