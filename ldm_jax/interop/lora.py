"""LoRA files in and out: diffusers/peft's layout and kohya's (A1111, ComfyUI), no pickles.

A LoRA for Stable Diffusion adapts modules of the U-Net and of the CLIP text encoder. Here it
is a `LoraWeights`: one adapters tree per component, as `ldm_jax.models.lora` applies them
(`{"lora_down": (in, r) or (kh, kw, in, r), "lora_up": (r, out)}` under the module's path in
our params), and one `alpha / rank` scale. Files name the modules as diffusers' U-Net and
transformers' `CLIPTextModel` do; the layouts differ in how:

* diffusers/peft (`StableDiffusionPipeline.save_lora_weights`):
  `unet.<module>.lora_A.weight` (r, in[, kh, kw]) and `.lora_B.weight` (out, r[, 1, 1]);
  `text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`, ...; the rank
  and alpha in the safetensors metadata `lora_adapter_metadata` (the JSON of peft's
  `LoraConfig`, keys prefixed `unet.` / `text_encoder.`), which is what diffusers'
  `load_lora_weights` reads: without it diffusers takes alpha = rank (scale 1).
  Read too: the names older diffusers wrote (`to_q.lora.down.weight`,
  `attn1.processor.to_q_lora.down.weight`, `q_proj.lora_linear_layer.down.weight`), and
  `<module>.alpha` tensors.
* kohya (sd-scripts, A1111): `lora_unet_<module with . as _>.lora_down.weight`,
  `.lora_up.weight` and a scalar `.alpha` per module; the text encoder's as
  `lora_te_text_model_encoder_layers_0_self_attn_q_proj...`. Convolutions: down
  (r, in, kh, kw), up (out, r, 1, 1).

A file whose modules have different scales (per-module alphas, mixed ranks) loads with the
rank and alpha most of its modules have (the first module's among equals); every other
module's scale is folded into its `lora_up`, so the adapters compute what the file means with
one scale, and a uniform file is read bit for bit. Saving writes each module's own rank and
the alpha that gives it the one scale (peft's `rank_pattern` and `alpha_pattern`, kohya's
per-module `alpha`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from ldm_jax import storage
from ldm_jax.interop.clip import ATTENTION_RENAMES, TORCH_ATTENTION_NAMES, rename_attention
from ldm_jax.interop.convert import WeightsMismatchError, flax_module_path, torch_module_name
from ldm_jax.interop.safetensors_io import find_weights_file, read_safetensors, write_safetensors
from ldm_jax.models.lora import DOWN, UP, adapter_paths, module_at

UNET, TEXT_ENCODER = "unet", "text_encoder"
COMPONENTS = (UNET, TEXT_ENCODER)
FORMATS = ("diffusers", "kohya")
# The file name diffusers' `save_lora_weights` writes in a directory, and looks for in one.
DIFFUSERS_WEIGHT_STEM = "pytorch_lora_weights"
# The safetensors metadata key of the peft `LoraConfig` JSON that diffusers writes and reads.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# peft's `LoraConfig` defaults, which diffusers gets for keys its metadata leaves out.
PEFT_DEFAULT_ALPHA = 8
KOHYA_PREFIXES = {UNET: "lora_unet_", TEXT_ENCODER: "lora_te_"}
TEXT_MODEL_PREFIX = "text_model."
ALPHA = "alpha"
# Key endings of the diffusers/peft layouts -> the tensor's role.
_DIFFUSERS_ENDINGS = (
    (".lora_A.weight", DOWN),
    (".lora_B.weight", UP),
    (".lora.down.weight", DOWN),  # diffusers' LoRACompatibleLinear (0.21-0.24)
    (".lora.up.weight", UP),
    (".lora_linear_layer.down.weight", DOWN),  # diffusers' text encoder patches (< 0.24)
    (".lora_linear_layer.up.weight", UP),
    (".alpha", ALPHA),
)
_KOHYA_ENDINGS = ((".lora_down.weight", DOWN), (".lora_up.weight", UP), (".alpha", ALPHA))
# Attention processors of diffusers < 0.21: `attn1.processor.to_out_lora.down.weight`.
_PROCESSOR_KEY = re.compile(
    r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$"
)
_PROCESSOR_MODULES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
# Module names made of several `_`-joined words, to split kohya's names back into modules (the
# other words are one module each, and a number joins the word before it: `layers_0`).
_MULTI_WORD_MODULES = frozenset(
    {
        # diffusers' UNet2DConditionModel
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "conv_in", "conv_out",
        "conv_norm_out", "conv_shortcut", "time_embedding", "time_emb_proj", "proj_in",
        "proj_out", "to_q", "to_k", "to_v", "to_out", "add_embedding", "class_embedding",
        "encoder_hid_proj",
        # transformers' CLIPTextModel
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
        "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding",
        "position_embedding",
    }
)  # fmt: skip
_LONGEST_MODULE_WORDS = max(name.count("_") + 1 for name in _MULTI_WORD_MODULES)
# The first modules of diffusers' U-Net names: a file of one model's bare names (as
# `UNet2DConditionModel.save_lora_adapter` writes it) is the U-Net's when they start so.
_UNET_TOP_MODULES = frozenset(
    {
        "down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out",
        "time_embedding", "add_embedding", "class_embedding", "encoder_hid_proj",
    }
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """A LoRA of a Stable Diffusion-like model: the adapters of its two components.

    Attributes:
      unet: the U-Net's adapters tree (`ldm_jax.models.lora` layout), or None.
      text_encoder: the CLIP text encoder's adapters tree, or None.
      rank: the rank the scale is relative to (most modules'; others may differ).
      alpha: the LoRA alpha; every adapter computes with `alpha / rank`.
    """

    unet: dict | None
    text_encoder: dict | None
    rank: int
    alpha: float

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"a LoRA rank must be at least 1, not {self.rank}")
        if self.unet is None and self.text_encoder is None:
            raise ValueError("a LoRA needs adapters for the U-Net, the text encoder or both")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def components(self) -> dict[str, dict]:
        """The adapters trees that are present, by component name."""
        trees = {UNET: self.unet, TEXT_ENCODER: self.text_encoder}
        return {name: tree for name, tree in trees.items() if tree is not None}


# ---------------------------------------------------------------------------------------------
# Module names: files name modules as PyTorch does, our trees by `flax_module_path`
# ---------------------------------------------------------------------------------------------
def _flax_path(component: str, torch_name: str) -> tuple[str, ...]:
    """Our module path of a file's module name (a transformers name for the text encoder,
    `text_model.` prefixed or not, with `q_proj` where we have `to_q`)."""
    if component == TEXT_ENCODER:
        torch_name = _renamed_module(torch_name.removeprefix(TEXT_MODEL_PREFIX), ATTENTION_RENAMES)
    return flax_module_path(torch_name)


def _torch_name(component: str, path: tuple[str, ...]) -> str:
    """The file's module name of one of our module paths (inverse of `_flax_path`)."""
    name = torch_module_name(path)
    if component == TEXT_ENCODER:
        name = TEXT_MODEL_PREFIX + _renamed_module(name, TORCH_ATTENTION_NAMES)
    return name


