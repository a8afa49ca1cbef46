"""The train state of a stage and the optimizer it is updated with."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ldm_jax.parallel import sharding


@flax.struct.dataclass
class TrainState:
    """Everything a training stage updates; saved whole in every checkpoint.

    Attributes:
      step: number of updates applied so far (int32 scalar).
      params: the online parameters, a dict of per-module parameter trees.
      ema_params: exponential moving average of ``params``; used for sampling and export.
      opt_state: the optimizer state, sharded like ``params``.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: optax.OptState


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay, after global-norm gradient clipping.

    Weight decay applies to kernels and embeddings only (ndim > 1), not to biases and norms.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.learning_rate,
        warmup_steps=min(train.warmup_steps, max(train.steps - 1, 1)),
        decay_steps=max(train.steps, train.warmup_steps + 1),
        end_value=train.learning_rate * train.end_learning_rate_fraction,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip),
        optax.adamw(
            schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay, mask=decay_mask
        ),
    )


def create_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state; meant to run inside ``jit`` (possibly on boxed, logically named params)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
    )


def apply_gradients(
    state: TrainState, grads: Any, optimizer: optax.GradientTransformation, ema_decay: float
) -> TrainState:
    """One optimizer update plus the EMA update.

    The EMA decay warms up as min(decay, (1 + step) / (10 + step)) so early averages are not
    dominated by the random initialisation.
    """
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    return TrainState(step=step, params=params, ema_params=ema_params, opt_state=opt_state)


def _with_params(state: TrainState, given: dict) -> TrainState:
    """``state`` with the top-level params in ``given`` replaced (keeping their axis names).

    The optimizer state of a fresh state does not depend on the param values (zero moments),
    and XLA drops the random draws of the replaced params as dead code.
    """
    params = dict(state.params)
    for name, value in given.items():
        params[name] = jax.tree.map(
            lambda boxed, new: (
                boxed.replace_boxed(jnp.asarray(new, boxed.unbox().dtype))
                if isinstance(boxed, flax.linen.meta.AxisMetadata)
                else jnp.asarray(new, boxed.dtype)
            ),
            state.params[name],
            value,
            is_leaf=lambda x: isinstance(x, flax.linen.meta.AxisMetadata),
        )
    return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))


def init_key(seed: int, stream: int, num_devices: int) -> jax.Array:
    """The key that initialises a stage's parameters on a mesh of ``num_devices``.

    On one device it uses the "rbg" generator: XLA compiles one random draw per parameter,
    and threefry draws compile about twice as slowly on CPU. On a mesh it uses threefry,
    whose draws XLA partitions: each device computes only its own shard. rbg draws are not
    partitionable, so every device would draw every full tensor (a full-size Stable
    Diffusion U-Net on 8 devices then needs over 24 GB on the host). Initial values do not
    depend on the mesh shape, only on whether there is more than one device.
    """
    impl = "rbg" if num_devices == 1 else None
    return jax.random.fold_in(jax.random.key(seed, impl=impl), stream)


def restore_or_create(
    init_fn,
    init_key: jax.Array,
    checkpointer,
    mesh,
    rules,
    data_iterator: Any = None,
    step: int | None = None,
    initial_params: dict | None = None,
) -> tuple[TrainState, Any]:
    """The state of ``init_fn(init_key)``'s shape, restored from ``checkpointer`` when it holds a
    checkpoint (onto this mesh, whatever mesh saved it), else freshly created sharded.

    A fresh state takes ``initial_params`` (host arrays for some of the top-level params,
    e.g. pretrained weights) in place of their random initialisation, for both the online
    and the EMA params.

    Returns:
      (state, shardings).
    """
    if checkpointer.latest_step() is None and initial_params:
        return sharding.create_sharded(
            lambda key, given: _with_params(init_fn(key), given),
            mesh,
            rules,
            init_key,
            initial_params,
        )
    if checkpointer.latest_step() is None:
        return sharding.create_sharded(init_fn, mesh, rules, init_key)
    abstract, shardings = sharding.abstract_state(init_fn, mesh, rules, init_key)
    return checkpointer.restore(abstract, data_iterator, step=step), shardings
