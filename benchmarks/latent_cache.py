"""Stage-2 training speed from a latent cache against encoding images at every step.

  python benchmarks/latent_cache.py [--config=configs/quickstart.py] [--steps=40] [--rounds=4]

Both runs use the config's stage-2 model, batch and data pipeline (grain, one process); the
only difference is the source: images through the frozen encoder, or the posterior means
and stds that `ldm-jax cache-latents` wrote. The autoencoder is untrained: speed does not
depend on its weights. The timed steps alternate between the two in rounds, so a change in
the machine's load weighs on both alike. Prints steps/s of each (and the process's CPU time
per step, which other processes on the machine disturb less) and their ratios; timing
excludes compilation. It is a measurement, never a test.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable

import jax
from absl import app, flags
from ml_collections import config_flags

from ldm_jax.checkpoint import Checkpointer
from ldm_jax.data.latent_cache import LatentCacheSource
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.pipeline import builders
from ldm_jax.pipeline import workdir as workdir_lib
from ldm_jax.pipeline.datasets import make_source
from ldm_jax.train import autoencoder as autoencoder_stage
from ldm_jax.train import data as data_lib
from ldm_jax.train import diffusion, frozen
from ldm_jax.train.latent_cache import cache_latents
from ldm_jax.train.loop import jit_train_step

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 40, "Timed steps per source (after 3 warm-up steps).")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Rounds the timed steps alternate in.")
_RECORDS = flags.DEFINE_integer("records", 4096, "Training records to encode and cache.")


def _stage1_workdir(config, workdir: str, mesh, rules) -> None:
    """A workdir holding an untrained stage-1 checkpoint and its latent scale."""
    checkpointer = Checkpointer(
        workdir_lib.checkpoint_dir(workdir, workdir_lib.AUTOENCODER), async_checkpointing=False
    )
    state, _ = autoencoder_stage.restore_or_create(config, checkpointer, mesh, rules)
    checkpointer.save(0, state)
    checkpointer.close()
    workdir_lib.write_latent_scale(workdir, 1.0, 0)


def _runner(config, source, encoded: bool, mesh, rules, workdir: str) -> Callable[[int], None]:
    """``run(n)``: n stage-2 steps on batches from ``source``, waiting for the last one."""
    ae_params, scale = frozen.load_autoencoder(config, workdir, mesh, rules)
    image_source = make_source(config.data, config.data.train_split, config.seed)
    tokenizer, text_encoder, extra = frozen.load_conditioning(
        config, workdir, mesh, rules, image_source
    )
    model = builders.build_model(config, tokenizer, scale, text_encoder)
    _, batches = data_lib.make_batches(
        config.data,
        source,
        batch_size=config.diffusion.train.batch_size,
        seed=0,
        mesh=mesh,
        tokenizer_json=tokenizer.to_str() if tokenizer else None,
        keys=diffusion.batch_keys(config.diffusion.conditioning, encoded),
        images=not encoded,
    )
    init, step_fn = diffusion.stage_functions(config, model)
    state, shardings = sharding.create_sharded(init, mesh, rules, jax.random.key(0))
    frozen_params = {**extra, "autoencoder": ae_params}
    step = jit_train_step(step_fn, shardings, mesh, frozen.shardings_of(frozen_params))
    key = jax.random.key(1)

    def run(num_steps: int) -> None:
        nonlocal state
        with jax.set_mesh(mesh):
            for _ in range(num_steps):
                state, metrics = step(state, next(batches), key, frozen_params)
            jax.block_until_ready(metrics)

    run(3)  # compiles
    return run


def _timed_rounds(runners: dict[str, Callable[[int], None]]) -> dict[str, tuple[float, float]]:
    """Per runner: (steps/s, CPU seconds per step) over ``--steps`` steps in alternating rounds."""
    wall, cpu = dict.fromkeys(runners, 0.0), dict.fromkeys(runners, 0.0)
    for round_index in range(_ROUNDS.value):
        round_steps = _STEPS.value // _ROUNDS.value + (round_index < _STEPS.value % _ROUNDS.value)
        for name, run in runners.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            run(round_steps)
            wall[name] += time.perf_counter() - wall_start
            cpu[name] += time.process_time() - cpu_start
    return {name: (_STEPS.value / wall[name], cpu[name] / _STEPS.value) for name in runners}


def main(_):
    config = _CONFIG.value
    config.data.num_train_examples = _RECORDS.value
    config.diffusion.encode_once = False
    mesh = mesh_lib.create_mesh(data=-1)
    rules = mesh_lib.DEFAULT_AXIS_RULES
    with tempfile.TemporaryDirectory() as workdir:
        _stage1_workdir(config, workdir, mesh, rules)
        cache_dir = f"{workdir}/latent_cache"
        start = time.perf_counter()
        metadata = cache_latents(config, workdir, cache_dir, mesh, rules)
        caching = time.perf_counter() - start
        images = make_source(config.data, config.data.train_split, config.seed)
        results = _timed_rounds(
            {
                "images + encoder": _runner(config, images, False, mesh, rules, workdir),
                "latent cache": _runner(
                    config, LatentCacheSource(cache_dir), True, mesh, rules, workdir
                ),
            }
        )
    (on_the_fly, on_the_fly_cpu), (cached, cached_cpu) = results.values()
    batch = config.diffusion.train.batch_size
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; stage-2 batch {batch}")
    print(f"caching {metadata['num_records']} records: {caching:.1f} s")
    print(f"{'source':<22} {'steps/s':>8} {'images/s':>9} {'CPU s/step':>11}")
    for name, (steps_per_second, cpu_per_step) in results.items():
        print(
            f"{name:<22} {steps_per_second:>8.2f} {steps_per_second * batch:>9.1f} "
            f"{cpu_per_step:>11.3f}"
        )
    print(
        f"speed-up from the cache: {cached / on_the_fly:.2f}x "
        f"(CPU time per step: {on_the_fly_cpu / cached_cpu:.2f}x less)"
    )
    print(
        json.dumps(
            {
                "steps_per_second_encoding": round(on_the_fly, 3),
                "steps_per_second_cache": round(cached, 3),
                "speedup": round(cached / on_the_fly, 3),
                "cpu_seconds_per_step_encoding": round(on_the_fly_cpu, 3),
                "cpu_seconds_per_step_cache": round(cached_cpu, 3),
                "cpu_speedup": round(on_the_fly_cpu / cached_cpu, 3),
                "caching_seconds": round(caching, 1),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
