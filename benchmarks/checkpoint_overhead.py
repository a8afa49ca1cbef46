"""Steps/s of the train loop with asynchronous checkpoints every N steps against none, and
with batches prefetched onto the devices against none, side by side in one run.

  python benchmarks/checkpoint_overhead.py [--config=configs/quickstart.py] [--steps=100]
      [--rounds=2] [--every=50,10] [--prefetch=0,1,2]

The loop is the training's own ``ldm_jax.train.loop.run_steps`` at the config's stage-2
(diffusion) sizes, fed as the quickstart feeds it: encoded latents (random values) with
tokenized captions through ``make_batches``, the step jitted by ``jit_train_step``,
checkpoints by ``Checkpointer`` (orbax, asynchronous) into a temporary directory, metrics to
``metrics.jsonl``. Each measured run logs every ``--log_every`` steps; its rate is taken
between its first log (after compilation) and its last (before the final save), so the saves
of every N steps fall inside and the one at the end does not. The variants alternate in
rounds, so a change in the machine's load weighs on all alike.

Prints steps/s per variant, the checkpoint overhead (1 - rate / rate without checkpoints,
target <= 5% of step time) and the prefetch effect (rate / rate without prefetch), then the
cost of one save of the same state outside the loop (median of --saves): the seconds the
caller is blocked and the seconds until the checkpoint is on disk, with the small arrays
packed (``Checkpointer``'s default) against every array saved on its own (pack_max_bytes=0),
and one JSON line. A measurement, never a test.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from ldm_jax import config as config_lib
from ldm_jax import host_memory
from ldm_jax.checkpoint import PACK_MAX_BYTES, Checkpointer
from ldm_jax.data import shapes, tokenizer
from ldm_jax.data.in_memory import InMemorySource
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.train import compile as compile_lib
from ldm_jax.train import data as data_lib
from ldm_jax.train import diffusion
from ldm_jax.train.loop import jit_train_step, run_steps
from ldm_jax.train.metrics import MetricsWriter

host_memory.use_huge_pages()  # as `ldm-jax train` runs (ldm_jax/host_memory.py)

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 100, "Measured steps per run (after the first log).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds the variants alternate in.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Steps between logs (host waits).")
_EVERY = flags.DEFINE_list("every", ["50", "10"], "Checkpoint intervals to compare with none.")
_PREFETCH = flags.DEFINE_list("prefetch", ["0", "1", "2"], "Device prefetch depths to compare.")
_SAVES = flags.DEFINE_integer("saves", 5, "Saves timed per packing variant (0: none).")
_RECORDS = 4096


class _TimedWriter(MetricsWriter):
    """A ``MetricsWriter`` that also notes when each step's metrics reached the host."""

    def __init__(self, workdir: str, stage: str):
        super().__init__(workdir, stage)
        self.times: dict[int, float] = {}

    def write(self, step, metrics) -> None:
        self.times[step] = time.perf_counter()
        super().write(step, metrics)


def _latent_source(config) -> InMemorySource:
    """Records shaped like ``diffusion.encode_dataset``'s (random values), shapes captions."""
    rng = np.random.default_rng(0)
    shape = (_RECORDS, *config_lib.latent_shape(config))
    images = shapes.ShapesSource("train", image_size=32, num_examples=_RECORDS)
    arrays = {
        "latent_mean": rng.standard_normal(shape, dtype=np.float32),
        "latent_std": np.full(shape, 0.1, np.float32),
        "label": np.zeros(_RECORDS, np.int32),
    }
    return InMemorySource(arrays, [str(images[i]["caption"]) for i in range(len(images))])


def _loop(config, mesh, rules):
    """``run(checkpoint_every, prefetch) -> (steps, seconds)``: one measured run of the loop."""
    source = _latent_source(config)
    tok = tokenizer.build_word_tokenizer(shapes.caption_vocabulary())
    keys = diffusion.batch_keys(config.diffusion.conditioning, encoded=True)
    # Stage 2 as `ldm-jax compile` builds it (a placeholder tokenizer of 1,000 words).
    init_fn, step_fn, _, frozen, frozen_shardings = compile_lib.stage_program(
        config, mesh, rules, "diffusion"
    )
    assert not frozen, "the measured config's stage 2 must read encoded latents (encode_once)"
    _, state_shardings = sharding.abstract_state(init_fn, mesh, rules, jax.random.key(0))
    step = jit_train_step(step_fn, state_shardings, mesh, frozen_shardings)
    key = jax.random.key(1)

    def run(checkpoint_every: int | None, prefetch: int) -> tuple[int, float]:
        run_config = config.copy_and_resolve_references()
        log_every = _LOG_EVERY.value
        total = run_config.diffusion.train.steps = log_every + _STEPS.value
        run_config.train.log_every = log_every
        # Without checkpoints: only the one after the last step, outside the measured window.
        run_config.train.checkpoint_every = checkpoint_every or 10 * total
        run_config.data.device_prefetch = prefetch
        data_iterator, batches = data_lib.make_batches(
            run_config.data,
            source,
            batch_size=run_config.diffusion.train.batch_size,
            seed=0,
            mesh=mesh,
            tokenizer_json=tok.to_str(),
            keys=keys,
            images=False,
        )
        state, _ = sharding.create_sharded(init_fn, mesh, rules, jax.random.key(0))
        with tempfile.TemporaryDirectory() as workdir:
            checkpointer = Checkpointer(f"{workdir}/checkpoints", max_to_keep=2)
            writer = _TimedWriter(workdir, "diffusion")
            run_steps(
                stage="diffusion",
                config=run_config,
                mesh=mesh,
                state=state,
                step_fn=lambda s, b: step(s, b, key, {}),
                batches=batches,
                data_iterator=data_iterator,
                checkpointer=checkpointer,
                writer=writer,
            )
            writer.close()
            checkpointer.close()
        return total - log_every, writer.times[total] - writer.times[log_every]

    return run


