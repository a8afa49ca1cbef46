"""Throughput of both training stages at a config's sizes, side by side in one run.

  python benchmarks/stages.py [--config=configs/quickstart.py] [--steps=10]

Prints a table (GFLOP per step from XLA's cost analysis, seconds per step, images/s,
achieved GFLOP/s and its ratio to this machine's measured float32 matmul peak) and one JSON
line. Timing excludes compilation; it is a measurement, never a test.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from common import matmul_peak_gflops, time_step
from ml_collections import config_flags

from ldm_jax.data import shapes, tokenizer
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.pipeline import builders
from ldm_jax.train import autoencoder, diffusion

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per stage (after 2 warm-up steps).")


def main(_):
    config = _CONFIG.value
    mesh = mesh_lib.create_mesh(data=-1)
    rules = mesh_lib.DEFAULT_AXIS_RULES
    size = config.data.image_size
    images = np.stack([shapes.ShapesSource("train", image_size=size)[i]["image"] for i in range(8)])

    def batch_of(n):
        return jax.device_put(np.resize(images, (n, size, size, 3)), sharding.batch_sharding(mesh))

    rows = {}
    ae_init, ae_step = autoencoder.stage_functions(config)
    with jax.set_mesh(mesh):
        ae_state, _ = sharding.create_sharded(ae_init, mesh, rules, jax.random.key(0))
        ae_batch = config.autoencoder.train.batch_size
        ae_params = jax.tree.map(jnp.copy, ae_state.params["autoencoder"])
        rows["autoencoder"] = (
            ae_batch,
            *time_step(
                ae_step,
                ae_state,
                ({"image": batch_of(ae_batch)}, jax.random.key(1), {}),
                _STEPS.value,
            ),
        )

        tok = tokenizer.build_word_tokenizer(shapes.caption_vocabulary())
        model = builders.build_model(config, tok, latent_scale=1.0)
        init, step = diffusion.stage_functions(config, model)
        state, _ = sharding.create_sharded(init, mesh, rules, jax.random.key(0))
        dm_batch = config.diffusion.train.batch_size
        tokens = jax.device_put(
            np.full((dm_batch, config.data.max_caption_length), 4, np.int32),
            sharding.batch_sharding(mesh),
        )
        rows["diffusion"] = (
            dm_batch,
            *time_step(
                step,
                state,
                (
                    {"image": batch_of(dm_batch), "tokens": tokens},
                    jax.random.key(1),
                    {"autoencoder": ae_params},
                ),
                _STEPS.value,
            ),
        )

    peak = matmul_peak_gflops()
    print(
        f"devices: {jax.device_count()} x {jax.devices()[0].platform}; "
        f"float32 matmul peak {peak:.0f} GFLOP/s"
    )
    print(
        f"{'stage':<12} {'batch':>5} {'GFLOP/step':>10} {'s/step':>7} {'images/s':>9} "
        f"{'GFLOP/s':>8} {'of peak':>7}"
    )
    record = {"matmul_peak_gflops": round(peak, 1)}
    for stage, (batch, gflop, seconds) in rows.items():
        rate = gflop / seconds
        print(
            f"{stage:<12} {batch:>5} {gflop:>10.2f} {seconds:>7.3f} {batch / seconds:>9.1f} "
            f"{rate:>8.1f} {rate / peak:>7.1%}"
        )
        record[stage] = {
            "batch": batch,
            "gflop_per_step": round(gflop, 3),
            "seconds_per_step": round(seconds, 4),
            "images_per_second": round(batch / seconds, 2),
            "fraction_of_peak": round(rate / peak, 4),
        }
    print(json.dumps(record))


if __name__ == "__main__":
    app.run(main)
