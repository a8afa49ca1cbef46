"""Images that condition the U-Net by concatenation to its input latents.

- "inpaint": the latents of the masked image (the image with its masked pixels set to 0, grey
  in [-1, 1]) and the mask downsampled to the latent size, in Stable Diffusion's inpainting
  order [z_t, mask, masked-image latents]: latent_channels + 1 + latent_channels channels.
- "sr": the low-resolution image, in [-1, 1], resized to the latent size (bicubic; at a
  super-resolution factor equal to the autoencoder's it is the latent size already):
  latent_channels + 3 channels, the LDM / Stable Diffusion x4 upscaler layout.
- "": none.

Training and sampling build the concatenated inputs with the same ``concat_condition``; the
data transforms that add a training record's conditioning images are the data layer's
(``ldm_jax.data.masks``, ``ldm_jax.data.degradation``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.inpainting import latent_mask

CONCAT_CONDITIONINGS = ("", "inpaint", "sr")
# Every key of the image inputs, and the ones a batch adds to "image" for each kind.
IMAGE_KEYS = ("image", "mask", "low_res")
CONCAT_INPUT_KEYS = {"": (), "inpaint": ("mask",), "sr": ("low_res",)}


def concat_channels(kind: str, latent_channels: int) -> int:
    """Channels the U-Net input gains from the concatenated conditioning of ``kind``."""
    return {"": 0, "inpaint": latent_channels + 1, "sr": 3}[kind]


def concat_condition(
    kind: str,
    inputs: dict[str, jax.Array],
    latent_batch_shape: tuple[int, int, int],
    encode: Callable[[jax.Array], jax.Array],
    factor: int,
) -> jax.Array:
    """The (B, h, w, concat_channels) input concatenated to the latents.

    Args:
        kind: "inpaint" or "sr".
        inputs: float32 pixels in [-1, 1]: "image" (B, H, W, 3) with its "mask" (B, H, W, 1)
            in {0, 1} for "inpaint" (without a mask: the whole image is masked, which is
            plain text-to-image); "low_res" for "sr".
        latent_batch_shape: (B, h, w) of the latents.
        encode: Pixels in [-1, 1] -> scaled latents (the posterior mean).
        factor: The autoencoder's downsampling factor.
    """
    batch, height, width = latent_batch_shape
    if kind == "sr":
        low_res = inputs["low_res"]
        shape = (batch, height, width, low_res.shape[-1])
        return low_res if low_res.shape == shape else jax.image.resize(low_res, shape, "bicubic")
    if "mask" in inputs:
        pixels, mask = inputs["image"], inputs["mask"]
    else:
        pixels = jnp.zeros((batch, height * factor, width * factor, 3), jnp.float32)
        mask = jnp.ones((batch, height * factor, width * factor, 1), jnp.float32)
    masked_latents = encode(pixels * (1.0 - mask))
    return jnp.concatenate([latent_mask(mask, factor), masked_latents], axis=-1)
