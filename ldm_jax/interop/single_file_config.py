"""The architecture of an original Stable Diffusion / CompVis checkpoint, read off its tensors.

Levels, channels, layers per block, attention levels (spatial transformers or CompVis'
plain `qkv` attention blocks), transformer depth, context width, 1x1-conv or linear
transformer projections, class embeddings, latent channels and (VQ) the codebook come from
tensor shapes and names; the result is the config of the diffusers class that computes the
same (`UNet2DConditionModel` or `UNet2DModel`; `AutoencoderKL` or `VQModel`), which
`diffusers_config` turns into our modules. What shapes cannot tell (attention heads, norm
groups) takes the defaults of the original models unless given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_jax.interop.diffusers_autoencoder_config import VAE_CLASS_NAME, VQ_CLASS_NAME
from ldm_jax.interop.diffusers_config import PLAIN_UNET_CLASS_NAME, UNET_CLASS_NAME
from ldm_jax.interop.single_file_names import (
    autoencoder_layout_from_names,
    numbered_children,
    unet_layout_from_names,
)

SD1_NUM_HEADS = 8
SD2_HEAD_WIDTH = 64
# CompVis' latent diffusion models (class-conditional ImageNet, CelebA-HQ, LSUN, ...) set
# num_head_channels=32.
COMPVIS_HEAD_WIDTH = 32
NORM_NUM_GROUPS = 32  # every CompVis and Stable Diffusion model; GroupNorm shapes cannot tell
VQ_CODEBOOK = "quantize.embedding.weight"
_CROSS_ATTENTION_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D")


def unet_config_from_original(
    tensors: Mapping[str, np.ndarray],
    *,
    num_heads: int | None = None,
    head_width: int | None = None,
) -> dict[str, Any]:
    """The diffusers config of original U-Net tensors: a `UNet2DConditionModel`'s, or a
    `UNet2DModel`'s when the U-Net attends with CompVis' plain `qkv` blocks.

    Args:
      tensors: the U-Net's tensors, `model.diffusion_model.` removed from their names.
      num_heads: attention heads of every spatial transformer (see `load_single_file`).
      head_width: channels per attention head; plain attention blocks default to
        CompVis' 32.

    Raises:
      ValueError: a tensor the architecture is read from is missing, or the heads do not
        divide the channels.
    """
    layout = unet_layout_from_names(tensors)
    step = layout.layers_per_block + 1
    channels = [
        shape_of(tensors, f"input_blocks.{1 + level * step}.0.out_layers.3.weight", "U-Net")[0]
        for level in range(layout.levels)
    ]
    plain = layout.attention_type == "plain"
    down, up = ("AttnDownBlock2D", "AttnUpBlock2D") if plain else _CROSS_ATTENTION_BLOCKS
    config: dict[str, Any] = {
        "_class_name": PLAIN_UNET_CLASS_NAME if plain else UNET_CLASS_NAME,
        "in_channels": shape_of(tensors, "input_blocks.0.0.weight", "U-Net")[1],
        "out_channels": shape_of(tensors, "out.2.weight", "U-Net")[0],
        "block_out_channels": channels,
        "layers_per_block": layout.layers_per_block,
        "down_block_types": [
            down if attention else "DownBlock2D" for attention in layout.attention_levels
        ],
        "up_block_types": [
            up if attention else "UpBlock2D" for attention in reversed(layout.attention_levels)
        ],
        "norm_num_groups": NORM_NUM_GROUPS,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    if plain:
        config |= _plain_attention_config(layout.mid_block_attention, num_heads, head_width)
    else:
        config["mid_block_type"] = (
            "UNetMidBlock2DCrossAttn" if layout.mid_block_attention else "UNetMidBlock2D"
        )
    transformers = sorted(
        name.removesuffix(".proj_in.weight") for name in tensors if name.endswith(".proj_in.weight")
    )
    if transformers:
        first = transformers[0]
        linear = tensors[f"{first}.proj_in.weight"].ndim == 2
        context = shape_of(tensors, f"{first}.transformer_blocks.0.attn2.to_k.weight", "U-Net")
        config |= {
            "cross_attention_dim": context[1],
            "transformer_layers_per_block": len(
                numbered_children(tensors, f"{first}.transformer_blocks")
            ),
            "use_linear_projection": linear,
            "attention_head_dim": _attention_heads(channels, linear, num_heads, head_width),
        }
    if "label_emb.weight" in tensors:
        config["num_class_embeds"] = int(tensors["label_emb.weight"].shape[0])
    return config


def _plain_attention_config(
    mid_block_attention: bool, num_heads: int | None, head_width: int | None
) -> dict[str, Any]:
    if num_heads is not None:
        raise ValueError(
            f"num_heads={num_heads}: CompVis' plain attention blocks are read with a head "
            "width (head_width, channels per head; their num_head_channels), not a head count."
        )
    if not mid_block_attention:
        raise ValueError(
            "the U-Net has plain attention blocks but none in its middle block: CompVis' and "
            "diffusers' UNet2DModel always attend there, so this checkpoint is not supported."
        )
    return {"attention_head_dim": head_width or COMPVIS_HEAD_WIDTH, "add_attention": True}


def vae_config_from_original(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The diffusers `AutoencoderKL` (or, with a codebook, `VQModel`) config of original
    autoencoder tensors.

    Args:
      tensors: the autoencoder's tensors, `first_stage_model.` removed from their names.

    Raises:
      ValueError: a tensor the architecture is read from is missing.
    """
    layout = autoencoder_layout_from_names(tensors)
    last = layout.layers_per_block - 1
    attention_levels = layout.attention_levels or (False,) * layout.levels
    config = {
        "_class_name": VAE_CLASS_NAME,
        "in_channels": shape_of(tensors, "encoder.conv_in.weight", "autoencoder")[1],
        "out_channels": shape_of(tensors, "decoder.conv_out.weight", "autoencoder")[0],
        "latent_channels": shape_of(tensors, "decoder.conv_in.weight", "autoencoder")[1],
        "block_out_channels": [
            shape_of(tensors, f"encoder.down.{level}.block.{last}.conv2.weight", "autoencoder")[0]
            for level in range(layout.levels)
        ],
        "layers_per_block": layout.layers_per_block,
        "down_block_types": [
            "AttnDownEncoderBlock2D" if attention else "DownEncoderBlock2D"
            for attention in attention_levels
        ],
        "up_block_types": [
            "AttnUpDecoderBlock2D" if attention else "UpDecoderBlock2D"
            for attention in reversed(attention_levels)
        ],
        "mid_block_add_attention": layout.mid_block_attention,
        "norm_num_groups": NORM_NUM_GROUPS,
    }
    if VQ_CODEBOOK in tensors:
        codes, width = shape_of(tensors, VQ_CODEBOOK, "autoencoder")
        config |= {"_class_name": VQ_CLASS_NAME, "num_vq_embeddings": codes, "vq_embed_dim": width}
    return config


