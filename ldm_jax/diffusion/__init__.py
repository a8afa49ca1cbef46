"""Diffusion maths on arrays: schedules, the training objective, samplers and guidance,
the editing applications built on the samplers (image-to-image, inpainting), and the images
concatenated to the U-Net's input (inpainting and super-resolution models)."""

from ldm_jax.diffusion.concat import (
    CONCAT_CONDITIONINGS,
    CONCAT_INPUT_KEYS,
    IMAGE_KEYS,
    concat_channels,
    concat_condition,
)
from ldm_jax.diffusion.guidance import (
    classifier_free_guidance,
    guided_denoise_fn,
    rescale_guidance,
)
from ldm_jax.diffusion.img2img import noised_start, strength_start_step
from ldm_jax.diffusion.inpainting import latent_mask, replace_known
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
    sampler_timesteps,
)
from ldm_jax.diffusion.schedules import (
    SCHEDULE_KINDS,
    TIMESTEP_SPACINGS,
    NoiseSchedule,
    make_schedule,
    sampling_timesteps,
)

__all__ = [
    "CONCAT_CONDITIONINGS",
    "CONCAT_INPUT_KEYS",
    "IMAGE_KEYS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SCHEDULE_KINDS",
    "TIMESTEP_SPACINGS",
    "NoiseSchedule",
    "classifier_free_guidance",
    "concat_channels",
    "concat_condition",
    "denoising_step",
    "diffusion_loss",
    "dpm_solver_step",
    "guided_denoise_fn",
    "latent_mask",
    "loss_weight",
    "make_schedule",
    "noise_std",
    "noised_start",
    "posterior_variance",
    "predict_x0_and_eps",
    "q_sample",
    "replace_known",
    "rescale_guidance",
    "sample",
    "sampler_timesteps",
    "sampling_timesteps",
    "snr",
    "strength_start_step",
    "training_target",
]
