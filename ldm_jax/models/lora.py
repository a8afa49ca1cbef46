"""Low-rank adapters (LoRA, Hu et al. 2021) on the kernels of a model's params.

An adapted kernel `W` (a dense `(in, out)` or a convolution `(kh, kw, in, out)`) computes
with `W + scale * down @ up`, where `down` has the kernel's shape with its last axis
replaced by the rank `r` (`(in, r)`, or `(kh, kw, in, r)`: the convolution of the input to
`r` channels) and `up` is `(r, out)` (a 1x1 convolution back). `scale` is `alpha / r`. This
is what peft's and kohya's LoRA layers compute on their inputs (`up(down(x)) * scale` added to
`W x`): the same linear map, here added to the kernel once per call of the model rather than
computed beside every product, so the U-Net's code is unchanged and any kernel can be adapted.

Adapters are a params tree holding, for each adapted module, `{"lora_down", "lora_up"}`
under that module's path in the base tree (`{"down_blocks_0": {"attentions_0": ... {"attn1":
{"to_q": {"lora_down": ..., "lora_up": ...}}}}}`). They take the logical axis names of the
kernel they adapt (`down` its input axes, `up` its output axis), so they are sharded like
the base whatever the mesh.

The modules to adapt are chosen by regular expressions searched in the `/`-joined module path
(`down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DOWN, UP = "lora_down", "lora_up"

# The attention projections: the U-Net's self- and cross-attention (`attn1`, `attn2`) and the
# text encoders' self-attention (`self_attn`), as diffusers' LoRA training scripts adapt them.
ATTENTION_TARGETS = (r"(attn1|attn2|self_attn)/(to_q|to_k|to_v|to_out_0)$",)
# Named target sets a config may give instead of patterns.
TARGET_SETS = {
    "attention": ATTENTION_TARGETS,
    # The transformer blocks' feed-forward layers.
    "feed_forward": (r"ff/net_0/proj$", r"ff/net_2$", r"mlp/fc[12]$"),
    # The spatial transformers' input and output projections.
    "projections": (r"attentions_\d+/proj_(in|out)$",),
    # The resnets' 3x3 convolutions (kohya's "LoCon").
    "convolutions": (r"resnets_\d+/conv[12]$",),
}


class LoraMismatchError(ValueError):
    """Adapters that do not fit a model: a module it lacks, or a kernel of another shape."""


@dataclasses.dataclass(frozen=True)
class LoraShape:
    """What an adapter set is: its rank, its alpha (the scale is ``alpha / rank``) and the
    module patterns it adapts."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = ATTENTION_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"a LoRA rank must be at least 1, not {self.rank}")
        for pattern in self.targets:
            re.compile(pattern)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def expand_targets(names: Iterable[str]) -> tuple[str, ...]:
    """Patterns of target names: a named set (``TARGET_SETS``) or a regular expression."""
    patterns: list[str] = []
    for name in names:
        patterns.extend(TARGET_SETS.get(name, (name,)))
    return tuple(patterns)


def _is_leaf(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata) or not isinstance(x, dict)


def target_paths(params: Any, targets: Sequence[str]) -> list[tuple[str, ...]]:
    """The paths of the modules of ``params`` (possibly boxed or abstract) whose 2-d or 4-d
    ``kernel`` matches one of ``targets``, in tree order."""
    compiled = [re.compile(t) for t in targets]
    found = []

    def walk(tree: Any, path: tuple[str, ...]) -> None:
        kernel = tree.get("kernel")
        if kernel is not None and _is_leaf(kernel) and len(_shape(kernel)) in (2, 4):
            joined = "/".join(path)
            if any(c.search(joined) for c in compiled):
                found.append(path)
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, (*path, key))

    walk(params, ())
    return found


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(nn.meta.unbox(x).shape)


def module_at(tree: Any, path: Sequence[str]) -> Any:
    """The subtree of ``tree`` at the module path ``path``."""
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def adapter_paths(adapters: Any) -> list[tuple[str, ...]]:
    """The module paths an adapters tree adapts, in tree order."""
    found = []

    def walk(tree: Any, path: tuple[str, ...]) -> None:
        if DOWN in tree:
            found.append(path)
            return
        for key, value in tree.items():
            walk(value, (*path, key))

    walk(adapters, ())
    return found


def init_adapters(key: jax.Array, params: Any, shape: LoraShape) -> dict:
    """Fresh adapters for the modules of ``params`` that ``shape.targets`` match.

    ``down`` is drawn from N(0, 1/r²) (peft's "gaussian" initialisation, as diffusers' LoRA
    training scripts use) and ``up`` is zero, so the adapted model starts as the base. With
    boxed ``params`` (``nn.Partitioned``, inside ``jax.eval_shape`` or an init), the adapters
    are boxed with the kernels' logical axis names.

    Raises:
      ValueError: when no module matches, naming the patterns.
    """
    paths = target_paths(params, shape.targets)
    if not paths:
        raise ValueError(f"no module of the model matches the LoRA targets {shape.targets}")
    adapters: dict = {}
    for index, path in enumerate(paths):
        kernel = module_at(params, path)["kernel"]
        kernel_shape = _shape(kernel)
        dtype = nn.meta.unbox(kernel).dtype
        down = jax.random.normal(
            jax.random.fold_in(key, index), (*kernel_shape[:-1], shape.rank), dtype
        ) * jnp.asarray(1.0 / shape.rank, dtype)
        up = jnp.zeros((shape.rank, kernel_shape[-1]), dtype)
        names = getattr(kernel, "names", None)
        if names is not None:  # the kernel's box (logical names and their rules) for each
            down = kernel.replace(value=down, names=(*names[:-1], None))
            up = kernel.replace(value=up, names=(None, names[-1]))
        _set(adapters, path, {DOWN: down, UP: up})
    return adapters


