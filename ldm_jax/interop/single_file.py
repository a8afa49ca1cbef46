"""Original Stable Diffusion / CompVis single-file checkpoints (safetensors only).

One file holds the U-Net (`model.diffusion_model.`), the autoencoder
(`first_stage_model.`, KL or VQ) and the conditioning model (`cond_stage_model.`): for
Stable Diffusion a CLIP text encoder, for CompVis' class-conditional ImageNet LDM the
`ClassEmbedder` table, which becomes the U-Net's class embedding with
`class_conditioning="context"`. Names map to diffusers' by the tables of
`single_file_names` (and `single_file_attention` for CompVis' fused-qkv attention
blocks); the architecture is read off the tensor shapes (`single_file_config`).

What the shapes cannot tell comes from keyword arguments whose defaults are the original
models': attention heads (8 per transformer with conv projections, as SD 1.x; heads of
width 64 with linear projections, as SD 2.x; heads of width 32 in CompVis LDMs, the files
with a VQ first stage, a class embedder or plain attention blocks), the prediction type
(epsilon; SD 2.x 768 "v" models need `prediction_type="v"`) and the autoencoder's scaling
factor (the file's `scale_factor` when it has one, else 0.18215 for KL autoencoders, as
Stable Diffusion, and 1 for VQ ones, as CompVis' LDMs). The noise schedule is
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
from ldm_jax.interop.single_file_attention import fuse_attention, split_fused_attention
from ldm_jax.interop.single_file_config import (
    COMPVIS_HEAD_WIDTH,
    VQ_CODEBOOK,
    shape_of,
    unet_config_from_original,
    vae_config_from_original,
)
from ldm_jax.interop.single_file_names import (
    AUTOENCODER_PREFIX,
    CLASS_EMBEDDER_PREFIX,
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
    open_clip_to_transformers,
    transformers_to_open_clip,
    unet_from_original,
    unet_layout_from_names,
    unet_to_original,
)
from ldm_jax.models import VQAutoencoder
from ldm_jax.models.clip import CLIPTextTransformer

log = logging.getLogger(__name__)

CLIP_HEAD_WIDTH = 64  # CLIP ViT-L/14 and OpenCLIP ViT-H/14 text towers alike
VQ_SCALING_FACTOR = 1.0  # CompVis' LDMs on VQ first stages do not rescale their latents
CLASS_TABLE = CLASS_EMBEDDER_PREFIX + "weight"
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
        projections (SD 1.x), else heads of `head_width` channels.
      head_width: channels per attention head (heads per level = channels // width);
        64 by default with linear projections (SD 2.x), 32 in CompVis LDMs.
      text_encoder_heads: attention heads of the CLIP text encoder; default width // 64.
      scaling_factor: the autoencoder's latent scale; default the file's `scale_factor`,
        else Stable Diffusion's 0.18215 (KL) or 1 (VQ).
      image_size: the training resolution in pixels, for `sample_size`; default 256 for
        CompVis LDMs, 768 for v-prediction, else 512.

    Returns:
      `{"unet": ..., "vae": ..., "text_encoder": ...}` `ImportedModel`s of the parts the
      file holds (a text encoder only in a CLIP format; a class embedder is part of the
      U-Net). The U-Net's extras hold
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
    is_vq = VQ_CODEBOOK in parts[AUTOENCODER_PREFIX]
    if scaling_factor is None:
        stored = tensors.get("scale_factor")
        default = VQ_SCALING_FACTOR if is_vq else DEFAULT_SCALING_FACTOR
        scaling_factor = default if stored is None else float(np.asarray(stored).item())
    class_table = parts[CLASS_EMBEDDER_PREFIX].get("weight")
    compvis_ldm = is_vq or class_table is not None  # not a Stable Diffusion file
    if compvis_ldm and num_heads is None and head_width is None:
        head_width = COMPVIS_HEAD_WIDTH
    components = {}
    if parts[AUTOENCODER_PREFIX]:
        components["vae"] = _load_vae(parts[AUTOENCODER_PREFIX], scaling_factor)
    downsample_factor = components["vae"].module.downsample_factor if "vae" in components else 8
    image_size = image_size or (256 if compvis_ldm else 768 if prediction_type == "v" else 512)
    extras = dict(
        prediction_type=prediction_type,
        sample_size=image_size // downsample_factor,
        schedule=_schedule(tensors.get("betas"), prediction_type),
    )
    components["unet"] = _load_unet(parts[UNET_PREFIX], num_heads, head_width, extras, class_table)
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
    tools, diffusers' `from_single_file`, `load_single_file`). The autoencoder's scaling
    factor is stored (as `scale_factor`, like CompVis' scale_by_std models) only when it is
    not the one readers assume: 0.18215 for KL autoencoders, 1 for VQ ones. A CLIP text
    encoder is written in SD 1's format when its activation is quick_gelu, in SD 2's
    OpenCLIP format when gelu; the layers skipped by `skip_last_layers` are left out, and
    an OpenCLIP tower gets one last identity block, since its readers take the
    penultimate block's output.

    Args:
      path: the `.safetensors` file to write.
      unet: the U-Net (`.module` a `UNet`, `.params` its parameter tree), or None. A class
        embedding that is the U-Net's context is written as CompVis' `ClassEmbedder`.
      vae: the autoencoder (`AutoencoderKL` or `VQAutoencoder` and params), or None.
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
            attention_type=module.attention_type,
        )
        state_dict = flax_to_torch(unet.params)
        if module.num_classes is not None and module.class_conditioning == "context":
            tensors[CLASS_TABLE] = state_dict.pop("class_embedding.weight")
        if module.attention_type == "plain":
            state_dict = fuse_attention(state_dict, module.heads_per_level)
        tensors |= _prefixed(UNET_PREFIX, unet_to_original(state_dict, layout))
    if vae is not None:
        module = vae.module
        layout = AutoencoderLayout(
            levels=len(module.block_out_channels),
            layers_per_block=module.layers_per_block,
            mid_block_attention=module.mid_block_attention,
            attention_levels=tuple(bool(level) for level in module.attention_levels),
        )
        state_dict = diffusers_interop.params_to_state_dict(vae.params)
        original = autoencoder_to_original(state_dict, layout)
        tensors |= _prefixed(AUTOENCODER_PREFIX, original)
        scale = vae.extras.get("scaling_factor")
        if scale is not None and scale != _default_scaling_factor(vae.module):
            tensors["scale_factor"] = np.asarray(scale, np.float32)  # as scale_by_std LDMs
    if text_encoder is not None:
        tensors |= _text_encoder_tensors(text_encoder.module, text_encoder.params)
    write_safetensors(tensors, path)


def _split_parts(path: str, tensors: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """`{prefix: {name without prefix: tensor}}` for the U-Net, autoencoder and CLIPs."""
    parts: dict[str, dict] = {
        prefix: {}
        for prefix in (
            UNET_PREFIX,
            AUTOENCODER_PREFIX,
            CLIP_PREFIX,
            OPEN_CLIP_PREFIX,
            CLASS_EMBEDDER_PREFIX,
        )
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
    class_table: np.ndarray | None,
) -> ImportedModel:
    layout = unet_layout_from_names(tensors)
    state_dict = unet_from_original(tensors, layout)
    config = unet_config_from_original(tensors, num_heads=num_heads, head_width=head_width)
    module = diffusers_interop.unet_from_diffusers_config(config)
    if layout.attention_type == "plain":
        state_dict = split_fused_attention(state_dict, module.heads_per_level)
    if class_table is not None:
        module = _class_as_context(module, class_table)
        state_dict = {**state_dict, "class_embedding.weight": class_table}
    params = diffusers_interop.unet_params_from_state_dict(module, state_dict)
    return ImportedModel(module=module, params=params, extras=extras)


def _default_scaling_factor(autoencoder: Any) -> float:
    """The latent scale `load_single_file` assumes when a file stores none."""
    return VQ_SCALING_FACTOR if isinstance(autoencoder, VQAutoencoder) else DEFAULT_SCALING_FACTOR


def _class_as_context(module: Any, class_table: np.ndarray) -> Any:
    """The U-Net with CompVis' ClassEmbedder (`rows` classes) as its cross-attention token."""
    rows, width = class_table.shape
    if module.num_classes is not None or module.context_dim != width:
        raise ValueError(
            f"the class embedder {CLASS_TABLE} ({rows} x {width}) must be the only class "
            f"conditioning of a U-Net whose cross-attention is {width} wide; this U-Net has "
            f"context_dim={module.context_dim}, num_classes={module.num_classes}."
        )
    # The last row is the unconditional class of classifier-free guidance.
    return module.clone(num_classes=rows - 1, class_conditioning="context")


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
    tokens = shape_of(state_dict, embeddings + "token_embedding.weight", "text encoder")
    positions = shape_of(state_dict, embeddings + "position_embedding.weight", "text encoder")
    mlp = shape_of(state_dict, "text_model.encoder.layers.0.mlp.fc1.weight", "text encoder")
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


def _prefixed(prefix: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {prefix + name: value for name, value in tensors.items()}
