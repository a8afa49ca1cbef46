"""The one ``validate``: every config value a run depends on, checked once at start-up.

A mistake is one ``ConfigError`` line that names the full key
(``config.diffusion.train.batch_size``) and what is allowed, so it never surfaces as a
traceback from inside jax or flax. Each key's type and range are checked first, then the
relations between keys (a batch that splits over the mesh, groups that divide the channels,
an image the autoencoder and the U-Net can halve), then the files a run reads.
"""

from __future__ import annotations

import re

import ml_collections

from ldm_jax import storage
from ldm_jax.config.schema import (
    AUTOENCODER_KINDS,
    CONDITIONINGS,
    DISCRIMINATOR_LOSSES,
    DTYPES,
    FINETUNE_METHODS,
    NONFINITE_POLICIES,
    PIXEL_LOSSES,
    SOURCES,
    STAGES,
    TEXT_ENCODER_KINDS,
    autoencoder_factor,
    mesh_sizes,
)
from ldm_jax.config.values import (
    MAX_COUNT,
    MAX_DEPTH,
    MAX_IMAGE_SIZE,
    MAX_TIMESTEPS,
    MAX_WIDTH,
    ConfigError,
    boolean,
    choice,
    integer,
    integers,
    is_integer,
    level_flags,
    lookup,
    number,
    positive,
    sequence,
    shown,
    text,
)
from ldm_jax.diffusion import (
    CONCAT_CONDITIONINGS,
    PREDICTION_TYPES,
    SAMPLERS,
    SCHEDULE_KINDS,
    TIMESTEP_SPACINGS,
    sampler_timesteps,
)
from ldm_jax.models import DISCRIMINATOR_NORMS
from ldm_jax.models.unet import ATTENTION_TYPES as UNET_ATTENTION_TYPES
from ldm_jax.models.unet import REMAT_POLICIES
from ldm_jax.parallel import mesh as mesh_lib

OPTIMIZER_STAGES = ("autoencoder", "diffusion", "finetune")


def _check_mesh(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """Checks ``config.mesh``; returns the number of batch shards (data x fsdp)."""
    for key in ("data", "fsdp", "tensor"):
        value = lookup(config, f"mesh.{key}")
        if not is_integer(value) or not (value == -1 or 1 <= value <= MAX_COUNT):
            raise ConfigError(
                f"config.mesh.{key}={shown(value)} must be a positive integer or -1 (fill)"
            )
    for key in ("dcn_data", "dcn_fsdp", "dcn_tensor"):
        integer(config, f"mesh.{key}", 1)
    rules = lookup(config, "mesh.axis_rules")
    names_ok = lambda axes: (
        axes is None
        or isinstance(axes, str)
        or (isinstance(axes, (tuple, list)) and all(isinstance(a, str) for a in axes))
    )
    if not isinstance(rules, (tuple, list)) or not all(
        isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) and names_ok(r[1])
        for r in rules
    ):
        raise ConfigError(
            f"config.mesh.axis_rules={shown(rules)} must be a tuple of (logical name, mesh axes) "
            f"pairs, the mesh axes None, one of {mesh_lib.MESH_AXES} or a tuple of them"
        )
    try:
        mesh_lib.axis_rules_from_config(rules)
    except ValueError as e:
        raise ConfigError(f"config.mesh.axis_rules: {e}") from None
    sizes = mesh_sizes(config)
    try:
        shape = mesh_lib.mesh_shape(**sizes, num_devices=num_devices)
    except ValueError as e:
        named = ", ".join(f"config.mesh.{k}={v}" for k, v in sizes.items())
        raise ConfigError(f"{named} on {num_devices} devices: {e}") from None
    return shape[0] * shape[1]


