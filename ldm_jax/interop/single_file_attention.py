"""CompVis' plain attention blocks: their fused `qkv` in diffusers' `to_q`, `to_k`, `to_v`.

The U-Nets of CompVis' unconditional LDMs (openaimodel's `AttentionBlock`) project queries,
keys and values with one 1x1 `Conv1d` to 3 x channels, `qkv`, and the output with a 1x1
`Conv1d` `proj_out`; diffusers' `UNet2DModel` (and the U-Net here) has dense `to_q`, `to_k`,
`to_v` and `to_out.0`. The rows of `qkv` are ordered head by head, each head's q, k and v in
turn (`QKVAttentionLegacy`), so splitting and fusing need each block's number of heads.
Names here are diffusers' module paths (`down_blocks.1.attentions.0.qkv.weight`), as
`single_file_names.unet_from_original` leaves them and `unet_to_original` takes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

_PROJECTIONS = ("to_q", "to_k", "to_v")
_OUTPUT = "to_out.0"


def heads_of_block(module: str, heads_per_level: Sequence[int]) -> int:
    """The heads of the attention block at diffusers path `module` (up levels reversed)."""
    kind, _, rest = module.partition(".")
    last = len(heads_per_level) - 1
    if kind == "down_blocks":
        return heads_per_level[int(rest.split(".")[0])]
    if kind == "up_blocks":
        return heads_per_level[last - int(rest.split(".")[0])]
    return heads_per_level[last]  # mid_block


def split_fused_attention(
    tensors: Mapping[str, np.ndarray], heads_per_level: Sequence[int]
) -> dict[str, np.ndarray]:
    """Every `X.qkv.{weight,bias}` as `X.to_q/.to_k/.to_v`, and `to_out.0` weights dense."""
    out = {}
    for name, value in tensors.items():
        module, _, param = name.rpartition(".")
        value = np.asarray(value)
        if module.endswith(".qkv"):
            block = module.removesuffix(".qkv")
            fused = value.reshape(value.shape[0], -1) if param == "weight" else value
            heads = heads_of_block(block, heads_per_level)
            channels = fused.shape[0] // 3
            per_head = fused.reshape(heads, 3, channels // heads, *fused.shape[1:])
            for index, projection in enumerate(_PROJECTIONS):
                split = per_head[:, index].reshape(channels, *fused.shape[1:])
                out[f"{block}.{projection}.{param}"] = split
        elif module.endswith(_OUTPUT) and param == "weight" and value.ndim == 3:
            out[name] = value[:, :, 0]  # Conv1d (out, in, 1) -> dense (out, in)
        else:
            out[name] = value
    return out


def fuse_attention(
    tensors: Mapping[str, np.ndarray], heads_per_level: Sequence[int]
) -> dict[str, np.ndarray]:
    """Inverse of `split_fused_attention`: `X.qkv` and `to_out.0` as 1x1 Conv1d weights."""
    out = {}
    for name, value in tensors.items():
        module, _, param = name.rpartition(".")
        block, _, projection = module.rpartition(".")
        if projection in _PROJECTIONS:
            if projection != _PROJECTIONS[0]:
                continue  # fused with to_q
            heads = heads_of_block(block, heads_per_level)
            parts = [np.asarray(tensors[f"{block}.{p}.{param}"]) for p in _PROJECTIONS]
            channels = parts[0].shape[0]
            per_head = [p.reshape(heads, channels // heads, *p.shape[1:]) for p in parts]
            fused = np.stack(per_head, axis=1).reshape(3 * channels, *parts[0].shape[1:])
            out[f"{block}.qkv.{param}"] = fused[..., None] if param == "weight" else fused
        elif module.endswith(_OUTPUT) and param == "weight":
            out[name] = np.asarray(value)[..., None]
        else:
            out[name] = value
    return out
