"""A toy linear model trained through the real step loop, jitted step and orbax
checkpoints, for tests of what the loop does around the model (failures, saves)."""

import json

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax.checkpoint import Checkpointer
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.train.loop import jit_train_step, run_steps
from ldm_jax.train.metrics import MetricsWriter

BATCH = 8


@flax.struct.dataclass
class ToyState:
    step: jax.Array
    params: dict


def toy_step(state, batch, key):
    """SGD on a linear model; a batch holding NaN gives a NaN loss and gradient."""
    del key

    def loss_fn(params):
        return jnp.mean((batch["x"] @ params["w"] - 1.0) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
    grad_norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    return ToyState(state.step + 1, params), {"loss": loss, "grad_norm": grad_norm}


def toy_config(steps=12, log_every=4, checkpoint_every=4, policy="halt", max_skips=100):
    return ml_collections.ConfigDict(
        {
            "toy": {"train": {"steps": steps, "batch_size": BATCH}},
            "train": {
                "log_every": log_every,
                "checkpoint_every": checkpoint_every,
                "sample_every": 0,
                "nonfinite": policy,
                "max_nonfinite_skips": max_skips,
            },
        }
    )


def batches(bad_steps):
    """Batch of step s (1-based) is all NaN when s is in ``bad_steps``."""
    step = 0
    rng = np.random.default_rng(0)
    while True:
        step += 1
        x = rng.normal(size=(BATCH, 3)).astype(np.float32)
        yield {"x": np.full_like(x, np.nan) if step in bad_steps else x}


def train_toy(tmp_path, config, bad_steps):
    mesh = mesh_lib.create_mesh(data=-1)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.device_put(ToyState(jnp.zeros((), jnp.int32), {"w": jnp.zeros(3)}), replicated)
    shardings = jax.tree.map(lambda _: replicated, state)
    step = jit_train_step(toy_step, shardings, mesh, nonfinite=config.train.nonfinite)
    key = jax.random.key(0)
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=10)
    writer = MetricsWriter(str(tmp_path), "toy")
    try:
        return checkpointer, run_steps(
            stage="toy",
            config=config,
            mesh=mesh,
            state=state,
            step_fn=lambda s, b: step(s, b, key),
            batches=batches(bad_steps),
            data_iterator=None,
            checkpointer=checkpointer,
            writer=writer,
        )
    finally:
        checkpointer.wait()
        writer.close()


def saved_params(checkpointer, step):
    abstract = ToyState(jnp.zeros((), jnp.int32), {"w": jnp.zeros(3)})
    restored = checkpointer.restore(abstract, step=step)
    return int(restored.step), np.asarray(restored.params["w"])


def logged(tmp_path):
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
