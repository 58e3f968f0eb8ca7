"""PiD networks: configs, the network, and a fast builder."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from pid.models.configs import NET_CONFIGS, NamesNetConfig, PiDNetConfig, get_net_config
from pid.models.pid_net import LatentFeatures, PiDNet, TrainingOutputs

__all__ = [
    "NET_CONFIGS",
    "LatentFeatures",
    "NamesNetConfig",
    "PiDNet",
    "PiDNetConfig",
    "TrainingOutputs",
    "build_pid_net",
    "get_net_config",
]


def build_pid_net(
    record_or_config: NamesNetConfig | PiDNetConfig | str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    state_dict: Mapping[str, Tensor] | None = None,
) -> PiDNet:
    """Build a PiD network for a checkpoint record, a config or a config name.

    The module tree is created on the meta device, so no memory is spent on weights that are
    about to be replaced: with `state_dict` (bare names, see `pid.checkpoints`) the tensors are
    assigned directly (strict: every name must match); without it the weights are freshly
    initialised on `device` (random weights, for tests and benchmarks). `device="meta"` returns
    the weightless skeleton. Defaults: CPU, float32 (the reference keeps fp32 master weights).
    """
    cfg = _resolve_config(record_or_config)
    with torch.device("meta"):
        net = PiDNet(cfg)
    if device is not None and torch.device(device).type == "meta":
        return net
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or torch.float32
    if state_dict is not None:
        net.load_state_dict(state_dict, strict=True, assign=True)
        net.to(device=device, dtype=dtype)
    else:
        net.to_empty(device=device)
        init_weights(net)
        net.to(dtype=dtype)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def init_weights(net: PiDNet) -> PiDNet:
    """Fresh random weights: PyTorch defaults for linear/conv/norm layers, ones for RMSNorm."""
    for module in net.modules():
        if module is net:
            continue
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
        elif hasattr(module, "eps") and isinstance(getattr(module, "weight", None), nn.Parameter):
            module.weight.fill_(1.0)  # RMSNorm
        if hasattr(module, "log_alpha"):
            module.log_alpha.zero_()
    nn.init.normal_(net.y_pos_embedding, std=0.02)
    return net


def _resolve_config(value: NamesNetConfig | PiDNetConfig | str) -> PiDNetConfig:
    if isinstance(value, PiDNetConfig):
        return value
    if isinstance(value, str):
        return get_net_config(value)
    net_config = getattr(value, "net_config", None)
    if isinstance(net_config, str):
        return get_net_config(net_config)
    raise TypeError(f"expected a CheckpointRecord, PiDNetConfig or config name, got {type(value).__name__}")
