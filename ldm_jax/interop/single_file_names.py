"""Tensor names of original Stable Diffusion / CompVis checkpoints, and diffusers' names.

One original checkpoint holds the U-Net under `model.diffusion_model.`, the autoencoder
under `first_stage_model.` and the text encoder under `cond_stage_model.`. The U-Net and
the autoencoder differ from diffusers only in module names; which module is which
follows from a few numbers (`UNetLayout`, `AutoencoderLayout`), from which one table of
module prefixes is built per model, the same table read in both directions:

* U-Net: `input_blocks.{i}.{0,1}` are the down path's resnets and transformers (the
  downsampling conv at `input_blocks.{i}.0.op`), `middle_block.{0,1,2}`, and
  `output_blocks.{i}.{0,1,2}` the up path (the upsampling conv last, at `.1.conv` or
  `.2.conv`); inside a resnet `in_layers.{0,2}`, `emb_layers.1`, `out_layers.{0,3}`,
  `skip_connection`; transformers keep diffusers' inner names. The unconditional CompVis
  LDMs attend with plain blocks `{norm, qkv, proj_out}` instead (diffusers' `group_norm`,
  fused `to_q`/`to_k`/`to_v`, `to_out.0`: see `single_file_attention`).
* Autoencoder: `encoder.down.{i}.block.{j}` (and `.attn.{j}`), `decoder.up.{i}.block.{j}`
  with the decoder's levels numbered from the deepest (`up.{i}` is diffusers'
  `up_blocks[L - 1 - i]`), `mid.block_{1,2}`, `mid.attn_1.{norm,q,k,v,proj_out}` (1x1
  convolution weights), `nin_shortcut`, `norm_out`; a VQ model's codebook is
  `quantize.embedding.weight` in both.

The text encoder is either transformers' `CLIPTextModel` (Stable Diffusion 1,
`cond_stage_model.transformer.`, names unchanged) or OpenCLIP's text tower (Stable
Diffusion 2, `cond_stage_model.model.`), converted by `open_clip_to_transformers`.
All functions here take and return `{name: numpy array}` dicts in PyTorch layout.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

import numpy as np

UNET_PREFIX = "model.diffusion_model."
AUTOENCODER_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
CLIP_PREFIX = COND_STAGE_PREFIX + "transformer."
OPEN_CLIP_PREFIX = COND_STAGE_PREFIX + "model."
# CompVis' ClassEmbedder (class-conditional ImageNet LDM): one table, a class per row.
CLASS_EMBEDDER_PREFIX = COND_STAGE_PREFIX + "embedding."

# Inside a U-Net resnet: diffusers' module name -> the original's.
_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Inside CompVis' plain attention blocks (U-Nets without transformers); `qkv` stays fused.
_UNET_PLAIN_ATTENTION_NAMES = {"group_norm": "norm", "to_out.0": "proj_out"}
# Inside autoencoder resnets and the mid-block attention.
_AUTOENCODER_INNER_NAMES = {
    "conv_shortcut": "nin_shortcut",
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# The autoencoder attention's projections are dense in diffusers, 1x1 convs originally.
_CONV_1X1_PROJECTIONS = frozenset({"q", "k", "v", "proj_out"})
_DENSE_PROJECTIONS = frozenset({"to_q", "to_k", "to_v", "to_out.0"})

# OpenCLIP text tower names -> transformers' CLIPTextModel names (fused q,k,v aside).
_OPEN_CLIP_NAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_LAYER_NAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Within resblock i: `transformer.resblocks.{i}.<module>.<weight|bias>`, or the fused
# `attn.in_proj_<weight|bias>` holding q, k and v stacked along the output axis.
_OPEN_CLIP_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$")
_OPEN_CLIP_FUSED = "attn.in_proj"
_OPEN_CLIP_HEAD = frozenset({"text_projection", "logit_scale"})
_CLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_CLIP_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}


@dataclasses.dataclass(frozen=True)
class UNetLayout:
    """What decides the U-Net's original module numbering."""

    levels: int
    layers_per_block: int
    attention_levels: tuple[bool, ...]
    mid_block_attention: bool
    attention_type: str = "transformer"  # or "plain": CompVis' qkv attention blocks


@dataclasses.dataclass(frozen=True)
class AutoencoderLayout:
    """What decides the autoencoder's original module numbering."""

    levels: int
    layers_per_block: int
    mid_block_attention: bool
    attention_levels: tuple[bool, ...] = ()  # empty: no level attends


