"""Shared definition of the reference-equality fixtures (tests/data/reference_outputs.pt).

The stored tensors are outputs of the reference network (nv-tlabs/PiD `PidNet`, commit 2c8814c)
run once on CPU with the small configs, seeded weights and seeded inputs defined here; the test
rebuilds the same weights and inputs and compares our network's output with them. Only outputs
are stored (weights and inputs are regenerated from seeds).
"""

from __future__ import annotations

import torch

# Shrunk versions of released configs: same layout and adapter kind, small widths, patch 4.
_SMALL = dict(
    num_groups=2, hidden_size=32, patch_depth=4, pixel_attn_hidden_size=16, pixel_num_groups=2,
    pixel_hidden_size=4, txt_embed_dim=16, txt_max_length=300, lq_hidden_dim=16, patch_size=4,
)
GOLDEN_CONFIGS = {
    name: dict(_SMALL)
    for name in [
        "v1_latent16ch", "v1_flux2_latent128ch", "v1_sdxl_latent4ch", "v1_siglip_latent1152ch_sr8",
        "v1pt5_latent16ch", "v1pt5_flux2_latent128ch",
    ]
}

# reference constructor argument -> our PiDNetConfig field
OURS = {
    "num_groups": "num_heads", "hidden_size": "hidden_size", "patch_depth": "patch_depth",
    "pixel_attn_hidden_size": "pixel_attn_hidden_size", "pixel_num_groups": "pixel_num_heads",
    "pixel_hidden_size": "pixel_hidden_size", "txt_embed_dim": "text_dim", "txt_max_length": "text_max_length",
    "lq_hidden_dim": "adapter_width", "patch_size": "patch_size",
}


def ref_kwargs(manifest_kwargs: dict, small: dict) -> dict:
    return {**manifest_kwargs, **small}


def our_overrides(small: dict) -> dict:
    return {OURS[k]: v for k, v in small.items()}


def seeded_state_dict(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic non-trivial weights: N(0, 0.1^2) matrices, norms near 1, gates' log_alpha near 0."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        value = torch.randn(shape, generator=g)
        if "norm" in name and name.endswith("weight") and len(shape) == 1:
            value = 1.0 + 0.1 * value
        elif len(shape) == 0:
            value = 0.3 * value
        else:
            value = (0.2 if len(shape) == 1 else 0.1) * value
        out[name] = value
    return out


def golden_inputs(config_name: str, small: dict, seed: int = 99) -> dict[str, torch.Tensor]:
    import json
    from pathlib import Path

    kwargs = json.loads((Path(__file__).parent / "data" / "manifests" / f"{config_name}.json").read_text())[
        "net_kwargs"
    ]
    g = torch.Generator().manual_seed(seed)
    # Non-square, and not latent x stride: the adapter's nearest resize maps the 2x3 latent onto a 6x10
    # patch grid with a non-integer ratio, which pins the resize semantics too.
    height, width = 24, 40
    return {
        "x_t": torch.randn(2, 3, height, width, generator=g),
        "t": torch.tensor([937.0, 211.0]),
        "caption_embeds": torch.randn(2, 300, small["txt_embed_dim"], generator=g),
        "lq_latent": torch.randn(2, kwargs["lq_latent_channels"], 2, 3, generator=g),
        "degrade_sigma": torch.tensor([0.0, 0.45]),
    }
