"""From logical partitioning to NamedShardings, sharded state creation and batch placement."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def _fit_spec_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops the mesh axes of any dimension they do not divide evenly (it stays replicated).

    Small layers (an RGB conv with 3 channels, a 4-channel latent projection) cannot be split
    over 2 or 8 devices; replicating them costs nothing and keeps one set of rules for all sizes.
    """
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        if axes is None:
            fitted.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([mesh.shape[a] for a in names]))
        fitted.append(axes if dim % size == 0 else None)
    return PartitionSpec(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a (possibly boxed) abstract tree from ``jax.eval_shape``."""
    specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.meta.unbox(abstract_tree)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, _fit_spec_to_shape(spec, leaf.shape, mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def create_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules, *args) -> tuple[Any, Any]:
    """Creates ``init_fn(*args)`` directly in its sharded layout; no full copy on one device.

    Returns:
      (state, shardings): the unboxed state and the matching tree of NamedShardings.
    """
    abstract = jax.eval_shape(init_fn, *args)
    # Outside the mesh context: unboxing there would add sharding constraints to abstract leaves.
    shardings = logical_shardings(abstract, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return state, shardings


def abstract_state(init_fn: Callable[..., Any], mesh: Mesh, rules, *args) -> tuple[Any, Any]:
    """The unboxed ``ShapeDtypeStruct`` tree of ``init_fn(*args)`` with target shardings attached.

    Used to restore a checkpoint onto this mesh, whatever mesh it was saved on.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(abstract, mesh, rules)
    unboxed = nn.meta.unbox(abstract)
    tree = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), unboxed, shardings
    )
    return tree, shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ('data', 'fsdp'); the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def to_host(tree: Any) -> Any:
    """Fetches (possibly multi-process) global arrays as numpy arrays on every process."""
    from jax.experimental import multihost_utils

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)
