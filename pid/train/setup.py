"""What every training run sets up, whatever its mode (pid.train.run: teacher and full; pid.train.distill_run:
distill): the init weights into a network, the frozen encoders, the rank's data, the seeds, and the progress bar
and peak memory a run reports."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from torch import Tensor, nn

from pid.errors import CheckpointMismatchError
from pid.inference import distributed as dist
from pid.models import PiDNet
from pid.train.plan import PIXELDIT_FILE, TrainPlan
from pid.training.loop import Encoders, TrainState
from pid.training.trainable import TEACHER_TRAINABLE_PREFIXES as ADAPTER_PREFIXES

EXIT_OK = 0


# ------------------------------------------------------------------------------------------------------------
# The init weights


@torch.no_grad()
def init_fresh_adapter(net: PiDNet) -> None:
    """The reference's initialisation of an adapter absent from the checkpoint (spec §a.2): convs trunc-normal
    std 0.02 with zero bias, output and PiT heads zero, aux-head Linears trunc-normal 0.02, gate projections
    trunc-normal 0.01 with bias 2.0 and log_alpha = ln 5."""
    adapter = net.lq_proj
    for module in adapter.latent_proj.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    heads = list(adapter.output_heads) + ([adapter.pit_head] if hasattr(adapter, "pit_head") else [])
    for head in heads:
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    if hasattr(adapter, "lq_aux_rgb_head"):
        for module in adapter.lq_aux_rgb_head:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
    gates = list(adapter.gate_modules) + ([net.pit_lq_gate] if hasattr(net, "pit_lq_gate") else [])
    for gate in gates:
        nn.init.trunc_normal_(gate.content_proj.weight, std=0.01)
        nn.init.constant_(gate.content_proj.bias, 2.0)
        gate.log_alpha.fill_(math.log(5.0))


def load_init(net: PiDNet, state: dict[str, Tensor], source: str) -> list[str]:
    """Copy the init weights into `net`. Adapter tensors the file lacks keep their fresh init (a PixelDiT file has
    none; a v1 decoder has no aux RGB head); any other missing or mis-shaped tensor is an error. Returns the
    names left fresh."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    bad = [k for k in missing if not k.startswith(ADAPTER_PREFIXES)]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if bad or shapes:
        few = ", ".join((bad + shapes)[:4])
        raise CheckpointMismatchError(f"{source} does not fit the network being trained: {few}; pick the init "
                                      "made for this latent space or set net_config=")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        logger.info("init: ignoring {} tensors the decoder does not have (e.g. {})", len(unexpected), unexpected[0])
    with torch.no_grad():
        for name, tensor in expected.items():
            if name in state:
                tensor.copy_(state[name].to(tensor.dtype))
    return missing


def init_file(plan: TrainPlan) -> Path:
    """The init weights' file or DCP folder, downloading the hub file when needed (the run, not the dry run)."""
    from pid.checkpoints import lookup, resolve_checkpoint, resolve_hub_path

    if plan.init.kind == "pixeldit":
        return resolve_hub_path(PIXELDIT_FILE, plan.checkpoint_dir, revision=plan.pid_revision)
    if plan.init.kind == "released":
        record = lookup(plan.backbone, plan.init.ckpt_type)
        return resolve_checkpoint(record, None, plan.checkpoint_dir, revision=plan.pid_revision)
    return Path(str(plan.init.path))


# ------------------------------------------------------------------------------------------------------------
# Encoders and data


def load_encoders(plan: TrainPlan, device: torch.device) -> Encoders:
    """The frozen VAE (LQ latents) and Gemma-2 (captions) of this latent space."""
    from pid.latents import get as get_latent_space
    from pid.text_encoder import CaptionEncoder

    space = get_latent_space(plan.backbone).load(device=device, checkpoint_dir=plan.checkpoint_dir,
                                                 revision=plan.pid_revision)
    kwargs = {"name_or_path": plan.text_encoder} if plan.text_encoder else {}
    text = CaptionEncoder.from_pretrained(device=device, revision=plan.text_encoder_revision, **kwargs)
    if text.hidden_size != plan.net_config.text_dim:
        raise CheckpointMismatchError(f"caption encoder width {text.hidden_size} != the network's text_dim "
                                      f"{plan.net_config.text_dim}")
    return Encoders(encode_lq=space.encode, encode_captions=text.encode)


def open_data(plan: TrainPlan, rank: int, world_size: int):
    """This rank's resumable loader; rank 0 lists skipped images in <run>/skipped.jsonl. Images are decoded
    ahead in `num_workers` processes (default 4 on a GPU, where the step outpaces one decoding thread; 0 on the
    CPU); the batches are the same for every value."""
    from pid.train.data_source import open_loader
    from pid.training.buckets import BucketSpec

    workers = plan.num_workers
    if workers is None:
        device = torch.device(plan.device) if plan.device else dist.rank_device()
        workers = 4 if device.type == "cuda" else 0
    skipped = plan.run_dir / "skipped.jsonl" if rank == 0 else None
    return open_loader(plan.data.source, BucketSpec(plan.bucket_mode, plan.resolution), plan.batch_size, plan.seed,
                       rank, world_size, skipped, workers)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------------------
# Watching


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class Progress:
    """tqdm on rank 0: loss, images/s, ETA (tqdm's own)."""

    def __init__(self, plan: TrainPlan, start: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=plan.steps, initial=start, desc="train", unit="step", disable=not enabled,
                        dynamic_ncols=True)
        self.images_per_step = plan.global_batch
        self.start = time.perf_counter()
        self.done = 0

    def __call__(self, state: TrainState) -> None:
        self.done += 1
        rate = self.done * self.images_per_step / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(loss=f"{state.log['loss']:.4f}", img_s=f"{rate:.2f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


__all__ = ["EXIT_OK", "Progress", "init_file", "init_fresh_adapter", "load_encoders", "load_init", "open_data",
           "peak_memory_gib", "seed_everything"]
