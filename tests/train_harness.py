"""Tiny training runs for the trainer's tests: a tiny v1.5 PiD init file, tiny frozen encoders (a random
16-channel /8 autoencoder, a tiny Gemma-2), a folder of 64 px images, and a plan built by the real CLI parser.

Also runnable as a script (a training process the tests can kill or launch under torchrun):

    python tests/train_harness.py <work folder> key=value ...      # the same options as python -m pid.train
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
REPO = TESTS_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CAPTIONS = ["a photo of cat", "a red fox in snow", "the city at night", "a dog"]


def make_images(folder: Path, count: int = 4, size: int = 64) -> Path:
    """`count` smooth random RGB images with same-name .txt captions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.random((4, 4, 3))
        image = np.kron(coarse, np.ones((size // 4, size // 4, 1)))  # blocks: learnable in a few steps
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return folder


def make_init(path: Path, seed: int = 0) -> Path:
    """A tiny v1.5 (16-channel) decoder `.pth` carrying its config, in the released names."""
    from hub_cache import tiny_pid_checkpoint

    path.write_bytes(tiny_pid_checkpoint("v1pt5_latent16ch", seed=seed))
    return path


def tiny_encoders():
    """Frozen tiny stand-ins of the FLUX.1 VAE (16 channels, /8) and Gemma-2, on the CPU."""
    from pid.latents import get as get_latent_space
    from pid.training.loop import Encoders

    from tiny import tiny_caption_encoder
    from tiny_vaes import tiny_autoencoder_kl

    space = get_latent_space("flux").attach(tiny_autoencoder_kl(16, seed=0))
    text = tiny_caption_encoder(seed=0, num_tokens=16)  # short captions keep the tiny runs fast
    return Encoders(encode_lq=space.encode, encode_captions=text.encode)


def plan_for(work: Path, *args: str):
    """The plan `python -m pid.train <args>` would run, for the files under `work`."""
    from pid.inference.cli import parse_command, rank_and_world
    from pid.train.__main__ import TRAIN
    from pid.train.plan import plan_run

    defaults = [f"data={work / 'images'}", f"init={work / 'init.pth'}", "resolution=64", f"output_dir={work / 'runs'}",
                "warmup_steps=0", "progress=false", "batch_size=2"]
    _, world = rank_and_world()
    return plan_run(parse_command(TRAIN, [*defaults, *args]).settings, world_size=world)


def prepare(work: Path) -> Path:
    if not (work / "images").is_dir():
        make_images(work / "images")
    if not (work / "init.pth").is_file():
        make_init(work / "init.pth")
    return work


def train(work: Path, *args: str) -> int:
    from pid.train.run import run

    torch.set_num_threads(1)
    return run(plan_for(prepare(work), *args), encoders=tiny_encoders())


if __name__ == "__main__":
    from loguru import logger

    import pid  # noqa: F401  (pid silences its logs on import; a command shows them)

    logger.enable("pid")
    sys.exit(train(Path(sys.argv[1]), *sys.argv[2:]))
