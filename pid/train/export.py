"""Export a training run's EMA weights as one decoder file.

    python -m pid.train.export runs/flux_teacher                       # -> runs/flux_teacher/ema_step_000030000.safetensors
    python -m pid.train.export runs/flux_teacher --out my_decoder.safetensors --dtype fp32

The file holds the whole network (a teacher run's frozen backbone comes from the run's init file, its adapter
from the EMA) with the network config, backbone and latent space in the safetensors metadata, in the format
`python -m pid.convert` writes. So it loads wherever a released decoder does. A `mode=distill` run exports its
student's EMA: a 4-step distilled decoder, sampled like a released student (`pid_steps=1..4`, no CFG):

    PiDDecoder.from_pretrained("flux", checkpoint="my_decoder.safetensors")
    python -m pid.inference.from_clean backbone=flux pid_checkpoint=my_decoder.safetensors input_path=x.png
    python -m pid.inference.from_ldm backbone=flux pid_checkpoint=my_decoder.safetensors prompt="..."
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pid.errors import ConfigError, PiDError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def export(run_dir: str | Path, out: str | Path | None = None, dtype: str = "bf16", step: int | None = None,
           overwrite: bool = False) -> Path:
    """Write the EMA weights of `run_dir`'s latest checkpoint (or of `step`); returns the file."""
    from safetensors.torch import save_file

    from pid.checkpoints import NET_CONFIG_KEY
    from pid.inference.io import atomic_output
    from pid.latents.declared import space_metadata
    from pid.models import build_pid_net
    from pid.models.configs import net_config_from_value, net_config_to_dict, released_name
    from pid.train.plan import RUN_FILE
    from pid.train.setup import init_fresh_adapter, load_init
    from pid.training.checkpoint import (
        checkpoint_root,
        latest_checkpoint,
        read_ema,
        read_init_weights,
        step_name,
    )

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / RUN_FILE).is_file():
        raise ConfigError(f"{run_dir} is not a training run folder (no {RUN_FILE}); give <output_dir>/<run_name>")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    folder = latest_checkpoint(run_dir) if step is None else checkpoint_root(run_dir) / step_name(step)
    if folder is None or not (folder / ".metadata").is_file():
        raise ConfigError(f"{run_dir} has no {'' if step is None else f'step {step} '}checkpoint yet")
    meta = json.loads((folder / "meta.json").read_text())
    out = Path(out) if out is not None else run_dir / f"ema_{folder.name}.safetensors"
    if out.suffix != ".safetensors":
        raise ConfigError(f"output {out} must end in .safetensors")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
    saved = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    identity = saved["identity"]
    cfg = net_config_from_value(identity["net_config"])
    init_file = saved.get("init_file")
    if not init_file or not Path(init_file).exists():
        raise ConfigError(f"the run's init weights {init_file} are gone; the frozen weights come from there")

    net = build_pid_net(cfg, device="cpu")
    init_fresh_adapter(net)  # overwritten below: by the init file, then by the EMA
    load_init(net, read_init_weights(init_file), init_file)
    ema = read_ema(folder)
    state = net.state_dict()
    unknown = sorted(set(ema) - set(state))
    if unknown:
        raise ConfigError(f"{folder} holds EMA tensors this network lacks (e.g. {unknown[0]})")
    with torch.no_grad():
        for name, tensor in ema.items():
            state[name].copy_(tensor)
    payload = {k: v.detach().to(DTYPES[dtype]).contiguous().clone() for k, v in state.items()}
    name = released_name(cfg)
    metadata = {
        "format": "pt",
        NET_CONFIG_KEY: name if name is not None else json.dumps(net_config_to_dict(cfg)),
        "pid.backbone": identity["backbone"],
        **space_metadata(identity["backbone"]),  # the family name, and a declared space's description
        "pid.train.mode": identity["mode"],
        "pid.train.step": str(meta["step"]),
        "pid.train.weights": "ema",
        **sampler_metadata(identity),
    }
    with atomic_output(out) as tmp:
        save_file(payload, str(tmp), metadata=metadata)
    return out


def sampler_metadata(identity: dict) -> dict[str, str]:
    """How the file is sampled. pid picks the sampler from `pid_ckpt_type` (its checkpoint record), not from the
    file: a distilled student runs with any distilled type of its backbone (the default type where the backbone
    has a distilled decoder), a teacher with pid_ckpt_type=undistilled. Recorded here for people and tools."""
    from pid.checkpoints import ckpt_types
    from pid.sampling import DISTILLED_T_LIST

    if identity["mode"] != "distill":
        return {"pid.sampler": "undistilled", "pid.ckpt_type": "undistilled"}
    distilled = [t for t in ckpt_types(identity["backbone"]) if t != "undistilled"]
    hint = "2kto4k_v1pt5" if "2kto4k_v1pt5" in distilled else (distilled[0] if distilled else "")
    return {"pid.sampler": "distilled", "pid.ckpt_type": hint, "pid.distilled_steps": "4",
            "pid.student_t_list": json.dumps(list(DISTILLED_T_LIST))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pid.train.export", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="the run folder: <output_dir>/<run_name> of python -m pid.train")
    parser.add_argument("--out", help="output .safetensors (default <run>/ema_step_<N>.safetensors)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weight dtype (default bf16)")
    parser.add_argument("--step", type=int, help="export this checkpoint step instead of the latest")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        path = export(args.run, args.out, args.dtype, args.step, args.overwrite)
    except PiDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
