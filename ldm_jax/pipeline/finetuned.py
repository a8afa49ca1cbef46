"""A fine-tuned model: a base model (a workdir of `ldm-jax train` or `ldm-jax import`) and
what a fine-tune run trained on top of it, LoRA adapters or U-Net weights.

A fine-tune workdir keeps its own ``config.json`` (the base's config with its ``finetune``
section, ``finetune.base`` naming the base workdir), its checkpoints under
``checkpoints/finetune/`` (only what it trains, so a LoRA checkpoint is a few megabytes), the
class images of DreamBooth's prior preservation, metrics and samples. Sampling it loads the
base and applies the trained part (``compose``): adapters are merged into the kernels they
adapt, trained weights replace the base's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import storage
from ldm_jax.config import ConfigError
from ldm_jax.interop import lora as lora_files
from ldm_jax.models import lora
from ldm_jax.pipeline.model import LatentDiffusion, init_trained_params

# The model parts a fine-tune run may train, in the order they are looked for.
PARTS = ("unet", "text_encoder")


def is_finetune(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` is a fine-tune run's (its workdir holds only the trained part)."""
    return config.stage == "finetune" and bool(config.finetune.base)


def base_workdir(config: ml_collections.ConfigDict) -> str:
    """The base workdir, as ``config.finetune.base`` names it: absolute, a bucket path, or
    relative to the current directory."""
    base = config.finetune.base
    return base if storage.is_remote(base) else os.path.abspath(base)


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config that loads the base model of a fine-tune run's ``config`` (its mesh and
    sampling settings kept)."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.stage = "diffusion"
    out.finetune.base = ""
    return out


def lora_shape(config: ml_collections.ConfigDict) -> lora.LoraShape:
    spec = config.finetune.lora
    return lora.LoraShape(spec.rank, float(spec.alpha), lora.expand_targets(spec.targets))


def trained_parts(config: ml_collections.ConfigDict, model: LatentDiffusion) -> tuple[str, ...]:
    """The model parts a fine-tune run trains: the U-Net, and the text encoder with
    ``finetune.train_text_encoder`` (a text-conditioned model's)."""
    with_text = config.finetune.train_text_encoder and model.conditioning == "text"
    return ("unet", "text_encoder") if with_text else ("unet",)


def model_params(key: jax.Array, *, model: LatentDiffusion, max_caption_length: int) -> dict:
    """Fresh params of every part a fine-tune run may train (boxed with logical axis names):
    the U-Net and the text encoder, a pretrained CLIP one included."""
    params = init_trained_params(key, model=model, max_caption_length=max_caption_length)
    if model.conditioning == "text" and model.frozen_text_encoder:
        tokens = jnp.zeros((1, max_caption_length), jnp.int32)
        params["text_encoder"] = model.text_encoder.init(key, tokens)["params"]
    return params


def init_finetuned(
    key: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    model: LatentDiffusion,
) -> dict:
    """Fresh params of what a fine-tune run trains (boxed): ``{"lora": {part: adapters}}``
    for LoRA, ``{part: params}`` for full fine-tuning (which starts from the base's values)."""
    length = config.data.max_caption_length
    parts = trained_parts(config, model)
    if config.finetune.method == "lora":
        abstract = jax.eval_shape(
            lambda: model_params(jax.random.key(0), model=model, max_caption_length=length)
        )
        shape = lora_shape(config)
        return {
            "lora": {
                part: _init_adapters(jax.random.fold_in(key, i), abstract[part], shape, part)
                for i, part in enumerate(parts)
            }
        }
    params = model_params(key, model=model, max_caption_length=length)
    return {part: params[part] for part in parts}


def _init_adapters(key: jax.Array, params: dict, shape: lora.LoraShape, part: str) -> dict:
    """``lora.init_adapters`` of one model part.

    Raises:
      ConfigError: naming ``config.finetune.lora.targets`` when they match no module of it.
    """
    try:
        return lora.init_adapters(key, params, shape)
    except ValueError as error:
        raise ConfigError(
            f"config.finetune.lora.targets: {error} in the {part}; name modules it has, e.g. "
            "'attention' (see models/lora.py's TARGET_SETS)"
        ) from None


