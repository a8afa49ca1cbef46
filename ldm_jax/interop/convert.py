"""PyTorch state dicts to Flax parameter trees and back, for modules named alike.

The models of this package name their modules as diffusers and transformers do, with
`name_{i}` where PyTorch has `name.{i}` (`down_blocks.0.resnets.1.conv1.weight` is
`down_blocks_0/resnets_1/conv1/kernel`). What differs is the parameter's own name and
layout, decided here by the kind of Flax module it lands in:

* a convolution `kernel` is `(kh, kw, in, out)`, PyTorch's `weight` `(out, in, kh, kw)`;
* a dense `kernel` is `(in, out)`, PyTorch's `weight` `(out, in)` (a 1x1 convolution
  weight `(out, in, 1, 1)` also loads into a dense kernel: old checkpoints stored the
  autoencoder's attention projections that way);
* norms have `scale` for `weight`; embeddings have `embedding` for `weight`.

Model-specific renames (original Stable Diffusion names, old attention names) are done on
the PyTorch names before they come here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_FLAX_NAMES_OF_WEIGHT = ("kernel", "scale", "embedding")
# PyTorch attribute names that themselves end in `_<digit>`: not list items.
_LITERAL_NAMES = frozenset({"linear_1", "linear_2"})


@dataclasses.dataclass(frozen=True)
class ImportedModel:
    """A model read from another format: the module (its fields are its config) and params.

    Attributes:
      module: the Flax module, built with the architecture the weights were saved with.
      params: its parameter tree (float32 numpy arrays), ready for `module.apply`.
      extras: what the format stores beside the weights and the module has no field for
        (an autoencoder's `scaling_factor`, a text encoder's tokenizer files, ...).
    """

    module: nn.Module
    params: dict
    extras: dict = dataclasses.field(default_factory=dict)


class WeightsMismatchError(ValueError):
    """The weights do not fit the model: names missing, unexpected, or of another shape."""


def refuse_unexpected(tensors: Any, expected: Any, what: str, advice: str) -> None:
    """Raises `WeightsMismatchError` when `tensors` holds names the model does not have.

    Args:
      tensors: the names read from the file.
      expected: the names the model reads.
      what: how the message names the file, e.g. "--inception_weights=PATH".
      advice: how to write a right file, appended to the message.
    """
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise WeightsMismatchError(
            f"{what} has {len(unexpected)} unexpected tensor(s) (e.g. {unexpected[:5]}); {advice}"
        )


def check_float_dtype(what: str, value: Any, expected_dtype: Any = np.float32) -> None:
    """Raises `WeightsMismatchError` unless `value` is a floating-point tensor.

    Weights are cast to the model's float dtype when loaded, so any float width (float16,
    bfloat16, float32, ...) is accepted; an integer or boolean tensor where the model has a
    float parameter would be cast silently into garbage, so it is refused.

    Args:
      what: how the message names the tensor, e.g. "U-Net tensor 'conv_in.weight'".
      value: the tensor as read from the file.
      expected_dtype: the model's dtype for it, for the message.
    """
    dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise WeightsMismatchError(
            f"{what} has dtype {dtype} in the weights, but the model expects a floating-point "
            f"tensor ({np.dtype(expected_dtype).name}). Is this a weights file of this model?"
        )


def flax_module_path(torch_name: str) -> tuple[str, ...]:
    """`a.0.b.c` to `("a_0", "b", "c")`: numeric segments join the segment before them."""
    path: list[str] = []
    for segment in torch_name.split("."):
        if segment.isdigit() and path:
            path[-1] = f"{path[-1]}_{segment}"
        else:
            path.append(segment)
    return tuple(path)


def torch_module_name(flax_path: tuple[str, ...]) -> str:
    """Inverse of `flax_module_path` for module paths (`("a_0", "b")` to `a.0.b`)."""
    segments = []
    for part in flax_path:
        stem, _, index = part.rpartition("_")
        is_item = stem and index.isdigit() and part not in _LITERAL_NAMES
        segments.extend([stem, index] if is_item else [part])
    return ".".join(segments)


def _to_flax_layout(torch_name: str, value: np.ndarray, target_shape: tuple[int, ...]):
    if value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]  # a 1x1 convolution stored for a dense projection
    if len(target_shape) == 4 and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if len(target_shape) == 2 and value.ndim == 2 and torch_name.endswith("kernel"):
        return np.transpose(value)
    return value


def _torch_shape_of(flax_shape: tuple[int, ...], leaf_name: str) -> tuple[int, ...]:
    if leaf_name == "kernel" and len(flax_shape) == 4:
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    if leaf_name == "kernel" and len(flax_shape) == 2:
        return (flax_shape[1], flax_shape[0])
    return tuple(flax_shape)


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    abstract_params: Any,
    *,
    ignore: tuple[str, ...] = (),
    what: str = "model",
) -> dict:
    """Converts a PyTorch state dict into the Flax parameter tree `abstract_params`.

    Args:
      state_dict: `{torch_name: array}` in PyTorch layout, names already in this
        package's module naming.
      abstract_params: the model's params, arrays or `ShapeDtypeStruct`s (boxed or not).
      ignore: name suffixes of buffers that have no parameter (`position_ids`, ...).
      what: what the weights are, for error messages ("U-Net", "autoencoder").

    Returns:
      A nested dict of float32 numpy arrays with the structure of `abstract_params`.

    Raises:
      WeightsMismatchError: a tensor's shape differs from the model's (naming the tensor
        and both shapes), a tensor is not floating point (naming it and both dtypes), or
        names are missing from or unexpected in the weights.
    """
    targets = flax.traverse_util.flatten_dict(flax.core.unfreeze(_unbox(abstract_params)))
    by_module: dict[tuple[str, ...], set[str]] = {}
    for path in targets:
        by_module.setdefault(path[:-1], set()).add(path[-1])

    converted: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for name, value in state_dict.items():
        if name.endswith(ignore):
            continue
        module_name, _, leaf = name.rpartition(".")
        module = flax_module_path(module_name)
        leaves = by_module.get(module, set())
        if leaf == "weight":
            leaf = next((n for n in _FLAX_NAMES_OF_WEIGHT if n in leaves), None)
        elif leaf not in leaves:
            # A raw parameter (no module) is named by its whole path, e.g. a position table.
            module, leaf = flax_module_path(name)[:-1], flax_module_path(name)[-1]
            leaf = leaf if leaf in by_module.get(module, set()) else None
        if leaf is None:
            unexpected.append(name)
            continue
        path = (*module, leaf)
        check_float_dtype(f"{what} tensor {name!r}", value, targets[path].dtype)
        target_shape = tuple(targets[path].shape)
        array = _to_flax_layout(leaf, np.asarray(value, dtype=np.float32), target_shape)
        if array.shape != target_shape:
            raise WeightsMismatchError(
                f"{what} tensor {name!r} has shape {tuple(np.shape(value))} in the weights, "
                f"but the model expects {_torch_shape_of(target_shape, leaf)} "
                f"(PyTorch layout). Is the model config the one these weights were saved with?"
            )
        converted[path] = array
    missing = sorted(_torch_name(p) for p in targets if p not in converted)
    if missing or unexpected:
        raise WeightsMismatchError(
            f"{what} weights do not match the model: "
            f"{len(missing)} missing (e.g. {missing[:5]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:5]})."
        )
    return flax.traverse_util.unflatten_dict(converted)


def flax_to_torch(params: Any) -> dict[str, np.ndarray]:
    """The PyTorch state dict of a Flax parameter tree: names, layouts and `weight` names."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(_unbox(params)))
    state_dict = {}
    for path, value in flat.items():
        array = np.asarray(jax.device_get(value), dtype=np.float32)
        leaf = path[-1]
        if leaf == "kernel" and array.ndim == 4:
            array = np.transpose(array, (3, 2, 0, 1))
        elif leaf == "kernel" and array.ndim == 2:
            array = np.transpose(array)
        state_dict[_torch_name(path)] = array
    return state_dict


def _torch_name(flax_path: tuple[str, ...]) -> str:
    """The PyTorch name of a parameter: `("a_0", "kernel")` to `a.0.weight`."""
    leaf = "weight" if flax_path[-1] in _FLAX_NAMES_OF_WEIGHT else flax_path[-1]
    module = torch_module_name(flax_path[:-1])
    return f"{module}.{leaf}" if module else leaf


def _unbox(tree: Any) -> Any:
    return flax.linen.meta.unbox(tree)
