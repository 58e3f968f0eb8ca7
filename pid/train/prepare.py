"""`python -m pid.train.prepare`: encode a training set's LQ latents and caption embeddings once (see --help and
docs/training-data.md). The work is in `pid.training.prepare`."""

from __future__ import annotations

from collections.abc import Sequence

from pid.inference.cli import EntryPoint, Settings, parse_command, plan_or_run, run_cli
from pid.training import prepare

PREPARE = EntryPoint("train_prepare", flags={})
MODULE = "pid.train.prepare"


def load_config(argv: Sequence[str]) -> Settings:
    """The settings for these command-line arguments."""
    return parse_command(PREPARE, list(argv)).settings


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PREPARE, MODULE, lambda command: plan_or_run(command, prepare.plan_prepare, prepare.run), argv)


if __name__ == "__main__":
    raise SystemExit(main())