def _check_data(config: ml_collections.ConfigDict) -> None:
    choice(config, "data.source", SOURCES)
    integer(config, "data.image_size", 1, MAX_IMAGE_SIZE)
    for key in ("path", "tfds_name", "tfds_data_dir", "eval_split", "latent_cache"):
        text(config, f"data.{key}")
    if not text(config, "data.train_split"):
        raise ConfigError("config.data.train_split='' must name the split to train on")
    integer(config, "data.num_train_examples", 1)
    boolean(config, "data.random_crop")
    boolean(config, "data.random_flip")
    integer(config, "data.worker_count", 0, 1024)
    integer(config, "data.device_prefetch", 0, 16)
    integer(config, "data.max_caption_length", 1, 4096)
    integer(config, "data.num_classes", 0)
    if config.data.source == "tfds" and not config.data.tfds_name:
        raise ConfigError(
            "config.data.source='tfds' needs a dataset: set --config.data.tfds_name "
            "(and --config.data.tfds_data_dir)"
        )


def _check_optimizer(config: ml_collections.ConfigDict, stage: str, shards: int) -> None:
    """``config.<stage>.train``: the step count, batch, AdamW and EMA of a stage."""
    key = f"{stage}.train"
    integer(config, f"{key}.steps", 1)
    batch_size = integer(config, f"{key}.batch_size", 1)
    positive(config, f"{key}.learning_rate")
    integer(config, f"{key}.warmup_steps", 0)
    number(config, f"{key}.end_learning_rate_fraction", 0.0, 1.0)
    number(config, f"{key}.weight_decay", 0.0)
    number(config, f"{key}.b1", 0.0, 1.0, high_open=True)
    number(config, f"{key}.b2", 0.0, 1.0, high_open=True)
    positive(config, f"{key}.grad_clip")
    number(config, f"{key}.ema_decay", 0.0, 1.0, high_open=True)
    accumulation = integer(config, f"{key}.grad_accum_steps", 1)
    boolean(config, f"{key}.parallel_microbatches")
    if stage == "autoencoder" and accumulation != 1:
        raise ConfigError(
            "config.autoencoder.train.grad_accum_steps must be 1: stage 1 does not "
            "accumulate gradients (its GAN weight and discriminator see the whole batch)"
        )
    try:
        mesh_lib.check_batch_size(f"config.{key}", batch_size, accumulation, shards)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_groups(key: str, channels: tuple, groups: int) -> None:
    if any(c % groups for c in channels):
        raise ConfigError(
            f"config.{key}.norm_num_groups={groups} must divide every entry of "
            f"config.{key}.block_out_channels={channels}"
        )


