"""The step loop shared by both stages: progress bar, metrics, checkpoints, periodic hooks."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from ldm_jax.checkpoint import Checkpointer
from ldm_jax.config.schema import NONFINITE_POLICIES
from ldm_jax.parallel import distributed, sharding
from ldm_jax.train.metrics import MetricsWriter

log = logging.getLogger(__name__)

SKIPPED = "nonfinite_skipped"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value in ``tree`` is finite (a scalar bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_float(x)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def skip_nonfinite(step_fn: Callable) -> Callable:
    """``step_fn`` whose update is dropped when a metric (loss, gradient norm) is not finite.

    The floating-point leaves of the state (params, EMA, optimizer moments) keep their values
    from before the step; integer leaves (the step counter) advance, so the next step draws
    new noise and timesteps. The metrics gain ``nonfinite_skipped`` (1.0 for a dropped step).
    """

    def guarded(state: Any, *args: Any) -> tuple[Any, dict]:
        new_state, metrics = step_fn(state, *args)
        ok = _all_finite(metrics)
        kept = jax.tree.map(
            lambda new, old: jnp.where(ok, new, old) if _is_float(new) else new, new_state, state
        )
        return kept, {**metrics, SKIPPED: jnp.where(ok, 0.0, 1.0).astype(jnp.float32)}

    return guarded


def jit_train_step(
    step_fn: Callable,
    state_shardings: Any,
    mesh: Mesh,
    *extra_shardings: Any,
    nonfinite: str = "halt",
):
    """``step_fn(state, batch, key, *extra)`` jitted once with explicit shardings.

    The state is donated (updated in place), the batch split over the mesh's batch axes, the
    key replicated; ``extra_shardings`` place further inputs (frozen params of stage 1).
    ``nonfinite="skip"`` drops the update of a step with a non-finite metric on the device
    (see ``skip_nonfinite``); under "halt" ``run_steps`` stops the run at such a step.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"config.train.nonfinite={nonfinite!r}: must be one of {NONFINITE_POLICIES}"
        )
    return jax.jit(
        skip_nonfinite(step_fn) if nonfinite == "skip" else step_fn,
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
    Under ``config.train.nonfinite="halt"`` the first step with a non-finite metric stops the
    run with an error naming it and the last good checkpoint; under "skip" the step function
    (``jit_train_step``) dropped such updates on the device, and they are counted, up to
    ``config.train.max_nonfinite_skips``. A checkpoint is saved every
    ``config.train.checkpoint_every`` steps and at the end, only after its step's metrics and
    the state itself were checked to be finite, so a NaN never reaches a checkpoint. ``hook(step,
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
    skipped_total, max_skips = 0, config.train.get("max_nonfinite_skips", 0)
    with jax.set_mesh(mesh), _finishing(bar, checkpointer):
        for step in range(start + 1, total_steps + 1):
            state, metrics = step_fn(state, next(batches))
            checkpointer.check()  # a failed background save stops the run here
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
                averaged, skipped = _window_metrics(pending, step, stage, checkpointer)
                pending = []
                skipped_total += skipped
                if skipped_total > max_skips:
                    raise NonFiniteLossError(
                        f"{stage}: {skipped_total} steps skipped for non-finite values by step "
                        f"{step}, more than config.train.max_nonfinite_skips={max_skips}; "
                        f"{_last_good(checkpointer)}. Lower the learning rate "
                        f"(config.{stage}.train.learning_rate) or check the data"
                    )
                elapsed = time.perf_counter() - window_start
                averaged["images_per_second"] = window_steps * batch_size / max(elapsed, 1e-9)
                writer.write(step, averaged)
                bar.set_postfix(
                    loss=f"{averaged['loss']:.4f}", img_s=f"{averaged['images_per_second']:.1f}"
                )
                window_start, window_steps = time.perf_counter(), 0
            if save_now:
                if not bool(jax.device_get(_finite_state(state))):
                    raise NonFiniteLossError(
                        f"{stage}: the train state holds non-finite values at step {step}; it "
                        f"was not saved; {_last_good(checkpointer)}. " + _ADVICE.format(stage=stage)
                    )
                checkpointer.save(step, state, data_iterator, config_dict)
            if hook is not None and (step % hook_every == 0 or step == total_steps):
                hook(step, state)
            bar.update(1)
            if stopping:
                checkpointer.wait()
                log.warning(
                    "%s: stopped at step %d on request; checkpoint of step %d saved in %s; "
                    "run the same command to resume",
                    stage,
                    step,
                    step,
                    checkpointer.directory,
                )
                break
    checkpointer.wait()
    if skipped_total and is_main:
        log.warning("%s: %d steps skipped for non-finite values", stage, skipped_total)
    if is_main and not stopping:
        log.info(
            "%s: finished %d steps; checkpoint in %s", stage, total_steps, checkpointer.directory
        )
    return state


@contextlib.contextmanager
def _finishing(bar: tqdm, checkpointer: Checkpointer):
    """Closes the progress bar; when the loop fails, first completes the saves in flight so
    the checkpoints the error names are on disk when the process exits."""
    try:
        yield
    except BaseException:
        bar.close()
        try:
            checkpointer.wait()
        except Exception:  # the original error is the one to report
            log.exception("a checkpoint save failed while stopping on an error")
        raise
    bar.close()


_ADVICE = (
    "Lower the learning rate (config.{stage}.train.learning_rate), check the data, or set "
    "--config.train.nonfinite=skip to drop such updates"
)
_finite_state = jax.jit(_all_finite)


def _last_good(checkpointer: Checkpointer) -> str:
    last = checkpointer.latest_step()
    if last is None:
        return f"no checkpoint was saved yet in {checkpointer.directory}"
    return f"the last good checkpoint is step {last} in {checkpointer.directory}"


def _window_metrics(
    pending: list[dict], last_step: int, stage: str, checkpointer: Checkpointer
) -> tuple[dict[str, float], int]:
    """The means of the metrics of the steps in ``pending`` (ending at ``last_step``) and how
    many of them were skipped for non-finite values (under ``nonfinite="skip"``).

    Raises NonFiniteLossError naming the first step whose metrics are not finite when no step
    was skipped on the device (``nonfinite="halt"``).
    """
    stacked = jax.device_get({k: jnp.stack([m[k] for m in pending]) for k in pending[0]})
    stacked = {k: np.asarray(v, np.float64) for k, v in stacked.items()}
    skipped = stacked.pop(SKIPPED, np.zeros(len(pending))) > 0
    kept = ~skipped
    finite = np.all([np.isfinite(v) | skipped for v in stacked.values()], axis=0)
    if not finite.all():
        first = int(np.argmin(finite))
        bad = sorted(k for k, v in stacked.items() if not np.isfinite(v[first]))
        raise NonFiniteLossError(
            f"{stage}: non-finite {', '.join(bad)} at step {last_step - len(pending) + 1 + first}"
            f"; {_last_good(checkpointer)}. {_ADVICE.format(stage=stage)}"
        )
    averaged = {k: float(v[kept].mean()) if kept.any() else math.nan for k, v in stacked.items()}
    if SKIPPED in pending[0]:
        averaged[SKIPPED] = float(skipped.sum())
    return averaged, int(skipped.sum())
