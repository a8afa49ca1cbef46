"""The configuration schema, its one ``validate``, and JSON round trips.

Every run is described by one ``ml_collections.ConfigDict``. ``base_config()`` holds every key
with its default; ``configs/NAME.py`` changes what it needs. ``validate`` runs once at start-up
and names the bad key and the allowed values, so a mistake never surfaces inside jax.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from ldm_jax.data.shapes import NUM_CLASSES
from ldm_jax.diffusion import (
    PREDICTION_TYPES,
    SAMPLERS,
    SCHEDULE_KINDS,
    TIMESTEP_SPACINGS,
)
from ldm_jax.image_conditioning import CONCAT_CONDITIONINGS
from ldm_jax.models import DISCRIMINATOR_NORMS
from ldm_jax.models.unet import ATTENTION_TYPES as UNET_ATTENTION_TYPES
from ldm_jax.models.unet import REMAT_POLICIES
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.train.gan import DISCRIMINATOR_LOSSES

STAGES = ("both", "autoencoder", "diffusion")
SOURCES = ("shapes", "image_folder", "tfds")
CONDITIONINGS = ("text", "class", "none")
TEXT_ENCODER_KINDS = ("scratch", "clip")
DTYPES = ("float32", "bfloat16")
AUTOENCODER_KINDS = ("kl", "vq")
PIXEL_LOSSES = ("l1", "l2")


class ConfigError(ValueError):
    """A config value a user has to change; the message names the key and what is allowed."""


def _optimizer(steps: int, batch_size: int, learning_rate: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=100,
            end_learning_rate_fraction=0.1,
            weight_decay=0.01,
            b1=0.9,
            b2=0.999,
            grad_clip=1.0,
            ema_decay=0.999,
            # Microbatches per step: gradients of batch_size / grad_accum_steps examples are
            # summed in one jitted step (a lax.scan), so activations scale with the microbatch.
            grad_accum_steps=1,
        )
    )


def base_config() -> ml_collections.ConfigDict:
    """Every key of the schema with its default value."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.stage = "both"
    config.dtype = "float32"  # compute dtype; params stay float32

    # Sizes inside one slice (-1 fills it); dcn_* multiply them across the slices of a
    # multislice job (data parallel over the slices by default).
    config.mesh = ml_collections.ConfigDict(
        dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    )
    config.mesh.axis_rules = mesh_lib.DEFAULT_AXIS_RULES

    config.data = ml_collections.ConfigDict(
        dict(
            source="shapes",
            image_size=32,
            path="",
            tfds_name="",
            tfds_data_dir="",
            train_split="train",
            eval_split="validation",
            num_train_examples=50_000,
            random_crop=False,
            random_flip=False,
            worker_count=0,
            max_caption_length=12,
            num_classes=0,  # class-conditional runs on real data set this; shapes knows its own
            # A directory written by `ldm-jax cache-latents`: stage 2 reads its latents
            # instead of encoding images (stage 1 must be the autoencoder that wrote it).
            latent_cache="",
        )
    )

    config.autoencoder = ml_collections.ConfigDict(
        dict(
            # "kl": a Gaussian posterior with a KL penalty; "vq": a vector-quantised latent.
            kind="kl",
            model=dict(
                block_out_channels=(64, 128, 128),
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=32,
                mid_block_attention=True,
                # One flag per level: self-attention after every resnet of that level (the
                # CompVis attn_resolutions); empty: none.
                attention_levels=(),
                # VQ only: codebook size, commitment weight beta, EMA codebook updates, and
                # the EMA usage under which a code is restarted from an encoder output.
                num_embeddings=512,
                commitment_beta=0.25,
                codebook_ema=False,
                codebook_ema_decay=0.99,
                dead_code_threshold=0.0,
            ),
            train=_optimizer(steps=2000, batch_size=32, learning_rate=1e-3).to_dict(),
            kl_weight=1e-6,
            loss=dict(
                pixel="l1",
                # LPIPS (VGG16) weights: one safetensors file made by
                # `python -m ldm_jax.interop.lpips_weights`; empty: no perceptual term.
                lpips_weights="",
                perceptual_weight=1.0,
                # Divide the reconstruction loss by a learned variance exp(logvar).
                learn_logvar=True,
                codebook_weight=1.0,
                # Patch-GAN: off when disc_weight is 0; on from step disc_start.
                disc_weight=0.0,
                disc_start=0,
                disc_loss="hinge",
                disc_num_layers=3,
                disc_channels=64,
                disc_norm="batch",
                # The discriminator's Adam: learning rate (0: the autoencoder's) and betas.
                disc_learning_rate=0.0,
                disc_b1=0.5,
                disc_b2=0.9,
            ),
            # The workdir where stage 2 finds the trained autoencoder; empty: this run's.
            workdir="",
            # A diffusers AutoencoderKL directory (config.json + safetensors) to use instead of
            # training stage 1; relative paths are inside the workdir (`ldm-jax import`).
            pretrained="",
            latent_scale_batches=8,
        )
    )

    config.diffusion = ml_collections.ConfigDict(
        dict(
            conditioning="text",
            cond_drop_prob=0.1,
            # Images concatenated to the U-Net input: "", "inpaint", "sr" (image_conditioning.py).
            concat_conditioning="",
            super_resolution_factor=4,
            # Encode the training set once at the start of stage 2 and keep the posterior
            # means and stds in host memory (8 bytes per latent value per image), instead of
            # running the encoder at every step. For datasets that fit in memory.
            encode_once=False,
            schedule="scaled_linear",
            num_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="epsilon",
            min_snr_gamma=0.0,
            unet=dict(
                block_out_channels=(64, 128),
                layers_per_block=2,
                attention_levels=(True, True),
                mid_block_attention=True,
                num_attention_heads=4,
                transformer_depth=1,
                # One transformer depth per level (SDXL: 0/1, 2, 10) when set; the mid block
                # takes the last. Empty: transformer_depth at every level.
                transformer_depth_per_level=(),
                norm_num_groups=32,
                dropout=0.0,
                # Activation memory: "none", "full" or "save_dots" (models/unet.py's
                # REMAT_POLICIES) rematerialisation of the resnets and spatial transformers.
                remat="none",
                # Heads per level from a fixed head width (64 in Stable Diffusion 2) when
                # positive; else num_attention_heads at every level.
                attention_head_dim=0,
                # "transformer": spatial transformers (self- and cross-attention); "plain":
                # group-normed self-attention, no context (CompVis' unconditional LDMs).
                attention_type="transformer",
                # Class conditioning: 0 adds the label's embedding to the timestep embedding;
                # a width makes the label the one cross-attention token of that width
                # (CompVis' ClassEmbedder, the class-conditional ImageNet LDM).
                class_context_dim=0,
                use_linear_projection=False,
                flip_sin_to_cos=True,
                freq_shift=0,
                # A diffusers UNet2DConditionModel directory whose weights start stage 2 when
                # the workdir has no stage-2 checkpoint (fine-tuning); relative: in the workdir.
                pretrained="",
            ),
            # kind "scratch": a small transformer trained with the U-Net (width, num_layers,
            # num_heads); kind "clip": a frozen pretrained CLIP text model read from the
            # transformers directory `pretrained` (its width must be `width`), tokenizer files
            # from `tokenizer` (default: the same directory).
            text_encoder=dict(
                kind="scratch",
                width=128,
                num_layers=2,
                num_heads=4,
                pretrained="",
                tokenizer="",
                skip_last_layers=0,
            ),
            train=_optimizer(steps=5000, batch_size=64, learning_rate=5e-4).to_dict(),
        )
    )

    config.sample = ml_collections.ConfigDict(
        dict(
            sampler="ddim",
            num_steps=50,
            guidance_scale=4.0,
            # Lin et al. 2023's phi: rescale the guided output's std to the conditional one's.
            guidance_rescale=0.0,
            eta=0.0,
            timestep_spacing="leading",
            # Timesteps visited are shifted by this (Stable Diffusion: 1).
            steps_offset=1,
            # DDIM's last step goes to alpha_bar = 1 (True) or to alpha_bar_0 (False, as
            # Stable Diffusion's scheduler config).
            set_alpha_to_one=True,
            num=16,
        )
    )

    config.train = ml_collections.ConfigDict(
        dict(
            log_every=50,
            checkpoint_every=500,
            max_to_keep=3,
            sample_every=1000,
            async_checkpointing=True,
            # A step with a non-finite loss or gradient: "halt" the run (naming the step and
            # the last good checkpoint) or "skip" its update and count it; at most
            # max_nonfinite_skips skipped steps before halting anyway.
            nonfinite="halt",
            max_nonfinite_skips=100,
            # Free space the workdir must have before training starts, in GiB, on top of
            # what max_to_keep checkpoints of the state need.
            min_free_gib=1.0,
        )
    )
    return config


