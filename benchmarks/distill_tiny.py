"""The tiny-problem check of distillation (issue 19): does `mode=distill` make a 4-step student closer to its
teacher's many-step output than the teacher itself sampled with 4 steps?

    python benchmarks/distill_tiny.py                      # a few minutes on one CPU thread
    python benchmarks/distill_tiny.py --teacher-steps 2000 --distill-steps 600 --out tiny.json
    python benchmarks/distill_tiny.py --modes --images 4 --teacher-steps 1500 --distill-steps 600 --seeds 64 \
        --steps 1 2 4                                      # four modes per condition (docs/training.md's table)

1. A tiny teacher (hidden 64, the harness's 16-channel /8 VAE and tiny Gemma-2 stand-ins) is trained with
   `python -m pid.train mode=full` on `--images` images of 64 px, then exported.
2. `python -m pid.train mode=distill init=<that export>` distils it; the student's EMA is exported (what a user
   gets), and its raw weights beside it.
3. For each training image (its LQ latent and caption), `--seeds` samples of each decoder (one batch drawn from
   seed 0) are compared with the teacher's 32-step DPM-Solver decodes with CFG `--teacher-cfg` (the VSD target's
   guidance), in [0, 1] images:
   - "mse": per sample, against the 32-step decode of the same seed (an ODE-map comparison: a
     distribution-matching SDE student need not follow it, and an ODE sampler from the same noise is favoured);
   - "mean_mse" / "std_mse": between the per-pixel means / standard deviations over the samples and those of
     32-step decodes from *other* noise (seed 1; the 32-step row itself is compared with seed 0), so that no
     decoder shares noise with its reference; "moments_w2" is their sum, the per-pixel Gaussian W2^2 between
     the two sample sets; the 32-step row is the floor that sampling noise alone leaves;
   - "precision_mse" / "recall_mse": per sample, against the nearest of those other-noise 32-step decodes (is
     each sample one the teacher's 32-step sampler makes?), and per 32-step decode, against the nearest sample
     (does the decoder make each of the teacher's samples? mode seeking and collapse show here);
   - "image_mse": per sample, against the training image; "nearest_image_mse": against the nearest training
     image (a sharp sample of any mode scores ~0, a blend of modes does not); "nearest_share_k": the share of
     samples nearest to training image k (the modes a sampler covers, for --modes).
   Decoders: the student (EMA, 4-step distilled sampler), the raw student, the teacher with its own 4-step
   DPM-Solver and CFG, and the teacher's weights in the student's 4-step sampler (the student before
   distillation).

Runs through the same code as the CLI (tests/train_harness.py builds the plan with the CLI parser).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from train_harness import CAPTIONS, make_images, make_init, tiny_encoders, train  # noqa: E402

TARGET = "teacher_32_steps_other_noise"
STUDENT, RAW = "student_ema", "student_raw"


def decoder_names(steps: tuple[int, ...]) -> list[str]:
    """The rows: each 4-or-fewer-step decoder at each step count, then the 32-step floor."""
    kinds = (STUDENT, RAW, "teacher_dpm", "teacher_weights_in_student_sampler")
    return [f"{kind}_{n}_steps" for n in steps for kind in kinds] + [TARGET]


def export(run_dir: Path, out: Path) -> Path:
    from pid.train.export import export as write

    return write(run_dir, out, dtype="fp32", overwrite=True)


def export_raw_student(run_dir: Path, ema_file: Path, out: Path) -> Path:
    """`ema_file` (the export) with the student's raw weights of the run's latest checkpoint in place of the EMA."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pid.training.checkpoint import _dcp_load, latest_checkpoint

    folder = latest_checkpoint(run_dir)
    prefix = "model.student."
    items = FileSystemReader(str(folder)).read_metadata().state_dict_metadata.items()
    raw = {key: torch.empty(item.size, dtype=item.properties.dtype) for key, item in items
           if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)}
    _dcp_load(raw, folder)
    with safe_open(str(ema_file), "pt") as f:
        metadata = f.metadata()
        state = {name: f.get_tensor(name) for name in f.keys()}
    unknown = sorted({key.removeprefix(prefix) for key in raw} - set(state))
    assert not unknown, f"the checkpoint's student has tensors the export lacks, e.g. {unknown[0]}"
    # the checkpoint holds the trainable tensors; the frozen ones (last block's text branch) stay the export's
    state.update({key.removeprefix(prefix): value.float().contiguous() for key, value in raw.items()})
    save_file(state, str(out), metadata=metadata)
    return out


