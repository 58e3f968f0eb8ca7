"""pid behaves like a library: importing it prints nothing, and its loguru logs are off until enabled."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loguru import logger

import pid


@pytest.fixture
def pid_log():
    """Messages that reach a loguru sink (all levels), and pid's logging switched back off afterwards."""
    messages: list[str] = []
    handler = logger.add(lambda m: messages.append(m.record["name"] + ": " + m.record["message"]), level="DEBUG")
    yield messages
    logger.remove(handler)
    logger.disable("pid")


def _decode_within_a_small_budget() -> None:
    # A tiny network and a budget too small for an unchunked decode: decode_within_memory logs how it decodes.
    from tiny import tiny_decoder

    decoder = tiny_decoder()
    out = pid.decode_within_memory(
        decoder, torch.randn(1, 16, 2, 2), budget_bytes=1, caption="a cat", steps=1, seed=0
    )
    assert out.shape == (1, 3, 64, 64)


# Run in a fresh interpreter: whether pid logs "by default" is the state `import pid` leaves, which other
# tests in this process (CLIs called in-process enable pid's logging) may have changed.
_FRESH_PROCESS_CHECK = """
import sys
from loguru import logger
records = []
logger.remove()
logger.add(lambda m: records.append(m.record["name"]), level="DEBUG")
import pid
import pid.inference.cli
from test_logging import _decode_within_a_small_budget
_decode_within_a_small_budget()
silent = [name for name in records if name.startswith("pid")]
logger.enable("pid")
_decode_within_a_small_budget()
heard = [name for name in records if name.startswith("pid")]
print(len(silent), len(heard), ",".join(sorted(set(heard))))
"""


def test_import_prints_nothing():
    done = subprocess.run(
        [sys.executable, "-c", "import pid; pid.PiDDecoder; import pid.inference.cli"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_decoding_logs_nothing_by_default_and_logs_once_enabled():
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS_CHECK], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr
    silent, heard, names = done.stdout.split()
    assert silent == "0", "pid logged before logger.enable('pid')"
    assert int(heard) > 0 and "pid.tiling" in names.split(","), done.stdout


def test_enabled_logs_reach_a_sink(pid_log):
    logger.enable("pid")
    _decode_within_a_small_budget()
    assert any(m.startswith("pid.tiling: ") for m in pid_log), pid_log


class PropagateHandler(logging.Handler):
    """docs/logging.md's recipe: hand each loguru record to the std-logging logger of its module."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def test_logs_route_to_standard_logging(pid_log, caplog):
    logger.enable("pid")
    handler = logger.add(PropagateHandler(), format="{message}", level="INFO")
    try:
        with caplog.at_level(logging.INFO, logger="pid"):
            _decode_within_a_small_budget()
    finally:
        logger.remove(handler)
    assert any(r.name == "pid.tiling" and r.levelno == logging.INFO for r in caplog.records), caplog.records
