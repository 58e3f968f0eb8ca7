"""Test session setup: one thread, offline hub, shared tiny builders live in tests/tiny.py."""

import os

for _name, _value in {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from hub_cache import hub_cache_env  # noqa: E402,F401  (session fixture: tiny stand-ins in a real-layout HF cache)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """The README's `python -m pytest -q` (no paths given) runs over every core with pytest-xdist.

    Explicit `-n N` / `-n 0`, `-p no:xdist`, named test files and xdist's own workers stay as asked.
    """
    if (
        config.pluginmanager.has_plugin("xdist")
        and config.getoption("numprocesses", None) is None
        and "PYTEST_XDIST_WORKER" not in os.environ
        and config.args_source == pytest.Config.ArgsSource.TESTPATHS
    ):
        config.option.numprocesses = "auto"
