"""pid — PiD, the pixel diffusion decoder for latent diffusion models.

Public API (everything else may change)::

    from pid import PiDDecoder
    decoder = PiDDecoder.from_pretrained("flux", ckpt_type="2k")
    images = decoder.decode(lq_latent, caption="a photo of a cat")   # [B, 3, H, W] in [0, 1]

    pid_pipe = pid.attach(diffusers_pipeline)                         # PiD as the pipeline's decoder
    out = pid_pipe("a red fox in snow", pid_stop_at=7)                # out.images: PiD's images
"""

from __future__ import annotations

import importlib
from typing import Any

from loguru import logger as _logger

__version__ = "0.1.0"

# A library stays quiet: pid's modules log through loguru, but nothing from "pid.*" is shown unless the
# application turns it on with `logger.enable("pid")` (the CLIs do; see docs/logging.md).
_logger.disable("pid")

# Lazy re-exports keep `import pid` cheap (no torch/diffusers import until needed).
_EXPORTS = {
    "PiDDecoder": "pid.decoder",
    "attach": "pid.pipeline_wrapper",
    "CheckpointRecord": "pid.checkpoints",
    "lookup": "pid.checkpoints",
    "load_pid_state_dict": "pid.checkpoints",
    "build_pid_net": "pid.models",
    "PiDNet": "pid.models",
    "PiDNetConfig": "pid.models",
    "CaptionEncoder": "pid.text_encoder",
    "decode_tiled": "pid.tiling",
    "decode_within_memory": "pid.tiling",
    "estimate_decode_memory": "pid.memory",
    "latents": "pid.latents",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pid' has no attribute {name!r}")
    mod = importlib.import_module(module)
    return mod if module == f"pid.{name}" else getattr(mod, name)
