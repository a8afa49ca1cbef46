"""Generation: condition -> sample latents -> decode, with the sampling options of one setting.

``SamplingOptions`` come from one place, ``sampling_options``: the config's ``sample`` block
(where every default is written) with a caller's overrides (command-line flags, sweep
points). ``generate`` runs the whole reverse process as a ``lax.scan`` and the decoder, pure
and meant for ``jit``; a ``Generator`` jits it once per setting, sharded over the mesh's
batch axes, for training's preview grids, ``ldm-jax sample`` and ``ldm-jax evaluate``.

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

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from ldm_jax import diffusion
from ldm_jax.data import tokenizer as tokenizer_lib
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.pipeline.model import LatentDiffusion, pixels_from_uint8

MODES = ("txt2img", "img2img", "inpaint", "sr")
# The uint8 image inputs each mode needs: "image" (B, H, W, 3), "mask" (B, H, W, 1) in {0, 1}
# (1: regenerate), "low_res" (B, h, w, 3).
MODE_INPUTS = {
    "txt2img": (),
    "img2img": ("image",),
    "inpaint": ("image", "mask"),
    "sr": ("low_res",),
}
# The strength of a mode when none is given: diffusers' img2img default; inpainting
# regenerates the masked region from noise.
DEFAULT_STRENGTH = {"img2img": 0.8}


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """One sampling setting; made by ``sampling_options``, which holds no default of its own
    but those of the mode (the others are the config's ``sample`` block).

    Attributes:
      strength: img2img and inpaint: 1 starts from noise, 0 keeps the image.
      paste_back: inpaint: the input's own pixels where the mask is 0, as CompVis' inpainting
        script does (the decoder spreads every latent over the whole image; this keeps the
        rest exact).
    """

    sampler: str
    num_steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float
    timestep_spacing: str
    steps_offset: int
    set_alpha_to_one: bool
    mode: str
    strength: float
    paste_back: bool


# The options whose defaults are the config's `sample` keys of the same names.
CONFIG_OPTIONS = (
    "sampler",
    "num_steps",
    "guidance_scale",
    "guidance_rescale",
    "eta",
    "timestep_spacing",
    "steps_offset",
    "set_alpha_to_one",
)


def sampling_options(sample: ml_collections.ConfigDict, **overrides: Any) -> SamplingOptions:
    """The options of ``sample`` (a config's ``sample`` block) with the ``overrides`` that are
    not None (an unset flag is None); the mode defaults to "txt2img", ``strength`` to the
    mode's (``DEFAULT_STRENGTH``, else 1), ``paste_back`` to True.

    Raises:
      TypeError: for an override that is not an option.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    unknown = sorted(set(given) - {field.name for field in dataclasses.fields(SamplingOptions)})
    if unknown:
        raise TypeError(f"not sampling options: {unknown}")
    values = {key: sample[key] for key in CONFIG_OPTIONS}
    values.update(mode="txt2img", paste_back=True)
    values.update(given)
    values.setdefault("strength", DEFAULT_STRENGTH.get(values["mode"], 1.0))
    for key in ("guidance_scale", "guidance_rescale", "eta", "strength"):
        values[key] = float(values[key])
    return SamplingOptions(**values)


def generate(
    model: LatentDiffusion,
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
    latent_shape = model.output_latent_shape(images)
    z_T = jax.random.normal(noise_key, (batch, *latent_shape), jnp.float32)
    concat = model.concat_input(params, images, (batch, *latent_shape))
    z_start, start_step, step_hook = z_T, 0, None
    if options.mode in ("img2img", "inpaint"):
        init_latents = model.encode(params, pixels_from_uint8(images["image"]))
        start_step = diffusion.strength_start_step(options.num_steps, options.strength)
        timesteps = diffusion.sampler_timesteps(
            model.schedule.num_timesteps,
            options.sampler,
            options.num_steps,
            options.timestep_spacing,
            options.steps_offset,
        )
        z_start = diffusion.noised_start(model.schedule, init_latents, z_T, timesteps, start_step)
        if options.mode == "inpaint" and model.concat_conditioning != "inpaint":
            mask = diffusion.latent_mask(images["mask"].astype(jnp.float32), model.factor)
            step_hook = diffusion.replace_known(init_latents, mask)
    z_0 = diffusion.sample(
        model.denoiser(params, condition, options.guidance_scale, options.guidance_rescale, concat),
        model.schedule,
        z_start,
        sample_key,
        sampler=options.sampler,
        num_steps=options.num_steps,
        eta=options.eta,
        prediction_type=model.prediction_type,
        timestep_spacing=options.timestep_spacing,
        steps_offset=options.steps_offset,
        set_alpha_to_one=options.set_alpha_to_one,
        start_step=start_step,
        step_hook=step_hook,
    )
    decoded = model.decode(params, z_0)
    if options.mode == "inpaint" and options.paste_back:
        return jnp.where(images["mask"] > 0, decoded, images["image"].astype(jnp.uint8))
    return decoded


class Generator:
    """Draws images from a ``LatentDiffusion`` model on a mesh, from prompts or labels.

    Conditions are padded to a multiple of the mesh's batch shards and split over them, as a
    training batch is; the params stay where they are (sharded as the config's mesh and
    logical rules place them). One compiled function per ``SamplingOptions`` is kept.
    """

    def __init__(
        self,
        model: LatentDiffusion,
        params: Any,
        mesh: Mesh,
        sample_config: ml_collections.ConfigDict,
        *,
        tokenizer: Any = None,
        max_caption_length: int = 0,
        batch_size: int = 64,
    ):
        """
        Args:
          model: the model.
          params: its params ({"unet", "autoencoder", maybe "text_encoder"}) on ``mesh``.
          mesh: the mesh the samples are split over.
          sample_config: the config's ``sample`` block: the default sampling options.
          tokenizer: the tokenizer of a text-conditioned model.
          max_caption_length: the token length of its captions.
          batch_size: conditions per compiled call, rounded to the mesh's batch shards.
        """
        self.model, self.params, self.mesh = model, params, mesh
        self.sample_config = sample_config
        self.tokenizer, self.max_caption_length = tokenizer, max_caption_length
        shards = mesh_lib.data_parallel_size(mesh)
        self.batch_size = max(shards, batch_size // shards * shards)
        self._compiled: dict[SamplingOptions, Any] = {}

    def options(self, **overrides: Any) -> SamplingOptions:
        """The config's sampling options with ``overrides`` (None: the config's)."""
        return sampling_options(self.sample_config, **overrides)

    def _function(self, options: SamplingOptions):
        if options not in self._compiled:
            batch = sharding.batch_sharding(self.mesh)

            def generate_batch(params, conditions, key_data, images):
                key = jax.random.wrap_key_data(key_data)
                return generate(self.model, params, conditions, key, options, images)

            self._compiled[options] = jax.jit(
                generate_batch,
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
        options: SamplingOptions | None = None,
        images: dict[str, np.ndarray] | None = None,
        **overrides: Any,
    ) -> np.ndarray:
        """uint8 images (N, H, W, 3), N = len(conditions), in chunks of ``batch_size``.

        Args:
          conditions: from ``conditions``.
          seed: the sampling seed.
          options: the setting; None: the config's with ``overrides`` (``sampling_options``).
          images: the uint8 inputs of the mode (``MODE_INPUTS``), N of each.
        """
        images = images or {}
        options = options or self.options(**overrides)
        self.check_inputs(options, images)
        fn = self._function(options)
        out = []
        key = jax.random.key(seed)
        batch = sharding.batch_sharding(self.mesh)
        with jax.set_mesh(self.mesh):
            for index, start in enumerate(range(0, len(conditions), self.batch_size)):
                chunk = conditions[start : start + self.batch_size]
                size = self._padded_size(len(chunk))
                # Every process holds the same conditions: each places the rows of its devices.
                chunk_images = {
                    name: _global(_pad_to(value[start : start + self.batch_size], size), batch)
                    for name, value in images.items()
                }
                generated = fn(
                    self.params,
                    _global(_pad_to(chunk, size), batch),
                    _key_data(jax.random.fold_in(key, index)),
                    chunk_images,
                )
                out.append(sharding.to_host(generated)[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0,), np.uint8)

    def sample(
        self,
        seed: int,
        *,
        prompts: Sequence[str] | None = None,
        labels: Sequence[int] | None = None,
        num_per_prompt: int = 1,
        images: dict[str, np.ndarray] | None = None,
        **overrides: Any,
    ) -> np.ndarray:
        """``num_per_prompt`` images of each prompt or label (of an unconditional model,
        ``num_per_prompt`` images), in that order: what ``ldm-jax sample`` draws.

        Args:
          seed: the sampling seed.
          prompts: texts of a text-conditioned model.
          labels: classes of a class-conditional model.
          num_per_prompt: images of each.
          images: one uint8 input of each kind the mode needs (``MODE_INPUTS``), no batch
            axis: every image is drawn from it.
          **overrides: sampling options over the config's (``sampling_options``).

        Raises:
          ValueError: one line naming the flag: a mode the model cannot do, a missing input,
            missing or unknown conditions.
        """
        if num_per_prompt < 1:
            raise ValueError(f"--num_per_prompt={num_per_prompt} must be at least 1")
        options = self.options(**overrides)
        images = images or {}
        # The mode before the conditions: an sr model asked for txt2img hears about the mode.
        self.check_inputs(options, {key: image[None] for key, image in images.items()})
        if self.model.conditioning == "none":
            prompts = [""]
        prompts = [p for p in prompts or [] for _ in range(num_per_prompt)] or None
        labels = [n for n in labels or [] for _ in range(num_per_prompt)] or None
        conditions = self.conditions(prompts, labels)
        batch = {
            key: np.repeat(image[None], len(conditions), axis=0) for key, image in images.items()
        }
        return self(conditions, seed, options, batch)

    def generate_global(
        self, conditions: jax.Array, key: jax.Array, options: SamplingOptions
    ) -> jax.Array:
        """Images from conditions alone for one global batch laid out over the mesh's batch
        axes, each process having given its own rows (``pipeline.global_batch``): how
        evaluation splits its prompts over several processes.

        Returns:
          The global uint8 images (B, H, W, 3), sharded as ``conditions``.
        """
        with jax.set_mesh(self.mesh):
            return self._function(options)(self.params, conditions, _key_data(key), {})

    def _padded_size(self, n: int) -> int:
        shards = mesh_lib.data_parallel_size(self.mesh)
        return math.ceil(n / shards) * shards


def _global(array: np.ndarray, batch_sharding) -> jax.Array:
    """A host array that every process holds whole, as a global array split over the batch
    axes (each process gives its devices their rows)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, batch_sharding, lambda index: array[index])


def _key_data(key: jax.Array) -> np.ndarray:
    """A key's raw data on the host: a replicated input every process can give alike."""
    return np.asarray(jax.random.key_data(key))


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
    pad = size - len(array)
    if pad == 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], pad, axis=0)], axis=0)
