"""The tiny-problem check of distillation (issue 19): does `mode=distill` make a 4-step student closer to its
teacher's many-step output than the teacher itself sampled with 4 steps?

    python benchmarks/distill_tiny.py                      # ~3 minutes on one CPU thread
    python benchmarks/distill_tiny.py --teacher-steps 300 --distill-steps 600 --out tiny.json

1. A tiny teacher (hidden 64, the harness's 16-channel /8 VAE and tiny Gemma-2 stand-ins) is trained with
   `python -m pid.train mode=full` on 4 images of 64 px, then exported.
2. `python -m pid.train mode=distill init=<that export>` distils it; the student EMA is exported.
3. On the 4 training images (their LQ latents and captions) and 4 seeds each, every decoder's output is compared
   with the teacher's 32-step DPM-Solver decode with CFG 3 (the VSD target's guidance): mean squared error and
   PSNR in [0, 1] images, for the student (4-step distilled sampler), the teacher with 4 DPM-Solver steps, and
   the teacher's weights in the student's 4-step sampler (the student before distillation).

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

SEEDS = (0, 1, 2, 3)


def export(run_dir: Path, out: Path) -> Path:
    from pid.train.export import export as write

    return write(run_dir, out, dtype="fp32", overwrite=True)


def decoder(weights: Path, ckpt_type: str):
    from pid.checkpoints import load_network_weights, lookup
    from pid.decoder import PiDDecoder
    from pid.models import build_pid_net

    from tiny import tiny_caption_encoder

    record = lookup("flux", ckpt_type)
    cfg, state = load_network_weights(weights, record)
    return PiDDecoder(build_pid_net(cfg, state_dict=state), record, tiny_caption_encoder(seed=0, num_tokens=16))


def lq_inputs(images: Path) -> list[tuple[torch.Tensor, str]]:
    """(LQ latent [1, 16, 2, 2], caption) of each training image, as training computes them."""
    from PIL import Image

    from pid.training import downsample

    encode = tiny_encoders().encode_lq
    out = []
    for i in range(4):
        pixels = torch.from_numpy(np.asarray(Image.open(images / f"img{i}.png"), dtype=np.float32) / 127.5 - 1)
        pixels = pixels.permute(2, 0, 1)[None]
        with torch.no_grad():
            out.append((encode(downsample(pixels)), CAPTIONS[i]))
    return out


def compare(work: Path, teacher_file: Path, student_file: Path, cfg: float = 3.0) -> dict[str, dict[str, float]]:
    """Per image and seed, each 4-step decode against the teacher's 32-step decode of the same seed ("mse",
    "psnr_db"); and per image, the mean over seeds of each against the mean of the 32-step decodes ("mean_mse":
    the distributions' first moments, which a distribution-matching student can meet without following the
    teacher's noise-to-image ODE map). "teacher_32_seed_to_seed" is the spread of the target itself."""
    teacher_u, teacher_d = decoder(teacher_file, "undistilled"), decoder(teacher_file, "2kto4k_v1pt5")
    student = decoder(student_file, "2kto4k_v1pt5")
    names = ("student_4_steps", "teacher_dpm_4_steps", "teacher_weights_in_student_sampler_4_steps",
             "teacher_32_seed_to_seed")
    errors: dict[str, list[float]] = {name: [] for name in names}
    mean_errors: dict[str, list[float]] = {name: [] for name in names[:3]}
    for latent, caption in lq_inputs(work / "images"):
        images: dict[str, list[torch.Tensor]] = {name: [] for name in ("target", *names[:3])}
        for seed in SEEDS:
            with torch.no_grad():
                images["target"].append(teacher_u.decode(latent, caption, steps=32, cfg_scale=cfg, seed=seed))
                images[names[0]].append(student.decode(latent, caption, steps=4, seed=seed))
                images[names[1]].append(teacher_u.decode(latent, caption, steps=4, cfg_scale=cfg, seed=seed))
                images[names[2]].append(teacher_d.decode(latent, caption, steps=4, seed=seed))
        target = images["target"]
        for name in names[:3]:
            errors[name] += [float((a - b).pow(2).mean()) for a, b in zip(images[name], target)]
            mean = torch.stack(images[name]).mean(0)
            mean_errors[name].append(float((mean - torch.stack(target).mean(0)).pow(2).mean()))
        errors[names[3]] += [float((target[i] - target[i + 1]).pow(2).mean()) for i in range(len(target) - 1)]
    out = {name: {"mse": float(np.mean(v)), "psnr_db": float(np.mean([10 * math.log10(1 / e) for e in v]))}
           for name, v in errors.items()}
    for name, v in mean_errors.items():
        out[name]["mean_mse"] = float(np.mean(v))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--distill-lr", type=float, default=1e-3, help="student, fake score and discriminator lr")
    parser.add_argument("--teacher-cfg", type=float, default=3.0, help="the VSD target's CFG and the decodes' CFG")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON")
    parser.add_argument("options", nargs="*", help="more key=value options of the distillation run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="pid_distill_tiny_"))
    make_images(work / "images")
    make_init(work / "init.pth")
    start = time.perf_counter()
    common = ["batch_size=4", "log_every=50", "keep_checkpoints=1"]
    assert train(work, "mode=full", "lr=3e-3", f"steps={args.teacher_steps}", f"ckpt_every={args.teacher_steps}",
                 "run_name=teacher", *common) == 0  # a rerun in the same --work resumes: finished at once
    teacher_file = export(work / "runs" / "teacher", work / "teacher.safetensors")
    teacher_s = time.perf_counter() - start
    lr = args.distill_lr
    options = [*args.options, f"teacher_cfg={args.teacher_cfg}"]
    run_name = "_".join(["student", str(args.distill_steps), f"{lr:g}", *options]).replace("=", "-")
    assert train(work, "mode=distill", f"init={teacher_file}", f"steps={args.distill_steps}",
                 f"ckpt_every={args.distill_steps}", f"lr={lr}", f"fake_score_lr={lr}", f"discriminator_lr={lr}",
                 "warmup_steps=0", f"run_name={run_name}", *common, *options) == 0
    student_file = export(work / "runs" / run_name, work / f"{run_name}.safetensors")
    distill_s = time.perf_counter() - start - teacher_s
    result = {"teacher_steps": args.teacher_steps, "distill_iterations": args.distill_steps, "distill_lr": lr,
              "options": options,
              "teacher_train_s": round(teacher_s, 1), "distill_s": round(distill_s, 1),
              f"against_teacher_32_step_cfg{args.teacher_cfg:g}": compare(work, teacher_file, student_file,
                                                                          args.teacher_cfg),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
