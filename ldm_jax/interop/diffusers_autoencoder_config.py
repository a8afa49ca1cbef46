"""diffusers autoencoder configs (`AutoencoderKL`, `VQModel`) to the fields of ours, and back.

A config's `_class_name` says which it is: `AutoencoderKL` maps to `AutoencoderKL`, `VQModel`
to `VQAutoencoder`. Both have the same encoder and decoder: levels whose blocks are
`AttnDownEncoderBlock2D` / `AttnUpDecoderBlock2D` are the `attention_levels`, which must be
the same resolutions on both paths. A `VQModel`'s `num_vq_embeddings` is `num_embeddings`;
its codebook must be as wide as the latents (`vq_embed_dim`, which diffusers allows to
differ). As for the U-Nets (`diffusers_config`), options that would make diffusers compute
something else raise a ValueError naming the key. The latent `scaling_factor` is no field of
the modules: the loaders keep it as an extra and the writers take it as an argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm_jax.interop.diffusers_config import (
    DIFFUSERS_VERSION,
    checked_config,
    mirrored_block_levels,
    unsupported_option,
)
from ldm_jax.models import AutoencoderKL, VQAutoencoder

VAE_CLASS_NAME = "AutoencoderKL"
VQ_CLASS_NAME = "VQModel"

# Defaults of diffusers' constructors, for the keys read from a config.
_CODER_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "mid_block_add_attention": True,
}
_VAE_DEFAULTS = {**_CODER_DEFAULTS, "latent_channels": 4}
_VQ_DEFAULTS = {
    **_CODER_DEFAULTS,
    "latent_channels": 3,
    "num_vq_embeddings": 256,
    "vq_embed_dim": None,
}
# Options whose other values change the computation: {key: supported values}, the first
# being diffusers' default (and what is written).
_VAE_FIXED_OPTIONS: dict[str, tuple] = {
    "act_fn": ("silu", "swish"),
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
}
_VQ_FIXED_OPTIONS: dict[str, tuple] = {
    "act_fn": ("silu", "swish"),
    "norm_type": ("group",),
    # Decoding codebook indices instead of latents (`force_not_quantize`): not a latent model.
    "lookup_from_codebook": (False,),
}
# Block types indexed by whether the block attends.
_DOWN_BLOCKS = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
_UP_BLOCKS = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")


def vae_from_diffusers_config(config: Mapping[str, Any]) -> AutoencoderKL | VQAutoencoder:
    """The autoencoder of a diffusers `AutoencoderKL` or `VQModel` config (float32 compute).

    Raises:
      ValueError: the config is of another class, or uses an option the autoencoders here do
        not reproduce; the message names the key, its value and what is supported.
    """
    found = config.get("_class_name", VAE_CLASS_NAME)
    if found == VQ_CLASS_NAME:
        config = checked_config(config, _VQ_DEFAULTS, VQ_CLASS_NAME, _VQ_FIXED_OPTIONS)
        if config["vq_embed_dim"] not in (None, config["latent_channels"]):
            supported = f"None or latent_channels={config['latent_channels']}"
            raise unsupported_option(
                VQ_CLASS_NAME, "vq_embed_dim", config["vq_embed_dim"], supported
            )
        return VQAutoencoder(
            num_embeddings=int(config["num_vq_embeddings"]),
            **_coder_fields(config, VQ_CLASS_NAME),
        )
    if found != VAE_CLASS_NAME:
        raise ValueError(
            f"the config is of a diffusers {found}, not of a {VAE_CLASS_NAME} or {VQ_CLASS_NAME}."
        )
    config = checked_config(config, _VAE_DEFAULTS, VAE_CLASS_NAME, _VAE_FIXED_OPTIONS)
    return AutoencoderKL(**_coder_fields(config, VAE_CLASS_NAME))


def vae_to_diffusers_config(vae: AutoencoderKL | VQAutoencoder, scaling_factor: float) -> dict:
    """The `config.json` of the diffusers `AutoencoderKL` or `VQModel` that computes as `vae`.

    Args:
      vae: the autoencoder.
      scaling_factor: what latents are multiplied by before the U-Net sees them.
    """
    attention = vae.attention_levels or (False,) * len(vae.block_out_channels)
    config = {
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": vae.in_channels,
        "out_channels": vae.out_channels,
        "down_block_types": [_DOWN_BLOCKS[bool(a)] for a in attention],
        "up_block_types": [_UP_BLOCKS[bool(a)] for a in reversed(attention)],
        "block_out_channels": [int(c) for c in vae.block_out_channels],
        "layers_per_block": vae.layers_per_block,
        "latent_channels": vae.latent_channels,
        "norm_num_groups": vae.norm_num_groups,
        "mid_block_add_attention": vae.mid_block_attention,
        "scaling_factor": float(scaling_factor),
    }
    if isinstance(vae, VQAutoencoder):
        return {
            "_class_name": VQ_CLASS_NAME,
            **config,
            "num_vq_embeddings": vae.num_embeddings,
            "vq_embed_dim": vae.latent_channels,
            "force_upcast": False,
            **{key: supported[0] for key, supported in _VQ_FIXED_OPTIONS.items()},
        }
    return {
        "_class_name": VAE_CLASS_NAME,
        **config,
        "force_upcast": True,
        **{key: supported[0] for key, supported in _VAE_FIXED_OPTIONS.items()},
    }


def _coder_fields(config: Mapping[str, Any], class_name: str) -> dict[str, Any]:
    """The fields both autoencoders take, from a config over its class's defaults."""
    channels = tuple(int(c) for c in config["block_out_channels"])
    attention = mirrored_block_levels(config, len(channels), class_name, _DOWN_BLOCKS, _UP_BLOCKS)
    return dict(
        in_channels=int(config["in_channels"]),
        out_channels=int(config["out_channels"]),
        block_out_channels=channels,
        layers_per_block=int(config["layers_per_block"]),
        latent_channels=int(config["latent_channels"]),
        norm_num_groups=int(config["norm_num_groups"]),
        mid_block_attention=bool(config["mid_block_add_attention"]),
        attention_levels=attention if any(attention) else (),
    )
