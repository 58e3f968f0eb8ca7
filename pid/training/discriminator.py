"""The DMD2 discriminator on frozen-teacher features (spec §d; the reference's Discriminator_ImageDiT).

One conv head per tapped patch block: Conv2d(D -> D/2, k4 s2 p1) . GroupNorm . LeakyReLU(0.2) .
Conv2d(D/2 -> 1, k1) . global average pool -> one logit per head; logits [B, num_heads].
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


def groupnorm_groups(channels: int) -> int:
    """The reference's GroupNorm group count: channels // 4 up to 32 channels, else the largest
    divisor of `channels` that is at most 32."""
    if channels <= 32:
        return max(1, channels // 4)
    groups = 32
    while groups > 1 and channels % groups:
        groups -= 1
    return groups


def _head(width: int, num_conv_layers: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    ch_in, ch_out = width, width // 2
    for _ in range(num_conv_layers - 1):
        layers += [
            nn.Conv2d(ch_in, ch_out, kernel_size=4, stride=2, padding=1),
            nn.GroupNorm(groupnorm_groups(ch_out), ch_out),
            nn.LeakyReLU(0.2),
        ]
        ch_in, ch_out = ch_out, max(ch_out // 2, 64)
    layers += [nn.Conv2d(ch_in, 1, kernel_size=1), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten()]
    return nn.Sequential(*layers)


class FeatureDiscriminator(nn.Module):
    """Logits from teacher token maps after the blocks `feature_blocks` (0-based; shipped: block 7 of 14).

    State-dict keys follow the reference (`cls_pred_heads.{i}.{layer}`), so its weights load as is.
    """

    def __init__(self, feature_blocks: Iterable[int], width: int, num_conv_layers: int = 2) -> None:
        super().__init__()
        if num_conv_layers < 2:
            raise ValueError(f"num_conv_layers must be >= 2, got {num_conv_layers}")
        self.feature_blocks: tuple[int, ...] = tuple(sorted(set(feature_blocks)))
        if not self.feature_blocks:
            raise ValueError("the discriminator needs at least one feature block")
        self.cls_pred_heads = nn.ModuleList(_head(width, num_conv_layers) for _ in self.feature_blocks)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """`features`: one [B, D, h, w] map per feature block, in block order -> logits [B, num_heads]."""
        if len(features) != len(self.cls_pred_heads):
            raise ValueError(f"expected {len(self.cls_pred_heads)} feature maps, got {len(features)}")
        return torch.cat([head(feat) for head, feat in zip(self.cls_pred_heads, features)], dim=1)