def _renamed_module(name: str, renames: Mapping[str, str]) -> str:
    """`rename_attention` of a module name (it renames `.self_attn.<old>.` in tensor names)."""
    return rename_attention(f"{name}.", renames).removesuffix(".")


def _split_kohya_name(name: str) -> str:
    """kohya's `down_blocks_0_attentions_0_proj_in` back to `down_blocks.0.attentions.0.proj_in`."""
    words, segments, index = name.split("_"), [], 0
    while index < len(words):
        for length in range(min(_LONGEST_MODULE_WORDS, len(words) - index), 0, -1):
            candidate = "_".join(words[index : index + length])
            if length == 1 or candidate in _MULTI_WORD_MODULES:
                break
        index += length
        if index < len(words) and words[index].isdigit():
            candidate, index = f"{candidate}_{words[index]}", index + 1
        segments.append(candidate)
    return torch_module_name(tuple(segments))


def _parse_key(key: str) -> tuple[str, str, str] | None:
    """(component, module name, role) of a tensor name, or None when it is no LoRA tensor."""
    for component, prefix in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            for ending, role in _KOHYA_ENDINGS:
                if key.endswith(ending):
                    return component, _split_kohya_name(key[len(prefix) : -len(ending)]), role
            return None
    component, _, rest = key.partition(".")
    if component not in COMPONENTS:  # one model's bare names
        if component in _UNET_TOP_MODULES:
            component, rest = UNET, key
        elif f"{component}." == TEXT_MODEL_PREFIX:
            component, rest = TEXT_ENCODER, key
        else:
            return None
    processor = _PROCESSOR_KEY.match(rest)
    if processor:
        parent, module, role = processor.groups()
        return component, f"{parent}.{_PROCESSOR_MODULES[module]}", DOWN if role == "down" else UP
    for ending, role in _DIFFUSERS_ENDINGS:
        if rest.endswith(ending):
            return component, rest[: -len(ending)], role
    return None


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def load_lora(path: str | os.PathLike) -> LoraWeights:
    """Reads a LoRA safetensors file in the diffusers/peft or the kohya layout.

    Args:
      path: the `.safetensors` file, or a directory holding diffusers'
        `pytorch_lora_weights.safetensors`; on a disk or in a bucket.

    Returns:
      The adapters of the components the file has, with the rank and alpha of most modules
      (other modules' scales folded into their `lora_up`).

    Raises:
      FileNotFoundError: `path` does not exist, or the directory has no LoRA file.
      PickleRefusedError: `path` is a pickle (`.bin`, `.pt`, `.ckpt`, ...).
      ValueError: one line naming the file: not a LoRA layout this reads, a key it cannot
        place, a module without its down or up weight, weights of inconsistent shapes.
    """
    path = os.fspath(path)
    if storage.as_path(path).is_dir():
        path = find_weights_file(path, (DIFFUSERS_WEIGHT_STEM,))
    tensors = read_safetensors(path)
    configs = _adapter_configs(path)
    modules: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unplaced = []
    for key, value in tensors.items():
        parsed = _parse_key(key)
        if parsed is None:
            unplaced.append(key)
            continue
        component, name, role = parsed
        modules.setdefault((component, name), {})[role] = value
    if not modules:
        raise ValueError(
            f"LoRA file {path} is in no layout ldm_jax reads (diffusers/peft "
            f"'unet.<module>.lora_A.weight', kohya 'lora_unet_<module>.lora_down.weight'); "
            f"its keys look like {sorted(tensors)[:3]}"
        )
    if unplaced:
        raise ValueError(
            f"LoRA file {path} has {len(unplaced)} key(s) ldm_jax cannot place (e.g. "
            f"{sorted(unplaced)[:3]}): only LoRA down/up weights and alphas of the U-Net "
            f"('unet.', 'lora_unet_') and the text encoder ('text_encoder.', 'lora_te_') are read"
        )
    adapters, rank_and_alpha = {}, {}
    for (component, name), tensors_of_module in modules.items():
        down, up, rank = _adapter_of(path, component, name, tensors_of_module)
        alpha = _module_alpha(tensors_of_module.get(ALPHA), rank, component, name, configs)
        adapters[component, name], rank_and_alpha[component, name] = (down, up), (rank, alpha)
    # The scale of most modules (of the first, among equals) is the one kept.
    rank, alpha = collections.Counter(rank_and_alpha.values()).most_common(1)[0][0]
    trees: dict[str, dict] = {}
    for (component, name), (down, up) in adapters.items():
        module_rank, module_alpha = rank_and_alpha[component, name]
        if module_alpha / module_rank != alpha / rank:
            up = up * np.float32((module_alpha / module_rank) / (alpha / rank))
        node = trees.setdefault(component, {})
        for segment in _flax_path(component, name):
            node = node.setdefault(segment, {})
        node.update({DOWN: down, UP: up})
    return LoraWeights(
        unet=trees.get(UNET), text_encoder=trees.get(TEXT_ENCODER), rank=rank, alpha=alpha
    )


