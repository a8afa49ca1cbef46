"""CLIP in Hugging Face transformers' format: text encoders in and out, whole models in.

A transformers directory holds `config.json` (a `CLIPTextConfig`, or a full `CLIPModel`
config whose `text_config` is used), `model.safetensors` (or a sharded index) and, for
Stable Diffusion's `text_encoder/` + `tokenizer/` layout or a tokenizer saved beside the
model, vocab.json + merges.txt. Weights are named as transformers' `text_model`;
only the attention projections are renamed, both ways, by `ATTENTION_RENAMES`.
`load_clip_model` reads a whole `CLIPModel` directory (text and vision towers and their
projections, for the CLIP score), named as transformers' `CLIPModel` with the same renames.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import storage
from ldm_jax.data.clip_tokenizer import (
    FAST_TOKENIZER_FILE,
    TOKENIZER_FILES,
    VOCAB_FILE,
    ClipTokenizer,
)
from ldm_jax.interop.convert import (
    ImportedModel,
    WeightsMismatchError,
    flax_to_torch,
    torch_to_flax,
)
from ldm_jax.interop.safetensors_io import find_weights_file, read_safetensors, write_safetensors
from ldm_jax.models.clip import ACTIVATIONS, CLIPTextTransformer
from ldm_jax.models.clip_vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPImageTextModel,
    CLIPVisionTransformer,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TEXT_MODEL_PREFIX = "text_model."
# transformers' names of CLIP's attention projections -> this package's `Attention`.
ATTENTION_RENAMES = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out.0"}
TORCH_ATTENTION_NAMES = {ours: theirs for theirs, ours in ATTENTION_RENAMES.items()}
TEXT_MODEL_TYPES = ("clip_text_model", "clip")
# CLIPTextConfig's defaults, for configs that leave a field out.
CONFIG_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
# CLIPVisionConfig's defaults.
VISION_CONFIG_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
PREPROCESSOR_FILE = "preprocessor_config.json"
# Config fields the module has no field for, kept in `extras["config"]` for re-export.
PASSTHROUGH_CONFIG_KEYS = ("projection_dim", "pad_token_id", "bos_token_id", "eos_token_id")


def rename_attention(text: str, renames: Mapping[str, str]) -> str:
    """Renames the attention projections in a tensor name (or in a message naming some)."""
    for old, new in renames.items():
        text = text.replace(f".self_attn.{old}.", f".self_attn.{new}.")
    return text


def _read_text_config(path: str) -> dict[str, Any]:
    config_path = storage.join(path, CONFIG_FILE)
    config_file = storage.as_path(config_path)
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: a CLIP text encoder directory needs the "
            f"{CONFIG_FILE} and {WEIGHTS_FILE} written by transformers' save_pretrained."
        )
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type", TEXT_MODEL_TYPES[0])
    if model_type not in TEXT_MODEL_TYPES:
        raise ValueError(
            f"{config_path}: model_type={model_type!r} is not a CLIP text model "
            f"(allowed: {list(TEXT_MODEL_TYPES)})."
        )
    text_config = {**CONFIG_DEFAULTS, **config.get("text_config", config)}
    if text_config["hidden_act"] not in ACTIVATIONS:
        raise ValueError(
            f"{config_path}: hidden_act={text_config['hidden_act']!r} is not supported "
            f"(allowed: {sorted(ACTIVATIONS)})."
        )
    if not isinstance(text_config["eos_token_id"], int):
        raise ValueError(
            f"{config_path}: eos_token_id must be one integer; got {text_config['eos_token_id']!r}."
        )
    if text_config["hidden_size"] % text_config["num_attention_heads"]:
        raise ValueError(
            f"{config_path}: num_attention_heads={text_config['num_attention_heads']} must "
            f"divide hidden_size={text_config['hidden_size']}."
        )
    return text_config


def _text_transformer(config: Mapping[str, Any], dtype: jnp.dtype) -> CLIPTextTransformer:
    """The text transformer of a (complete) text config."""
    return CLIPTextTransformer(
        vocab_size=config["vocab_size"],
        max_length=config["max_position_embeddings"],
        width=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        mlp_width=config["intermediate_size"],
        activation=config["hidden_act"],
        layer_norm_eps=config["layer_norm_eps"],
        dtype=dtype,
    )


def text_model_weights(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Weights of the text transformer alone, named as a bare `CLIPTextModel`'s.

    transformers writes them under `text_model.`, beside a projection or a vision tower
    in `CLIPTextModelWithProjection` and `CLIPModel` files; a bare-named file is read as is.
    """
    if any(name.startswith(TEXT_MODEL_PREFIX) for name in tensors):
        tensors = {
            name.removeprefix(TEXT_MODEL_PREFIX): value
            for name, value in tensors.items()
            if name.startswith(TEXT_MODEL_PREFIX)
        }
    return {rename_attention(name, ATTENTION_RENAMES): value for name, value in tensors.items()}


