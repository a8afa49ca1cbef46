"""The step loop shared by both stages: progress bar, metrics, checkpoints, periodic hooks."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from tqdm import tqdm

from ldm_jax.checkpoint import Checkpointer
from ldm_jax.parallel import distributed, sharding
from ldm_jax.train.metrics import MetricsWriter

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


def jit_train_step(step_fn: Callable, state_shardings: Any, mesh: Mesh, *extra_shardings: Any):
    """``step_fn(state, batch, key, *extra)`` jitted once with explicit shardings.

    The state is donated (updated in place), the batch split over the mesh's batch axes, the
    key replicated; ``extra_shardings`` place further inputs (frozen params of stage 1).
    """
    return jax.jit(
        step_fn,
        in_shardings=(
            state_shardings,
            sharding.batch_sharding(mesh),
            sharding.replicated(mesh),
            *extra_shardings,
        ),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def run_steps(
    *,
    stage: str,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    state: Any,
    step_fn: Callable,
    batches: Iterator[dict],
    data_iterator: Any,
    checkpointer: Checkpointer,
    writer: MetricsWriter,
    hook: Callable[[int, Any], None] | None = None,
    should_stop: Callable[[int], bool] | None = None,
) -> Any:
    """Runs ``state, metrics = step_fn(state, batch)`` up to ``config.<stage>.train.steps``.

    The host waits on the device only every ``config.train.log_every`` steps (and at
    checkpoints), when the accumulated metrics are fetched, checked to be finite and written.
    A checkpoint is saved every ``config.train.checkpoint_every`` steps and at the end, only
    after its step's metrics were checked, so a NaN never reaches a checkpoint. ``hook(step,
    state)`` runs every ``config.train.sample_every`` steps (0: at the end only).

    ``should_stop(step)`` is asked after every step (a preemption signal sets it): when it
    says yes the loop checkpoints that step and returns early; the next start resumes there.
    With several processes the request is honoured at the next log or checkpoint step, where
    the processes agree on it: the last checkpoint is written by all of them at one step.
    """
    total_steps = config[stage].train.steps
    batch_size = config[stage].train.batch_size
    log_every, checkpoint_every = config.train.log_every, config.train.checkpoint_every
    hook_every = config.train.sample_every or total_steps
    config_dict = config.to_dict()
    start = int(state.step)
    if start >= total_steps:
        log.info("%s: already trained for %d steps; nothing to do", stage, start)
        return state
    is_main = jax.process_index() == 0
    bar = tqdm(
        total=total_steps,
        initial=start,
        desc=stage,
        disable=not is_main,
        dynamic_ncols=True,
        unit="step",
    )
    pending: list[dict] = []
    window_start, window_steps = time.perf_counter(), 0
    several_processes, requested = jax.process_count() > 1, False
    with jax.set_mesh(mesh):
        for step in range(start + 1, total_steps + 1):
            state, metrics = step_fn(state, next(batches))
            pending.append(metrics)
            window_steps += 1
            requested = requested or (should_stop is not None and should_stop(step))
            stopping = requested
            if several_processes:
                # Agreed where the host waits for the device anyway, not at every step.
                syncs = step % log_every == 0 or step % checkpoint_every == 0
                stopping = (syncs or step == total_steps) and distributed.any_process(requested)
            is_last = step == total_steps or stopping
            save_now = step % checkpoint_every == 0 or is_last
            if step % log_every == 0 or save_now:
                averaged = {
                    k: float(v)
                    for k, v in jax.device_get(
                        jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *pending)
                    ).items()
                }
                pending = []
                bad = [k for k, v in averaged.items() if not math.isfinite(v)]
                if bad:
                    bar.close()
                    last = checkpointer.latest_step()
                    raise NonFiniteLossError(
                        f"{stage}: non-finite {', '.join(bad)} at step {step}; the last good "
                        f"checkpoint is step {last} in {checkpointer.directory}. Lower the "
                        f"learning rate (config.{stage}.train.learning_rate) or check the data."
                    )
                elapsed = time.perf_counter() - window_start
                averaged["images_per_second"] = window_steps * batch_size / max(elapsed, 1e-9)
                writer.write(step, averaged)
                bar.set_postfix(
                    loss=f"{averaged['loss']:.4f}", img_s=f"{averaged['images_per_second']:.1f}"
                )
                window_start, window_steps = time.perf_counter(), 0
            if save_now:
                checkpointer.save(step, state, data_iterator, config_dict)
            if hook is not None and (step % hook_every == 0 or step == total_steps):
                hook(step, state)
            bar.update(1)
            if stopping:
                log.info("%s: stopping at step %d on request; it is checkpointed", stage, step)
                break
    bar.close()
    checkpointer.wait()
    if is_main and not stopping:
        log.info(
            "%s: finished %d steps; checkpoint in %s", stage, total_steps, checkpointer.directory
        )
    return state