def _check_autoencoder(config: ml_collections.ConfigDict) -> None:
    choice(config, "autoencoder.kind", AUTOENCODER_KINDS)
    key = "autoencoder.model"
    channels = integers(config, f"{key}.block_out_channels", 1, MAX_WIDTH)
    integer(config, f"{key}.layers_per_block", 1, MAX_DEPTH)
    integer(config, f"{key}.latent_channels", 1, MAX_WIDTH)
    _check_groups(key, channels, integer(config, f"{key}.norm_num_groups", 1, MAX_WIDTH))
    boolean(config, f"{key}.mid_block_attention")
    level_flags(
        config, f"{key}.attention_levels", f"{key}.block_out_channels", channels, optional=True
    )
    integer(config, f"{key}.num_embeddings", 1)
    number(config, f"{key}.commitment_beta", 0.0)
    boolean(config, f"{key}.codebook_ema")
    number(config, f"{key}.codebook_ema_decay", 0.0, 1.0, high_open=True)
    number(config, f"{key}.dead_code_threshold", 0.0)
    number(config, "autoencoder.kl_weight", 0.0)
    for name in ("workdir", "pretrained"):
        text(config, f"autoencoder.{name}")
    integer(config, "autoencoder.latent_scale_batches", 1)

    loss = "autoencoder.loss"
    choice(config, f"{loss}.pixel", PIXEL_LOSSES)
    text(config, f"{loss}.lpips_weights")
    for name in ("perceptual_weight", "codebook_weight", "disc_weight", "disc_learning_rate"):
        number(config, f"{loss}.{name}", 0.0)
    boolean(config, f"{loss}.learn_logvar")
    integer(config, f"{loss}.disc_start", 0)
    choice(config, f"{loss}.disc_loss", DISCRIMINATOR_LOSSES)
    layers = integer(config, f"{loss}.disc_num_layers", 1, MAX_DEPTH)
    integer(config, f"{loss}.disc_channels", 1, MAX_WIDTH)
    choice(config, f"{loss}.disc_norm", DISCRIMINATOR_NORMS)
    number(config, f"{loss}.disc_b1", 0.0, 1.0, high_open=True)
    number(config, f"{loss}.disc_b2", 0.0, 1.0, high_open=True)

    image_size = config.data.image_size
    factor = autoencoder_factor(config)
    if image_size % factor:
        raise ConfigError(
            f"config.data.image_size={image_size} is not divisible by the autoencoder factor "
            f"f={factor} (2**(len(config.autoencoder.model.block_out_channels)-1)); choose an "
            f"image size that is a multiple of {factor}"
        )
    # The patch-GAN halves the image per layer (4x4 convs, stride 2, padding 1), then two
    # stride-1 4x4 convs take one pixel each: its logit grid must keep at least one patch.
    grid = image_size
    for _ in range(layers):
        grid = (grid - 2) // 2 + 1
    if config.autoencoder.loss.disc_weight > 0 and grid - 2 < 1:
        raise ConfigError(
            f"config.autoencoder.loss.disc_num_layers={layers} halves "
            f"config.data.image_size={image_size} to no patch at all: use fewer layers "
            "(a 32x32 image takes at most 3)"
        )


def _check_unet(config: ml_collections.ConfigDict) -> tuple:
    """``config.diffusion.unet``; returns its block_out_channels."""
    key = "diffusion.unet"
    channels = integers(config, f"{key}.block_out_channels", 1, MAX_WIDTH)
    levels = len(channels)
    integer(config, f"{key}.layers_per_block", 1, MAX_DEPTH)
    attention = level_flags(
        config, f"{key}.attention_levels", f"{key}.block_out_channels", channels
    )
    mid_attention = boolean(config, f"{key}.mid_block_attention")
    heads = integer(config, f"{key}.num_attention_heads", 1, MAX_WIDTH)
    integer(config, f"{key}.transformer_depth", 1, MAX_DEPTH)
    depths = integers(config, f"{key}.transformer_depth_per_level", 0, MAX_DEPTH, nonempty=False)
    if depths and len(depths) != levels:
        raise ConfigError(
            f"config.{key}.transformer_depth_per_level={depths} needs one entry per entry of "
            f"config.{key}.block_out_channels={channels} (or none at all)"
        )
    _check_groups(key, channels, integer(config, f"{key}.norm_num_groups", 1, MAX_WIDTH))
    number(config, f"{key}.dropout", 0.0, 1.0, high_open=True)
    choice(config, f"{key}.remat", tuple(REMAT_POLICIES))
    head_dim = integer(config, f"{key}.attention_head_dim", 0, MAX_WIDTH)
    choice(config, f"{key}.attention_type", UNET_ATTENTION_TYPES)
    integer(config, f"{key}.class_context_dim", 0, MAX_WIDTH)
    boolean(config, f"{key}.use_linear_projection")
    boolean(config, f"{key}.flip_sin_to_cos")
    freq_shift = integer(config, f"{key}.freq_shift", 0, 1)
    text(config, f"{key}.pretrained")
    if channels[0] // 2 <= freq_shift:
        raise ConfigError(
            f"config.{key}.freq_shift={freq_shift} needs config.{key}.block_out_channels[0] >= "
            f"{2 * freq_shift + 2} (the timestep features of its width); got {channels}"
        )
    # Every attention's width (the channels of its level) splits into whole heads.
    attended = [c for c, a in zip(channels, attention, strict=True) if a]
    attended += [channels[-1]] if mid_attention else []
    if head_dim > 0:
        if any(c % head_dim for c in channels):
            raise ConfigError(
                f"config.{key}.attention_head_dim={head_dim} must divide every entry of "
                f"config.{key}.block_out_channels={channels}"
            )
    elif any(c % heads for c in attended):
        raise ConfigError(
            f"config.{key}.num_attention_heads={heads} must divide the channels of every level "
            f"with attention (config.{key}.block_out_channels={channels}, attention_levels="
            f"{attention}, mid_block_attention={mid_attention})"
        )
    return channels


