"""PiD training maths: the reference's training step, losses, schedules and draws (issues 17, 19).

The parity contract (checked against the reference's golden values) is importable from here:
`teacher_losses`, `downsample`, `dynamic_shift`, `ema_beta`, `vsd_loss`, `dsm_loss`,
`gan_generator_loss`, `gan_discriminator_loss`. The trainer (`pid.train`) draws the randomness
with `draw_teacher_randomness` / `drop_captions` and calls `teacher_losses`.
"""

from pid.training.degradation import downsample, latent_sigma, noise_latent
from pid.training.discriminator import FeatureDiscriminator
from pid.training.dmd import (
    DMDConfig,
    draw_dmd_randomness,
    fake_score_losses,
    gan_generator_weight,
    is_student_step,
    sample_student_ode,
    student_losses,
    student_t_list,
    teacher_forcing_input,
    velocity_to_x0,
)
from pid.training.losses import (
    color_align_loss,
    dsm_loss,
    flow_matching_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    noisy_pixels,
    r1_loss,
    rgb_to_ycbcr,
    vsd_loss,
)
from pid.training.optim import PowerEMA, build_optimizer, build_warmup_scheduler, clip_gradients
from pid.training.schedules import (
    dmd_time,
    dynamic_shift,
    ema_beta,
    logit_normal_time,
    power_ema_gamma,
    shift_time,
    warmup_multiplier,
)
from pid.training.teacher import (
    TeacherStepOutputs,
    draw_teacher_randomness,
    drop_captions,
    teacher_losses,
    teacher_step_outputs,
)
from pid.training.trainable import set_trainable

__all__ = [
    "DMDConfig",
    "FeatureDiscriminator",
    "PowerEMA",
    "TeacherStepOutputs",
    "build_optimizer",
    "build_warmup_scheduler",
    "clip_gradients",
    "color_align_loss",
    "dmd_time",
    "downsample",
    "draw_dmd_randomness",
    "draw_teacher_randomness",
    "drop_captions",
    "dsm_loss",
    "dynamic_shift",
    "ema_beta",
    "fake_score_losses",
    "flow_matching_loss",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "gan_generator_weight",
    "is_student_step",
    "latent_sigma",
    "logit_normal_time",
    "noise_latent",
    "noisy_pixels",
    "power_ema_gamma",
    "r1_loss",
    "rgb_to_ycbcr",
    "sample_student_ode",
    "set_trainable",
    "shift_time",
    "student_losses",
    "student_t_list",
    "teacher_forcing_input",
    "teacher_losses",
    "teacher_step_outputs",
    "velocity_to_x0",
    "vsd_loss",
    "warmup_multiplier",
]
