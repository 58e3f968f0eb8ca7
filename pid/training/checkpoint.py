"""Training checkpoints with torch.distributed.checkpoint (DCP), and the reference's files as init.

Layout of a run folder:

    <run>/checkpoints/step_000005000/   a DCP folder: .metadata, __<rank>_0.distcp (model, ema, optim tensors),
                                        meta.json (step, scheduler, optimiser hyper-parameters),
                                        rank_<r>.json (each rank's data position and RNG states)
    <run>/checkpoints/latest            the name of the newest complete checkpoint folder

A checkpoint is written into `step_X.partial/` by every rank, then renamed by rank 0 once all ranks finished,
and only then does `latest` (written atomically) point at it: a run killed at any moment leaves the previous
checkpoint intact. Tensors go through DCP; every non-tensor value goes to JSON (DCP would pickle them), so
loading never unpickles anything. Teacher runs store only the trainable parameters: the frozen backbone is the
init file's, reloaded by a rerun.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from loguru import logger
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pid.errors import CheckpointMismatchError
from pid.inference.io import atomic_write_text

CHECKPOINTS = "checkpoints"
LATEST = "latest"
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Loading: the frozen parameters are not in the checkpoint (they are the init file's).
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def step_name(step: int) -> str:
    return f"step_{step:09d}"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder `latest` names, when it exists and is complete (has DCP's .metadata)."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    folder = checkpoint_root(run_dir) / pointer.read_text(encoding="utf-8").strip()
    return folder if (folder / ".metadata").is_file() and (folder / "meta.json").is_file() else None


def latest_step(run_dir: str | os.PathLike) -> int | None:
    folder = latest_checkpoint(run_dir)
    return None if folder is None else int(json.loads((folder / "meta.json").read_text())["step"])


def _dcp_save(state: dict[str, Any], folder: Path) -> None:
    with warnings.catch_warnings():  # one process without a process group is normal here; DCP warns each call
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(folder))


def _dcp_load(state: dict[str, Any], folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder))


def _group() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _group():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _group() else 0


# ------------------------------------------------------------------------------------------------------------
# RNG states as JSON


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": _listify(random.getstate()),
             "numpy": [np_state[0], np_state[1].tolist(), *[_plain(v) for v in np_state[2:]]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_tupleify(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, tuple | list) else value


def _tupleify(value: Any) -> Any:
    return tuple(_tupleify(v) for v in value) if isinstance(value, list) else value


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


# ------------------------------------------------------------------------------------------------------------
# Save / load


def _optimizers(state: Any) -> Any:
    """The state's optimiser, or its several (a distillation state: student, fake score, discriminator)."""
    return list(state.optimizers.values()) if hasattr(state, "optimizers") else state.optimizer


def _scheduler_states(state: Any) -> dict[str, Any]:
    if hasattr(state, "schedulers"):
        return {"schedulers": {name: _json_safe(s.state_dict()) for name, s in state.schedulers.items()}}
    return {"scheduler": _json_safe(state.scheduler.state_dict())}


def _load_schedulers(state: Any, meta: Mapping[str, Any]) -> None:
    if hasattr(state, "schedulers"):
        for name, scheduler in state.schedulers.items():
            scheduler.load_state_dict(meta["schedulers"][name])
    else:
        state.scheduler.load_state_dict(meta["scheduler"])