def _adapter_of(
    path: str, component: str, name: str, tensors: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, int]:
    """One module's (down, up, rank) in our layout, from PyTorch's."""
    if DOWN not in tensors or UP not in tensors:
        missing = "up" if DOWN in tensors else "down"
        raise ValueError(f"LoRA file {path}: {component} module {name} has no {missing} weight")
    down = np.asarray(tensors[DOWN], np.float32)
    up = np.asarray(tensors[UP], np.float32)
    rank = down.shape[0]
    up_is_1x1 = up.ndim == 2 or (up.ndim == 4 and up.shape[2:] == (1, 1))
    if down.ndim not in (2, 4) or not up_is_1x1 or up.ndim != down.ndim or up.shape[1] != rank:
        raise ValueError(
            f"LoRA file {path}: {component} module {name} has down {down.shape} and up "
            f"{up.shape}, not a LoRA pair ((r, in) and (out, r), or (r, in, kh, kw) and "
            f"(out, r, 1, 1))"
        )
    if down.ndim == 4:
        return np.transpose(down, (2, 3, 1, 0)), np.transpose(up[:, :, 0, 0]), rank
    return np.transpose(down), np.transpose(up), rank


def _adapter_configs(path: str) -> dict[str, dict]:
    """The peft `LoraConfig` fields diffusers stored per component in the file's metadata
    (keys `unet.r`, ...; one model's file, as `save_lora_adapter` writes it, has them bare:
    the U-Net's)."""
    with storage.as_path(path).open("rb") as file:  # the header alone, not the tensors
        (length,) = struct.unpack("<Q", file.read(8))
        metadata = json.loads(file.read(length)).get("__metadata__") or {}
    configs: dict[str, dict] = {}
    for key, value in json.loads(metadata.get(ADAPTER_METADATA_KEY) or "{}").items():
        component, _, field = key.partition(".")
        if component not in COMPONENTS:
            component, field = UNET, key
        configs.setdefault(component, {})[field] = value
    for component, config in configs.items():
        if config.get("use_dora") or config.get("lora_bias"):
            raise ValueError(
                f"LoRA file {path}: the {component}'s adapter is a DoRA or has biases "
                f"(use_dora, lora_bias), which ldm_jax does not read"
            )
    return configs