def _save_costs(config, mesh, rules, saves: int) -> dict:
    """Median seconds of one save of the stage-2 state (blocking the caller, and until on
    disk) and of its restore, with the small arrays packed and with every array on its own,
    alternating."""
    init_fn = compile_lib.stage_program(config, mesh, rules, "diffusion")[0]
    state, _ = sharding.create_sharded(init_fn, mesh, rules, jax.random.key(0))
    abstract, _ = sharding.abstract_state(init_fn, mesh, rules, jax.random.key(0))
    variants = {"packed (default)": PACK_MAX_BYTES, "every array on its own": 0}
    times = {name: ([], [], []) for name in variants}
    with tempfile.TemporaryDirectory() as workdir:
        checkpointers = {
            name: Checkpointer(f"{workdir}/{pack}", max_to_keep=2, pack_max_bytes=pack)
            for name, pack in variants.items()
        }
        for step in range(saves + 1):
            for name, checkpointer in checkpointers.items():
                start = time.perf_counter()
                checkpointer.save(step, state, config=config.to_dict())
                blocked = time.perf_counter() - start
                checkpointer.wait()
                if step:  # the first save of each is a warm-up
                    times[name][0].append(blocked)
                    times[name][1].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    jax.block_until_ready(checkpointer.restore(abstract))
                    times[name][2].append(time.perf_counter() - start)
        for checkpointer in checkpointers.values():
            checkpointer.close()
    leaves = jax.tree.leaves(state)
    print(
        f"one save of the stage-2 state ({len(leaves)} arrays, "
        f"{sum(x.nbytes for x in leaves) / 1e6:.1f} MB), median of {saves}:"
    )
    print(f"{'variant':<30} {'blocking s':>10} {'on disk s':>10} {'restore s':>10}")
    record = {}
    for name, (blocked, total, restored) in times.items():
        record[name] = {
            "blocking_seconds": round(statistics.median(blocked), 4),
            "seconds_to_disk": round(statistics.median(total), 4),
            "restore_seconds": round(statistics.median(restored), 4),
        }
        print(f"{name:<30} " + " ".join(f"{v:>10.3f}" for v in record[name].values()))
    return record


def _name(prefetch: int, every: int | None) -> str:
    return f"prefetch {prefetch}, " + ("no checkpoints" if every is None else f"every {every}")


def main(_):
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    config = _CONFIG.value
    mesh = mesh_lib.create_mesh(data=-1)
    rules = mesh_lib.axis_rules_from_config(config.mesh.axis_rules)
    default_prefetch = config.data.device_prefetch
    depths = sorted({0, default_prefetch, *(int(p) for p in _PREFETCH.value)})
    variants = {_name(p, None): (None, p) for p in depths}
    for every in _EVERY.value:
        variants[_name(default_prefetch, int(every))] = (int(every), default_prefetch)
    run = _loop(config, mesh, rules)
    run(None, default_prefetch)  # compiles the step, warms the caches; not counted
    steps, seconds = dict.fromkeys(variants, 0), dict.fromkeys(variants, 0.0)
    for _ in range(_ROUNDS.value):
        for name, (every, prefetch) in variants.items():
            n, s = run(every, prefetch)
            steps[name] += n
            seconds[name] += s
    rates = {name: steps[name] / seconds[name] for name in variants}

    batch = config.diffusion.train.batch_size
    print(
        f"devices: {jax.device_count()} x {jax.devices()[0].platform}; stage-2 batch {batch}; "
        f"{_ROUNDS.value} rounds x {_STEPS.value} steps per variant, log every {_LOG_EVERY.value}"
    )
    print(f"{'variant':<30} {'steps/s':>8} {'s/step':>7} {'images/s':>9} {'vs reference':>13}")
    record = {}
    for name, (every, _) in variants.items():
        # Prefetch depths against none; checkpoint intervals against none at the same depth.
        reference = _name(0 if every is None else default_prefetch, None)
        ratio = rates[name] / rates[reference]
        label = f"{ratio:.3f}x" if every is None else f"overhead {1 - ratio:+.1%}"
        print(
            f"{name:<30} {rates[name]:>8.3f} {1 / rates[name]:>7.3f} {rates[name] * batch:>9.1f} "
            f"{label:>13}"
        )
        record[name] = {
            "steps_per_second": round(rates[name], 4),
            "ratio_to_reference": round(ratio, 4),
            "reference": reference,
        }
    print("checkpoint overhead target: <= 5% of step time; prefetch: ratio to no prefetch")
    if _SAVES.value:
        record["one save"] = _save_costs(config, mesh, rules, _SAVES.value)
    print(json.dumps(record))


if __name__ == "__main__":
    app.run(main)
