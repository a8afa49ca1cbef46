"""diffusers U-Net configs to the fields of `UNet`, and back; what every config mapping shares.

Two diffusers classes compute as a `UNet`: `UNet2DConditionModel` (spatial transformers,
`attention_type="transformer"`: Stable Diffusion) and `UNet2DModel` (group-normed
self-attention, `attention_type="plain"`, no context: the unconditional CompVis LDMs). A
config's `_class_name` says which it is; a U-Net is written as the class that computes as it
(`unet_diffusers_class`). Options that would make diffusers compute something the U-Net does
not raise a ValueError naming the config key; options that only change precision
(`upcast_attention`) or a pipeline's defaults (`sample_size`) are accepted and not kept. The
autoencoders' configs are in `diffusers_autoencoder_config`.

Three mappings are not one to one by name:

* `UNet2DConditionModel`'s `attention_head_dim` is, when `num_attention_heads` is not given
  (every released config), the number of heads: it is `UNet.num_attention_heads`.
* `UNet2DModel`'s `attention_head_dim` is what it says, the width of a head (heads per level
  = channels // width); None means one head per level.
* diffusers' class table `num_class_embeds=N` is `UNet.num_classes=N - 1`: the last row is
  the "null" class of classifier-free guidance.

A transformer U-Net without a context (`context_dim=None`) but with attention is written with
one `cross_attention_dim` per level equal to `block_out_channels`: its `attn2` then attends
to the features, as diffusers does when called with `encoder_hidden_states=None`. A
per-level `cross_attention_dim` equal to `block_out_channels` reads back as
`context_dim=None`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ldm_jax.models import UNet

UNET_CLASS_NAME = "UNet2DConditionModel"
PLAIN_UNET_CLASS_NAME = "UNet2DModel"
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
_PLAIN_UNET_DEFAULTS = {
    **{key: _UNET_DEFAULTS[key] for key in ("flip_sin_to_cos", "freq_shift", "dropout")},
    **{key: _UNET_DEFAULTS[key] for key in ("layers_per_block", "norm_eps", "norm_num_groups")},
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D"] + ["AttnDownBlock2D"] * 3,
    "up_block_types": ["AttnUpBlock2D"] * 3 + ["UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "attention_head_dim": 8,
    "attn_norm_num_groups": None,
    "num_class_embeds": None,
    "time_embedding_dim": None,
}
# Options whose other values change the computation in ways the models here do not have:
# {key: supported values}, the first being diffusers' default (and what is written).
_SHARED_FIXED_OPTIONS: dict[str, tuple] = {
    "act_fn": ("silu", "swish"),
    "center_input_sample": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "class_embed_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
}
_UNET_FIXED_OPTIONS: dict[str, tuple] = {
    **_SHARED_FIXED_OPTIONS,
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "addition_embed_type": (None,),
    "class_embeddings_concat": (False,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}
_PLAIN_UNET_FIXED_OPTIONS: dict[str, tuple] = {
    **_SHARED_FIXED_OPTIONS,
    # resnet, attention, resnet: without attention diffusers keeps both resnets, ours one.
    "mid_block_type": ("UNetMidBlock2D",),
    "add_attention": (True,),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
}
# Block types indexed by whether the block attends.
_UNET_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
_UNET_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
_UNET_MID_BLOCKS = ("UNetMidBlock2D", "UNetMidBlock2DCrossAttn")
_PLAIN_UNET_DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
_PLAIN_UNET_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def unet_from_diffusers_config(config: Mapping[str, Any]) -> UNet:
    """The `UNet` of a diffusers `UNet2DConditionModel` or `UNet2DModel` config (float32).

    Raises:
      ValueError: the config is of another class, or uses an option the U-Net here does not
        reproduce; the message names the key, its value and what is supported.
    """
    found = config.get("_class_name", UNET_CLASS_NAME)
    if found == PLAIN_UNET_CLASS_NAME:
        return _plain_unet_from_config(config)
    if found != UNET_CLASS_NAME:
        raise ValueError(
            f"the config is of a diffusers {found}, not of a {UNET_CLASS_NAME} or "
            f"{PLAIN_UNET_CLASS_NAME}."
        )
    return _transformer_unet_from_config(config)


def unet_diffusers_class(unet: UNet) -> str:
    """The diffusers class that computes as `unet`: `UNet2DModel` for plain attention.

    Raises:
      ValueError: no diffusers U-Net computes as `unet` (the message says why).
    """
    if unet.num_classes is not None and unet.class_conditioning == "context":
        raise ValueError(
            "the U-Net takes its class label as a cross-attention token (CompVis' "
            "ClassEmbedder, class_conditioning='context'), which no diffusers U-Net does: "
            "export it as an original single file (--to=safetensors) instead"
        )
    attends = any(unet.attention_levels) or unet.mid_block_attention
    if unet.attention_type != "plain" or not attends:
        return UNET_CLASS_NAME
    if not unet.mid_block_attention:
        raise ValueError(
            "the U-Net has plain attention but none in its mid block, which no diffusers U-Net "
            "has: UNet2DModel's mid block is resnet, attention, resnet (two resnets even with "
            "add_attention=False), this U-Net's a single resnet"
        )
    return PLAIN_UNET_CLASS_NAME


def unet_to_diffusers_config(unet: UNet, sample_size: int | None = None) -> dict:
    """The `config.json` of the diffusers U-Net (`unet_diffusers_class`) that computes as `unet`.

    Args:
      unet: the U-Net.
      sample_size: the latent height and width diffusers pipelines generate by default
        (their default image side is this times the autoencoder's factor), or None.

    Raises:
      ValueError: no diffusers U-Net computes as `unet`.
    """
    attention = [bool(a) for a in unet.attention_levels]
    common = {
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "block_out_channels": [int(c) for c in unet.block_out_channels],
        "layers_per_block": unet.layers_per_block,
        "num_class_embeds": None if unet.num_classes is None else unet.num_classes + 1,
        "norm_num_groups": unet.norm_num_groups,
        "norm_eps": unet.norm_eps,
        "dropout": unet.dropout,
        "flip_sin_to_cos": unet.flip_sin_to_cos,
        "freq_shift": unet.freq_shift,
        "time_embedding_dim": None,
    }
    if unet_diffusers_class(unet) == PLAIN_UNET_CLASS_NAME:
        return {
            "_class_name": PLAIN_UNET_CLASS_NAME,
            **common,
            "down_block_types": [_PLAIN_UNET_DOWN_BLOCKS[a] for a in attention],
            "up_block_types": [_PLAIN_UNET_UP_BLOCKS[a] for a in reversed(attention)],
            "attention_head_dim": _plain_head_width(unet),
            "attn_norm_num_groups": None,
            **{key: supported[0] for key, supported in _PLAIN_UNET_FIXED_OPTIONS.items()},
        }
    channels = common["block_out_channels"]
    return {
        "_class_name": UNET_CLASS_NAME,
        **common,
        "down_block_types": [_UNET_DOWN_BLOCKS[a] for a in attention],
        "mid_block_type": _UNET_MID_BLOCKS[bool(unet.mid_block_attention)],
        "up_block_types": [_UNET_UP_BLOCKS[a] for a in reversed(attention)],
        "attention_head_dim": _json_per_level(unet.num_attention_heads),
        "num_attention_heads": None,
        "transformer_layers_per_block": _json_per_level(unet.transformer_depth),
        "cross_attention_dim": channels if unet.context_dim is None else unet.context_dim,
        "use_linear_projection": unet.use_linear_projection,
        "upcast_attention": False,
        **{key: supported[0] for key, supported in _UNET_FIXED_OPTIONS.items()},
    }


# ---------------------------------------------------------------------------------------------
# The two U-Net classes
# ---------------------------------------------------------------------------------------------
def _transformer_unet_from_config(config: Mapping[str, Any]) -> UNet:
    config = checked_config(config, _UNET_DEFAULTS, UNET_CLASS_NAME, _UNET_FIXED_OPTIONS)
    fields = _shared_unet_fields(config, UNET_CLASS_NAME, _UNET_DOWN_BLOCKS, _UNET_UP_BLOCKS)
    channels, levels = fields["block_out_channels"], len(fields["block_out_channels"])
    if config["mid_block_type"] not in _UNET_MID_BLOCKS:
        raise unsupported_option(
            UNET_CLASS_NAME, "mid_block_type", config["mid_block_type"], _UNET_MID_BLOCKS
        )
    mid_block_attention = bool(_UNET_MID_BLOCKS.index(config["mid_block_type"]))
    # diffusers' own rule: `attention_head_dim` stands for the number of heads.
    head_key = "num_attention_heads" if config["num_attention_heads"] else "attention_head_dim"
    heads = _per_level(config, head_key, levels, UNET_CLASS_NAME)
    heads_per_level = (heads,) * levels if isinstance(heads, int) else heads
    attended = _attended_levels(fields["attention_levels"], mid_block_attention)
    for level in attended:
        if channels[level] % heads_per_level[level]:
            raise unsupported_option(
                UNET_CLASS_NAME,
                head_key,
                config[head_key],
                f"head counts dividing the channels of their level ({channels[level]} at "
                f"level {level})",
            )
    return UNet(
        **fields,
        mid_block_attention=mid_block_attention,
        num_attention_heads=heads,
        transformer_depth=_per_level(
            config, "transformer_layers_per_block", levels, UNET_CLASS_NAME
        ),
        context_dim=_unet_context_dim(config["cross_attention_dim"], channels, bool(attended)),
        use_linear_projection=bool(config["use_linear_projection"]),
    )


def _plain_unet_from_config(config: Mapping[str, Any]) -> UNet:
    name = PLAIN_UNET_CLASS_NAME
    config = checked_config(config, _PLAIN_UNET_DEFAULTS, name, _PLAIN_UNET_FIXED_OPTIONS)
    fields = _shared_unet_fields(config, name, _PLAIN_UNET_DOWN_BLOCKS, _PLAIN_UNET_UP_BLOCKS)
    channels = fields["block_out_channels"]
    if config["attn_norm_num_groups"] not in (None, config["norm_num_groups"]):
        supported = f"None or norm_num_groups={config['norm_num_groups']}"
        raise unsupported_option(
            name, "attn_norm_num_groups", config["attn_norm_num_groups"], supported
        )
    width = config["attention_head_dim"]
    if width is None:  # diffusers: one head as wide as the block
        heads: int | tuple[int, ...] = 1
    else:
        for level in _attended_levels(fields["attention_levels"], True):
            if not isinstance(width, int) or width < 1 or channels[level] % width:
                supported = (
                    f"None, or a head width dividing the channels of each attending level "
                    f"({channels[level]} at level {level})"
                )
                raise unsupported_option(name, "attention_head_dim", width, supported)
        heads = _compact(tuple(max(c // width, 1) for c in channels))
    return UNet(
        **fields,
        attention_type="plain",
        mid_block_attention=True,
        num_attention_heads=heads,
        context_dim=None,
    )


def _shared_unet_fields(
    config: Mapping[str, Any],
    class_name: str,
    down_blocks: tuple[str, str],
    up_blocks: tuple[str, str],
) -> dict[str, Any]:
    """The `UNet` fields both classes' configs give alike: levels, norms, time, classes."""
    channels = tuple(int(c) for c in config["block_out_channels"])
    levels = len(channels)
    if config["norm_num_groups"] is None:
        raise unsupported_option(class_name, "norm_num_groups", None, "an int")
    if config["time_embedding_dim"] not in (None, 4 * channels[0]):
        supported = f"None or 4 * block_out_channels[0] = {4 * channels[0]}"
        raise unsupported_option(
            class_name, "time_embedding_dim", config["time_embedding_dim"], supported
        )
    layers_per_block = _per_level(config, "layers_per_block", levels, class_name)
    if not isinstance(layers_per_block, int):
        if len(set(layers_per_block)) > 1:
            raise unsupported_option(
                class_name, "layers_per_block", layers_per_block, "one count for all levels"
            )
        layers_per_block = layers_per_block[0]
    num_class_embeds = config["num_class_embeds"]
    if num_class_embeds is not None and num_class_embeds < 1:
        raise unsupported_option(class_name, "num_class_embeds", num_class_embeds, "None or >= 1")
    return dict(
        in_channels=int(config["in_channels"]),
        out_channels=int(config["out_channels"]),
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        attention_levels=mirrored_block_levels(config, levels, class_name, down_blocks, up_blocks),
        num_classes=None if num_class_embeds is None else int(num_class_embeds) - 1,
        norm_num_groups=int(config["norm_num_groups"]),
        norm_eps=float(config["norm_eps"]),
        dropout=float(config["dropout"]),
        flip_sin_to_cos=bool(config["flip_sin_to_cos"]),
        freq_shift=config["freq_shift"],
    )


def _plain_head_width(unet: UNet) -> int | None:
    """`UNet2DModel`'s `attention_head_dim` for `unet`'s heads at its attending levels."""
    channels, heads = unet.block_out_channels, unet.heads_per_level
    attended = _attended_levels(unet.attention_levels, unet.mid_block_attention)
    widths = {channels[level] // heads[level] for level in attended}
    if any(channels[level] % heads[level] for level in attended):
        raise ValueError(
            f"the U-Net's attention heads {heads} do not divide its channels {channels}"
        )
    if len(widths) == 1:
        return widths.pop()
    if all(heads[level] == 1 for level in attended):
        return None  # one head per level, as wide as the level
    raise ValueError(
        f"the U-Net's plain attention has heads of {sorted(widths)} channels at different "
        "levels, but diffusers' UNet2DModel has one head width (attention_head_dim) for all"
    )


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def unsupported_option(class_name: str, key: str, value: Any, supported: Any) -> ValueError:
    """The error for a config option the models here do not reproduce, naming the key."""
    return ValueError(
        f"diffusers {class_name} config {key}={value!r} is not supported; supported: {supported}."
    )


def checked_config(
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
            raise unsupported_option(class_name, key, value, supported)
    return {**defaults, **config}


def mirrored_block_levels(
    config: Mapping[str, Any],
    levels: int,
    class_name: str,
    down_blocks: tuple[str, str],
    up_blocks: tuple[str, str],
) -> tuple[bool, ...]:
    """Per level, whether its blocks attend: `down_blocks[1]` in `down_block_types`, and
    `up_blocks[1]` at the mirrored places of `up_block_types` (the up path runs in reverse).

    Both tuples are (block without attention, block with attention).
    """
    attention = []
    for key, blocks in (("down_block_types", down_blocks), ("up_block_types", up_blocks)):
        types = list(config[key])
        if len(types) != levels or not set(types) <= set(blocks):
            supported = f"{levels} (one per block_out_channels) of {blocks}"
            raise unsupported_option(class_name, key, types, supported)
        attention.append([bool(blocks.index(t)) for t in types])
    down, up = attention
    if down != up[::-1]:
        raise unsupported_option(
            class_name,
            "up_block_types",
            config["up_block_types"],
            f"the mirror of down_block_types {config['down_block_types']} ({up_blocks[1]} "
            f"exactly at the levels of {down_blocks[1]})",
        )
    return tuple(down)


def _attended_levels(attention_levels: Sequence[bool], mid_block_attention: bool) -> list[int]:
    """The levels whose heads are used: those with attention, and the last for the mid block."""
    attended = [level for level, attends in enumerate(attention_levels) if attends]
    return attended + ([len(attention_levels) - 1] if mid_block_attention else [])


def _per_level(
    config: Mapping[str, Any], key: str, levels: int, class_name: str
) -> int | tuple[int, ...]:
    """An int, or a tuple of one int per level, from `config[key]`."""
    value = config[key]
    if isinstance(value, int):
        return value
    is_per_level = isinstance(value, (list, tuple)) and len(value) == levels
    if not is_per_level or not all(isinstance(entry, int) for entry in value):
        raise unsupported_option(class_name, key, value, f"an int or {levels} ints")
    return tuple(value)


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
    raise unsupported_option(UNET_CLASS_NAME, "cross_attention_dim", cross_attention_dim, supported)


def _compact(per_level: tuple[int, ...]) -> int | tuple[int, ...]:
    """One int for equal per-level values, as a config would give them."""
    return per_level[0] if len(set(per_level)) == 1 else per_level


def _json_per_level(value: int | tuple[int, ...]) -> int | list[int]:
    return value if isinstance(value, int) else [int(v) for v in value]