def _check_text_encoder(config: ml_collections.ConfigDict) -> None:
    key = "diffusion.text_encoder"
    kind = choice(config, f"{key}.kind", TEXT_ENCODER_KINDS)
    width = integer(config, f"{key}.width", 1, MAX_WIDTH)
    layers = integer(config, f"{key}.num_layers", 1, MAX_DEPTH)
    heads = integer(config, f"{key}.num_heads", 1, MAX_WIDTH)
    text(config, f"{key}.pretrained")
    text(config, f"{key}.tokenizer")
    skipped = integer(config, f"{key}.skip_last_layers", 0, MAX_DEPTH)
    if kind == "scratch" and width % heads:
        raise ConfigError(f"config.{key}.num_heads={heads} must divide config.{key}.width={width}")
    if kind == "scratch" and skipped >= layers:
        raise ConfigError(
            f"config.{key}.skip_last_layers={skipped} must be less than "
            f"config.{key}.num_layers={layers}"
        )


def _check_diffusion(config: ml_collections.ConfigDict) -> None:
    dm, image_size = config.diffusion, config.data.image_size
    conditioning = choice(config, "diffusion.conditioning", CONDITIONINGS)
    number(config, "diffusion.cond_drop_prob", 0.0, 1.0, high_open=True)
    concat = choice(config, "diffusion.concat_conditioning", CONCAT_CONDITIONINGS)
    sr_factor = integer(config, "diffusion.super_resolution_factor", 1, MAX_IMAGE_SIZE)
    encode_once = boolean(config, "diffusion.encode_once")
    choice(config, "diffusion.schedule", SCHEDULE_KINDS)
    integer(config, "diffusion.num_timesteps", 1, MAX_TIMESTEPS)
    beta_start = number(config, "diffusion.beta_start", 0.0, 1.0, high_open=True)
    beta_end = number(config, "diffusion.beta_end", 0.0, 1.0, high_open=True)
    if not 0.0 < beta_start <= beta_end:
        raise ConfigError(
            f"config.diffusion.beta_start={beta_start} and config.diffusion.beta_end={beta_end} "
            "must satisfy 0 < beta_start <= beta_end < 1"
        )
    choice(config, "diffusion.prediction_type", PREDICTION_TYPES)
    number(config, "diffusion.min_snr_gamma", 0.0)
    channels = _check_unet(config)
    _check_text_encoder(config)

    if concat and (encode_once or config.data.latent_cache):
        raise ConfigError(
            f"config.diffusion.concat_conditioning={concat!r} encodes the images of every step: "
            "set --config.diffusion.encode_once=False and no config.data.latent_cache"
        )
    if concat == "sr" and image_size % sr_factor:
        raise ConfigError(
            f"config.data.image_size={image_size} is not divisible by "
            f"config.diffusion.super_resolution_factor={sr_factor}"
        )
    if conditioning == "class" and config.data.source != "shapes" and config.data.num_classes <= 0:
        raise ConfigError(
            "config.diffusion.conditioning='class' needs the number of classes: "
            "set --config.data.num_classes"
        )
    if dm.unet.attention_type == "plain" and (conditioning == "text" or dm.unet.class_context_dim):
        raise ConfigError(
            "config.diffusion.unet.attention_type='plain' has no cross-attention, so it cannot "
            "take text or a class token (config.diffusion.conditioning="
            f"{conditioning!r}, config.diffusion.unet.class_context_dim="
            f"{dm.unet.class_context_dim}): use attention_type='transformer', or "
            "conditioning='class' with class_context_dim=0, or conditioning='none'"
        )
    latent_size = image_size // autoencoder_factor(config)
    unet_factor = 2 ** (len(channels) - 1)
    if latent_size % unet_factor:
        raise ConfigError(
            f"latents of size {latent_size} (config.data.image_size={image_size} over "
            f"config.autoencoder.model.block_out_channels="
            f"{tuple(config.autoencoder.model.block_out_channels)}) are not divisible by "
            f"{unet_factor}, as the {len(channels) - 1} downsamplings of "
            f"config.diffusion.unet.block_out_channels={channels} need: use fewer U-Net "
            "levels or a larger image size"
        )