def _attention_heads(
    channels: list[int], linear: bool, num_heads: int | None, head_width: int | None
) -> int | list[int]:
    """diffusers' `attention_head_dim`: a head count, or one per level (its SD 2 usage)."""
    if num_heads is not None and head_width is not None:
        raise ValueError(
            f"give num_heads ({num_heads}) or head_width ({head_width}), not both: the "
            "other follows from the channels."
        )
    if num_heads is not None:
        return num_heads
    if head_width is None and not linear:
        return SD1_NUM_HEADS
    width = head_width or SD2_HEAD_WIDTH
    if any(level_channels % width for level_channels in channels):
        raise ValueError(
            f"head_width={width} does not divide the U-Net's channels {channels}: pass "
            "num_heads or a head_width that divides them."
        )
    return [level_channels // width for level_channels in channels]


def shape_of(tensors: Mapping[str, np.ndarray], name: str, what: str) -> tuple[int, ...]:
    """The shape of `tensors[name]`, or a ValueError naming the missing tensor."""
    if name not in tensors:
        raise ValueError(
            f"the {what} has no tensor {name!r}, which its architecture is read from: the "
            "checkpoint is incomplete or not an original Stable Diffusion / CompVis one."
        )
    return tuple(int(size) for size in tensors[name].shape)
