"""diffusers model configs to the fields of `UNet` and `AutoencoderKL`, and back.

A `UNet2DConditionModel` config maps to `UNet` fields and an `AutoencoderKL` config to
`AutoencoderKL` fields. Options that would make diffusers compute something these models do
not raise a ValueError naming the config key; options that only change precision
(`upcast_attention`, `force_upcast`) or a pipeline's defaults (`sample_size`) are accepted
and not kept.

Two mappings are not one to one by name:

* diffusers' `attention_head_dim` is, when `num_attention_heads` is not given (every
  released config), the number of heads: it is `UNet.num_attention_heads`.
* diffusers' class table `num_class_embeds=N` is `UNet.num_classes=N - 1`: the last row is
  the "null" class of classifier-free guidance.

A U-Net without a context (`context_dim=None`) but with attention is written with one
`cross_attention_dim` per level equal to `block_out_channels`: its `attn2` then attends to
the features, as diffusers does when called with `encoder_hidden_states=None`. A per-level
`cross_attention_dim` equal to `block_out_channels` reads back as `context_dim=None`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm_jax.models import AutoencoderKL, UNet

UNET_CLASS_NAME = "UNet2DConditionModel"
VAE_CLASS_NAME = "AutoencoderKL"
# The diffusers release whose config keys are written.
DIFFUSERS_VERSION = "0.42.1"
# diffusers' AutoencoderKL scaling factor when its config has none (Stable Diffusion 1/2's).
DEFAULT_SCALING_FACTOR = 0.18215

# Defaults of diffusers' constructors, for the keys read from a config.
_UNET_DEFAULTS = {
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "num_class_embeds": None,
    "time_embedding_dim": None,
}
_VAE_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "mid_block_add_attention": True,
}
# Options whose other values change the computation in ways the models here do not have:
# {key: supported values}, the first being diffusers' default (and what is written).
_UNET_FIXED_OPTIONS: dict[str, tuple] = {
    "act_fn": ("silu", "swish"),
    "center_input_sample": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "class_embeddings_concat": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}
_VAE_FIXED_OPTIONS: dict[str, tuple] = {
    "act_fn": ("silu", "swish"),
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
}
# Block types indexed by whether the block attends.
_UNET_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
_UNET_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
_UNET_MID_BLOCKS = ("UNetMidBlock2D", "UNetMidBlock2DCrossAttn")
_VAE_DOWN_BLOCK, _VAE_UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def unet_from_diffusers_config(config: Mapping[str, Any]) -> UNet:
    """The `UNet` of a diffusers `UNet2DConditionModel` config (float32 compute).

    Raises:
      ValueError: the config uses an option the U-Net here does not reproduce; the message
        names the key, its value and what is supported.
    """
    config = _checked_config(config, _UNET_DEFAULTS, UNET_CLASS_NAME, _UNET_FIXED_OPTIONS)
    channels = tuple(int(c) for c in config["block_out_channels"])
    levels = len(channels)
    attention_levels = _unet_attention_levels(config, levels)
    if config["mid_block_type"] not in _UNET_MID_BLOCKS:
        raise _unsupported(
            UNET_CLASS_NAME, "mid_block_type", config["mid_block_type"], _UNET_MID_BLOCKS
        )
    mid_block_attention = bool(_UNET_MID_BLOCKS.index(config["mid_block_type"]))
    if config["norm_num_groups"] is None:
        raise _unsupported(UNET_CLASS_NAME, "norm_num_groups", None, "an int")
    if config["time_embedding_dim"] not in (None, 4 * channels[0]):
        supported = f"None or 4 * block_out_channels[0] = {4 * channels[0]}"
        raise _unsupported(
            UNET_CLASS_NAME, "time_embedding_dim", config["time_embedding_dim"], supported
        )
    layers_per_block = _per_level(config, "layers_per_block", levels)
    if not isinstance(layers_per_block, int):
        if len(set(layers_per_block)) > 1:
            raise _unsupported(
                UNET_CLASS_NAME, "layers_per_block", layers_per_block, "one count for all levels"
            )
        layers_per_block = layers_per_block[0]
    # diffusers' own rule: `attention_head_dim` stands for the number of heads.
    head_key = "num_attention_heads" if config["num_attention_heads"] else "attention_head_dim"
    heads = _per_level(config, head_key, levels)
    heads_per_level = (heads,) * levels if isinstance(heads, int) else heads
    attended = [level for level in range(levels) if attention_levels[level]]
    attended += [levels - 1] if mid_block_attention else []
    for level in attended:
        if channels[level] % heads_per_level[level]:
            raise _unsupported(
                UNET_CLASS_NAME,
                head_key,
                config[head_key],
                f"head counts dividing the channels of their level ({channels[level]} at "
                f"level {level})",
            )
    num_class_embeds = config["num_class_embeds"]
    if num_class_embeds is not None and num_class_embeds < 1:
        raise _unsupported(UNET_CLASS_NAME, "num_class_embeds", num_class_embeds, "None or >= 1")
    return UNet(
        in_channels=int(config["in_channels"]),
        out_channels=int(config["out_channels"]),
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        attention_levels=attention_levels,
        mid_block_attention=mid_block_attention,
        num_attention_heads=heads,
        transformer_depth=_per_level(config, "transformer_layers_per_block", levels),
        context_dim=_unet_context_dim(config["cross_attention_dim"], channels, bool(attended)),
        num_classes=None if num_class_embeds is None else int(num_class_embeds) - 1,
        use_linear_projection=bool(config["use_linear_projection"]),
        norm_num_groups=int(config["norm_num_groups"]),
        norm_eps=float(config["norm_eps"]),
        dropout=float(config["dropout"]),
        flip_sin_to_cos=bool(config["flip_sin_to_cos"]),
        freq_shift=config["freq_shift"],
    )


def unet_to_diffusers_config(unet: UNet, sample_size: int | None = None) -> dict:
    """The `config.json` of the diffusers `UNet2DConditionModel` that computes as `unet`.

    Args:
      unet: the U-Net.
      sample_size: the latent height and width diffusers pipelines generate by default
        (their default image side is this times the autoencoder's factor), or None.
    """
    attention = [bool(a) for a in unet.attention_levels]
    channels = [int(c) for c in unet.block_out_channels]
    return {
        "_class_name": UNET_CLASS_NAME,
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "down_block_types": [_UNET_DOWN_BLOCKS[a] for a in attention],
        "mid_block_type": _UNET_MID_BLOCKS[bool(unet.mid_block_attention)],
        "up_block_types": [_UNET_UP_BLOCKS[a] for a in reversed(attention)],
        "block_out_channels": channels,
        "layers_per_block": unet.layers_per_block,
        "attention_head_dim": _json_per_level(unet.num_attention_heads),
        "num_attention_heads": None,
        "transformer_layers_per_block": _json_per_level(unet.transformer_depth),
        "cross_attention_dim": channels if unet.context_dim is None else unet.context_dim,
        "num_class_embeds": None if unet.num_classes is None else unet.num_classes + 1,
        "use_linear_projection": unet.use_linear_projection,
        "upcast_attention": False,
        "norm_num_groups": unet.norm_num_groups,
        "norm_eps": unet.norm_eps,
        "dropout": unet.dropout,
        "flip_sin_to_cos": unet.flip_sin_to_cos,
        "freq_shift": unet.freq_shift,
        "time_embedding_dim": None,
        **{key: supported[0] for key, supported in _UNET_FIXED_OPTIONS.items()},
    }


def vae_from_diffusers_config(config: Mapping[str, Any]) -> AutoencoderKL:
    """The `AutoencoderKL` of a diffusers `AutoencoderKL` config (float32 compute).

    Raises:
      ValueError: the config uses an option the autoencoder here does not reproduce; the
        message names the key, its value and what is supported.
    """
    config = _checked_config(config, _VAE_DEFAULTS, VAE_CLASS_NAME, _VAE_FIXED_OPTIONS)
    channels = tuple(int(c) for c in config["block_out_channels"])
    for key, block in (("down_block_types", _VAE_DOWN_BLOCK), ("up_block_types", _VAE_UP_BLOCK)):
        if list(config[key]) != [block] * len(channels):
            supported = f"{block!r} for each of the {len(channels)} block_out_channels"
            raise _unsupported(VAE_CLASS_NAME, key, config[key], supported)
    return AutoencoderKL(
        in_channels=int(config["in_channels"]),
        out_channels=int(config["out_channels"]),
        block_out_channels=channels,
        layers_per_block=int(config["layers_per_block"]),
        latent_channels=int(config["latent_channels"]),
        norm_num_groups=int(config["norm_num_groups"]),
        mid_block_attention=bool(config["mid_block_add_attention"]),
    )


def vae_to_diffusers_config(vae: AutoencoderKL, scaling_factor: float) -> dict:
    """The `config.json` of the diffusers `AutoencoderKL` that computes as `vae`.

    Args:
      vae: the autoencoder.
      scaling_factor: what latents are multiplied by before the U-Net sees them.
    """
    levels = len(vae.block_out_channels)
    return {
        "_class_name": VAE_CLASS_NAME,
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": vae.in_channels,
        "out_channels": vae.out_channels,
        "down_block_types": [_VAE_DOWN_BLOCK] * levels,
        "up_block_types": [_VAE_UP_BLOCK] * levels,
        "block_out_channels": [int(c) for c in vae.block_out_channels],
        "layers_per_block": vae.layers_per_block,
        "latent_channels": vae.latent_channels,
        "norm_num_groups": vae.norm_num_groups,
        "mid_block_add_attention": vae.mid_block_attention,
        "scaling_factor": float(scaling_factor),
        "force_upcast": True,
        **{key: supported[0] for key, supported in _VAE_FIXED_OPTIONS.items()},
    }


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _unsupported(class_name: str, key: str, value: Any, supported: Any) -> ValueError:
    return ValueError(
        f"diffusers {class_name} config {key}={value!r} is not supported; supported: {supported}."
    )


def _checked_config(
    config: Mapping[str, Any], defaults: dict, class_name: str, fixed: dict[str, tuple]
) -> dict:
    """`config` over diffusers' defaults, after checking its class and its fixed options."""
    found = config.get("_class_name", class_name)
    if found != class_name:
        raise ValueError(f"the config is of a diffusers {found}, not of a {class_name}.")
    for key, supported in fixed.items():
        value = config.get(key, supported[0])
        # A per-level list is supported when each of its entries is.
        entries = value if isinstance(value, (list, tuple)) else [value]
        if not all(entry in supported for entry in entries):
            raise _unsupported(class_name, key, value, supported)
    return {**defaults, **config}


def _per_level(config: Mapping[str, Any], key: str, levels: int) -> int | tuple[int, ...]:
    """An int, or a tuple of one int per level, from `config[key]`."""
    value = config[key]
    if isinstance(value, int):
        return value
    is_per_level = isinstance(value, (list, tuple)) and len(value) == levels
    if not is_per_level or not all(isinstance(entry, int) for entry in value):
        raise _unsupported(UNET_CLASS_NAME, key, value, f"an int or {levels} ints")
    return tuple(value)


def _unet_attention_levels(config: Mapping[str, Any], levels: int) -> tuple[bool, ...]:
    """Per level, whether it attends: the down and up block types must agree."""
    attention = []
    for key, blocks in (
        ("down_block_types", _UNET_DOWN_BLOCKS),
        ("up_block_types", _UNET_UP_BLOCKS),
    ):
        types = list(config[key])
        if len(types) != levels or not set(types) <= set(blocks):
            supported = f"{levels} (one per block_out_channels) of {blocks}"
            raise _unsupported(UNET_CLASS_NAME, key, types, supported)
        attention.append([bool(blocks.index(t)) for t in types])
    down, up = attention
    if down != up[::-1]:
        raise _unsupported(
            UNET_CLASS_NAME,
            "up_block_types",
            config["up_block_types"],
            f"the mirror of down_block_types {config['down_block_types']} (CrossAttnUpBlock2D "
            f"exactly at the levels of CrossAttnDownBlock2D)",
        )
    return tuple(down)


def _unet_context_dim(
    cross_attention_dim: int | list[int], channels: tuple[int, ...], attends: bool
) -> int | None:
    """The context width; None for no attention, or per-level widths equal to the channels."""
    if not attends:
        return None
    if isinstance(cross_attention_dim, int):
        return cross_attention_dim
    widths = tuple(cross_attention_dim)
    if widths == channels:
        return None
    if len(set(widths)) == 1:
        return widths[0]
    supported = f"an int, or block_out_channels {list(channels)} (attention without a context)"
    raise _unsupported(UNET_CLASS_NAME, "cross_attention_dim", cross_attention_dim, supported)


def _json_per_level(value: int | tuple[int, ...]) -> int | list[int]:
    return value if isinstance(value, int) else [int(v) for v in value]
