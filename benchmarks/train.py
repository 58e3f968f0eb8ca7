"""Training-step benchmark: images/s and peak memory per mode and resolution, beside the dry run's estimate.

    python benchmarks/train.py                                   # CUDA: the flux v1.5 network, 1024² and 2048²
    python benchmarks/train.py --device cpu --config tiny --sizes 64 128 --steps 6

Runs `pid.training.loop.train_loop` (draws, teacher losses, backward, clip, AdamW, EMA) on a random-weight
network (speed and memory do not depend on the weights) with random images, latents and caption embeddings (the
VAE and Gemma-2 are not timed: a prepare cache removes them from training too). images/s: over the steps after
the first (warm-up). Peak memory: `torch.cuda.max_memory_allocated` on CUDA, the process's peak RSS growth on CPU
(coarse). Prints a markdown table and writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pid.memory import GiB  # noqa: E402
from pid.models import build_pid_net  # noqa: E402
from pid.models.configs import get_net_config  # noqa: E402
from pid.train.memory import estimate_train_memory  # noqa: E402
from pid.train.plan import parameter_counts  # noqa: E402
from pid.training import set_trainable  # noqa: E402
from pid.training.loop import Encoders, LoopConfig, TeacherStep, TrainState, init_ema, train_loop  # noqa: E402
from pid.training.optim import build_optimizer, build_warmup_scheduler  # noqa: E402

TINY = dict(hidden_size=64, num_heads=4, patch_depth=4, pixel_hidden_size=8, pixel_attn_hidden_size=32,
            pixel_num_heads=2, text_dim=32, adapter_width=32)


@dataclass
class Batch:
    pixels: torch.Tensor
    captions: list[str]
    keys: list[str]
    lq_latent: torch.Tensor
    caption_embeds: torch.Tensor
    null_caption_embed: torch.Tensor


class RandomBatches:
    def __init__(self, cfg, size: int, batch: int, text_len: int) -> None:
        stride = cfg.latent_downsample * cfg.sr_scale
        self.batch = Batch(torch.rand(batch, 3, size, size) * 2 - 1, ["x"] * batch, [str(i) for i in range(batch)],
                           torch.randn(batch, cfg.latent_channels, size // stride, size // stride),
                           torch.randn(batch, text_len, cfg.text_dim), torch.zeros(text_len, cfg.text_dim))

    def __iter__(self):
        while True:
            yield self.batch

    def state_dict(self):
        return {}


def bench(cfg, mode: str, size: int, batch: int, steps: int, device: torch.device, checkpointing: bool) -> dict:
    net = build_pid_net(cfg, device="cpu").train()
    set_trainable(net, mode)
    if mode == "teacher" and device.type == "cuda":
        for p in net.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if checkpointing:
        from torch.distributed._composable import checkpoint

        for block in [*net.patch_blocks, *net.pixel_blocks]:
            checkpoint(block)
    model = TeacherStep(net.to(device))
    optimizer = build_optimizer(model.parameters(), 1e-5, 0.0)
    state = TrainState(0, model, optimizer, build_warmup_scheduler(optimizer, 0), init_ema(model))
    stamps: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def on_step(_state) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    loop = LoopConfig(steps=steps, batch_size=batch, ckpt_every=10**9, log_every=10**9)
    start = time.perf_counter()
    train_loop(loop, state, RandomBatches(cfg, size, batch, min(cfg.text_max_length, 300)), Encoders(None, None),
               device, on_step=on_step)
    timed = stamps[-1] - stamps[0] if len(stamps) > 1 else stamps[-1] - start
    images_per_s = batch * max(len(stamps) - 1, 1) / timed
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    trainable, frozen = parameter_counts(cfg, mode)
    estimate = estimate_train_memory(cfg, trainable, frozen, size, size, batch, cuda=device.type == "cuda",
                                     checkpointing=checkpointing)
    return {"mode": mode, "size": size, "batch": batch, "checkpointing": checkpointing,
            "images_per_s": round(images_per_s, 3), "peak_gib": round(peak / GiB, 3),
            "estimate_gib": round(estimate.total_bytes / GiB, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="v1pt5_latent16ch", help="a released network config name, or tiny")
    parser.add_argument("--modes", nargs="+", default=["teacher", "full"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    base = get_net_config("v1pt5_latent16ch" if args.config == "tiny" else args.config)
    cfg = replace(base, aux_rgb_head=True, **(TINY if args.config == "tiny" else {}))
    device = torch.device(args.device)
    rows = []
    for mode in args.modes:
        for size in args.sizes:
            row = bench(cfg, mode, size, args.batch, args.steps, device, args.checkpointing)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{args.config} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}")
    print("| mode | size | batch | images/s | peak GiB (measured) | estimate GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['size']}² | {r['batch']} | {r['images_per_s']} | {r['peak_gib']} | {r['estimate_gib']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