def _check_sample(config: ml_collections.ConfigDict) -> None:
    sampler = choice(config, "sample.sampler", SAMPLERS)
    num_timesteps = config.diffusion.num_timesteps
    num_steps = lookup(config, "sample.num_steps")
    if not is_integer(num_steps) or not 1 <= num_steps <= num_timesteps:
        raise ConfigError(
            f"config.sample.num_steps={shown(num_steps)} must be in "
            f"[1, config.diffusion.num_timesteps={num_timesteps}]"
        )
    number(config, "sample.guidance_scale", 0.0)
    number(config, "sample.guidance_rescale", 0.0, 1.0)
    number(config, "sample.eta", 0.0, 1.0)
    spacing = choice(config, "sample.timestep_spacing", TIMESTEP_SPACINGS)
    offset = integer(config, "sample.steps_offset", 0, MAX_TIMESTEPS)
    boolean(config, "sample.set_alpha_to_one")
    integer(config, "sample.num_per_prompt", 1, 4096)
    try:
        sampler_timesteps(num_timesteps, sampler, num_steps, spacing, offset)
    except ValueError as e:
        raise ConfigError(
            f"config.sample.sampler={sampler!r}, config.sample.num_steps={num_steps}, "
            f"config.sample.timestep_spacing={spacing!r} and config.sample.steps_offset={offset} "
            f"do not fit config.diffusion.num_timesteps={num_timesteps}: {e}"
        ) from None


def _check_train(config: ml_collections.ConfigDict) -> None:
    for key in ("log_every", "checkpoint_every", "max_to_keep"):
        integer(config, f"train.{key}", 1)
    integer(config, "train.sample_every", 0)
    boolean(config, "train.async_checkpointing")
    choice(config, "train.nonfinite", NONFINITE_POLICIES)
    integer(config, "train.max_nonfinite_skips", 0)
    number(config, "train.min_free_gib", 0.0)


def _check_finetune(config: ml_collections.ConfigDict) -> None:
    key = "finetune"
    text(config, f"{key}.base")
    choice(config, f"{key}.method", FINETUNE_METHODS)
    integer(config, f"{key}.lora.rank", 1, MAX_WIDTH)
    positive(config, f"{key}.lora.alpha")
    targets = sequence(config, f"{key}.lora.targets", "module names or patterns")
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(
            f"config.{key}.lora.targets={shown(targets)} must name the modules to adapt: "
            "'attention', 'feed_forward', 'projections', 'convolutions' or regular expressions"
        )
    for target in targets:
        try:
            re.compile(target)
        except re.error as error:
            raise ConfigError(
                f"config.{key}.lora.targets: {target!r} is not a regular expression ({error})"
            ) from None
    number(config, f"{key}.lora.rank_dropout", 0.0, 1.0, high_open=True)
    base_dtype = choice(config, f"{key}.base_dtype", DTYPES)
    if base_dtype != "float32" and config.finetune.method != "lora":
        raise ConfigError(
            f"config.{key}.base_dtype={base_dtype!r} keeps a frozen base in that type, but "
            f"config.{key}.method={config.finetune.method!r} trains the base: use method 'lora' "
            "or base_dtype 'float32'"
        )
    boolean(config, f"{key}.train_text_encoder")
    instance_prompt = text(config, f"{key}.instance_prompt")
    class_prompt = text(config, f"{key}.class_prompt")
    integer(config, f"{key}.num_class_images", 1)
    number(config, f"{key}.prior_loss_weight", 0.0)
    if class_prompt and not instance_prompt:
        raise ConfigError(
            f"config.{key}.class_prompt is set (prior preservation) but "
            f"config.{key}.instance_prompt is empty: set the prompt naming the instance "
            "images' subject, e.g. --config.finetune.instance_prompt='a sks dog'"
        )
    if (instance_prompt or class_prompt) and config.diffusion.conditioning != "text":
        raise ConfigError(
            f"config.{key}.instance_prompt / class_prompt need a text-conditioned model, but "
            f"config.diffusion.conditioning={config.diffusion.conditioning!r}"
        )