def _module_alpha(
    alpha: Any, rank: int, component: str, name: str, configs: Mapping[str, dict]
) -> float:
    """The alpha of one module (its scale is `alpha / rank`): its `.alpha` tensor (kohya: 0
    means the rank), else the peft config diffusers stored (`lora_alpha`, `alpha_pattern`,
    `use_rslora`), else the rank: scale 1, what diffusers assumes for a file without either."""
    if alpha is not None:
        return float(np.asarray(alpha).reshape(())) or float(rank)
    config = configs.get(component)
    if config is None:
        return float(rank)
    if component == TEXT_ENCODER:  # patterns may name it with `text_model.` or without
        name = TEXT_MODEL_PREFIX + name.removeprefix(TEXT_MODEL_PREFIX)
    # peft matches each pattern as a regular expression against the name's dotted suffixes.
    patterns = config.get("alpha_pattern") or {}
    matches = [value for key, value in patterns.items() if re.match(rf"(.*\.)?({key})$", name)]
    value = float(matches[0] if matches else config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    return value * float(np.sqrt(rank)) if config.get("use_rslora") else value


def check_lora(
    weights: LoraWeights, unet_params: Any = None, text_encoder_params: Any = None
) -> None:
    """Checks that every adapter fits a kernel of the model's params (arrays, boxed or
    abstract).

    Raises:
      WeightsMismatchError: one line naming the first module the model lacks or whose kernel
        has another shape (the LoRA was made for another model), or a component the LoRA
        adapts and no params were given for.
    """
    params_of = {UNET: unet_params, TEXT_ENCODER: text_encoder_params}
    for component, adapters in weights.components().items():
        params = params_of[component]
        if params is None:
            raise WeightsMismatchError(
                f"the LoRA adapts the {component}, but no {component} params were given"
            )
        params = nn.meta.unbox(params)
        for path in adapter_paths(adapters):
            name = _torch_name(component, path)
            node = params
            for segment in path:
                node = node.get(segment) if isinstance(node, Mapping) else None
            kernel = node.get("kernel") if isinstance(node, Mapping) else None
            if kernel is None:
                raise WeightsMismatchError(
                    f"the LoRA adapts {component} module {name}, which the model does not "
                    f"have: the LoRA was made for another model"
                )
            adapter = nn.meta.unbox(module_at(adapters, path))
            down_shape, up_shape = tuple(adapter[DOWN].shape), tuple(adapter[UP].shape)
            kernel_shape = tuple(kernel.shape)
            if down_shape[:-1] + up_shape[-1:] != kernel_shape or down_shape[-1] != up_shape[0]:
                raise WeightsMismatchError(
                    f"the LoRA of {component} module {name} adapts a kernel of shape "
                    f"{down_shape[:-1] + up_shape[-1:]}, but the model's is {kernel_shape}: "
                    f"the LoRA was made for another model"
                )


def save_lora(path: str | os.PathLike, weights: LoraWeights, format: str = "diffusers") -> None:
    """Writes `weights` as one safetensors file.

    Args:
      path: the `.safetensors` file to write (its folder is created), on a disk or in a
        bucket.
      weights: the adapters and their scale.
      format: "diffusers" (peft's names and the `lora_adapter_metadata` diffusers'
        `load_lora_weights` reads the alpha from) or "kohya" (A1111, ComfyUI, sd-scripts).

    Raises:
      ValueError: an unknown format, or a path that is not a `.safetensors` file.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {list(FORMATS)}")
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"LoRA files are written as safetensors: name {path} '*.safetensors'")
    tensors: dict[str, np.ndarray] = {}
    configs: dict[str, dict] = {}
    for component, adapters in weights.components().items():
        ranks: dict[str, int] = {}
        for module_path in adapter_paths(adapters):
            name = _torch_name(component, module_path)
            down, up = _torch_layout(module_at(adapters, module_path))
            ranks[name] = down.shape[0]
            if format == "kohya":
                key = KOHYA_PREFIXES[component] + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = down
                tensors[f"{key}.lora_up.weight"] = up
                tensors[f"{key}.alpha"] = np.asarray(
                    _alpha_of_rank(weights, ranks[name]), np.float32
                )
            else:
                tensors[f"{component}.{name}.lora_A.weight"] = down
                tensors[f"{component}.{name}.lora_B.weight"] = up
        configs[component] = _peft_config(ranks, weights)
    if format == "kohya":
        # What sd-scripts writes; A1111's and kohya's tools show the network's size from it.
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(weights.rank),
            "ss_network_alpha": str(weights.alpha),
        }
    else:
        packed = {
            f"{component}.{field}": value
            for component, config in configs.items()
            for field, value in config.items()
        }
        metadata = {ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    write_safetensors(tensors, path, {"format": "pt", **metadata})


def _torch_layout(adapter: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(down, up) in PyTorch's layout: (r, in) and (out, r), or (r, in, kh, kw) and
    (out, r, 1, 1)."""
    down = np.asarray(jax.device_get(nn.meta.unbox(adapter[DOWN])), np.float32)
    up = np.asarray(jax.device_get(nn.meta.unbox(adapter[UP])), np.float32).T
    if down.ndim == 4:
        return np.transpose(down, (3, 2, 0, 1)), up[:, :, None, None]
    return down.T, up


def _alpha_of_rank(weights: LoraWeights, rank: int) -> float:
    """The alpha that gives a module of this rank the scale of `weights`."""
    return weights.alpha if rank == weights.rank else weights.scale * rank


def _peft_config(ranks: Mapping[str, int], weights: LoraWeights) -> dict:
    """The peft `LoraConfig` fields diffusers builds the adapter of a component from: its
    modules (the text encoder's named without `text_model.`, which transformers 5 dropped and
    peft matches as a suffix either way), and the rank and alpha of those whose rank is not
    `weights.rank`."""
    names = {name: name.removeprefix(TEXT_MODEL_PREFIX) for name in ranks}
    other_ranks = {names[name]: rank for name, rank in ranks.items() if rank != weights.rank}
    return {
        "r": weights.rank,
        "lora_alpha": weights.alpha,
        "target_modules": sorted(names.values()),
        "rank_pattern": other_ranks,
        "alpha_pattern": {
            name: _alpha_of_rank(weights, rank) for name, rank in other_ranks.items()
        },
    }


def convert_lora(source: str | os.PathLike, out_path: str | os.PathLike, format: str) -> None:
    """Rewrites the LoRA file `source` (any layout `load_lora` reads) in `format` at
    `out_path`."""
    save_lora(out_path, load_lora(source), format)
