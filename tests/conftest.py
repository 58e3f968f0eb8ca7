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

import torch  # noqa: E402

torch.set_num_threads(1)

from hub_cache import hub_cache_env  # noqa: E402,F401  (session fixture: tiny stand-ins in a real-layout HF cache)