def compose(
    base: dict,
    trained: dict,
    config: ml_collections.ConfigDict,
    *,
    dropout_key: jax.Array | None = None,
) -> dict:
    """The params the fine-tuned model computes with: ``base`` with the trained adapters
    applied to their parts (rank dropout drawn from ``dropout_key`` while training) or the
    trained parts in place of the base's."""
    if "lora" not in trained:
        return {**base, **trained}
    out = dict(base)
    spec = config.finetune.lora
    rank_dropout = spec.rank_dropout if dropout_key is not None else 0.0
    for index, (part, adapters) in enumerate(trained["lora"].items()):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        out[part] = lora.adapted(
            base[part],
            [(adapters, spec.alpha / spec.rank)],
            rank_dropout=rank_dropout,
            dropout_key=key,
        )
    return out


def parse_lora_flag(value: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` of ``--lora`` as (file, scale); the scale defaults to 1. A bucket path's
    own colon (``gs://...``) is not a scale."""
    path, colon, scale = value.rpartition(":")
    if colon and "/" not in scale:
        try:
            return path, float(scale)
        except ValueError:
            raise ValueError(
                f"--lora={value}: {scale!r} after the last ':' is not a scale; write FILE or "
                "FILE:SCALE, e.g. --lora=style.safetensors:0.8"
            ) from None
    return value, 1.0


def read_lora_flags(flags: Sequence[str]) -> list[tuple[str, lora_files.LoraWeights, float]]:
    """The LoRA files of ``--lora=FILE[:SCALE]`` (repeatable), read before any model is
    loaded: (flag, weights, scale) each.

    Raises:
      FileNotFoundError, ValueError: a missing file, a bad scale or a file that is not a
        LoRA, in one line naming the flag.
    """
    read = []
    for flag in flags:
        path, strength = parse_lora_flag(flag)
        if not storage.as_path(path).exists():
            raise FileNotFoundError(f"--lora={flag}: {path} does not exist")
        try:
            read.append((flag, lora_files.load_lora(path), strength))
        except ValueError as error:
            raise ValueError(f"--lora={flag}: {error}") from None
    return read


def with_lora_files(
    params: dict, loras: Sequence[tuple[str, lora_files.LoraWeights, float]]
) -> dict:
    """``params`` with the LoRAs of ``read_lora_flags`` merged into the kernels they adapt,
    each with its own scale (times its file's alpha / rank).

    Raises:
      ValueError: a LoRA made for another model, in one line naming the flag.
    """
    by_part: dict[str, list] = {}
    for flag, weights, strength in loras:
        try:
            lora_files.check_lora(weights, params.get("unet"), params.get("text_encoder"))
        except ValueError as error:
            raise ValueError(f"--lora={flag}: {error}") from None
        for part, adapters in weights.components().items():
            by_part.setdefault(part, []).append((adapters, weights.scale * strength))
    out = dict(params)
    for part, pairs in by_part.items():
        out[part] = lora.adapted(params[part], pairs)
    return out


def trained_lora(config: ml_collections.ConfigDict, trained: dict) -> lora_files.LoraWeights:
    """The adapters a LoRA fine-tune run trained, as a LoRA file holds them.

    Raises:
      ValueError: when the run trained every weight (``finetune.method="full"``).
    """
    if "lora" not in trained:
        raise ValueError(
            f"the fine-tune run trained every weight (config.finetune.method="
            f"{config.finetune.method!r}), not LoRA adapters: export it with --to=diffusers"
        )
    spec = config.finetune.lora
    adapters = jax.tree.map(np.asarray, trained["lora"])
    return lora_files.LoraWeights(
        unet=adapters.get("unet"),
        text_encoder=adapters.get("text_encoder"),
        rank=spec.rank,
        alpha=float(spec.alpha),
    )