def _check_files(config: ml_collections.ConfigDict) -> None:
    """The data, weight and cache paths a run reads exist."""
    data = config.data
    if data.source == "image_folder":
        if not data.path:
            raise ConfigError(
                "config.data.source='image_folder' needs a folder: set --config.data.path"
            )
        if not storage.as_path(data.path).is_dir():
            raise ConfigError(
                f"config.data.path={data.path!r} is not a directory; "
                "set --config.data.path to a folder of images"
            )
    metadata = storage.join(data.latent_cache, "metadata.json") if data.latent_cache else ""
    if data.latent_cache and not storage.as_path(metadata).is_file():
        raise ConfigError(
            f"config.data.latent_cache={data.latent_cache!r} holds no metadata.json: write the "
            "cache with `ldm-jax cache-latents --workdir=STAGE1_DIR --out=DIR` or unset "
            "--config.data.latent_cache"
        )
    lpips = config.autoencoder.loss.lpips_weights
    if lpips and not storage.as_path(lpips).is_file():
        raise ConfigError(
            f"config.autoencoder.loss.lpips_weights={lpips!r} is not a file; make "
            "it with `python -m ldm_jax.interop.lpips_weights --vgg=... --heads=... --out=...` "
            "or leave it empty to train without the perceptual loss"
        )
    base = config.finetune.base
    if config.stage == "finetune" and not base:
        raise ConfigError(
            "config.stage='finetune' needs the model to fine-tune: set --config.finetune.base "
            "to its workdir (or use --config=configs/finetune.py:VARIANT,BASE_WORKDIR)"
        )
    if config.stage == "finetune" and not storage.as_path(base).joinpath("config.json").exists():
        raise ConfigError(
            f"config.finetune.base={base!r} is not a workdir (it holds no config.json): set "
            "--config.finetune.base to a workdir written by `ldm-jax train` or `ldm-jax import`"
        )
    text = config.diffusion.text_encoder
    if text.kind == "clip" and not text.pretrained:
        raise ConfigError(
            "config.diffusion.text_encoder.kind='clip' needs its weights: set "
            "--config.diffusion.text_encoder.pretrained to a transformers CLIP text model "
            "directory (or make the workdir with `ldm-jax import`)"
        )


def validate(config: ml_collections.ConfigDict, num_devices: int, check_files: bool = True) -> None:
    """Checks every value a run depends on; raises ConfigError naming the key and the fix.

    ``check_files=False`` leaves out the data, weight and cache paths, for a run that needs
    only the shapes (``ldm-jax compile``).
    """
    integer(config, "seed", 0)
    choice(config, "stage", STAGES)
    choice(config, "dtype", DTYPES)
    shards = _check_mesh(config, num_devices)
    _check_data(config)
    _check_autoencoder(config)
    _check_diffusion(config)
    _check_sample(config)
    _check_train(config)
    _check_finetune(config)
    for stage in OPTIMIZER_STAGES:
        _check_optimizer(config, stage, shards)
    if check_files:
        _check_files(config)
