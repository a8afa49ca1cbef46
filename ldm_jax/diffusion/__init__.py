"""Diffusion maths on arrays: schedules, the training objective, samplers and guidance."""

from ldm_jax.diffusion.guidance import classifier_free_guidance, guided_denoise_fn
from ldm_jax.diffusion.objectives import (
    PREDICTION_TYPES,
    diffusion_loss,
    loss_weight,
    predict_x0_and_eps,
    q_sample,
    snr,
    training_target,
)
from ldm_jax.diffusion.samplers import (
    SAMPLERS,
    denoising_step,
    dpm_solver_step,
    noise_std,
    posterior_variance,
    sample,
)
from ldm_jax.diffusion.schedules import (
    SCHEDULE_KINDS,
    TIMESTEP_SPACINGS,
    NoiseSchedule,
    make_schedule,
    sampling_timesteps,
)

__all__ = [
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SCHEDULE_KINDS",
    "TIMESTEP_SPACINGS",
    "NoiseSchedule",
    "classifier_free_guidance",
    "denoising_step",
    "diffusion_loss",
    "dpm_solver_step",
    "guided_denoise_fn",
    "loss_weight",
    "make_schedule",
    "noise_std",
    "posterior_variance",
    "predict_x0_and_eps",
    "q_sample",
    "sample",
    "sampling_timesteps",
    "snr",
    "training_target",
]