def delta(adapter: dict, scale: float | jax.Array, rank_mask: jax.Array | None = None) -> jax.Array:
    """``scale * down @ up`` in the kernel's shape; ``rank_mask`` (r,) weighs each rank."""
    down = adapter[DOWN]
    if rank_mask is not None:
        down = down * rank_mask.astype(down.dtype)
    return jnp.tensordot(down, adapter[UP], axes=1) * jnp.asarray(scale, down.dtype)


def adapted(
    params: Any,
    loras: Sequence[tuple[Any, float | jax.Array]],
    *,
    rank_dropout: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> Any:
    """``params`` with the kernels of every adapted module replaced by ``W + Σ scale·down@up``
    (in the wider of the two types: a bfloat16 base with float32 adapters gives float32).

    Args:
      params: the base params tree (unboxed).
      loras: (adapters, scale) pairs; the scale is ``alpha / rank`` times any strength.
      rank_dropout: while training, each rank of each adapter is dropped with this
        probability for the whole step and the others scaled by ``1 / (1 - p)`` (kohya's
        rank dropout, drawn per step rather than per example).
      dropout_key: the key of those draws (required when ``rank_dropout > 0``).

    Raises:
      LoraMismatchError: when an adapter names a module the params do not have, or whose
        kernel has another shape.
    """
    deltas: dict[tuple[str, ...], jax.Array] = {}
    for lora_index, (adapters, scale) in enumerate(loras):
        for path_index, path in enumerate(adapter_paths(adapters)):
            adapter = module_at(adapters, path)
            mask = None
            if rank_dropout > 0.0:
                if dropout_key is None:
                    raise ValueError("rank_dropout > 0 needs a dropout_key")
                rank = adapter[UP].shape[0]
                draw_key = jax.random.fold_in(
                    jax.random.fold_in(dropout_key, lora_index), path_index
                )
                keep = jax.random.bernoulli(draw_key, 1.0 - rank_dropout, (rank,))
                mask = keep / (1.0 - rank_dropout)
            change = delta(adapter, scale, mask)
            deltas[path] = change if path not in deltas else deltas[path] + change
    if not deltas:
        return params
    out = _copy_dicts(params)
    for path, change in deltas.items():
        try:
            module = module_at(out, path)
        except KeyError:
            raise KeyError(
                f"the LoRA adapts {'/'.join(path)}, which the model does not have"
            ) from None
        kernel = module["kernel"]
        if kernel.shape != change.shape:
            raise LoraMismatchError(
                f"the LoRA of {'/'.join(path)} has the shape {change.shape}, but the model's "
                f"kernel is {kernel.shape}: it was made for another model"
            )
        # A base kept in a narrower type (bfloat16) is widened to the adapters' type, so that
        # small updates are not rounded away.
        dtype = jnp.promote_types(kernel.dtype, change.dtype)
        module["kernel"] = kernel.astype(dtype) + change.astype(dtype)
    return out


def _copy_dicts(tree: Any) -> Any:
    """The dicts of ``tree`` copied (to replace leaves); the arrays shared."""
    if isinstance(tree, dict):
        return {k: _copy_dicts(v) for k, v in tree.items()}
    return tree


def merge(params: Any, loras: Sequence[tuple[Any, float]]) -> tuple[Any, dict]:
    """The base ``params`` with the LoRAs merged into their kernels, for inference without
    any per-call cost; and the kernels it replaced, which ``unmerge`` puts back.

    Returns:
      (merged params, the replaced kernels: a tree of the adapted modules' ``{"kernel"}``).
    """
    originals: dict = {}
    for adapters, _ in loras:
        for path in adapter_paths(adapters):
            _set(originals, path, {"kernel": module_at(params, path)["kernel"]})
    return adapted(params, loras), originals


def unmerge(merged: Any, originals: dict) -> Any:
    """The base params again, bit for bit: the replaced kernels put back (subtracting the
    products would leave rounding errors in float32)."""
    out = _copy_dicts(merged)
    for path in kernel_paths(originals):
        module_at(out, path)["kernel"] = module_at(originals, path)["kernel"]
    return out


def kernel_paths(tree: Any) -> list[tuple[str, ...]]:
    """The module paths of a tree of ``{"kernel"}`` dicts (what ``merge`` returns)."""
    found = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if "kernel" in node and not isinstance(node["kernel"], dict):
            found.append(path)
            return
        for key, value in node.items():
            walk(value, (*path, key))

    walk(tree, ())
    return found


def num_params(adapters: Any) -> int:
    """The number of adapter parameters (arrays, boxed or abstract)."""
    return sum(int(x.size) for x in jax.tree.leaves(nn.meta.unbox(adapters)))
