"""PSNR, SSIM, CIEDE2000 and resize, against analytic values and published reference data."""

from __future__ import annotations

import math

import pytest
import torch

from pid.metrics import ciede2000, delta_e2000, psnr, resize_to, srgb_to_lab, ssim, summarize

# Sharma, Wu & Dalal (2005), "The CIEDE2000 color-difference formula: implementation notes, supplementary test
# data, and mathematical observations", Table 1: L1 a1 b1 L2 a2 b2 dE00 (all 34 pairs).
SHARMA_PAIRS = [
    (50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425),
    (50.0000, 3.1571, -77.2803, 50.0000, 0.0000, -82.7485, 2.8615),
    (50.0000, 2.8361, -74.0200, 50.0000, 0.0000, -82.7485, 3.4412),
    (50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -1.1848, -84.8006, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -0.9009, -85.5211, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669),
    (50.0000, -1.0000, 2.0000, 50.0000, 0.0000, 0.0000, 2.3669),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0010, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0012, 7.2195),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0009, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0010, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461),
    (50.0000, 2.5000, 0.0000, 50.0000, 0.0000, -2.5000, 4.3065),
    (50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492),
    (50.0000, 2.5000, 0.0000, 61.0000, -5.0000, 29.0000, 22.8977),
    (50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030),
    (50.0000, 2.5000, 0.0000, 58.0000, 24.0000, 15.0000, 19.4535),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.1736, 0.5854, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2972, 0.0000, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 1.8634, 0.5757, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2592, 0.3350, 1.0000),
    (60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644),
    (63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630),
    (61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731),
    (35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645),
    (22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373),
    (36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146),
    (90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441),
    (90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381),
    (6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377),
    (2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082),
]


def _uniform(rgb, size=(16, 16), batch=1):
    return torch.tensor(rgb, dtype=torch.float64).view(1, 3, 1, 1).expand(batch, 3, *size).clone()


def _random(seed=0, size=(32, 40), batch=2):
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_sharma_test_pairs():
    data = torch.tensor(SHARMA_PAIRS, dtype=torch.float64)
    de = ciede2000(data[:, 0:3], data[:, 3:6], dim=1)
    assert torch.allclose(de, data[:, 6], atol=5e-5, rtol=0), (de - data[:, 6]).abs().max()
    # The formula is symmetric in its two colours.
    assert torch.allclose(ciede2000(data[:, 3:6], data[:, 0:3], dim=1), de, atol=1e-12)


def test_identical_images():
    image = _random()
    assert torch.isinf(psnr(image, image)).all() and (psnr(image, image) > 0).all()
    assert torch.equal(ssim(image, image), torch.ones(2, dtype=torch.float64))
    assert torch.equal(ssim(image, image, channels="luma"), torch.ones(2, dtype=torch.float64))
    assert torch.equal(delta_e2000(image, image), torch.zeros(2, dtype=torch.float64))


def test_psnr_known_uniform_error():
    target = _uniform((0.5, 0.5, 0.5))
    assert psnr(target + 0.1, target).item() == pytest.approx(20.0, abs=1e-9)
    assert psnr(target + 1 / 255, target).item() == pytest.approx(20 * math.log10(255), abs=1e-9)
    # Per image, not pooled over the batch.
    batch = torch.cat([target, target])
    values = psnr(batch + torch.tensor([0.1, 0.01], dtype=torch.float64).view(2, 1, 1, 1), batch)
    assert values.tolist() == pytest.approx([20.0, 40.0], abs=1e-9)


def test_ssim_of_constant_images_matches_closed_form():
    # Zero variance: SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    a, b = _uniform((0.2, 0.2, 0.2)), _uniform((0.6, 0.6, 0.6))
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert ssim(a, b).item() == pytest.approx(expected, abs=1e-9)
    assert ssim(a, b, channels="luma").item() == pytest.approx(expected, abs=1e-9)