def unet_module_table(layout: UNetLayout) -> dict[str, str]:
    """diffusers module prefix -> original prefix, for every module of the U-Net."""
    table = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "class_embedding": "label_emb",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
    }
    last = layout.levels - 1
    block = 1
    for level in range(layout.levels):
        for j in range(layout.layers_per_block):
            table[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{block}.0"
            if layout.attention_levels[level]:
                table[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{block}.1"
            block += 1
        if level < last:
            table[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{block}.0.op"
            block += 1
    if layout.mid_block_attention:
        table["mid_block.attentions.0"] = "middle_block.1"
    table["mid_block.resnets.1"] = f"middle_block.{2 if layout.mid_block_attention else 1}"
    block = 0
    for up in range(layout.levels):
        has_attention = layout.attention_levels[last - up]
        for j in range(layout.layers_per_block + 1):
            table[f"up_blocks.{up}.resnets.{j}"] = f"output_blocks.{block}.0"
            if has_attention:
                table[f"up_blocks.{up}.attentions.{j}"] = f"output_blocks.{block}.1"
            block += 1
        if up < last:
            # The upsampler is the last module of the level's last output block.
            table[f"up_blocks.{up}.upsamplers.0.conv"] = (
                f"output_blocks.{block - 1}.{2 if has_attention else 1}.conv"
            )
    return table


def autoencoder_module_table(layout: AutoencoderLayout) -> dict[str, str]:
    """diffusers module prefix -> original prefix, for every module of the autoencoder."""
    table = {name: name for name in ("quant_conv", "post_quant_conv", "quantize")}
    last = layout.levels - 1
    attends = layout.attention_levels or (False,) * layout.levels
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in"] = f"{part}.conv_in"
        table[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        table[f"{part}.conv_out"] = f"{part}.conv_out"
        table[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        table[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        if layout.mid_block_attention:
            table[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    for level in range(layout.levels):
        for j in range(layout.layers_per_block):
            table[f"encoder.down_blocks.{level}.resnets.{j}"] = f"encoder.down.{level}.block.{j}"
            if attends[level]:
                table[f"encoder.down_blocks.{level}.attentions.{j}"] = (
                    f"encoder.down.{level}.attn.{j}"
                )
        if level < last:
            table[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (
                f"encoder.down.{level}.downsample.conv"
            )
    for up in range(layout.levels):
        level = last - up
        for j in range(layout.layers_per_block + 1):
            table[f"decoder.up_blocks.{up}.resnets.{j}"] = f"decoder.up.{level}.block.{j}"
            if attends[level]:
                table[f"decoder.up_blocks.{up}.attentions.{j}"] = f"decoder.up.{level}.attn.{j}"
        if up < last:
            table[f"decoder.up_blocks.{up}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
    return table


def _rename(
    name: str, modules: Mapping[str, str], inner: Mapping[str, str]
) -> tuple[str, str] | None:
    """`(new name, new inner module name)` through the longest known module prefix, or None."""
    segments = name.split(".")
    for cut in range(len(segments) - 1, 0, -1):
        prefix = ".".join(segments[:cut])
        if prefix in modules:
            inner_module = ".".join(segments[cut:-1])
            inner_module = inner.get(inner_module, inner_module)
            renamed = ".".join(part for part in (modules[prefix], inner_module) if part)
            return f"{renamed}.{segments[-1]}", inner_module
    return None


def _apply_table(
    tensors: Mapping[str, np.ndarray],
    modules: Mapping[str, str],
    inner: Mapping[str, str],
    conv_1x1_layout: str | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Renames every tensor; returns the renamed ones and the names with no module.

    `conv_1x1_layout` ("conv" or "dense") is the layout the autoencoder attention's
    projection weights are given in the result.
    """
    renamed, unknown = {}, []
    for name, value in tensors.items():
        result = _rename(name, modules, inner)
        if result is None:
            unknown.append(name)
            continue
        new_name, inner_module = result
        is_projection = inner_module in _CONV_1X1_PROJECTIONS | _DENSE_PROJECTIONS
        if conv_1x1_layout and is_projection and new_name.endswith(".weight"):
            if conv_1x1_layout == "conv" and np.ndim(value) == 2:
                value = np.reshape(value, (*np.shape(value), 1, 1))
            elif conv_1x1_layout == "dense" and np.ndim(value) == 4:
                value = value[:, :, 0, 0]
        renamed[new_name] = value
    return renamed, unknown


def _inverse(mapping: Mapping[str, str]) -> dict[str, str]:
    return {value: key for key, value in mapping.items()}


def unet_to_original(
    tensors: Mapping[str, np.ndarray], layout: UNetLayout
) -> dict[str, np.ndarray]:
    """A diffusers-named U-Net state dict in original names (without `model.diffusion_model.`).

    Raises:
      ValueError: a tensor is not part of a U-Net of this layout.
    """
    renamed, unknown = _apply_table(tensors, unet_module_table(layout), _unet_inner_names(layout))
    _raise_unknown(unknown, "U-Net", "a diffusers UNet2DConditionModel or UNet2DModel")
    return renamed


def _unet_inner_names(layout: UNetLayout) -> dict[str, str]:
    """Names inside the U-Net's modules; plain attention's only where no transformer is."""
    if layout.attention_type == "plain":
        return _UNET_RESNET_NAMES | _UNET_PLAIN_ATTENTION_NAMES
    return _UNET_RESNET_NAMES


def unet_from_original(
    tensors: Mapping[str, np.ndarray], layout: UNetLayout
) -> dict[str, np.ndarray]:
    """Original U-Net tensors (`model.diffusion_model.` removed) in diffusers names.

    Raises:
      ValueError: a tensor has no place in a U-Net of this layout (the older CompVis
        `qkv` attention blocks, SDXL's embeddings, ...).
    """
    renamed, unknown = _apply_table(
        tensors, _inverse(unet_module_table(layout)), _inverse(_unet_inner_names(layout))
    )
    _raise_unknown(unknown, "U-Net", f"a Stable Diffusion / CompVis U-Net ({layout})")
    return renamed


def autoencoder_to_original(
    tensors: Mapping[str, np.ndarray], layout: AutoencoderLayout
) -> dict[str, np.ndarray]:
    """A diffusers-named AutoencoderKL state dict in original names (attention as 1x1 convs).

    Raises:
      ValueError: a tensor is not part of an autoencoder of this layout.
    """
    renamed, unknown = _apply_table(
        tensors, autoencoder_module_table(layout), _AUTOENCODER_INNER_NAMES, "conv"
    )
    _raise_unknown(unknown, "autoencoder", "a diffusers AutoencoderKL or VQModel")
    return renamed


def autoencoder_from_original(
    tensors: Mapping[str, np.ndarray], layout: AutoencoderLayout
) -> dict[str, np.ndarray]:
    """Original autoencoder tensors (`first_stage_model.` removed) in diffusers names.

    Raises:
      ValueError: a tensor has no place in a KL autoencoder of this layout.
    """
    renamed, unknown = _apply_table(
        tensors,
        _inverse(autoencoder_module_table(layout)),
        _inverse(_AUTOENCODER_INNER_NAMES),
        "dense",
    )
    _raise_unknown(unknown, "autoencoder", f"a CompVis KL or VQ autoencoder ({layout})")
    return renamed


def unet_layout_from_names(names: Iterable[str]) -> UNetLayout:
    """The layout of an original U-Net from its tensor names (prefix removed).

    Raises:
      ValueError: the names are not those of a U-Net with this module structure.
    """
    names = set(names)
    inputs = numbered_children(names, "input_blocks")
    outputs = numbered_children(names, "output_blocks")
    downsamplers = sorted(i for i in inputs if f"input_blocks.{i}.0.op.weight" in names)
    levels = len(downsamplers) + 1
    layers_per_block = len(outputs) // levels - 1
    if not inputs or layers_per_block < 1 or len(inputs) != len(outputs):
        raise ValueError(
            f"the U-Net tensors do not have the input/output block structure of a Stable "
            f"Diffusion U-Net ({len(inputs)} input blocks, {len(outputs)} output blocks, "
            f"{len(downsamplers)} downsamplers)."
        )
    first_blocks = [1 + level * (layers_per_block + 1) for level in range(levels)]
    fused = sorted(name for name in names if name.endswith(".qkv.weight"))
    if fused and any(name.endswith(".proj_in.weight") for name in names):
        raise ValueError(
            f"the U-Net tensors mix spatial transformers with CompVis' plain qkv attention "
            f"blocks (e.g. {fused[:3]}), as no supported model does."
        )

    def attends(module: str) -> bool:  # a spatial transformer or a plain attention block
        return f"{module}.proj_in.weight" in names or f"{module}.qkv.weight" in names

    return UNetLayout(
        levels=levels,
        layers_per_block=layers_per_block,
        attention_levels=tuple(attends(f"input_blocks.{i}.1") for i in first_blocks),
        mid_block_attention=attends("middle_block.1"),
        attention_type="plain" if fused else "transformer",
    )


def autoencoder_layout_from_names(names: Iterable[str]) -> AutoencoderLayout:
    """The layout of an original autoencoder from its tensor names (prefix removed)."""
    names = set(names)
    levels = len(numbered_children(names, "encoder.down"))
    attention = tuple(f"encoder.down.{level}.attn.0.q.weight" in names for level in range(levels))
    return AutoencoderLayout(
        levels=levels,
        layers_per_block=len(numbered_children(names, "encoder.down.0.block")),
        mid_block_attention="encoder.mid.attn_1.q.weight" in names,
        attention_levels=attention if any(attention) else (),
    )


def numbered_children(names: Iterable[str], prefix: str) -> set[int]:
    """The integers `i` of all names `prefix.{i}.*` (the items of a numbered module list)."""
    start = len(prefix) + 1
    children = (name[start:].split(".", 1)[0] for name in names if name.startswith(prefix + "."))
    return {int(child) for child in children if child.isdigit()}


def open_clip_to_transformers(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenCLIP text tower tensors (prefix removed) in `CLIPTextModel` names.

    The fused `attn.in_proj_*` is split into `q_proj`, `k_proj`, `v_proj`.
    `text_projection` and `logit_scale` belong to CLIP's image-text head, not to the text
    model, and are left out.

    Raises:
      ValueError: a tensor is not part of an OpenCLIP text tower.
    """
    converted, unknown = {}, []
    for name, value in tensors.items():
        layer = _OPEN_CLIP_LAYER.match(name)
        if name in _OPEN_CLIP_HEAD:
            continue
        if name in _OPEN_CLIP_NAMES:
            converted[_OPEN_CLIP_NAMES[name]] = value
            continue
        module = layer.group(2) if layer else None
        prefix = layer and f"text_model.encoder.layers.{layer.group(1)}"
        if module == _OPEN_CLIP_FUSED:
            for projection, part in zip("qkv", np.split(value, 3, axis=0), strict=True):
                converted[f"{prefix}.self_attn.{projection}_proj.{layer.group(3)}"] = part
        elif module in _OPEN_CLIP_LAYER_NAMES:
            converted[f"{prefix}.{_OPEN_CLIP_LAYER_NAMES[module]}.{layer.group(3)}"] = value
        else:
            unknown.append(name)
    _raise_unknown(unknown, "OpenCLIP text encoder", "an OpenCLIP text tower")
    return converted


def transformers_to_open_clip(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of `open_clip_to_transformers`: `CLIPTextModel` tensors in OpenCLIP names.

    Raises:
      ValueError: a tensor is not part of a `CLIPTextModel`'s text model.
    """
    names_back = _inverse(_OPEN_CLIP_NAMES)
    layer_names_back = _inverse(_OPEN_CLIP_LAYER_NAMES)
    converted, projections, unknown = {}, {}, []
    for name, value in tensors.items():
        layer = _CLIP_LAYER.match(name)
        module = layer.group(2) if layer else None
        if name in names_back:
            converted[names_back[name]] = value
        elif module in _CLIP_QKV:
            key = (layer.group(1), layer.group(3))
            projections.setdefault(key, {})[_CLIP_QKV[module]] = value
        elif module in layer_names_back:
            block = f"transformer.resblocks.{layer.group(1)}"
            converted[f"{block}.{layer_names_back[module]}.{layer.group(3)}"] = value
        elif not name.endswith("position_ids"):
            unknown.append(name)
    _raise_unknown(unknown, "CLIP text encoder", "a transformers CLIPTextModel")
    for (index, leaf), parts in projections.items():
        fused = np.concatenate([parts[projection] for projection in "qkv"], axis=0)
        converted[f"transformer.resblocks.{index}.{_OPEN_CLIP_FUSED}_{leaf}"] = fused
    return converted


def clip_layer_count(tensors: Mapping[str, np.ndarray]) -> int:
    """How many encoder layers a `CLIPTextModel` state dict holds."""
    return len(numbered_children(set(tensors), "text_model.encoder.layers"))


def first_clip_layers(tensors: Mapping[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """A `CLIPTextModel` state dict without its encoder layers from index `count` on."""
    return {
        name: value
        for name, value in tensors.items()
        if not ((layer := _CLIP_LAYER.match(name)) and int(layer.group(1)) >= count)
    }


def identity_clip_layer(tensors: Mapping[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    """Encoder layer `index` shaped as layer 0, adding zero on both residual branches.

    Its LayerNorm scales are one and every other tensor zero, so the attention output
    and the MLP output are zero and the layer passes its input through unchanged.
    """
    first = "text_model.encoder.layers.0."
    layer = {}
    for name, value in tensors.items():
        if name.startswith(first):
            inner = name[len(first) :]
            is_norm_scale = inner in ("layer_norm1.weight", "layer_norm2.weight")
            fill = np.ones_like if is_norm_scale else np.zeros_like
            layer[f"text_model.encoder.layers.{index}.{inner}"] = fill(value)
    return layer


def _raise_unknown(unknown: list[str], what: str, expected: str) -> None:
    if unknown:
        raise ValueError(
            f"{len(unknown)} {what} tensors have no place in {expected}, "
            f"e.g. {sorted(unknown)[:5]}."
        )