def load_clip_text_encoder(
    path: str | os.PathLike, *, dtype: jnp.dtype = jnp.float32
) -> ImportedModel:
    """Loads a transformers CLIP text encoder directory.

    Args:
      path: the directory (`config.json` + `model.safetensors`, e.g. Stable Diffusion's
        `text_encoder/`); a tokenizer is read from the directory itself or, in Stable
        Diffusion's layout, from the sibling `tokenizer/`.
      dtype: compute dtype of the module (params stay float32).

    Returns:
      An `ImportedModel` whose module is a `CLIPTextTransformer`; `extras` holds
      `"tokenizer"` (a `ClipTokenizer`, or None without tokenizer files),
      `"tokenizer_dir"` (where it was read, or None) and `"config"` (the config fields
      `save_clip_text_encoder` writes back and `pooled_output` needs: `eos_token_id`, ...).

    Raises:
      FileNotFoundError: config.json or the weights are missing.
      ValueError: the config has a value this module does not support, naming the key.
      WeightsMismatchError: the weights do not fit the config, naming the tensor and both
        shapes.
    """
    path = os.fspath(path)
    config = _read_text_config(path)
    module = _text_transformer(config, dtype)
    dummy_ids = jnp.zeros((1, module.max_length), jnp.int32)
    abstract = jax.eval_shape(module.init, jax.random.key(0), dummy_ids)["params"]
    weights = read_safetensors(find_weights_file(path, ("model",)))
    try:
        params = torch_to_flax(
            text_model_weights(weights),
            abstract,
            ignore=("position_ids",),
            what=f"CLIP text encoder {path}:",
        )
    except WeightsMismatchError as error:
        # Name the tensors as the file does (q_proj, ...), not as this package does.
        raise WeightsMismatchError(rename_attention(str(error), TORCH_ATTENTION_NAMES)) from None
    tokenizer_dir = _find_tokenizer_dir(path)
    tokenizer = (
        ClipTokenizer.from_directory(tokenizer_dir, max_length=module.max_length)
        if tokenizer_dir
        else None
    )
    extras = {
        "tokenizer": tokenizer,
        "tokenizer_dir": tokenizer_dir,
        "config": {key: config[key] for key in PASSTHROUGH_CONFIG_KEYS},
    }
    return ImportedModel(module=module, params=params, extras=extras)


def _find_tokenizer_dir(path: str) -> str | None:
    sibling = os.fspath(storage.as_path(path).parent / "tokenizer")
    for candidate in (path, sibling):
        folder = storage.as_path(candidate)
        if any((folder / name).is_file() for name in (VOCAB_FILE, FAST_TOKENIZER_FILE)):
            return candidate
    return None


def copy_tokenizer(source: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Copies the tokenizer files of `source` that exist into `out_dir` (either may be in a
    bucket), creating `out_dir`."""
    source_folder, out_folder = storage.as_path(source), storage.as_path(out_dir)
    out_folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source_folder / name).is_file():
            (out_folder / name).write_bytes((source_folder / name).read_bytes())


def save_clip_text_encoder(
    module: CLIPTextTransformer,
    params: Any,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    *,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Writes a directory `transformers.CLIPTextModel.from_pretrained(out_dir)` loads.

    Args:
      module: the text transformer; its fields become the config's architecture.
      params: its parameter tree.
      out_dir: the directory to write (created if missing).
      tokenizer_dir: a tokenizer directory whose files (vocab.json, merges.txt and the
        special-token JSON files present) are copied beside the model.
      config: further config fields (`extras["config"]` of `load_clip_text_encoder`:
        `eos_token_id`, ...); CLIP's defaults otherwise.
    """
    out_folder = storage.as_path(out_dir)
    out_folder.mkdir(parents=True, exist_ok=True)
    passthrough = {key: CONFIG_DEFAULTS[key] for key in PASSTHROUGH_CONFIG_KEYS}
    text_config = {
        "architectures": ["CLIPTextModel"],
        "model_type": TEXT_MODEL_TYPES[0],
        **passthrough,
        **(config or {}),
        "vocab_size": module.vocab_size,
        "max_position_embeddings": module.max_length,
        "hidden_size": module.width,
        "num_hidden_layers": module.num_layers,
        "num_attention_heads": module.num_heads,
        "intermediate_size": module.mlp_width,
        "hidden_act": module.activation,
        "layer_norm_eps": module.layer_norm_eps,
    }
    (out_folder / CONFIG_FILE).write_text(json.dumps(text_config, indent=2, sort_keys=True))
    state_dict = {
        TEXT_MODEL_PREFIX + rename_attention(name, TORCH_ATTENTION_NAMES): value
        for name, value in flax_to_torch(params).items()
    }
    write_safetensors(state_dict, out_folder / WEIGHTS_FILE)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out_folder)


