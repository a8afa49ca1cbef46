"""Image-to-image (SDEdit, Meng et al. 2022): noise an image part of the way, then denoise it.

``strength`` s in [0, 1] says how far: the last ⌊s·N⌋ of a sampler's N steps are run, from the
image's latents noised to the first of them (diffusers' img2img pipelines count the same
way). s = 1 runs every step from pure noise, text-to-image; s = 0 runs none and returns the
latents, a reconstruction.
"""

import jax
import numpy as np

from ldm_jax.diffusion.objectives import q_sample
from ldm_jax.diffusion.schedules import NoiseSchedule


def strength_start_step(num_steps: int, strength: float) -> int:
    """The first of ``num_steps`` steps that image-to-image at ``strength`` runs.

    Raises:
        ValueError: If ``strength`` is outside [0, 1].
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return num_steps - min(int(num_steps * strength), num_steps)


def noised_start(
    schedule: NoiseSchedule,
    latents: jax.Array,
    noise: jax.Array,
    timesteps: np.ndarray,
    start_step: int,
) -> jax.Array:
    """The sample ``sample(..., start_step=start_step)`` starts from.

    Args:
        schedule: The model's noise schedule.
        latents: Clean latents z_0 of the image, (B, ...).
        noise: Standard normal noise, the shape of ``latents``.
        timesteps: The timesteps the sampler visits (``sampler_timesteps``).
        start_step: From ``strength_start_step`` (static).

    Returns:
        ``noise`` when every step runs (pure noise, so strength 1 is text-to-image exactly),
        ``latents`` when none does, else the latents noised to ``timesteps[start_step]``.
    """
    if start_step == 0:
        return noise
    if start_step == len(timesteps):
        return latents
    t = np.full((latents.shape[0],), timesteps[start_step], np.int32)
    return q_sample(schedule, latents, t, noise)
