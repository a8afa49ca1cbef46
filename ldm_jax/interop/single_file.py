"""Original Stable Diffusion / CompVis single-file checkpoints (safetensors only).

One file holds the U-Net (`model.diffusion_model.`), the autoencoder
(`first_stage_model.`) and, for Stable Diffusion, the CLIP text encoder
(`cond_stage_model.`), named as the original code named its modules; the names map to
diffusers' by the tables of `single_file_names`. The architecture is read off the tensor
shapes: levels, channels, layers per block, attention levels, transformer depth, context
width, 1x1-conv or linear transformer projections, class embeddings, latent channels.

What the shapes cannot tell comes from keyword arguments whose defaults are Stable
Diffusion's: attention heads (8 per transformer with conv projections, as SD 1.x and
CompVis LDMs; heads of width 64 with linear projections, as SD 2.x), the prediction type
(epsilon; SD 2.x 768 "v" models need `prediction_type="v"`) and the autoencoder's scaling
factor (the file's `scale_factor` when it has one, else 0.18215). The noise schedule is
read from the file's `betas` when present, else Stable Diffusion's. Training checkpoints'
`model_ema.*` copies are passed over: the weights read are the `model.*` ones, which
released "ema-only" files hold the EMA weights in.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.objectives import PREDICTION_TYPES
from ldm_jax.diffusion.schedules import validate_choice
from ldm_jax.interop import diffusers as diffusers_interop
from ldm_jax.interop.clip import (
    ATTENTION_RENAMES,
    TEXT_MODEL_PREFIX,
    rename_attention,
    text_model_weights,
)
from ldm_jax.interop.convert import ImportedModel, flax_to_torch, torch_to_flax
from ldm_jax.interop.diffusers_config import DEFAULT_SCALING_FACTOR
from ldm_jax.interop.safetensors_io import read_safetensors, refuse_pickle, write_safetensors
from ldm_jax.interop.single_file_names import (
    AUTOENCODER_PREFIX,
    CLIP_PREFIX,
    COND_STAGE_PREFIX,
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    AutoencoderLayout,
    UNetLayout,
    autoencoder_from_original,
    autoencoder_layout_from_names,
    autoencoder_to_original,
    clip_layer_count,
    first_clip_layers,
    identity_clip_layer,
    numbered_children,
    open_clip_to_transformers,
    transformers_to_open_clip,
    unet_from_original,
    unet_layout_from_names,
    unet_to_original,
)
from ldm_jax.models.clip import CLIPTextTransformer

log = logging.getLogger(__name__)

SD1_NUM_HEADS = 8
SD2_HEAD_WIDTH = 64
CLIP_HEAD_WIDTH = 64  # CLIP ViT-L/14 and OpenCLIP ViT-H/14 text towers alike
NORM_NUM_GROUPS = 32  # every CompVis and Stable Diffusion model; GroupNorm shapes cannot tell
# Stable Diffusion's training schedule and DDIM settings, as its scheduler_config.json.
SD_SCHEDULE = dict(
    schedule="scaled_linear",
    num_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    timestep_spacing="leading",
    steps_offset=1,
    set_alpha_to_one=False,
)
# Buffers of the original training code that are no model's weights.
NON_WEIGHT_PREFIXES = ("model_ema.",)
NON_WEIGHT_NAMES = frozenset(
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
    "log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod "
    "posterior_variance posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2 "
    "logvar scale_factor".split()
)
# The CLIP tokenizer's config of the original models: pooling at the largest token id
# (end-of-text is the last id of CLIP's vocabulary), as both SD 1 and SD 2 pool.
CLIP_TOKEN_CONFIG = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
# SD 1 conditions on OpenAI CLIP ViT-L/14 (quick_gelu), SD 2 on OpenCLIP ViT-H/14 (gelu).
TEXT_ENCODER_ACTIVATIONS = {CLIP_PREFIX: "quick_gelu", OPEN_CLIP_PREFIX: "gelu"}


def load_single_file(
    path: str | os.PathLike,
    *,
    prediction_type: str = "epsilon",
    num_heads: int | None = None,
    head_width: int | None = None,
    text_encoder_heads: int | None = None,
    scaling_factor: float | None = None,
    image_size: int | None = None,
) -> dict[str, ImportedModel]:
    """Reads an original Stable Diffusion / CompVis LDM checkpoint.

    Args:
      path: a `.safetensors` file; pickled checkpoints (`.ckpt`, ...) are refused with
        the command that converts them.
      prediction_type: what the U-Net predicts, one of `PREDICTION_TYPES`: "v" for the
        Stable Diffusion 2.x 768 models (`*-768-v`), "epsilon" for the others.
      num_heads: attention heads of every spatial transformer. Default: 8 with conv
        projections (SD 1.x, CompVis LDMs), else heads of `head_width` channels.
      head_width: channels per attention head (heads per level = channels // width);
        64 by default with linear projections (SD 2.x).
      text_encoder_heads: attention heads of the CLIP text encoder; default width // 64.
      scaling_factor: the autoencoder's latent scale; default the file's `scale_factor`,
        else Stable Diffusion's 0.18215.
      image_size: the training resolution in pixels, for `sample_size`; default 768 for
        v-prediction, else 512.

    Returns:
      `{"unet": ..., "vae": ..., "text_encoder": ...}` `ImportedModel`s of the parts the
      file holds (a text encoder only in a CLIP format). The U-Net's extras hold
      `prediction_type`, `sample_size` (latent side) and `schedule` (see `schedule_of`);
      the autoencoder's `scaling_factor`; the text encoder's `config` (its token ids).

    Raises:
      PickleRefusedError: `path` is a pickled checkpoint.
      ValueError: `path` is not `.safetensors`, has no U-Net, or has tensors that belong
        to no supported part (the message lists some).
    """
    path = os.fspath(path)
    refuse_pickle(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: single-file checkpoints are read from .safetensors files only")
    validate_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    tensors = read_safetensors(path)
    if not any(name.startswith(UNET_PREFIX) for name in tensors):
        raise ValueError(
            f"{path} holds no U-Net: no tensor is named `{UNET_PREFIX}*` as in an original "
            f"Stable Diffusion / CompVis checkpoint (its names begin with "
            f"{sorted({name.split('.')[0] for name in tensors})[:5]})."
        )
    parts = _split_parts(path, tensors)
    if scaling_factor is None:
        stored = tensors.get("scale_factor")
        scaling_factor = DEFAULT_SCALING_FACTOR if stored is None else float(stored.item())
    components = {}
    if parts[AUTOENCODER_PREFIX]:
        components["vae"] = _load_vae(parts[AUTOENCODER_PREFIX], scaling_factor)
    downsample_factor = components["vae"].module.downsample_factor if "vae" in components else 8
    image_size = image_size or (768 if prediction_type == "v" else 512)
    extras = dict(
        prediction_type=prediction_type,
        sample_size=image_size // downsample_factor,
        schedule=_schedule(tensors.get("betas"), prediction_type),
    )
    components["unet"] = _load_unet(parts[UNET_PREFIX], num_heads, head_width, extras)
    if parts[CLIP_PREFIX]:
        components["text_encoder"] = _load_text_encoder(
            parts[CLIP_PREFIX], TEXT_ENCODER_ACTIVATIONS[CLIP_PREFIX], text_encoder_heads
        )
    elif parts[OPEN_CLIP_PREFIX]:
        state_dict = open_clip_to_transformers(parts[OPEN_CLIP_PREFIX])
        # Stable Diffusion 2 conditions on the penultimate block's output (then ln_final):
        # the last block is never used (diffusers drops it too).
        state_dict = first_clip_layers(state_dict, clip_layer_count(state_dict) - 1)
        components["text_encoder"] = _load_text_encoder(
            state_dict, TEXT_ENCODER_ACTIVATIONS[OPEN_CLIP_PREFIX], text_encoder_heads
        )
    return components


def schedule_of(components: Mapping[str, ImportedModel]) -> dict[str, Any]:
    """The noise schedule settings of a `load_single_file` result (as a pipeline's)."""
    return dict(components["unet"].extras["schedule"])


def save_single_file(
    path: str | os.PathLike,
    *,
    unet: ImportedModel | None = None,
    vae: ImportedModel | None = None,
    text_encoder: ImportedModel | None = None,
) -> None:
    """Writes the given models to one safetensors file with the original names.

    The file loads where original Stable Diffusion checkpoints load (ComfyUI-style
    tools, diffusers' `from_single_file`, `load_single_file`). As in the originals, the
    autoencoder's scaling factor is not stored. A CLIP text encoder is written in SD 1's
    format when its activation is quick_gelu, in SD 2's OpenCLIP format when gelu; the
    layers skipped by `skip_last_layers` are left out, and an OpenCLIP tower gets one
    last identity block, since its readers take the penultimate block's output.

    Args:
      path: the `.safetensors` file to write.
      unet: the U-Net (`.module` a `UNet`, `.params` its parameter tree), or None.
      vae: the autoencoder (`AutoencoderKL` and params), or None.
      text_encoder: the text encoder (`CLIPTextTransformer` and params), or None.

    Raises:
      ValueError: `path` is not `.safetensors`, no model is given, or a text encoder has
        an activation neither original format has.
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: single-file checkpoints are written as .safetensors only")
    if unet is None and vae is None and text_encoder is None:
        raise ValueError("save_single_file got nothing to write: pass unet, vae or text_encoder")
    tensors: dict[str, np.ndarray] = {}
    if unet is not None:
        module = unet.module
        layout = UNetLayout(
            levels=len(module.block_out_channels),
            layers_per_block=module.layers_per_block,
            attention_levels=tuple(bool(level) for level in module.attention_levels),
            mid_block_attention=module.mid_block_attention,
        )
        tensors |= _prefixed(UNET_PREFIX, unet_to_original(flax_to_torch(unet.params), layout))
    if vae is not None:
        module = vae.module
        layout = AutoencoderLayout(
            levels=len(module.block_out_channels),
            layers_per_block=module.layers_per_block,
            mid_block_attention=module.mid_block_attention,
        )
        original = autoencoder_to_original(flax_to_torch(vae.params), layout)
        tensors |= _prefixed(AUTOENCODER_PREFIX, original)
    if text_encoder is not None:
        tensors |= _text_encoder_tensors(text_encoder.module, text_encoder.params)
    write_safetensors(tensors, path)


def unet_config_from_original(
    tensors: Mapping[str, np.ndarray],
    *,
    num_heads: int | None = None,
    head_width: int | None = None,
) -> dict[str, Any]:
    """The diffusers `UNet2DConditionModel` config of original U-Net tensors.

    Args:
      tensors: the U-Net's tensors, `model.diffusion_model.` removed from their names.
      num_heads: see `load_single_file`.
      head_width: see `load_single_file`.

    Raises:
      ValueError: a tensor the architecture is read from is missing, or the heads do not
        divide the channels.
    """
    layout = unet_layout_from_names(tensors)
    step = layout.layers_per_block + 1
    channels = [
        _shape(tensors, f"input_blocks.{1 + level * step}.0.out_layers.3.weight", "U-Net")[0]
        for level in range(layout.levels)
    ]
    config: dict[str, Any] = {
        "in_channels": _shape(tensors, "input_blocks.0.0.weight", "U-Net")[1],
        "out_channels": _shape(tensors, "out.2.weight", "U-Net")[0],
        "block_out_channels": channels,
        "layers_per_block": layout.layers_per_block,
        "down_block_types": [
            "CrossAttnDownBlock2D" if attention else "DownBlock2D"
            for attention in layout.attention_levels
        ],
        "up_block_types": [
            "CrossAttnUpBlock2D" if attention else "UpBlock2D"
            for attention in reversed(layout.attention_levels)
        ],
        "mid_block_type": (
            "UNetMidBlock2DCrossAttn" if layout.mid_block_attention else "UNetMidBlock2D"
        ),
        "norm_num_groups": NORM_NUM_GROUPS,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    transformers = sorted(
        name.removesuffix(".proj_in.weight") for name in tensors if name.endswith(".proj_in.weight")
    )
    if transformers:
        first = transformers[0]
        linear = tensors[f"{first}.proj_in.weight"].ndim == 2
        context = _shape(tensors, f"{first}.transformer_blocks.0.attn2.to_k.weight", "U-Net")
        config |= {
            "cross_attention_dim": context[1],
            "transformer_layers_per_block": len(
                numbered_children(tensors, f"{first}.transformer_blocks")
            ),
            "use_linear_projection": linear,
            "attention_head_dim": _attention_heads(channels, linear, num_heads, head_width),
        }
    if "label_emb.weight" in tensors:
        config["num_class_embeds"] = int(tensors["label_emb.weight"].shape[0])
    return config


def vae_config_from_original(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The diffusers `AutoencoderKL` config of original autoencoder tensors.

    Args:
      tensors: the autoencoder's tensors, `first_stage_model.` removed from their names.

    Raises:
      ValueError: a tensor the architecture is read from is missing.
    """
    layout = autoencoder_layout_from_names(tensors)
    last = layout.layers_per_block - 1
    return {
        "in_channels": _shape(tensors, "encoder.conv_in.weight", "autoencoder")[1],
        "out_channels": _shape(tensors, "decoder.conv_out.weight", "autoencoder")[0],
        "latent_channels": _shape(tensors, "decoder.conv_in.weight", "autoencoder")[1],
        "block_out_channels": [
            _shape(tensors, f"encoder.down.{level}.block.{last}.conv2.weight", "autoencoder")[0]
            for level in range(layout.levels)
        ],
        "layers_per_block": layout.layers_per_block,
        "down_block_types": ["DownEncoderBlock2D"] * layout.levels,
        "up_block_types": ["UpDecoderBlock2D"] * layout.levels,
        "mid_block_add_attention": layout.mid_block_attention,
        "norm_num_groups": NORM_NUM_GROUPS,
    }


def _split_parts(path: str, tensors: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """`{prefix: {name without prefix: tensor}}` for the U-Net, autoencoder and CLIPs."""
    parts: dict[str, dict] = {
        prefix: {} for prefix in (UNET_PREFIX, AUTOENCODER_PREFIX, CLIP_PREFIX, OPEN_CLIP_PREFIX)
    }
    other_text_encoder, unknown = [], []
    for name, value in tensors.items():
        prefix = next((prefix for prefix in parts if name.startswith(prefix)), None)
        if prefix is not None:
            parts[prefix][name.removeprefix(prefix)] = value
        elif name in NON_WEIGHT_NAMES or name.startswith(NON_WEIGHT_PREFIXES):
            continue
        elif name.startswith(COND_STAGE_PREFIX):
            other_text_encoder.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} tensors belong to no part of a Stable Diffusion / "
            f"CompVis checkpoint (`{UNET_PREFIX}`, `{AUTOENCODER_PREFIX}`, "
            f"`{COND_STAGE_PREFIX}`), e.g. {sorted(unknown)[:5]}. SDXL, ControlNet and "
            "other single-file layouts are not supported."
        )
    if other_text_encoder:
        log.warning(
            "%s: the text encoder (%s, ...) is not CLIP and is not imported; only the "
            "U-Net and the autoencoder are",
            path,
            other_text_encoder[0],
        )
    return parts


def _load_unet(
    tensors: Mapping[str, np.ndarray],
    num_heads: int | None,
    head_width: int | None,
    extras: dict[str, Any],
) -> ImportedModel:
    layout = unet_layout_from_names(tensors)
    state_dict = unet_from_original(tensors, layout)
    config = unet_config_from_original(tensors, num_heads=num_heads, head_width=head_width)
    module = diffusers_interop.unet_from_diffusers_config(config)
    params = diffusers_interop.unet_params_from_state_dict(module, state_dict)
    return ImportedModel(module=module, params=params, extras=extras)


def _load_vae(tensors: Mapping[str, np.ndarray], scaling_factor: float) -> ImportedModel:
    layout = autoencoder_layout_from_names(tensors)
    state_dict = autoencoder_from_original(tensors, layout)
    module = diffusers_interop.vae_from_diffusers_config(vae_config_from_original(tensors))
    params = diffusers_interop.vae_params_from_state_dict(module, state_dict)
    return ImportedModel(module=module, params=params, extras={"scaling_factor": scaling_factor})


def _load_text_encoder(
    state_dict: Mapping[str, np.ndarray], activation: str, num_heads: int | None
) -> ImportedModel:
    """A `CLIPTextTransformer` from a transformers-named `CLIPTextModel` state dict."""
    embeddings = "text_model.embeddings."
    tokens = _shape(state_dict, embeddings + "token_embedding.weight", "text encoder")
    positions = _shape(state_dict, embeddings + "position_embedding.weight", "text encoder")
    mlp = _shape(state_dict, "text_model.encoder.layers.0.mlp.fc1.weight", "text encoder")
    if num_heads is None and tokens[1] % CLIP_HEAD_WIDTH:
        raise ValueError(
            f"the text encoder's width {tokens[1]} is not a multiple of CLIP's head width "
            f"{CLIP_HEAD_WIDTH}: give its number of heads (text_encoder_heads)"
        )
    module = CLIPTextTransformer(
        vocab_size=tokens[0],
        max_length=positions[0],
        width=tokens[1],
        num_layers=clip_layer_count(state_dict),
        num_heads=num_heads or tokens[1] // CLIP_HEAD_WIDTH,
        mlp_width=mlp[0],
        activation=activation,
    )
    token_ids = jnp.zeros((1, module.max_length), jnp.int32)
    abstract = jax.eval_shape(module.init, jax.random.key(0), token_ids)["params"]
    params = torch_to_flax(
        text_model_weights(state_dict),
        abstract,
        ignore=("position_ids",),
        what="CLIP text encoder",
    )
    return ImportedModel(module=module, params=params, extras={"config": dict(CLIP_TOKEN_CONFIG)})


def _text_encoder_tensors(module: CLIPTextTransformer, params: Any) -> dict[str, np.ndarray]:
    """The text encoder's tensors in SD 1's CLIP or SD 2's OpenCLIP names, prefixed."""
    prefix = next(
        (prefix for prefix, act in TEXT_ENCODER_ACTIVATIONS.items() if act == module.activation),
        None,
    )
    if prefix is None:
        raise ValueError(
            f"a text encoder with activation={module.activation!r} has no original "
            f"single-file format (allowed: {sorted(TEXT_ENCODER_ACTIVATIONS.values())})."
        )
    to_torch_names = {ours: theirs for theirs, ours in ATTENTION_RENAMES.items()}
    state_dict = {
        TEXT_MODEL_PREFIX + rename_attention(name, to_torch_names): value
        for name, value in flax_to_torch(params).items()
    }
    used_layers = module.num_layers - module.skip_last_layers
    state_dict = first_clip_layers(state_dict, used_layers)
    if prefix == CLIP_PREFIX:
        return _prefixed(prefix, state_dict)
    state_dict |= identity_clip_layer(state_dict, used_layers)
    return _prefixed(prefix, transformers_to_open_clip(state_dict))


def _attention_heads(
    channels: list[int], linear: bool, num_heads: int | None, head_width: int | None
) -> int | list[int]:
    """diffusers' `attention_head_dim`: a head count, or one per level (its SD 2 usage)."""
    if num_heads is not None and head_width is not None:
        raise ValueError(
            f"give num_heads ({num_heads}) or head_width ({head_width}), not both: the "
            "other follows from the channels."
        )
    if num_heads is not None:
        return num_heads
    if head_width is None and not linear:
        return SD1_NUM_HEADS
    width = head_width or SD2_HEAD_WIDTH
    if any(level_channels % width for level_channels in channels):
        raise ValueError(
            f"head_width={width} does not divide the U-Net's channels {channels}: pass "
            "num_heads or a head_width that divides them."
        )
    return [level_channels // width for level_channels in channels]


def _schedule(betas: np.ndarray | None, prediction_type: str) -> dict[str, Any]:
    """Stable Diffusion's schedule, with the length and end points of the file's `betas`."""
    schedule = dict(SD_SCHEDULE, prediction_type=prediction_type)
    if betas is None:
        return schedule
    betas = np.asarray(betas, np.float64)
    scaled_linear = np.linspace(np.sqrt(betas[0]), np.sqrt(betas[-1]), len(betas)) ** 2
    # Half-precision files store betas to ~1e-3 relative precision.
    if not np.allclose(betas, scaled_linear, rtol=2e-3, atol=0):
        raise ValueError(
            "the checkpoint's `betas` do not follow the scaled-linear schedule of Stable "
            "Diffusion and CompVis LDMs; other schedules are not supported."
        )
    start, end = float(betas[0]), float(betas[-1])
    if not np.allclose([start, end], [SD_SCHEDULE["beta_start"], SD_SCHEDULE["beta_end"]], 2e-3):
        schedule |= {"beta_start": float(f"{start:.4g}"), "beta_end": float(f"{end:.4g}")}
    schedule["num_timesteps"] = len(betas)
    return schedule


def _shape(tensors: Mapping[str, np.ndarray], name: str, what: str) -> tuple[int, ...]:
    if name not in tensors:
        raise ValueError(
            f"the {what} has no tensor {name!r}, which its architecture is read from: the "
            "checkpoint is incomplete or not an original Stable Diffusion / CompVis one."
        )
    return tuple(int(size) for size in tensors[name].shape)


def _prefixed(prefix: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {prefix + name: value for name, value in tensors.items()}