def _tensor_state(state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what DCP stores, the optimisers' full state dict) of a TrainState (or a distillation state)."""
    model_sd = get_model_state_dict(state.model, options=_OPTIONS)
    optim_sd = get_optimizer_state_dict(state.model, _optimizers(state), options=_OPTIONS)
    ema = {f"net.{name}": tensor for name, tensor in state.ema.items()}
    return {"model": model_sd, "ema": ema, "optim": optim_sd["state"]}, optim_sd


def save_checkpoint(run_dir: str | os.PathLike, state: Any, data_state: Mapping[str, Any], keep: int) -> Path:
    """Write the checkpoint of `state` (a `pid.training.loop.TrainState` or `distill_loop.DistillState`) on every
    rank; returns its folder."""
    root = checkpoint_root(run_dir)
    final = root / step_name(state.step)
    partial = root / f"{final.name}.partial"
    rank = _rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    tensors, optim_sd = _tensor_state(state)
    _dcp_save(tensors, Path(partial))
    (partial / f"rank_{rank}.json").write_text(json.dumps({"data": data_state, "rng": rng_state()}))
    if rank == 0:
        meta = {"step": state.step, **_scheduler_states(state),
                "param_groups": _json_safe(optim_sd["param_groups"]),
                "world_size": dist.get_world_size() if _group() else 1}
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
    _barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        prune(root, keep)
    _barrier()
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (and the one `latest` names); drop leftovers of kills."""
    current = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in done[:-keep] if keep > 0 else done:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob("step_*.partial"):
        if not (leftover.name.startswith(current or "\0")):
            shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(folder: str | os.PathLike, state: Any) -> dict[str, Any]:
    """Restore `state` in place from `folder`; returns this rank's data position. RNG states are restored."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    tensors, optim_sd = _tensor_state(state)
    _dcp_load(tensors, Path(folder))
    set_model_state_dict(state.model, tensors["model"], options=_LOAD_OPTIONS)
    optim_sd = {"state": tensors["optim"], "param_groups": meta["param_groups"]}
    set_optimizer_state_dict(state.model, _optimizers(state), optim_sd, options=_OPTIONS)
    for name in state.ema:
        state.ema[name] = tensors["ema"][f"net.{name}"]
    _load_schedulers(state, meta)
    state.step = int(meta["step"])
    rank_file = folder / f"rank_{_rank()}.json"
    if not rank_file.is_file():
        raise CheckpointMismatchError(
            f"{folder} was written by {meta['world_size']} processes and has no state for rank {_rank()}; "
            f"resume with the same number of processes")
    saved = json.loads(rank_file.read_text())
    set_rng_state(saved["rng"])
    return saved["data"]


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return None  # callables (lr lambdas) are rebuilt by the trainer, not stored


def read_ema(folder: str | os.PathLike) -> dict[str, Tensor]:
    """The EMA tensors of a checkpoint folder (bare network names), read on one process without the run's
    model: shapes and dtypes come from DCP's metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata()
    wanted = {key: item for key, item in metadata.state_dict_metadata.items()
              if key.startswith("ema.") and isinstance(item, TensorStorageMetadata)}
    tensors = {key: torch.empty(item.size, dtype=item.properties.dtype) for key, item in wanted.items()}
    _dcp_load(tensors, Path(folder))
    return {key.removeprefix("ema.net."): value for key, value in tensors.items()}


# ------------------------------------------------------------------------------------------------------------
# The reference's checkpoints as init


def reference_checkpoint_shapes(path: str | os.PathLike) -> dict[str, Any] | Any:
    """Bare name -> tensor-like (with .shape / .ndim) of a `.pth` or DCP folder, read without loading weights;
    or the PiDNetConfig a `.pth` carries."""
    from pid.checkpoints import read_checkpoint

    path = Path(path)
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        items = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        prefix = _preferred_prefix(items)
        return {k.removeprefix(prefix): torch.empty(v.size, device="meta") for k, v in items.items()
                if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
    raw, embedded = read_checkpoint(path)  # weights-only and memory-mapped: no tensor data is read yet
    if embedded is not None:
        return embedded
    return _bare(raw)


def _preferred_prefix(keys: Any) -> str:
    """The reference saves `net.*` and `net_ema.*`; the EMA weights are the better start."""
    return "net_ema." if any(str(k).startswith("net_ema.") for k in keys) else "net."


def _bare(raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if any(k.startswith(("net.", "net_ema.")) for k in raw):
        prefix = _preferred_prefix(raw)
        return {k.removeprefix(prefix): v for k, v in raw.items() if k.startswith(prefix)}
    return dict(raw)


def read_init_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """Bare-named tensors of an init file: a `.safetensors` / `.pth` (net.* or net_ema.* keys: the EMA ones
    when present) or a reference DCP `model` folder. Read weights-only; nothing is unpickled."""
    from pid.checkpoints import read_checkpoint

    path = Path(path)
    if not path.is_dir():
        return _bare(read_checkpoint(path)[0])
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    items = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = _preferred_prefix(items)
    tensors = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in items.items()
               if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
    if not tensors:
        raise CheckpointMismatchError(f"{path} holds no net.* / net_ema.* tensors (not a PiD model checkpoint)")
    _dcp_load(tensors, Path(path))
    logger.info("init: {} tensors ({}*) from the DCP folder {}", len(tensors), prefix, path)
    return {k.removeprefix(prefix): v for k, v in tensors.items()}
