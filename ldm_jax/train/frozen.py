"""The frozen inputs of stage 2: the autoencoder (trained in stage 1 or pretrained) and the
text conditioning (a tokenizer, and a pretrained CLIP text model when the config names one)."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from ldm_jax import config as config_lib
from ldm_jax import pretrained
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.data import tokenizer as tokenizer_lib
from ldm_jax.train import autoencoder as autoencoder_stage
from ldm_jax.train import data as data_lib


def autoencoder_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.autoencoder.workdir or workdir


def load_autoencoder(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, rules
) -> tuple[Any, Any, float]:
    """EMA params of the trained stage 1 (with their shardings) and its latent scale."""
    if config.autoencoder.pretrained:
        return pretrained.load_autoencoder(config, workdir, mesh, rules)
    ae_workdir = autoencoder_workdir(config, workdir)
    checkpointer = Checkpointer(
        autoencoder_stage.checkpoint_dir(ae_workdir), async_checkpointing=False
    )
    if checkpointer.latest_step() is None:
        raise config_lib.ConfigError(
            f"stage 2 needs a trained autoencoder, but {checkpointer.directory} holds no "
            "checkpoint: run stage 1 first (--config.stage=both or autoencoder) or point "
            "--config.autoencoder.workdir at a workdir that has one"
        )
    state, _ = autoencoder_stage.restore_or_create(config, checkpointer, mesh, rules)
    checkpointer.close()
    params = autoencoder_stage.inference_params(state)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    scale = autoencoder_stage.read_latent_scale(ae_workdir, int(state.step))
    if scale is None:
        scale = autoencoder_stage.measure_latent_scale(config, params, mesh)
        autoencoder_stage.write_latent_scale(ae_workdir, scale, int(state.step))
    return params, shardings, scale


def load_conditioning(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, rules, source: Any = None
) -> tuple[Any, Any, dict, dict]:
    """The tokenizer, a pretrained text encoder, and its frozen params with their shardings.

    With a from-scratch text encoder, the tokenizer is built from ``source``'s captions on
    the first run (then read from the workdir) and the encoder is left to ``build_model``.

    Returns:
      (tokenizer or None, text encoder module or None, frozen params, their shardings):
      the frozen dicts hold "text_encoder" for a pretrained CLIP text model, else nothing.
    """
    if config.diffusion.conditioning != "text":
        return None, None, {}, {}
    if config.diffusion.text_encoder.kind == "scratch":
        if source is None:
            path = os.path.join(workdir, data_lib.TOKENIZER_FILE)
            return tokenizer_lib.load_tokenizer(path), None, {}, {}
        return data_lib.load_or_build_tokenizer(workdir, config.data, source), None, {}, {}
    module, params, clip_tokenizer = pretrained.load_clip(config, workdir)
    if module.max_length != config.data.max_caption_length:
        raise config_lib.ConfigError(
            f"config.data.max_caption_length={config.data.max_caption_length} must equal the "
            f"CLIP text model's max_length {module.max_length}"
        )
    tokens = jnp.zeros((1, module.max_length), jnp.int32)
    params, shardings = pretrained.place(params, module, mesh, rules, tokens)
    return (
        clip_tokenizer.tokenizer,
        module,
        {"text_encoder": params},
        {"text_encoder": shardings},
    )
