"""The generation pipeline: condition -> sample latents -> decode.

One jitted function per sampling setting runs the whole reverse process as a ``lax.scan``
and the decoder, sharded over the mesh's batch axes. It is used by training's sample grids,
``ldm-jax sample`` and ``ldm-jax evaluate``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ldm_jax import diffusion
from ldm_jax.data import tokenizer as tokenizer_lib
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding


def pixels_from_uint8(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def pixels_to_uint8(images: jax.Array) -> jax.Array:
    """float [-1, 1] -> uint8 [0, 255], rounding and clipping."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    sampler: str = "ddim"
    num_steps: int = 50
    guidance_scale: float = 4.0
    eta: float = 0.0
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = True


@dataclasses.dataclass(frozen=True)
class LatentDiffusion:
    """The modules and fixed numbers of a trained latent diffusion model.

    Attributes:
      conditioning: "text" (tokens through ``text_encoder``), "class" (labels) or "none".
      null_condition: the condition that means "no condition" for guidance: the tokens of the
        empty caption, or the reserved null class index.
      frozen_text_encoder: the text encoder is pretrained and not trained (CLIP): its params
        come with the autoencoder's, not in the train state.
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
        train: bool = False,
        rngs: dict | None = None,
    ) -> jax.Array:
        """The U-Net's output for noisy latents under a batch of conditions."""
        context, labels = self.encode_condition(params, condition)
        return self.unet.apply(
            {"params": params["unet"]}, z_t, t, context, labels, train=train, rngs=rngs
        )

    def drop_condition(self, condition: jax.Array, drop: jax.Array) -> jax.Array:
        """Replaces the conditions where ``drop`` (B,) is true by the null condition."""
        null = jnp.asarray(self.null_condition)
        return jnp.where(drop.reshape((-1,) + (1,) * (condition.ndim - 1)), null, condition)

    def denoiser(self, params: Any, condition: jax.Array, guidance_scale: float):
        """``denoise_fn(z_t, t)`` with the condition (and classifier-free guidance) bound.

        The condition is encoded once here, not at every sampling step.
        """
        guided = self.conditioning != "none" and guidance_scale != 1.0
        if guided:
            null = jnp.broadcast_to(jnp.asarray(self.null_condition), condition.shape)
            condition = jnp.concatenate([condition, null], axis=0)
        context, labels = self.encode_condition(params, condition)

        def model_fn(z, t):
            return self.unet.apply({"params": params["unet"]}, z, t, context, labels)

        return diffusion.guided_denoise_fn(model_fn, guidance_scale) if guided else model_fn

    def generate(
        self, params: Any, condition: jax.Array, key: jax.Array, options: SamplingOptions
    ) -> jax.Array:
        """Images (B, H, W, 3) uint8 for a batch of conditions; pure, meant for ``jit``."""
        noise_key, sample_key = jax.random.split(key)
        batch = condition.shape[0]
        z_T = jax.random.normal(noise_key, (batch, *self.latent_shape), jnp.float32)
        z_0 = diffusion.sample(
            self.denoiser(params, condition, options.guidance_scale),
            self.schedule,
            z_T,
            sample_key,
            sampler=options.sampler,
            num_steps=options.num_steps,
            eta=options.eta,
            prediction_type=self.prediction_type,
            timestep_spacing=options.timestep_spacing,
            steps_offset=options.steps_offset,
            set_alpha_to_one=options.set_alpha_to_one,
        )
        images = self.autoencoder.apply(
            {"params": params["autoencoder"]}, z_0 / self.latent_scale, method="decode"
        )
        return pixels_to_uint8(images)


class Generator:
    """Draws images from a ``LatentDiffusion`` model on a mesh, from prompts or labels.

    Conditions are padded to a multiple of the mesh's batch shards and split over them; one
    compiled function per ``SamplingOptions`` is kept.
    """

    def __init__(
        self,
        model: LatentDiffusion,
        params: Any,
        mesh: Mesh,
        tokenizer: Any = None,
        max_caption_length: int = 0,
        batch_size: int = 64,
    ):
        self.model, self.params, self.mesh = model, params, mesh
        self.tokenizer, self.max_caption_length = tokenizer, max_caption_length
        shards = mesh_lib.data_parallel_size(mesh)
        self.batch_size = max(shards, batch_size // shards * shards)
        self._compiled: dict[SamplingOptions, Any] = {}

    def _function(self, options: SamplingOptions):
        if options not in self._compiled:
            batch = sharding.batch_sharding(self.mesh)
            self._compiled[options] = jax.jit(
                functools.partial(self.model.generate, options=options),
                in_shardings=(None, batch, sharding.replicated(self.mesh)),
                out_shardings=batch,
            )
        return self._compiled[options]

    def conditions(
        self, prompts: Sequence[str] | None = None, labels: Sequence[int] | None = None
    ) -> np.ndarray:
        """Tokens for ``prompts`` or an int32 array of ``labels``, as the model expects."""
        if self.model.conditioning == "text":
            if prompts is None:
                raise ValueError("this model is text-conditioned: give prompts (--prompt)")
            return tokenizer_lib.encode(self.tokenizer, list(prompts), self.max_caption_length)
        if self.model.conditioning == "class":
            if labels is None:
                raise ValueError("this model is class-conditioned: give labels (--label)")
            num_classes = int(self.model.null_condition)  # the null class is the last row
            outside = sorted({int(n) for n in labels if not 0 <= int(n) < num_classes})
            if outside:
                raise ValueError(
                    f"class labels {outside} are outside [0, {num_classes}): this model knows "
                    f"{num_classes} classes (--label)"
                )
            return np.asarray(labels, np.int32)
        count = len(prompts) if prompts is not None else len(labels or [])
        return np.zeros((count,), np.int32)

    def __call__(
        self, conditions: np.ndarray, seed: int, options: SamplingOptions = SamplingOptions()
    ) -> np.ndarray:
        """uint8 images (N, H, W, 3), N = len(conditions), in chunks of ``batch_size``."""
        fn = self._function(options)
        out = []
        key = jax.random.key(seed)
        with jax.set_mesh(self.mesh):
            for index, start in enumerate(range(0, len(conditions), self.batch_size)):
                chunk = conditions[start : start + self.batch_size]
                padded = _pad_to(chunk, self._padded_size(len(chunk)))
                images = fn(self.params, padded, jax.random.fold_in(key, index))
                out.append(sharding.to_host(images)[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0,), np.uint8)

    def _padded_size(self, n: int) -> int:
        shards = mesh_lib.data_parallel_size(self.mesh)
        return math.ceil(n / shards) * shards


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
    pad = size - len(array)
    if pad == 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], pad, axis=0)], axis=0)