def autoencoder_factor(config: ml_collections.ConfigDict) -> int:
    """Spatial downsampling factor f of the autoencoder."""
    return 2 ** (len(config.autoencoder.model.block_out_channels) - 1)


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    size = config.data.image_size // autoencoder_factor(config)
    return size, size, config.autoencoder.model.latent_channels


def mesh_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The ``config.mesh`` sizes, as ``mesh.create_mesh`` and ``mesh.mesh_shape`` take them."""
    keys = ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor")
    return {key: config.mesh[key] for key in keys}


def _check_choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"config.{key}={value!r} is not allowed; choose one of {tuple(allowed)}")


def _check_positive(key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config.{key}={value!r} must be a positive number")


def _check_groups(key: str, channels, groups: int) -> None:
    for c in channels:
        if c % groups:
            raise ConfigError(
                f"config.{key}.norm_num_groups={groups} must divide every entry of "
                f"config.{key}.block_out_channels={tuple(channels)}"
            )


def _check_first_stage_loss(loss: ml_collections.ConfigDict, check_files: bool) -> None:
    _check_choice("autoencoder.loss.pixel", loss.pixel, PIXEL_LOSSES)
    _check_choice("autoencoder.loss.disc_loss", loss.disc_loss, tuple(DISCRIMINATOR_LOSSES))
    _check_choice("autoencoder.loss.disc_norm", loss.disc_norm, DISCRIMINATOR_NORMS)
    if check_files and loss.lpips_weights and not os.path.isfile(loss.lpips_weights):
        raise ConfigError(
            f"config.autoencoder.loss.lpips_weights={loss.lpips_weights!r} is not a file; make "
            "it with `python -m ldm_jax.interop.lpips_weights --vgg=... --heads=... --out=...` "
            "or leave it empty to train without the perceptual loss"
        )
    for key in ("disc_weight", "disc_start", "perceptual_weight", "codebook_weight"):
        if loss[key] < 0:
            raise ConfigError(f"config.autoencoder.loss.{key}={loss[key]} must be >= 0")


def validate(config: ml_collections.ConfigDict, num_devices: int, check_files: bool = True) -> None:
    """Checks every value a run depends on; raises ConfigError naming the key and the fix.

    ``check_files=False`` leaves out the data, weight and cache paths, for a run that needs
    only the shapes (``ldm-jax compile``).
    """
    _check_choice("stage", config.stage, STAGES)
    _check_choice("dtype", config.dtype, DTYPES)
    data = config.data
    _check_choice("data.source", data.source, SOURCES)
    _check_positive("data.image_size", data.image_size)
    if data.source == "image_folder" and check_files:
        if not data.path:
            raise ConfigError(
                "config.data.source='image_folder' needs a folder: set --config.data.path"
            )
        if not os.path.isdir(data.path):
            raise ConfigError(
                f"config.data.path={data.path!r} is not a directory; "
                "set --config.data.path to a folder of images"
            )
    if data.source == "tfds" and not data.tfds_name:
        raise ConfigError(
            "config.data.source='tfds' needs a dataset: set --config.data.tfds_name "
            "(and --config.data.tfds_data_dir)"
        )
    if (
        check_files
        and data.latent_cache
        and not os.path.isfile(os.path.join(data.latent_cache, "metadata.json"))
    ):
        raise ConfigError(
            f"config.data.latent_cache={data.latent_cache!r} holds no metadata.json: write the "
            "cache with `ldm-jax cache-latents --workdir=STAGE1_DIR --out=DIR` or unset "
            "--config.data.latent_cache"
        )
    if data.worker_count < 0:
        raise ConfigError(f"config.data.worker_count={data.worker_count} must be >= 0")

    ae = config.autoencoder
    _check_choice("autoencoder.kind", ae.kind, AUTOENCODER_KINDS)
    _check_groups("autoencoder.model", ae.model.block_out_channels, ae.model.norm_num_groups)
    levels = ae.model.attention_levels
    if levels and len(levels) != len(ae.model.block_out_channels):
        raise ConfigError(
            f"config.autoencoder.model.attention_levels={tuple(levels)} needs one entry per "
            f"entry of config.autoencoder.model.block_out_channels (or none at all)"
        )
    if ae.kind == "vq":
        _check_positive("autoencoder.model.num_embeddings", ae.model.num_embeddings)
    _check_first_stage_loss(ae.loss, check_files)
    factor = autoencoder_factor(config)
    if data.image_size % factor:
        raise ConfigError(
            f"config.data.image_size={data.image_size} is not divisible by the autoencoder factor "
            f"f={factor} (2**(len(config.autoencoder.model.block_out_channels)-1)); choose an "
            f"image size that is a multiple of {factor}"
        )

    dm = config.diffusion
    _check_choice("diffusion.conditioning", dm.conditioning, CONDITIONINGS)
    _check_choice("diffusion.schedule", dm.schedule, SCHEDULE_KINDS)
    _check_choice("diffusion.prediction_type", dm.prediction_type, PREDICTION_TYPES)
    if not 0.0 <= dm.cond_drop_prob < 1.0:
        raise ConfigError(f"config.diffusion.cond_drop_prob={dm.cond_drop_prob} must be in [0, 1)")
    _check_choice("diffusion.concat_conditioning", dm.concat_conditioning, CONCAT_CONDITIONINGS)
    if dm.concat_conditioning and (dm.encode_once or data.latent_cache):
        raise ConfigError(
            f"config.diffusion.concat_conditioning={dm.concat_conditioning!r} encodes the images "
            "of every step: set --config.diffusion.encode_once=False and no data.latent_cache"
        )
    if dm.concat_conditioning == "sr" and data.image_size % dm.super_resolution_factor:
        raise ConfigError(
            f"config.data.image_size={data.image_size} is not divisible by "
            f"config.diffusion.super_resolution_factor={dm.super_resolution_factor}"
        )
    if dm.conditioning == "class" and data.source != "shapes" and data.num_classes <= 0:
        raise ConfigError(
            "config.diffusion.conditioning='class' needs the number of classes: "
            "set --config.data.num_classes"
        )
    _check_choice("diffusion.text_encoder.kind", dm.text_encoder.kind, TEXT_ENCODER_KINDS)
    if check_files and dm.text_encoder.kind == "clip" and not dm.text_encoder.pretrained:
        raise ConfigError(
            "config.diffusion.text_encoder.kind='clip' needs its weights: set "
            "--config.diffusion.text_encoder.pretrained to a transformers CLIP text model "
            "directory (or make the workdir with `ldm-jax import`)"
        )
    _check_groups("diffusion.unet", dm.unet.block_out_channels, dm.unet.norm_num_groups)
    _check_choice("diffusion.unet.attention_type", dm.unet.attention_type, UNET_ATTENTION_TYPES)
    _check_choice("diffusion.unet.remat", dm.unet.remat, tuple(REMAT_POLICIES))
    if dm.unet.class_context_dim < 0:
        raise ConfigError(
            f"config.diffusion.unet.class_context_dim={dm.unet.class_context_dim} must be >= 0"
        )
    if dm.unet.attention_type == "plain":
        if dm.conditioning == "text" or dm.unet.class_context_dim:
            raise ConfigError(
                "config.diffusion.unet.attention_type='plain' has no cross-attention, so it "
                "cannot take text or a class token: use attention_type='transformer', or "
                "conditioning='class' with class_context_dim=0, or conditioning='none'"
            )
    if dm.unet.attention_head_dim > 0:
        for channels in dm.unet.block_out_channels:
            if channels % dm.unet.attention_head_dim:
                raise ConfigError(
                    f"config.diffusion.unet.attention_head_dim={dm.unet.attention_head_dim} "
                    f"must divide every entry of config.diffusion.unet.block_out_channels="
                    f"{tuple(dm.unet.block_out_channels)}"
                )
    depths = dm.unet.transformer_depth_per_level
    if depths and len(depths) != len(dm.unet.block_out_channels):
        raise ConfigError(
            f"config.diffusion.unet.transformer_depth_per_level={tuple(depths)} needs one entry "
            "per entry of config.diffusion.unet.block_out_channels (or none at all)"
        )
    if len(dm.unet.attention_levels) != len(dm.unet.block_out_channels):
        raise ConfigError(
            "config.diffusion.unet.attention_levels needs one entry per entry of "
            "config.diffusion.unet.block_out_channels"
        )
    latent_size = data.image_size // factor
    unet_factor = 2 ** (len(dm.unet.block_out_channels) - 1)
    if latent_size % unet_factor:
        raise ConfigError(
            f"latents of size {latent_size} cannot be halved {len(dm.unet.block_out_channels) - 1} "
            "times by the U-Net: use fewer config.diffusion.unet.block_out_channels or a larger "
            "config.data.image_size"
        )

    _check_choice("sample.sampler", config.sample.sampler, SAMPLERS)
    _check_choice("sample.timestep_spacing", config.sample.timestep_spacing, TIMESTEP_SPACINGS)
    if not 0.0 <= (rescale := config.sample.guidance_rescale) <= 1.0:
        raise ConfigError(f"config.sample.guidance_rescale={rescale} must be in [0, 1]")
    if not 1 <= config.sample.num_steps <= dm.num_timesteps:
        raise ConfigError(
            f"config.sample.num_steps={config.sample.num_steps} must be in "
            f"[1, config.diffusion.num_timesteps={dm.num_timesteps}]"
        )

    try:
        shape = mesh_lib.mesh_shape(**mesh_sizes(config), num_devices=num_devices)
        mesh_lib.axis_rules_from_config(config.mesh.axis_rules)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    shards = shape[0] * shape[1]
    for stage in ("autoencoder", "diffusion"):
        train = config[stage].train
        for key in ("steps", "batch_size", "learning_rate", "grad_accum_steps"):
            _check_positive(f"{stage}.train.{key}", train[key])
        try:
            mesh_lib.check_batch_size(
                f"config.{stage}.train", train.batch_size, train.grad_accum_steps, shards
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if stage == "autoencoder" and train.grad_accum_steps != 1:
            raise ConfigError(
                "config.autoencoder.train.grad_accum_steps must be 1: stage 1 does not "
                "accumulate gradients (its GAN weight and discriminator see the whole batch)"
            )
        if not 0.0 <= train.ema_decay < 1.0:
            raise ConfigError(f"config.{stage}.train.ema_decay={train.ema_decay} must be in [0, 1)")
    for key in ("log_every", "checkpoint_every", "max_to_keep"):
        _check_positive(f"train.{key}", config.train[key])


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def _tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of ``to_json``; lists come back as tuples, as the config files write them."""
    merged = base_config()
    merged.update(_tuples(json.loads(text)))
    return merged


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: --workdir must be a directory written by "
            "`ldm-jax train` (or `ldm-jax import`)"
        )
    with open(path, encoding="utf-8") as f:
        return from_json(f.read())


def num_classes(config: ml_collections.ConfigDict) -> int:
    """Number of class labels: `config.data.num_classes` when set (an imported model's),
    else the dataset's (the shapes dataset knows its own)."""
    if config.data.num_classes > 0 or config.data.source != "shapes":
        return config.data.num_classes
    return NUM_CLASSES
