"""Checkpoint housekeeping the run tests do not pin down: pruning (which folders survive) and a reference DCP
`model` folder as `init=` (the EMA weights preferred, as from a `.pth`)."""

from __future__ import annotations

import warnings

import pytest
import torch

from pid.errors import CheckpointMismatchError
from pid.training.checkpoint import LATEST, prune, read_init_weights, step_name


def _folders(root, *steps: int, suffix: str = "") -> None:
    for step in steps:
        (root / f"{step_name(step)}{suffix}").mkdir()


def test_prune_keeps_the_newest_and_the_one_latest_names_and_drops_dead_partials(tmp_path):
    _folders(tmp_path, 2, 4, 6, 8, 10)
    _folders(tmp_path, 12, suffix=".partial")  # a kill mid-write
    (tmp_path / LATEST).write_text(step_name(4))  # e.g. a run resumed from an older checkpoint
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LATEST, step_name(4), step_name(8), step_name(10)])
    prune(tmp_path, keep=0)  # keep=0: only what `latest` names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LATEST, step_name(4)])


def test_a_reference_dcp_model_folder_is_an_init_with_its_ema_weights_preferred(tmp_path):
    import torch.distributed.checkpoint as dcp

    weight, ema = torch.randn(3, 2), torch.randn(3, 2)
    both, plain, neither = tmp_path / "both", tmp_path / "plain", tmp_path / "neither"
    with warnings.catch_warnings():  # DCP may say it runs without a process group
        warnings.simplefilter("ignore")
        dcp.save({"net.x_embedder.weight": weight, "net_ema.x_embedder.weight": ema}, checkpoint_id=str(both))
        dcp.save({"net.x_embedder.weight": weight}, checkpoint_id=str(plain))
        dcp.save({"optimizer.step": torch.zeros(1)}, checkpoint_id=str(neither))
    assert torch.equal(read_init_weights(both)["x_embedder.weight"], ema)
    assert list(read_init_weights(both)) == ["x_embedder.weight"]
    assert torch.equal(read_init_weights(plain)["x_embedder.weight"], weight)
    with pytest.raises(CheckpointMismatchError, match="no net"):
        read_init_weights(neither)
