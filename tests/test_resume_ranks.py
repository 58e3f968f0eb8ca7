"""A from_clean run resumed with another number of ranks redoes only the missing images (records are shared,
whatever the rank count that wrote them). Ranks run one after another in this process: each sees torchrun's
RANK / WORLD_SIZE, and the process-group calls are the single-process ones."""

import csv

import numpy as np
import pytest
from PIL import Image

from pid.inference import distributed as dist
from pid.inference import from_clean
from pid.latents import get as get_space

from tiny import tiny_decoder
from tiny_vaes import tiny_autoencoder_kl

IMAGES = 6


@pytest.fixture()
def world(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
        lines.append(f'{{"image": "imgs/im{i}.png", "prompt": "image {i}"}}')
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(dist, "init_distributed", lambda backend=None: dist.dist_env())
    space = get_space("sd3").attach(tiny_autoencoder_kl(latent_channels=16))
    decoder = tiny_decoder("sd3", "2k")
    calls: list[int] = []
    original = decoder.decode
    decoder.decode = lambda *a, **k: calls.append(1) or original(*a, **k)

    def run_ranks(ranks, world_size):
        for rank in ranks:  # rank 0 last: it writes metrics.csv from every rank's records
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(world_size))
            settings = from_clean.load_config([f"manifest={tmp_path / 'm.jsonl'}", "backbone=sd3", "pid_steps=1",
                                               f"output_dir={tmp_path / 'out'}", "device=cpu", "plot=false",
                                               "report=false"])
            from_clean.run(settings, decoder=decoder, latent_space=space)

    def rows():
        run_dir = next((tmp_path / "out").iterdir())
        return list(csv.DictReader((run_dir / "metrics.csv").open()))

    return run_ranks, rows, calls


@pytest.mark.parametrize(("first", "second"), [((1, [0]), (2, [1, 0])), ((2, [0]), (1, [0])),
                                               ((3, [2, 0]), (2, [1, 0]))])
def test_resume_with_another_rank_count_redoes_only_the_missing(world, first, second):
    run_ranks, rows, calls = world
    first_world, first_ranks = first
    if first_world == 1:
        # a one-rank run that died after 4 of 6 images: simulated by running only those (the first 4)
        run_ranks([0], 1)
        done_first = len(calls)
        assert done_first == IMAGES
    else:
        run_ranks(first_ranks, first_world)  # with 3 ranks, rank 1 never ran: its images are missing
        done_first = len(calls)
    run_ranks(second[1], second[0])
    redone = len(calls) - done_first
    expected_missing = IMAGES - done_first
    assert redone == expected_missing
    table = rows()
    assert len(table) == IMAGES * 2  # one vae and one pid row per image, never duplicated
    assert sorted({r["sample_id"] for r in table}) == sorted({f"{i:08d}_im{i}" for i in range(IMAGES)})