def load_clip_model(path: str | os.PathLike, *, dtype: jnp.dtype = jnp.float32) -> ImportedModel:
    """Loads a transformers `CLIPModel` directory: both towers and their projections.

    Args:
      path: the directory `CLIPModel.save_pretrained` wrote (`config.json` with
        `text_config` and `vision_config`, `model.safetensors`, the tokenizer files and,
        optionally, `preprocessor_config.json`); flag `--clip_weights`.
      dtype: compute dtype (params stay float32).

    Returns:
      An `ImportedModel` whose module is a `CLIPImageTextModel`; `extras` holds
      `"tokenizer"` (a `ClipTokenizer`), and `"image_mean"`, `"image_std"` (the RGB
      normalisation of `preprocessor_config.json`, else OpenAI's).

    Raises:
      FileNotFoundError: config.json, the weights or the tokenizer files are missing.
      ValueError: the config is not a `CLIPModel`'s, or has an unsupported value.
      WeightsMismatchError: the weights do not fit the config, naming the tensor.
    """
    path = os.fspath(path)
    text_config = _read_text_config(path)
    config = json.loads((storage.as_path(path) / CONFIG_FILE).read_text())
    if "vision_config" not in config:
        raise ValueError(
            f"--clip_weights={path}: {CONFIG_FILE} has no vision_config; the CLIP score needs a "
            "whole CLIPModel (both towers), e.g. openai/clip-vit-base-patch32"
        )
    vision_config = {**VISION_CONFIG_DEFAULTS, **config["vision_config"]}
    if vision_config["hidden_act"] not in ACTIVATIONS:
        raise ValueError(
            f"--clip_weights={path}: vision hidden_act={vision_config['hidden_act']!r} is not "
            f"supported (allowed: {sorted(ACTIVATIONS)})."
        )
    text = _text_transformer(text_config, dtype)
    vision = CLIPVisionTransformer(
        image_size=vision_config["image_size"],
        patch_size=vision_config["patch_size"],
        width=vision_config["hidden_size"],
        num_layers=vision_config["num_hidden_layers"],
        num_heads=vision_config["num_attention_heads"],
        mlp_width=vision_config["intermediate_size"],
        activation=vision_config["hidden_act"],
        layer_norm_eps=vision_config["layer_norm_eps"],
        dtype=dtype,
    )
    module = CLIPImageTextModel(
        vision_model=vision,
        text_model=text,
        projection_dim=config.get("projection_dim", CONFIG_DEFAULTS["projection_dim"]),
        eos_token_id=text_config["eos_token_id"],
    )
    size = vision.image_size
    abstract = jax.eval_shape(
        module.init,
        jax.random.key(0),
        jnp.zeros((1, size, size, 3)),
        jnp.zeros((1, text.max_length), jnp.int32),
    )["params"]
    weights = {
        rename_attention(name, ATTENTION_RENAMES): value
        for name, value in read_safetensors(find_weights_file(path, ("model",))).items()
    }
    try:
        params = torch_to_flax(
            weights,
            abstract,
            ignore=("position_ids", "logit_scale"),
            what=f"CLIP model {path}:",
        )
    except WeightsMismatchError as error:
        raise WeightsMismatchError(rename_attention(str(error), TORCH_ATTENTION_NAMES)) from None
    tokenizer_dir = _find_tokenizer_dir(path)
    if tokenizer_dir is None:
        raise FileNotFoundError(
            f"--clip_weights={path} has no tokenizer files ({VOCAB_FILE} and merges.txt, or "
            f"{FAST_TOKENIZER_FILE}): save the CLIPProcessor beside the model"
        )
    mean, std = _image_normalisation(path)
    extras = {
        "tokenizer": ClipTokenizer.from_directory(tokenizer_dir, max_length=text.max_length),
        "image_mean": mean,
        "image_std": std,
    }
    return ImportedModel(module=module, params=params, extras=extras)


def _image_normalisation(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The RGB mean and std of the directory's image processor, else OpenAI CLIP's."""
    config_file = storage.as_path(path) / PREPROCESSOR_FILE
    if not config_file.is_file():
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    processor = json.loads(config_file.read_text())
    return (
        tuple(processor.get("image_mean", OPENAI_CLIP_MEAN)),
        tuple(processor.get("image_std", OPENAI_CLIP_STD)),
    )
