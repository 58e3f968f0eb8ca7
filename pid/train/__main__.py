"""`python -m pid.train` (console script `pid-train`): train a PiD decoder.

    python -m pid.train backbone=flux data=photos/ steps=30000
    python -m pid.train --backbone sd3 --data photos.jsonl --init pixeldit --dry_run
    torchrun --nproc_per_node=8 -m pid.train backbone=qwenimage data=/data/wds mode=full init=released

Options, their defaults and help come from configs/train.yaml (the same front door as from_ldm / from_clean:
key=value or --key value, text verbatim). The command is parsed once into a `TrainPlan`; `--dry_run` prints it
as JSON and loads nothing. A rerun of the same command resumes the run from its latest checkpoint.

Exit codes: 0 done; 1 the run failed; 2 bad input before any work; 128 + the signal when stopped (130 Ctrl-C /
SIGINT, 143 SIGTERM, e.g. a scheduler's preemption): the current step finished and its checkpoint was saved.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pid.inference.cli import Command, EntryPoint, print_plan, rank_and_world, run_cli

TRAIN = EntryPoint("train", flags={}, exit_codes="0 done, 1 the run failed, 2 bad input, 130 interrupted "
                   "by Ctrl-C (SIGINT) or 143 by SIGTERM (a checkpoint of the current step was saved; rerun the "
                   "command to resume)")
MODULE = "pid.train"


def _main(command: Command) -> int:
    from pid.inference import distributed as dist
    from pid.train.plan import plan_run

    rank, world = rank_and_world()
    plan = plan_run(command.settings, world_size=world)
    if command.dry_run:
        print_plan(plan.describe(rank, world))
        return 0
    from pid.inference import lifecycle
    from pid.train.run import run

    lifecycle.quiet_libraries_for_run()
    try:
        return run(plan)
    finally:
        dist.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(TRAIN, MODULE, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
