"""The trained latent diffusion model: its modules and fixed numbers, and what every use of
it shares (encoding images, the concatenated conditioning, the U-Net's prediction under a
condition, classifier-free guidance). Training computes its loss with ``predict``; sampling
(``ldm_jax.pipeline.generator``) runs ``denoiser`` in the sampler's scan.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import diffusion


def pixels_from_uint8(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def pixels_to_uint8(images: jax.Array) -> jax.Array:
    """float [-1, 1] -> uint8 [0, 255], rounding and clipping."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def reconstruct(params: Any, images: jax.Array, *, model: nn.Module) -> jax.Array:
    """uint8 reconstructions of uint8 images by an autoencoder, through the posterior mode
    (VQ: the quantised latent)."""
    posterior = model.apply({"params": params}, pixels_from_uint8(images), method="encode")
    return pixels_to_uint8(model.apply({"params": params}, posterior.mode(), method="decode"))


@dataclasses.dataclass(frozen=True)
class LatentDiffusion:
    """The modules and fixed numbers of a trained latent diffusion model.

    Attributes:
      conditioning: "text" (tokens through ``text_encoder``), "class" (labels) or "none".
      null_condition: the condition that means "no condition" for guidance: the tokens of the
        empty caption, or the reserved null class index.
      frozen_text_encoder: the text encoder is pretrained and not trained (CLIP): its params
        come with the autoencoder's, not in the train state.
      concat_conditioning: images concatenated to the U-Net's input, one of
        ``diffusion.CONCAT_CONDITIONINGS``.
      super_resolution_factor: how many times larger than its low-resolution input an "sr"
        model's output is.
    """

    unet: nn.Module
    autoencoder: nn.Module
    text_encoder: nn.Module | None
    schedule: diffusion.NoiseSchedule
    conditioning: str
    null_condition: np.ndarray
    latent_shape: tuple[int, int, int]
    latent_scale: float
    prediction_type: str = "epsilon"
    frozen_text_encoder: bool = False
    concat_conditioning: str = ""
    super_resolution_factor: int = 1

    @property
    def factor(self) -> int:
        """The autoencoder's downsampling factor."""
        return self.autoencoder.downsample_factor

    def encode(self, params: Any, pixels: jax.Array) -> jax.Array:
        """Scaled latents (the posterior mean) of images in [-1, 1]."""
        posterior = self.autoencoder.apply(
            {"params": params["autoencoder"]}, pixels, method="encode"
        )
        return posterior.mean.astype(jnp.float32) * self.latent_scale

    def concat_input(
        self, params: Any, images: dict[str, jax.Array], latent_batch_shape: tuple[int, ...]
    ) -> jax.Array | None:
        """The conditioning concatenated to latents (B, h, w, c), from uint8 ``images``."""
        if not self.concat_conditioning:
            return None
        inputs = {
            key: value.astype(jnp.float32) if key == "mask" else pixels_from_uint8(value)
            for key, value in images.items()
            if key in diffusion.IMAGE_KEYS
        }
        return diffusion.concat_condition(
            self.concat_conditioning,
            inputs,
            tuple(latent_batch_shape[:3]),
            lambda pixels: self.encode(params, pixels),
            self.factor,
        )

    def encode_condition(self, params: Any, condition: jax.Array | None):
        """(context, labels) for the U-Net: text through the encoder, labels as they are."""
        if self.conditioning == "text":
            return self.text_encoder.apply({"params": params["text_encoder"]}, condition), None
        if self.conditioning == "class":
            return None, condition
        return None, None

    def predict(
        self,
        params: Any,
        z_t: jax.Array,
        t: jax.Array,
        condition: jax.Array | None,
        *,
        concat: jax.Array | None = None,
        train: bool = False,
        rngs: dict | None = None,
    ) -> jax.Array:
        """The U-Net's output for noisy latents under a batch of conditions (and ``concat``,
        from ``concat_input``)."""
        context, labels = self.encode_condition(params, condition)
        return self._apply_unet(params, z_t, t, context, labels, concat, train=train, rngs=rngs)

    def _apply_unet(self, params, z_t, t, context, labels, concat, **kwargs) -> jax.Array:
        if concat is not None:
            z_t = jnp.concatenate([z_t, concat.astype(z_t.dtype)], axis=-1)
        return self.unet.apply({"params": params["unet"]}, z_t, t, context, labels, **kwargs)

    def drop_condition(self, condition: jax.Array, drop: jax.Array) -> jax.Array:
        """Replaces the conditions where ``drop`` (B,) is true by the null condition."""
        null = jnp.asarray(self.null_condition)
        return jnp.where(drop.reshape((-1,) + (1,) * (condition.ndim - 1)), null, condition)

    def denoiser(
        self,
        params: Any,
        condition: jax.Array,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        concat: jax.Array | None = None,
    ):
        """``denoise_fn(z_t, t)`` with the condition (and classifier-free guidance) bound.

        The condition is encoded once here, not at every sampling step. The concatenated
        images (``concat``) condition both halves of guidance: only the condition is dropped.
        """
        guided = self.conditioning != "none" and guidance_scale != 1.0
        if guided:
            null = jnp.broadcast_to(jnp.asarray(self.null_condition), condition.shape)
            condition = jnp.concatenate([condition, null], axis=0)
            concat = None if concat is None else jnp.concatenate([concat, concat], axis=0)
        context, labels = self.encode_condition(params, condition)

        def model_fn(z, t):
            return self._apply_unet(params, z, t, context, labels, concat)

        if guided:
            return diffusion.guided_denoise_fn(model_fn, guidance_scale, guidance_rescale)
        return model_fn

    def output_latent_shape(self, images: dict[str, Any]) -> tuple[int, int, int]:
        """The latent shape of the images generated from ``images`` (none: the model's)."""
        channels = self.latent_shape[-1]
        if "low_res" in images:
            height, width = images["low_res"].shape[1:3]
            scale = self.super_resolution_factor
            return height * scale // self.factor, width * scale // self.factor, channels
        if "image" in images:
            height, width = images["image"].shape[1:3]
            return height // self.factor, width // self.factor, channels
        return self.latent_shape

    def decode(self, params: Any, latents: jax.Array) -> jax.Array:
        """uint8 images of scaled latents."""
        pixels = self.autoencoder.apply(
            {"params": params["autoencoder"]}, latents / self.latent_scale, method="decode"
        )
        return pixels_to_uint8(pixels)


def init_trained_params(key: jax.Array, *, model: LatentDiffusion, max_caption_length: int) -> dict:
    """Fresh params of what stage 2 trains: the U-Net, and a from-scratch text encoder."""
    unet_key, text_key = jax.random.split(key)
    # The U-Net's input: the latents and any concatenated conditioning images.
    latents = jnp.zeros((1, *model.latent_shape[:2], model.unet.in_channels), jnp.float32)
    timesteps = jnp.zeros((1,), jnp.int32)
    params, context, labels = {}, None, None
    if model.conditioning == "text" and model.frozen_text_encoder:
        context = jnp.zeros((1, max_caption_length, model.unet.context_dim), jnp.float32)
    elif model.conditioning == "text":
        tokens = jnp.zeros((1, max_caption_length), jnp.int32)
        params["text_encoder"] = model.text_encoder.init(text_key, tokens)["params"]
        context = model.text_encoder.apply({"params": params["text_encoder"]}, tokens)
    elif model.conditioning == "class":
        labels = jnp.zeros((1,), jnp.int32)
    params["unet"] = model.unet.init(unet_key, latents, timesteps, context, labels)["params"]
    return params
