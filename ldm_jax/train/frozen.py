"""The frozen inputs of stage 2: the autoencoder (trained in stage 1 or pretrained), loaded as
inference loads it, and the text conditioning (the word tokenizer, built from the captions on
the first run, or a pretrained CLIP text model with its tokenizer)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from ldm_jax.pipeline import load
from ldm_jax.pipeline import workdir as workdir_lib
from ldm_jax.train import autoencoder as autoencoder_stage
from ldm_jax.train import data as data_lib


def shardings_of(params: Any) -> Any:
    """The shardings of arrays on a mesh, as a jitted step's ``in_shardings`` takes them."""
    return jax.tree.map(lambda x: x.sharding, params)


def load_autoencoder(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, rules
) -> tuple[Any, float]:
    """The autoencoder's params on the mesh and its latent scale, measured on the training
    data (and recorded in the stage-1 workdir) the first time stage 2 uses the autoencoder."""
    autoencoder = load.load_autoencoder(config, workdir, mesh, rules)
    scale = autoencoder.latent_scale
    if scale is None:
        scale = autoencoder_stage.measure_latent_scale(config, autoencoder.params, mesh)
        ae_workdir = workdir_lib.autoencoder_workdir(config, workdir)
        workdir_lib.write_latent_scale(ae_workdir, scale, autoencoder.step)
    return autoencoder.params, scale


def load_conditioning(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, rules, source: Any
) -> tuple[Any, Any, dict]:
    """(tokenizer or None, pretrained text encoder or None, its frozen params on the mesh):
    ``load.load_conditioning`` with a from-scratch encoder's tokenizer built from ``source``'s
    captions on the first run (then read from the workdir)."""
    tokenizer = None
    text = config.diffusion.text_encoder
    if config.diffusion.conditioning == "text" and text.kind == "scratch":
        tokenizer = data_lib.load_or_build_tokenizer(workdir, config.data, source)
    return load.load_conditioning(config, workdir, mesh, rules, tokenizer)
