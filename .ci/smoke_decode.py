"""Smoke test of an installed pid (run by .ci/run from a temporary folder, against the wheel).

Builds a tiny random-weight PiD network of the FLUX decoder's layout, wraps it in `pid.PiDDecoder` and
decodes a random latent end to end through the public API; also checks that pid logs nothing until
`logger.enable("pid")`. No files, no network.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
from loguru import logger

import pid
from pid.models import get_net_config


def main() -> int:
    messages: list[str] = []
    logger.remove()
    logger.add(lambda m: messages.append(m.record["name"]), level="DEBUG")

    record = pid.lookup("flux", "2k")
    tiny = replace(
        get_net_config(record.net_config),
        hidden_size=64, num_heads=4, patch_depth=4, pixel_hidden_size=8, pixel_attn_hidden_size=32,
        pixel_num_heads=2, text_dim=32, adapter_width=32,
    )
    torch.manual_seed(0)
    decoder = pid.PiDDecoder(pid.build_pid_net(tiny), record, text_encoder=None)
    latent = torch.randn(1, 16, 2, 2)
    caption = torch.randn(1, 8, 32)

    image = pid.decode_within_memory(decoder, latent, budget_bytes=1, caption_embeds=caption, steps=1, seed=0)
    if image.shape != (1, 3, 64, 64) or not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        print(f"smoke decode: bad output {tuple(image.shape)}", file=sys.stderr)
        return 1
    if any(name.startswith("pid") for name in messages):
        print(f"smoke decode: pid logged while disabled: {messages}", file=sys.stderr)
        return 1
    logger.enable("pid")
    pid.decode_within_memory(decoder, latent, budget_bytes=1, caption_embeds=caption, steps=1, seed=0)
    if not any(name.startswith("pid") for name in messages):
        print("smoke decode: no log after logger.enable('pid')", file=sys.stderr)
        return 1
    print(f"smoke decode ok: pid {pid.__version__} from {Path(pid.__file__).parent}, image {tuple(image.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
