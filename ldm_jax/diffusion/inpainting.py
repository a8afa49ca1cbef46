"""Training-free inpainting (RePaint-style, Lugmayr et al. 2022) as a sampler step hook.

After every reverse step the known region of the sample is replaced by the known latents
noised to the step's target noise level, so the model only ever generates the masked region
while seeing the known one at the noise level it expects. (RePaint's resampling jumps are
left out: one pass, as the LDM paper's inpainting by replacement.)

Masks are 1 where the image is regenerated, 0 where it is kept.
"""

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.samplers import StepHook


def latent_mask(mask: jax.Array, factor: int) -> jax.Array:
    """A pixel mask (B, H, W, 1) downsampled to the latents of an autoencoder of factor f.

    A latent pixel is regenerated when any of the f×f image pixels it covers is (a max
    pool): a latent straddling the mask's edge would otherwise bring back what is masked.

    Raises:
        ValueError: If H or W is not divisible by ``factor``.
    """
    batch, height, width, channels = mask.shape
    if height % factor or width % factor:
        raise ValueError(
            f"a mask of {height}x{width} pixels is not divisible by the autoencoder factor {factor}"
        )
    blocks = mask.reshape(batch, height // factor, factor, width // factor, factor, channels)
    return blocks.max(axis=(2, 4))


def replace_known(known_latents: jax.Array, mask: jax.Array) -> StepHook:
    """The ``step_hook`` of ``sample`` that keeps the known region of ``known_latents``.

    Args:
        known_latents: Clean latents z_0 of the image to keep, (B, h, w, c).
        mask: (B, h, w, 1) at latent resolution, 1 where the sample is regenerated.

    Returns:
        ``hook(z, alpha_bar, key)``: mask·z + (1 − mask)·(sqrt(ᾱ)·z_0 + sqrt(1 − ᾱ)·ε) with
        fresh noise ε; at ᾱ = 1 the known region is z_0 itself.
    """

    def hook(z: jax.Array, alpha_bar: jax.Array, key: jax.Array) -> jax.Array:
        noise = jax.random.normal(key, z.shape, jnp.float32)
        noised = jnp.sqrt(alpha_bar) * known_latents + jnp.sqrt(1.0 - alpha_bar) * noise
        return (mask * z + (1.0 - mask) * noised).astype(z.dtype)

    return hook
