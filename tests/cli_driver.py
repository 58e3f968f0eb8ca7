"""Run the CLIs as a user does: a subprocess with the arguments as typed (no shell), offline, from a chosen folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), PYTHONIOENCODING="utf-8")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_module(module: str, *args: str, cwd: Path | str = REPO, env: dict[str, str] | None = None,
               timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env or cli_env(), capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout)


def dry_run(module: str, *args: str, **kwargs: Any) -> dict[str, Any]:
    """The plan a `--dry_run` prints; fails the test with the process's stderr when it did not exit 0."""
    done = run_module(module, *args, "--dry_run", **kwargs)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