def test_ssim_behaviour():
    clean = _random(1)
    noisy = (clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    noisier = (clean + 0.2 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    s1, s2 = ssim(noisy, clean), ssim(noisier, clean)
    assert (s1 < 1).all() and (s2 < s1).all()
    torch.testing.assert_close(ssim(clean, noisy), s1)  # symmetric
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 32), torch.zeros(1, 3, 8, 32))
    with pytest.raises(ValueError, match="channels"):
        ssim(clean, clean, channels="yuv")


def test_lab_of_srgb_primaries():
    # Reference values for sRGB / D65 (Lindbloom's calculator, 2-degree observer).
    colours = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.float64)
    lab = srgb_to_lab(colours.view(5, 3, 1, 1))[:, :, 0, 0]
    expected = torch.tensor(
        [
            [53.2408, 80.0925, 67.2032],
            [87.7347, -86.1827, 83.1793],
            [32.2970, 79.1875, -107.8602],
            [100.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(lab, expected, atol=2e-4), lab


@pytest.mark.parametrize(
    "a, b, expected",
    [
        # colour-science 0.4.7: delta_E(XYZ_to_Lab(sRGB_to_XYZ(a)), ..., method="CIE 2000"). Its D65 white differs
        # from ours in the 4th decimal, hence the tolerance.
        ((0.5, 0.5, 0.5), (0.55, 0.5, 0.5), 6.4794),
        ((1.0, 0.0, 0.0), (0.9, 0.1, 0.0), 4.8345),
        ((0.2, 0.4, 0.8), (0.2, 0.45, 0.75), 5.3712),
        ((1.0, 1.0, 1.0), (0.95, 0.95, 0.95), 2.5788),
        ((0.0, 0.0, 0.0), (0.02, 0.02, 0.02), 0.8052),
    ],
)
def test_known_colour_shift(a, b, expected):
    assert delta_e2000(_uniform(a), _uniform(b)).item() == pytest.approx(expected, abs=5e-3)


def test_delta_e_is_per_image_mean():
    a = torch.cat([_uniform((0.5, 0.5, 0.5)), _uniform((0.5, 0.5, 0.5))])
    b = a.clone()
    b[1, :, :8] = 0.55  # half of image 1 is shifted grey
    values = delta_e2000(b, a)
    assert values[0].item() == 0.0
    grey_step = delta_e2000(_uniform((0.55, 0.55, 0.55)), _uniform((0.5, 0.5, 0.5))).item()
    assert values[1].item() == pytest.approx(grey_step / 2, rel=1e-9)


def test_shape_checks():
    with pytest.raises(ValueError, match="differ"):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        delta_e2000(torch.zeros(3, 4, 4), torch.zeros(3, 4, 4))


def test_resize_to():
    image = _random(size=(32, 48), batch=1).float()
    assert resize_to(image, (32, 48)) is image
    up = resize_to(image, (64, 96))
    assert up.shape == (1, 3, 64, 96) and up.dtype == torch.float32
    assert 0.0 <= up.min() and up.max() <= 1.0  # bicubic overshoot is clamped
    # Antialiased downsizing of a 1-pixel checkerboard gives flat mid-grey, not aliasing.
    checker = ((torch.arange(32).view(-1, 1) + torch.arange(32).view(1, -1)) % 2).float().expand(1, 3, 32, 32)
    down = resize_to(checker, 8)
    assert down.shape == (1, 3, 8, 8)
    assert torch.allclose(down, torch.full_like(down, 0.5), atol=0.02)
    flat = torch.full((2, 3, 10, 10), 0.3)
    assert torch.allclose(resize_to(flat, (25, 7)), torch.full((2, 3, 25, 7), 0.3), atol=1e-6)


def test_summarize_is_json_ready():
    a, b = _random(4, batch=1), _random(5, batch=1)
    out = summarize(a, b)
    assert set(out) == {"psnr", "ssim", "delta_e2000"}
    assert all(isinstance(v[0], float) for v in out.values())
    assert math.isinf(summarize(a, a)["psnr"][0])
