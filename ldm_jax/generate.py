"""The generation pipeline: condition -> sample latents -> decode.

One jitted function per sampling setting runs the whole reverse process as a ``lax.scan``
and the decoder, sharded over the mesh's batch axes. It is used by training's sample grids,
``ldm-jax sample`` and ``ldm-jax evaluate``.

Modes (``SamplingOptions.mode``): "txt2img" from noise; "img2img" from an image noised to
the ``strength``; "inpaint" regenerates the masked region of an image, by concatenated
conditioning on a model trained for it, else by replacing the known region after every
step; "sr" upsamples a low-resolution image on a model trained for it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ldm_jax import diffusion, image_conditioning
from ldm_jax.data import tokenizer as tokenizer_lib
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding


def pixels_from_uint8(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def pixels_to_uint8(images: jax.Array) -> jax.Array:
    """float [-1, 1] -> uint8 [0, 255], rounding and clipping."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


MODES = ("txt2img", "img2img", "inpaint", "sr")
# The uint8 image inputs each mode needs: "image" (B, H, W, 3), "mask" (B, H, W, 1) in {0, 1}
# (1: regenerate), "low_res" (B, h, w, 3).
MODE_INPUTS = {
    "txt2img": (),
    "img2img": ("image",),
    "inpaint": ("image", "mask"),
    "sr": ("low_res",),
}


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    sampler: str = "ddim"
    num_steps: int = 50
    guidance_scale: float = 4.0
    guidance_rescale: float = 0.0
    eta: float = 0.0
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = True
    mode: str = "txt2img"
    strength: float = 1.0  # img2img and inpaint: 1 starts from noise, 0 keeps the image
    # inpaint: the input's own pixels where the mask is 0, as CompVis' inpainting script does
    # (the decoder spreads every latent over the whole image; this keeps the rest exact).
    paste_back: bool = True


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
        ``image_conditioning.CONCAT_CONDITIONINGS``.
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
            if key in image_conditioning.IMAGE_KEYS
        }
        return image_conditioning.concat_condition(
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

    def generate(
        self,
        params: Any,
        condition: jax.Array,
        key: jax.Array,
        options: SamplingOptions,
        images: dict[str, jax.Array] | None = None,
    ) -> jax.Array:
        """Images (B, H, W, 3) uint8 for a batch of conditions; pure, meant for ``jit``.

        ``images`` holds the uint8 inputs of ``options.mode`` (``MODE_INPUTS``).
        """
        images = images or {}
        noise_key, sample_key = jax.random.split(key)
        batch = condition.shape[0]
        latent_shape = self.output_latent_shape(images)
        z_T = jax.random.normal(noise_key, (batch, *latent_shape), jnp.float32)
        concat = self.concat_input(params, images, (batch, *latent_shape))
        z_start, start_step, step_hook = z_T, 0, None
        if options.mode in ("img2img", "inpaint"):
            init_latents = self.encode(params, pixels_from_uint8(images["image"]))
            start_step = diffusion.strength_start_step(options.num_steps, options.strength)
            timesteps = diffusion.sampler_timesteps(
                self.schedule.num_timesteps,
                options.sampler,
                options.num_steps,
                options.timestep_spacing,
                options.steps_offset,
            )
            z_start = diffusion.noised_start(
                self.schedule, init_latents, z_T, timesteps, start_step
            )
            if options.mode == "inpaint" and self.concat_conditioning != "inpaint":
                mask = diffusion.latent_mask(images["mask"].astype(jnp.float32), self.factor)
                step_hook = diffusion.replace_known(init_latents, mask)
        z_0 = diffusion.sample(
            self.denoiser(
                params, condition, options.guidance_scale, options.guidance_rescale, concat
            ),
            self.schedule,
            z_start,
            sample_key,
            sampler=options.sampler,
            num_steps=options.num_steps,
            eta=options.eta,
            prediction_type=self.prediction_type,
            timestep_spacing=options.timestep_spacing,
            steps_offset=options.steps_offset,
            set_alpha_to_one=options.set_alpha_to_one,
            start_step=start_step,
            step_hook=step_hook,
        )
        decoded = pixels_to_uint8(
            self.autoencoder.apply(
                {"params": params["autoencoder"]}, z_0 / self.latent_scale, method="decode"
            )
        )
        if options.mode == "inpaint" and options.paste_back:
            return jnp.where(images["mask"] > 0, decoded, images["image"].astype(jnp.uint8))
        return decoded


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

            def generate(params, conditions, key, images):
                return self.model.generate(params, conditions, key, options, images)

            self._compiled[options] = jax.jit(
                generate,
                in_shardings=(None, batch, sharding.replicated(self.mesh), batch),
                out_shardings=batch,
            )
        return self._compiled[options]

    def check_inputs(self, options: SamplingOptions, images: dict[str, np.ndarray]) -> None:
        """Raises a one-line ValueError, naming the flag, if the model cannot do ``options.mode``
        with ``images``."""
        model = self.model
        if options.mode not in MODES:
            raise ValueError(f"--mode={options.mode!r} is not one of {MODES}")
        if (options.mode == "sr") != (model.concat_conditioning == "sr"):
            raise ValueError(
                "--mode=sr needs a model trained for super-resolution "
                "(config.diffusion.concat_conditioning='sr')"
                if options.mode == "sr"
                else f"this is a super-resolution model: use --mode=sr, not --mode={options.mode}"
            )
        if not 0.0 <= options.strength <= 1.0:
            raise ValueError(f"--strength={options.strength} must be in [0, 1]")
        flags = {"image": "--init_image", "mask": "--mask", "low_res": "--init_image (low-res)"}
        missing = [flags[key] for key in MODE_INPUTS[options.mode] if key not in images]
        if missing:
            raise ValueError(f"--mode={options.mode} needs {' and '.join(missing)}")
        multiple = model.factor * 2 ** (len(model.unet.block_out_channels) - 1)
        for key, value in images.items():
            height, width = value.shape[1:3]
            scale = model.super_resolution_factor if key == "low_res" else 1
            if (height * scale) % multiple or (width * scale) % multiple:
                raise ValueError(
                    f"the {key} of {height}x{width} pixels gives a {height * scale}x"
                    f"{width * scale} output, not a multiple of {multiple} pixels (the "
                    "autoencoder's and the U-Net's downsampling): resize --init_image"
                )
        if "mask" in images and images["mask"].shape[1:3] != images["image"].shape[1:3]:
            (mask_h, mask_w), (image_h, image_w) = (images[k].shape[1:3] for k in ("mask", "image"))
            raise ValueError(
                f"--mask is {mask_w}x{mask_h} pixels but --init_image {image_w}x{image_h}: "
                "they must be the same size"
            )

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
        self,
        conditions: np.ndarray,
        seed: int,
        options: SamplingOptions = SamplingOptions(),
        images: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """uint8 images (N, H, W, 3), N = len(conditions), in chunks of ``batch_size``.

        ``images``: the uint8 inputs of ``options.mode`` (``MODE_INPUTS``), N of each.
        """
        images = images or {}
        self.check_inputs(options, images)
        fn = self._function(options)
        out = []
        key = jax.random.key(seed)
        with jax.set_mesh(self.mesh):
            for index, start in enumerate(range(0, len(conditions), self.batch_size)):
                chunk = conditions[start : start + self.batch_size]
                size = self._padded_size(len(chunk))
                chunk_images = {
                    name: _pad_to(value[start : start + self.batch_size], size)
                    for name, value in images.items()
                }
                generated = fn(
                    self.params, _pad_to(chunk, size), jax.random.fold_in(key, index), chunk_images
                )
                out.append(sharding.to_host(generated)[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0,), np.uint8)

    def generate_global(
        self, conditions: jax.Array, key: jax.Array, options: SamplingOptions = SamplingOptions()
    ) -> jax.Array:
        """Images from conditions alone for one global batch laid out over the mesh's batch
        axes, each process having given its own rows (``pipeline.global_batch``): how
        evaluation splits its prompts over several processes.

        Returns:
          The global uint8 images (B, H, W, 3), sharded as ``conditions``.
        """
        with jax.set_mesh(self.mesh):
            return self._function(options)(self.params, conditions, key, {})

    def _padded_size(self, n: int) -> int:
        shards = mesh_lib.data_parallel_size(self.mesh)
        return math.ceil(n / shards) * shards


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
    pad = size - len(array)
    if pad == 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], pad, axis=0)], axis=0)
