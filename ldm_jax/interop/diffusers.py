"""diffusers-format U-Net and autoencoder directories, read and written.

A diffusers model directory holds `config.json` (the architecture; `_class_name` names the
class) and `diffusion_pytorch_model.safetensors` (or a sharded index); a pipeline keeps one
in each of its `unet/` and `vae/` (or `vqvae/`) folders. U-Nets are `UNet2DConditionModel`s
or `UNet2DModel`s, autoencoders `AutoencoderKL`s or `VQModel`s: their configs map to module
fields in `diffusers_config` and `diffusers_autoencoder_config` (re-exported here); weights
map one to one through `convert.torch_to_flax` / `flax_to_torch` (a `VQModel`'s codebook
`quantize.embedding.weight` is our `quantize/embedding`); no pickle is ever opened.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import storage
from ldm_jax.interop.convert import ImportedModel, flax_to_torch, torch_to_flax
from ldm_jax.interop.diffusers_autoencoder_config import (
    VAE_CLASS_NAME,
    VQ_CLASS_NAME,
    vae_from_diffusers_config,
    vae_to_diffusers_config,
)
from ldm_jax.interop.diffusers_config import (
    DEFAULT_SCALING_FACTOR,
    PLAIN_UNET_CLASS_NAME,
    UNET_CLASS_NAME,
    unet_diffusers_class,
    unet_from_diffusers_config,
    unet_to_diffusers_config,
)
from ldm_jax.interop.safetensors_io import (
    find_weights_file,
    read_safetensors,
    refuse_pickle,
    write_safetensors,
)
from ldm_jax.models import AutoencoderKL, UNet, VQAutoencoder

__all__ = [
    "load_diffusers_unet",
    "load_diffusers_vae",
    "params_to_state_dict",
    "save_diffusers_unet",
    "save_diffusers_vae",
    "unet_diffusers_class",
    "unet_from_diffusers_config",
    "unet_params_from_state_dict",
    "unet_to_diffusers_config",
    "vae_from_diffusers_config",
    "vae_params_from_state_dict",
    "vae_to_diffusers_config",
]

CONFIG_NAME = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
# Read when the float32 weights are absent: the half-precision variant diffusers also writes.
_WEIGHTS_STEMS = (WEIGHTS_STEM, f"{WEIGHTS_STEM}.fp16")
# Attention projections of diffusers checkpoints written before diffusers 0.14.
_LEGACY_ATTENTION_NAME = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_ATTENTION_RENAMES = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}
# A VQModel's codebook is an `nn.Embedding` inside `quantize`; ours a parameter of `quantize`.
_CODEBOOK_NAMES = ("quantize.embedding.weight", "quantize.embedding")


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
def unet_params_from_state_dict(unet: UNet, state_dict: Mapping[str, np.ndarray]) -> dict:
    """The U-Net's parameter tree (apply as `{"params": tree}`) from a diffusers state dict.

    Raises:
      WeightsMismatchError: a tensor has another shape than `unet` expects (naming it and
        both shapes), or tensors are missing or unexpected.
    """
    return torch_to_flax(state_dict, _abstract_unet_params(unet), what="U-Net")


def vae_params_from_state_dict(
    vae: AutoencoderKL | VQAutoencoder, state_dict: Mapping[str, np.ndarray]
) -> dict:
    """The autoencoder's parameter tree from a diffusers `AutoencoderKL` or `VQModel` state
    dict, old names included.

    Checkpoints written before diffusers 0.14 name the attention projections `query`,
    `key`, `value` and `proj_attn`; they are read as `to_q`, `to_k`, `to_v` and `to_out.0`.

    Raises:
      WeightsMismatchError: as `unet_params_from_state_dict`.
    """
    diffusers_codebook, codebook = _CODEBOOK_NAMES
    renamed = {
        codebook if name == diffusers_codebook else _current_attention_name(name): value
        for name, value in state_dict.items()
    }
    return torch_to_flax(renamed, _abstract_vae_params(vae), what="autoencoder")


def params_to_state_dict(params: Any) -> dict[str, np.ndarray]:
    """A Flax parameter tree to a diffusers (PyTorch) state dict: names, layouts, float32."""
    state_dict = flax_to_torch(params)
    codebook = state_dict.pop("quantize.weight", None)  # `quantize/embedding`: a VQ codebook
    if codebook is not None:
        state_dict[_CODEBOOK_NAMES[0]] = codebook
    return state_dict


# ---------------------------------------------------------------------------------------------
# Directories
# ---------------------------------------------------------------------------------------------
def load_diffusers_unet(path: str) -> ImportedModel:
    """Reads a diffusers `UNet2DConditionModel` or `UNet2DModel` directory (a pipeline's
    `unet/`).

    Raises:
      FileNotFoundError: `path` lacks `config.json` or safetensors weights.
      PickleRefusedError: the weights are pickled (`.bin`, `.ckpt`, ...).
      ValueError: the config uses an unsupported option (naming the key).
      WeightsMismatchError: the weights do not fit the config.
    """
    config, state_dict = _read_model_directory(
        path, f"{UNET_CLASS_NAME} or {PLAIN_UNET_CLASS_NAME}"
    )
    unet = unet_from_diffusers_config(config)
    return ImportedModel(unet, unet_params_from_state_dict(unet, state_dict))


def load_diffusers_vae(path: str) -> ImportedModel:
    """Reads a diffusers `AutoencoderKL` or `VQModel` directory (a pipeline's `vae/` or
    `vqvae/`): an `AutoencoderKL` or a `VQAutoencoder`.

    The result's `extras["scaling_factor"]` is the config's latent scaling factor (diffusers'
    default 0.18215 when the config has none).

    Raises:
      As `load_diffusers_unet`.
    """
    config, state_dict = _read_model_directory(path, f"{VAE_CLASS_NAME} or {VQ_CLASS_NAME}")
    vae = vae_from_diffusers_config(config)
    scaling_factor = float(config.get("scaling_factor", DEFAULT_SCALING_FACTOR))
    return ImportedModel(
        vae, vae_params_from_state_dict(vae, state_dict), {"scaling_factor": scaling_factor}
    )


def save_diffusers_unet(
    unet: UNet, params: Any, out_dir: str, sample_size: int | None = None
) -> None:
    """Writes `config.json` and `diffusion_pytorch_model.safetensors` that diffusers'
    `from_pretrained(out_dir)` of the class computing as `unet` loads: `UNet2DModel` for
    plain attention, else `UNet2DConditionModel` (see `unet_diffusers_class`).

    Args:
      unet: the U-Net.
      params: its parameter tree.
      out_dir: the directory to write (created if missing).
      sample_size: the default latent side of diffusers pipelines, or None.

    Raises:
      ValueError: no diffusers U-Net computes as `unet` (the message says why).
      WeightsMismatchError: `params` are not the parameters of `unet`.
    """
    config = unet_to_diffusers_config(unet, sample_size)
    state_dict = params_to_state_dict(params)
    unet_params_from_state_dict(unet, state_dict)  # refuses params of another architecture
    _write_model_directory(out_dir, config, state_dict)


def save_diffusers_vae(
    vae: AutoencoderKL | VQAutoencoder, params: Any, out_dir: str, scaling_factor: float
) -> None:
    """Writes a directory that diffusers' `AutoencoderKL.from_pretrained(out_dir)` (or, for a
    `VQAutoencoder`, `VQModel.from_pretrained`) loads.

    Args:
      vae: the autoencoder.
      params: its parameter tree.
      out_dir: the directory to write (created if missing).
      scaling_factor: what latents are multiplied by before the U-Net sees them.

    Raises:
      WeightsMismatchError: `params` are not the parameters of `vae`.
    """
    state_dict = params_to_state_dict(params)
    vae_params_from_state_dict(vae, state_dict)  # refuses params of another architecture
    _write_model_directory(out_dir, vae_to_diffusers_config(vae, scaling_factor), state_dict)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _current_attention_name(name: str) -> str:
    match = _LEGACY_ATTENTION_NAME.match(name)
    if match is None:
        return name
    prefix, old = match.groups()
    return f"{prefix}{_LEGACY_ATTENTION_RENAMES[old]}.{name[match.end() :]}"


def _abstract_unet_params(unet: UNet) -> Any:
    """The U-Net's parameter shapes, traced with the smallest inputs (nothing computed)."""
    size = 2 ** (len(unet.block_out_channels) - 1)
    x = jax.ShapeDtypeStruct((1, size, size, unet.in_channels), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((1,), jnp.float32)
    context = None
    if unet.takes_context:
        context = jax.ShapeDtypeStruct((1, 1, unet.context_dim), jnp.float32)
    labels = None if unet.num_classes is None else jax.ShapeDtypeStruct((1,), jnp.int32)
    key = jax.random.key(0)
    return jax.eval_shape(unet.init, key, x, timesteps, context, labels)["params"]


def _abstract_vae_params(vae: AutoencoderKL | VQAutoencoder) -> Any:
    """The autoencoder's parameter shapes, traced with the smallest images."""
    size = vae.downsample_factor
    images = jax.ShapeDtypeStruct((1, size, size, vae.in_channels), jnp.float32)
    key = jax.random.key(0)
    return jax.eval_shape(vae.init, {"params": key, "sample": key}, images)["params"]


def _read_model_directory(path: str, class_name: str) -> tuple[dict, dict[str, np.ndarray]]:
    if storage.as_path(path).is_file():
        refuse_pickle(path)
        raise FileNotFoundError(
            f"{path} is a file; pass the diffusers {class_name} directory that holds "
            f"{CONFIG_NAME} and {WEIGHTS_STEM}.safetensors."
        )
    weights_path = find_weights_file(path, _WEIGHTS_STEMS)
    config_path = storage.join(path, CONFIG_NAME)
    config_file = storage.as_path(config_path)
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: a diffusers {class_name} directory holds {CONFIG_NAME} "
            f"beside its weights (of a pipeline, pass its unet/ or vae/ folder)."
        )
    return json.loads(config_file.read_text()), read_safetensors(weights_path)


def _write_model_directory(out_dir: str, config: dict, state_dict: dict[str, np.ndarray]) -> None:
    folder = storage.as_path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_safetensors(state_dict, storage.join(out_dir, f"{WEIGHTS_STEM}.safetensors"))
