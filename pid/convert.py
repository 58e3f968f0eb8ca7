"""Rewrite a PiD checkpoint as `.safetensors` (or `.pth`), carrying its network config.

    python -m pid.convert checkpoints/PiD_res2k_sr4x_official_flux_distill_4step/model_ema_bf16.pth
    python -m pid.convert my_finetune.pth --net-config my_net.json      # a decoder of another size

writes `model_ema_bf16.safetensors` beside the input, which later loads memory-mapped and
pickle-free (`pid.checkpoints.resolve_checkpoint` prefers it). Same tensor names, same dtype. The
network config goes with the weights (safetensors metadata / a `.pth` top-level entry under
`pid.net_config`): a released config name, or the PiDNetConfig fields when the network is not one
of the released ones. Loaders build the network from it, so fine-tuned decoders of another size
load like released ones. The input is read weights-only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from pid.checkpoints import (
    NET_CONFIG_KEY,
    check_network_fits,
    detect_net_config,
    read_checkpoint,
    strip_network_prefix,
)
from pid.errors import CheckpointMismatchError, ConfigError, PiDError
from pid.inference.io import atomic_output
from pid.models.configs import (
    PiDNetConfig,
    get_net_config,
    net_config_from_value,
    net_config_to_dict,
    released_name,
)


def parse_net_config_arg(value: str) -> PiDNetConfig:
    """`--net-config`: a released config name, a JSON file of PiDNetConfig fields, or inline JSON."""
    text = value.strip()
    path = Path(text).expanduser()
    if not text.startswith("{") and path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"--net-config file {path} does not exist")
        text = path.read_text()
    try:
        return net_config_from_value(text)
    except ValueError as exc:
        raise ConfigError(f"--net-config: {exc}") from None


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    overwrite: bool = False,
    net_config: PiDNetConfig | str | None = None,
    latent_space: Any = None,
) -> Path:
    """Convert `src` (.pth or .safetensors) to `dst` (default: same name, .safetensors; a `.pth` dst
    writes a weights-only-loadable `.pth`). Returns the output path.

    net_config: the network the weights belong to (a PiDNetConfig, a released name or JSON); default:
    the config `src` already carries, else the released config detected from the tensor shapes.
    The weights are checked against it; a file matching no released network needs one.
    latent_space: a declared latent space (YAML / JSON file, mapping or object, see `pid.latents.resolve`) the
    decoder reads; written beside the network config, so loaders pick its VAE and normalisation. Its channels
    must be the network's.
    """
    from safetensors.torch import save_file

    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".safetensors")
    if dst.suffix not in (".safetensors", ".pth"):
        raise ConfigError(f"output {dst} must end in .safetensors or .pth")
    if dst.exists() and not overwrite:
        raise PiDError(f"{dst} already exists; pass --overwrite to replace it")
    tensors, embedded = read_checkpoint(src)
    bare = strip_network_prefix(tensors)
    if net_config is not None:
        cfg = net_config if isinstance(net_config, PiDNetConfig) else parse_net_config_arg(net_config)
    elif embedded is not None:
        cfg = embedded
    else:
        detected = detect_net_config(bare)
        if detected is None:
            raise CheckpointMismatchError(
                f"{src} matches no released PiD network; say which it is with --net-config "
                "<released name or JSON file of PiDNetConfig fields>"
            )
        cfg = get_net_config(detected)
    check_network_fits(bare, cfg, src, cfg.name)
    space_entries: dict[str, str] = {}
    if latent_space is not None:
        from pid.latents import resolve
        from pid.latents.declared import check_space_fits, space_metadata

        space = resolve(latent_space)
        check_space_fits(cfg.latent_channels, space, src)
        space_entries = space_metadata(space)
    name = released_name(cfg)
    config_value: str | dict = name if name is not None else net_config_to_dict(cfg)

    # safetensors needs contiguous, unshared storage
    payload = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    with atomic_output(dst) as tmp:
        if dst.suffix == ".safetensors":
            metadata = {
                "format": "pt",
                "source": src.name,
                NET_CONFIG_KEY: config_value if isinstance(config_value, str) else json.dumps(config_value),
                **space_entries,
            }
            save_file(payload, str(tmp), metadata=metadata)
        else:
            # A plain dict of str/int/float/bool next to the tensors: torch.load(weights_only=True) reads it.
            torch.save({"state_dict": payload, NET_CONFIG_KEY: config_value, **space_entries}, tmp)
    logger.info("wrote {} ({} tensors, network: {})", dst, len(payload), name or "custom config")
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pid.convert", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="PiD checkpoint (.pth or .safetensors)")
    parser.add_argument("dst", nargs="?", help="output .safetensors or .pth (default: .safetensors beside the input)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument(
        "--net-config",
        metavar="NAME_OR_JSON_FILE",
        help="network of the weights: a released config name (e.g. v1_latent16ch) or a JSON file of "
        "PiDNetConfig fields (may hold \"base\": <released name>); default: the detected released one",
    )
    parser.add_argument(
        "--latent-space",
        metavar="YAML_OR_JSON_FILE",
        help="the declared latent space the decoder reads (docs/latents.md, Bring your own VAE); stored with the "
        "weights so from_clean / from_ldm / pid.attach need no more flags",
    )
    args = parser.parse_args(argv)
    logger.enable("pid")  # pid is silent as a library (pid/__init__.py); a command shows its progress
    try:
        convert(args.src, args.dst, args.overwrite, args.net_config, args.latent_space)
    except PiDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
