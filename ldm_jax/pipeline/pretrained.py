"""Pretrained weights named by a config: an autoencoder or U-Net, a CLIP text model.

A workdir made by `ldm-jax import` holds these as diffusers / transformers directories
(`vae/` or `vqvae/`, `unet/`, `text_encoder/`, `tokenizer/`), or, for a model no diffusers
pipeline computes as (CompVis' class-conditional ImageNet LDM), as one original
single file (`model.safetensors`); its config names them with paths relative to the
workdir. Training and sampling read them here, check that they have the architecture the
config describes, and place them on the mesh.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from ldm_jax import config as config_lib
from ldm_jax import storage
from ldm_jax.data.clip_tokenizer import ClipTokenizer
from ldm_jax.interop import clip as clip_interop
from ldm_jax.interop import diffusers as diffusers_interop
from ldm_jax.interop import single_file
from ldm_jax.interop.convert import ImportedModel
from ldm_jax.parallel import sharding
from ldm_jax.pipeline import builders
from ldm_jax.pipeline.workdir import resolve


def _read(path: str, part: str) -> ImportedModel:
    """The `part` ("unet" or "vae") of a diffusers model folder or an original single file."""
    if path.endswith(".safetensors") and storage.as_path(path).is_file():
        components = single_file.load_single_file(path)
        if part not in components:
            raise config_lib.ConfigError(f"{path} holds no {part}")
        return components[part]
    if part == "unet":
        return diffusers_interop.load_diffusers_unet(path)
    return diffusers_interop.load_diffusers_vae(path)


def _check_fields(what: str, key: str, loaded: nn.Module, expected: nn.Module, fields) -> None:
    if type(loaded) is not type(expected):
        raise config_lib.ConfigError(
            f"the {what} weights in {key} are of a {type(loaded).__name__}, but the config "
            f"describes a {type(expected).__name__}: fix the config (or re-run `ldm-jax import`)"
        )
    for field in fields:
        have, want = getattr(loaded, field), getattr(expected, field)
        if (tuple(have) if isinstance(have, list) else have) != (
            tuple(want) if isinstance(want, list) else want
        ):
            raise config_lib.ConfigError(
                f"the {what} weights in {key} have {field}={have!r}, but the config describes "
                f"{field}={want!r}: fix the config (or re-run `ldm-jax import`)"
            )


def place(params: Any, module: nn.Module, mesh: Mesh, rules, *init_args) -> tuple[Any, Any]:
    """Puts host `params` of `module` on the mesh with the shardings its axis names give
    (each device receives only its shards).

    Returns:
      (params, shardings).
    """
    abstract = jax.eval_shape(
        lambda: module.init(jax.random.key(0, impl="rbg"), *init_args)["params"]
    )
    shardings = sharding.logical_shardings(abstract, mesh, rules)
    with jax.set_mesh(mesh):
        return jax.device_put(params, shardings), shardings


def load_autoencoder(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, rules
) -> tuple[Any, Any, float]:
    """The autoencoder of `config.autoencoder.pretrained`: (params, shardings, latent scale)."""
    imported = _read(resolve(workdir, config.autoencoder.pretrained), "vae")
    expected = builders.build_autoencoder(config)
    fields = ["block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups"]
    fields += ["mid_block_attention", "attention_levels"]
    if config.autoencoder.kind == "vq":
        fields.append("num_embeddings")
    _check_fields("autoencoder", "config.autoencoder.pretrained", imported.module, expected, fields)
    size = config.data.image_size
    images = jnp.zeros((1, size, size, expected.in_channels), jnp.float32)
    params, shardings = place(imported.params, expected, mesh, rules, images, False)
    return params, shardings, float(imported.extras["scaling_factor"])


def load_clip(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[nn.Module, Any, ClipTokenizer]:
    """The frozen CLIP text model the config names: (module, params, tokenizer)."""
    text = config.diffusion.text_encoder
    path = resolve(workdir, text.pretrained)
    imported = clip_interop.load_clip_text_encoder(path)
    module = imported.module.clone(skip_last_layers=text.skip_last_layers)
    if module.width != text.width:
        raise config_lib.ConfigError(
            f"the CLIP text model in config.diffusion.text_encoder.pretrained has width "
            f"{module.width}, but config.diffusion.text_encoder.width={text.width} (the U-Net's "
            "cross-attention width): set them equal"
        )
    tokenizer = ClipTokenizer.from_directory(
        resolve(workdir, text.tokenizer or text.pretrained), max_length=module.max_length
    )
    return module, imported.params, tokenizer


def initial_unet_params(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Host params of `config.diffusion.unet.pretrained` for the U-Net the config describes."""
    imported = _read(resolve(workdir, config.diffusion.unet.pretrained), "unet")
    expected = builders.build_unet(config)
    fields = ("block_out_channels", "layers_per_block", "attention_levels", "context_dim")
    # Heads and the attention kind leave the shapes alone but change what is computed.
    fields += ("heads_per_level", "attention_type", "num_classes", "class_conditioning")
    _check_fields("U-Net", "config.diffusion.unet.pretrained", imported.module, expected, fields)
    return imported.params