def decoder(weights: Path, ckpt_type: str):
    from pid.checkpoints import load_network_weights, lookup
    from pid.decoder import PiDDecoder
    from pid.models import build_pid_net

    from tiny import tiny_caption_encoder

    record = lookup("flux", ckpt_type)
    cfg, state = load_network_weights(weights, record)
    return PiDDecoder(build_pid_net(cfg, state_dict=state), record, tiny_caption_encoder(seed=0, num_tokens=16))


MODE_CAPTION = "a striped pattern"


def make_mode_images(folder: Path, count: int, amplitude: float, size: int = 64) -> Path:
    """`count` images that differ only in a 4-pixel-period pattern (horizontal, vertical, checker, anti-checker
    stripes of +-`amplitude`) over the same coarse blocks, all with one caption. The x4 antialiased downsample
    all but removes such a pattern, so the images share (nearly) one LQ latent: the teacher must learn a
    `count`-mode distribution per condition, whose flow a 4-step solver cannot follow (it blurs the modes)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    coarse = np.kron(np.random.default_rng(0).random((4, 4, 3)) * 0.5 + 0.25, np.ones((size // 4, size // 4, 1)))
    rows, cols = np.indices((size, size)) // 2 % 2 * 2 - 1  # +-1, 2 px on and 2 off, along each axis
    patterns = [rows, cols, rows * cols, -rows * cols]
    for i in range(count):
        image = np.clip(coarse + amplitude * patterns[i][..., None], 0, 1)
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(MODE_CAPTION)
    return folder


def lq_inputs(images: Path, count: int) -> list[tuple[torch.Tensor, str, torch.Tensor]]:
    """(LQ latent [1, 16, 2, 2], caption, the image [1, 3, 64, 64] in [0, 1]) of each training image, the latent
    and caption as training computes them."""
    from PIL import Image

    from pid.training import downsample

    encode = tiny_encoders().encode_lq
    out = []
    for i in range(count):
        pixels = torch.from_numpy(np.asarray(Image.open(images / f"img{i}.png"), dtype=np.float32) / 127.5 - 1)
        pixels = pixels.permute(2, 0, 1)[None]
        with torch.no_grad():
            caption = (images / f"img{i}.txt").read_text()
            out.append((encode(downsample(pixels)), caption, (pixels + 1) / 2))
    return out


def scores(samples: torch.Tensor, paired: torch.Tensor, reference: torch.Tensor, image: torch.Tensor,
           images: torch.Tensor) -> dict[str, float]:
    """Per-sample MSE of `samples` [N, 3, H, W] against `paired` (same noise); first-moment and spread MSE, and
    nearest-neighbour MSE both ways (precision, recall), against `reference` (other noise); per-sample MSE to the
    training image and to the nearest of `images` [K, ...]."""
    nearest = (samples[:, None] - images[None]).pow(2).mean(dim=(2, 3, 4)).min(dim=1)
    # squared distances between every sample and every reference sample, as per-pixel MSE
    pairs = torch.cdist(samples.flatten(1).double(), reference.flatten(1).double()).pow(2) / samples[0].numel()
    share = torch.bincount(nearest.indices, minlength=len(images)).float() / len(samples)
    return {"mse": float((samples - paired).pow(2).mean()),
            "image_mse": float((samples - image).pow(2).mean()),
            "nearest_image_mse": float(nearest.values.mean()),
            # which training image each sample is nearest to: the modes a multi-mode sampler covers
            **{f"nearest_share_{k}": float(v) for k, v in enumerate(share)},
            "mean_mse": float((samples.mean(0) - reference.mean(0)).pow(2).mean()),
            "std_mse": float((samples.std(0) - reference.std(0)).pow(2).mean()),
            "precision_mse": float(pairs.min(dim=1).values.mean()),
            "recall_mse": float(pairs.min(dim=0).values.mean())}


def compare(work: Path, teacher_file: Path, student_files: dict[str, Path], count: int, seeds: int,
            cfg: float = 3.0, steps: tuple[int, ...] = (4,)) -> dict[str, dict[str, float]]:
    """Each decoder's `seeds` samples per image against the teacher's 32-step CFG decodes (see the module doc),
    averaged over the images; "psnr_db" is that of the per-sample MSE."""
    teacher_u, teacher_d = decoder(teacher_file, "undistilled"), decoder(teacher_file, "2kto4k_v1pt5")
    students = {name: decoder(file, "2kto4k_v1pt5") for name, file in student_files.items()}
    names = decoder_names(steps)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    spread = []
    inputs = lq_inputs(work / "images", count)
    images = torch.cat([image for _, _, image in inputs])
    for latent, caption, image in inputs:
        batch = latent.expand(seeds, -1, -1, -1)
        with torch.no_grad():
            target = teacher_u.decode(batch, caption, steps=32, cfg_scale=cfg, seed=0)
            samples = {}
            for n in steps:
                samples.update({f"{name}_{n}_steps": s.decode(batch, caption, steps=n, seed=0)
                                for name, s in students.items()})
                samples[f"teacher_dpm_{n}_steps"] = teacher_u.decode(batch, caption, steps=n, cfg_scale=cfg, seed=0)
                samples[f"teacher_weights_in_student_sampler_{n}_steps"] = teacher_d.decode(batch, caption, steps=n,
                                                                                            seed=0)
            samples[TARGET] = teacher_u.decode(batch, caption, steps=32, cfg_scale=cfg, seed=1)
        for name in names:
            reference = target if name == TARGET else samples[TARGET]
            rows[name].append(scores(samples[name], target, reference, image, images))
        spread.append(float(target.std(0).pow(2).mean()))
    out = {}
    for name, per_image in rows.items():
        out[name] = {key: float(np.mean([r[key] for r in per_image])) for key in per_image[0]}
        out[name]["psnr_db"] = 10 * math.log10(1 / out[name]["mse"])
        # per-pixel Gaussian W2^2 between the sample sets: first moments plus spreads
        out[name]["moments_w2"] = out[name]["mean_mse"] + out[name]["std_mse"]
    out["target_pixel_variance"] = {"mean": float(np.mean(spread))}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--images", type=int, default=4, choices=range(1, len(CAPTIONS) + 1), metavar="1-4",
                        help="training images of the teacher and of the distillation")
    parser.add_argument("--modes", action="store_true",
                        help="a multi-mode problem: the images differ only in a fine pattern the LQ latent does not "
                             "keep, under one caption (see make_mode_images)")
    parser.add_argument("--mode-amplitude", type=float, default=0.2)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--distill-lr", type=float, default=1e-3, help="student, fake score and discriminator lr")
    parser.add_argument("--teacher-cfg", type=float, default=3.0, help="the VSD target's CFG and the decodes' CFG")
    parser.add_argument("--seeds", type=int, default=16, help="samples per image and decoder")
    parser.add_argument("--steps", type=int, nargs="+", default=[4], choices=range(1, 5), metavar="1-4",
                        help="step counts at which the 4-or-fewer-step decoders are compared")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON")
    parser.add_argument("options", nargs="*", help="more key=value options of the distillation run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="pid_distill_tiny_"))
    if args.modes:
        make_mode_images(work / "images", args.images, args.mode_amplitude)
    else:
        make_images(work / "images", count=args.images)
    make_init(work / "init.pth")
    start = time.perf_counter()
    common = [f"batch_size={args.images}", "log_every=50", "keep_checkpoints=1"]
    teacher_name = f"teacher_{'modes_' if args.modes else ''}{args.images}_{args.teacher_steps}_{args.teacher_lr:g}"
    assert train(work, "mode=full", f"lr={args.teacher_lr}", f"steps={args.teacher_steps}",
                 f"ckpt_every={args.teacher_steps}", f"run_name={teacher_name}", *common) == 0  # a rerun resumes
    teacher_file = export(work / "runs" / teacher_name, work / f"{teacher_name}.safetensors")
    teacher_s = time.perf_counter() - start
    lr = args.distill_lr
    options = [*args.options, f"teacher_cfg={args.teacher_cfg}"]
    run_name = "_".join([teacher_name, "student", str(args.distill_steps), f"{lr:g}", *options]).replace("=", "-")
    assert train(work, "mode=distill", f"init={teacher_file}", f"steps={args.distill_steps}",
                 f"ckpt_every={args.distill_steps}", f"lr={lr}", f"fake_score_lr={lr}", f"discriminator_lr={lr}",
                 "warmup_steps=0", f"run_name={run_name}", *common, *options) == 0
    student_file = export(work / "runs" / run_name, work / f"{run_name}.safetensors")
    raw_file = export_raw_student(work / "runs" / run_name, student_file, work / f"{run_name}_raw.safetensors")
    distill_s = time.perf_counter() - start - teacher_s
    result = {"images": args.images, "modes": args.modes, "teacher_steps": args.teacher_steps, "teacher_lr": args.teacher_lr,
              "distill_iterations": args.distill_steps, "distill_lr": lr, "options": options, "seeds": args.seeds,
              "teacher_train_s": round(teacher_s, 1), "distill_s": round(distill_s, 1),
              f"against_teacher_32_step_cfg{args.teacher_cfg:g}": compare(
                  work, teacher_file, {STUDENT: student_file, RAW: raw_file}, args.images, args.seeds,
                  args.teacher_cfg, tuple(args.steps)),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
