"""Gradient accumulation: the gradient of a batch as the mean over microbatches, in one jit.

Microbatch ``i`` of ``k`` holds the examples ``i, i + k, i + 2k, ...`` of the batch, so when the
batch is split over the devices (each holding a contiguous block whose size ``k`` divides),
every device keeps its own examples in every microbatch: splitting moves no data.

The microbatches run one after another in a ``lax.scan`` (one microbatch's activations alive at
a time: the memory lever), or with ``parallel=True`` as independent computations in one graph
(every microbatch's activations alive at once) that XLA may run at the same time: on a CPU,
whose runtime gives independent operations to different threads, that is the faster step
(``benchmarks/train_step.py --microbatches=2`` measures it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# loss_fn(params, inputs, key) -> (scalar loss, {name: scalar metric}).
LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def microbatches(inputs: Any, num_microbatches: int) -> Any:
    """Every leaf ``(B, ...)`` of ``inputs`` as ``(num_microbatches, B / num_microbatches, ...)``.

    Microbatch ``i`` takes the examples ``i::num_microbatches`` (see the module docstring).
    """

    def split(x: jax.Array) -> jax.Array:
        strided = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
        return jnp.swapaxes(strided, 0, 1)

    return jax.tree.map(split, inputs)


def accumulated_gradients(
    loss_fn: LossFn,
    params: Any,
    inputs: Any,
    key: jax.Array,
    num_microbatches: int,
    parallel: bool = False,
) -> tuple[Any, dict[str, jax.Array]]:
    """The gradient of ``loss_fn`` and its metrics, averaged over ``num_microbatches``.

    ``loss_fn`` must be a mean over the examples of ``inputs`` (a pytree of arrays with a
    leading batch dimension) for the average of equal-sized microbatches to be the full
    batch's gradient. Whatever randomness belongs to an example must come inside ``inputs``;
    ``key`` (folded with the microbatch index when there are several) is for the rest.
    Only one microbatch's activations are alive at a time: ``lax.scan`` runs them in turn;
    with ``parallel`` they are independent branches of the graph instead (see the module
    docstring), which computes the same gradient.

    Returns:
      (grads, metrics): grads shaped like ``params``; the metrics averaged.
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if num_microbatches == 1:
        return grad_fn(params, inputs, key)

    def step(summed: Any, index_and_inputs: tuple[jax.Array, Any]):
        index, microbatch = index_and_inputs
        grads, metrics = grad_fn(params, microbatch, jax.random.fold_in(key, index))
        return jax.tree.map(jnp.add, summed, grads), metrics

    split = microbatches(inputs, num_microbatches)
    if parallel:
        results = [
            grad_fn(params, jax.tree.map(lambda x, i=i: x[i], split), jax.random.fold_in(key, i))
            for i in range(num_microbatches)
        ]
        summed = jax.tree.map(lambda *g: sum(g), *(grads for grads, _ in results))
        metrics = jax.tree.map(lambda *m: jnp.stack(m), *(metrics for _, metrics in results))
    else:
        zeros = jax.tree.map(jnp.zeros_like, params)
        indices = jnp.arange(num_microbatches)
        summed, metrics = jax.lax.scan(step, zeros, (indices, split))
    grads = jax.tree.map(lambda g: g / num_microbatches, summed)
    return grads, jax.tree.map(jnp.mean, metrics)
