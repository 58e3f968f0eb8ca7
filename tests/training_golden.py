"""The reference's tiny training setup, rebuilt from tests/data/training_golden/ (copied from the
shared golden set; its README is tests/data/training_golden/README.md).

The tiny networks' weights are not stored: they follow the golden set's deterministic fill rule
from the recorded parameter tables, and the test checks them against the recorded forward outputs.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pid.models import PiDNet, PiDNetConfig, build_pid_net
from pid.training import FeatureDiscriminator, downsample

DATA = Path(__file__).parent / "data" / "training_golden"


def tiny_reference_config(aux_rgb_head: bool) -> PiDNetConfig:
    """The golden README's TINY_NET_KW in our config's terms (hidden 32, 2 MMDiT + 1 PiT block, 64 px RoPE
    reference, adapter width 8 with 2 res blocks, replicate padding, per-token gates, PiT injection)."""
    return PiDNetConfig(
        name="tiny_reference",
        hidden_size=32,
        num_heads=2,
        patch_depth=2,
        pixel_hidden_size=4,
        pixel_attn_hidden_size=16,
        pixel_num_heads=2,
        pixel_depth=1,
        text_dim=8,
        text_max_length=6,
        rope_ref_size=64,
        latent_channels=16,
        adapter_width=8,
        adapter_res_blocks=2,
        adapter_padding="replicate",
        gate="per_token",
        pit_inject=True,
        aux_rgb_head=aux_rgb_head,
    )


def json_data(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


@cache
def tensors(name: str) -> dict[str, torch.Tensor]:
    return load_file(DATA / f"{name}.safetensors")


def filled_weights(table: list, phase: float) -> dict[str, torch.Tensor]:
    """The golden fill rule: tensor i, flat element j -> 0.1 sin(0.7 j + 0.3 i + phase) (+1 for norm weights)."""
    weights = {}
    for index, name, shape, rule in table:
        j = torch.arange(math.prod(shape), dtype=torch.float64)
        value = 0.1 * torch.sin(0.7 * j + 0.3 * index + phase)
        if rule.startswith("1+"):
            value = value + 1.0
        weights[name] = value.float().reshape(shape)
    return weights


def tiny_teacher_net() -> PiDNet:
    table = json_data("teacher_step")["param_table(i, name, shape, rule)"]
    return build_pid_net(tiny_reference_config(True), state_dict=filled_weights(table, 0.1))


def tiny_dmd_nets() -> tuple[PiDNet, PiDNet, PiDNet, FeatureDiscriminator]:
    """(student, teacher, fake_score, discriminator) of the dmd_step golden."""
    tables = json_data("dmd_step")["param_tables"]
    cfg = tiny_reference_config(False)
    nets = [
        build_pid_net(cfg, state_dict=filled_weights(tables[f"{role}(phase={phase})"], phase))
        for role, phase in (("student", 0.3), ("teacher", 0.1), ("fake_score", 0.2))
    ]
    discriminator = FeatureDiscriminator({1}, width=32)
    discriminator.load_state_dict(filled_weights(tables["discriminator(phase=0.4)"], 0.4), strict=True)
    return (*nets, discriminator)


def hq_images(batch: int) -> torch.Tensor:
    """The golden HQ test images [batch <= 4, 3, 64, 64]: clamp(0.8 sin(0.3x + 0.2y + c + 0.5b) + 0.2 (-1)^(x+y), -1, 1),
    as stored (recomputing the formula differs in the last bits, which the gradients notice)."""
    return tensors("teacher_step")["image_hq"][:batch]


def stub_vae_latent(lq_image: torch.Tensor) -> torch.Tensor:
    """The golden's stub VAE: z = M avgpool8(lq), M[o, i] = 0.5 sin(3o + i + 1), 3 -> 16 channels."""
    o = torch.arange(16.0)[:, None]
    i = torch.arange(3.0)[None]
    return torch.einsum("oi,bihw->bohw", 0.5 * torch.sin(3 * o + i + 1), F.avg_pool2d(lq_image, 8))


def stub_caption_embeds(captions: list[str]) -> torch.Tensor:
    """The golden's stub text encoder: 0.5 sin(0.1 (l+1)(c+1) + 0.01 h), h = sum(ord) mod 997, L=6, C=8."""
    l_idx = torch.arange(6.0)[:, None]
    c_idx = torch.arange(8.0)[None]
    rows = [0.5 * torch.sin(0.1 * (l_idx + 1) * (c_idx + 1) + 0.01 * (sum(map(ord, s)) % 997)) for s in captions]
    return torch.stack(rows)


def teacher_batch_pixels() -> torch.Tensor:
    return hq_images(4)


def lq_latent_of(pixels: torch.Tensor) -> torch.Tensor:
    return stub_vae_latent(downsample(pixels))
