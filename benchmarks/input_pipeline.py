"""Images/s of the grain input pipeline against what the train steps consume, in one run.

  python benchmarks/input_pipeline.py [--config=configs/quickstart.py] [--batches=60]
      [--steps=10] [--folder_images=384] [--folder_image_size=256] [--workers=2]

Pipelines are the training's own (``ldm_jax.train.data.make_batches``: source, transforms,
batching, tokens, placement on the devices) at the config's batch sizes, each read alone:

- shapes: the embedded dataset, as stage 1 of the quickstart reads it;
- image folder: a temporary folder of PNGs with caption files (by default twice the config's
  image size, so they are resized as real photos are), read as
  ``config.data.source="image_folder"``;
- latents: the encoded records stage 2 of the quickstart reads (``encode_once``): posterior
  means and stds of random values, with captions tokenized per batch.

Each is read with and without read threads and worker processes. Consumption: images/s of
the stage-1 (autoencoder) and stage-2 (diffusion, from latents) train steps at the config's
sizes, timed on one batch the devices already hold (compilation excluded). The ratio pipeline /
consumption says how far ahead of the step the data can run (target: >= 5x for the
pipeline each stage is configured with). A measurement, never a test; note that on a small
CPU the pipeline and the step share the cores when training.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from common import time_step
from ml_collections import config_flags
from PIL import Image

from ldm_jax import config as config_lib
from ldm_jax.data import shapes, tokenizer
from ldm_jax.data.in_memory import InMemorySource
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.pipeline.datasets import make_source
from ldm_jax.train import autoencoder, diffusion
from ldm_jax.train import compile as compile_lib
from ldm_jax.train import data as data_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", lock_config=False)
_BATCHES = flags.DEFINE_integer("batches", 60, "Timed batches per pipeline (after a warm-up).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps per stage (after 2 warm-up steps).")
_FOLDER_IMAGES = flags.DEFINE_integer("folder_images", 384, "PNG files in the image folder.")
_FOLDER_IMAGE_SIZE = flags.DEFINE_integer(
    "folder_image_size", 0, "Side of the PNGs (32, 64, 128, 256; 0: twice the config's)."
)
_WORKERS = flags.DEFINE_integer("workers", 2, "Worker processes of the rows that use them.")
_LATENT_RECORDS = 4096
_WARMUP_BATCHES = 4  # worker processes start and fill their buffers meanwhile


def _image_folder(directory: pathlib.Path, count: int, image_size: int) -> pathlib.Path:
    """``count`` shapes images as PNG files of ``image_size`` pixels with caption files."""
    source = shapes.ShapesSource("train", image_size=image_size, num_examples=count)
    for index in range(count):
        record = source[index]
        Image.fromarray(record["image"]).save(directory / f"{index:05d}.png")
        (directory / f"{index:05d}.txt").write_text(str(record["caption"]), encoding="utf-8")
    return directory


def _latent_source(config) -> InMemorySource:
    """Records shaped like ``diffusion.encode_dataset``'s, with the shapes dataset's captions."""
    rng = np.random.default_rng(0)
    shape = (_LATENT_RECORDS, *config_lib.latent_shape(config))
    images = shapes.ShapesSource("train", image_size=32, num_examples=_LATENT_RECORDS)
    arrays = {
        "latent_mean": rng.standard_normal(shape, dtype=np.float32),
        "latent_std": np.full(shape, 0.1, np.float32),
        "label": np.zeros(_LATENT_RECORDS, np.int32),
    }
    return InMemorySource(arrays, [str(images[i]["caption"]) for i in range(len(images))])


def _pipeline_rate(config, source, mesh, *, batch_size: int, workers: int, threads, **kwargs):
    """Images (records) per second of ``make_batches``'s batches, each ready on the devices."""
    data = config.data
    data.worker_count, data.device_prefetch = workers, 0  # one batch read per `next`
    _, batches = data_lib.make_batches(
        data, source, batch_size=batch_size, seed=0, mesh=mesh, read_threads=threads, **kwargs
    )
    for _ in range(_WARMUP_BATCHES + 2 * workers):
        jax.block_until_ready(next(batches))
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
        batch = next(batches)
    jax.block_until_ready(batch)
    return _BATCHES.value * batch_size / (time.perf_counter() - start)


def _pipeline_rows(config, mesh, folder: pathlib.Path) -> list[dict]:
    ae_batch, dm_batch = config.autoencoder.train.batch_size, config.diffusion.train.batch_size
    shapes_source = make_source(config.data, config.data.train_split, config.seed)
    folder_config = config.copy_and_resolve_references()
    folder_config.data.source, folder_config.data.path = "image_folder", str(folder)
    folder_source = make_source(folder_config.data, "train", config.seed)
    latents = _latent_source(config)
    tok = tokenizer.build_word_tokenizer(shapes.caption_vocabulary())
    latent_keys = diffusion.batch_keys(config.diffusion.conditioning, encoded=True)
    default = {source: data_lib.READ_THREADS[source] for source in ("shapes", "image_folder")}
    workers = _WORKERS.value
    latent_options = dict(tokenizer_json=tok.to_str(), keys=latent_keys, images=False)
    folder_threads = default["image_folder"]
    plans = [  # (name, stage, config, source, batch, workers, threads, make_batches options)
        ("shapes", 1, config, shapes_source, ae_batch, 0, default["shapes"], {}),
        ("shapes", 1, config, shapes_source, ae_batch, 0, 16, {}),
        ("shapes", 1, config, shapes_source, ae_batch, workers, default["shapes"], {}),
        ("image folder", 1, folder_config, folder_source, ae_batch, 0, 0, {}),
        ("image folder", 1, folder_config, folder_source, ae_batch, 0, folder_threads, {}),
        ("image folder", 1, folder_config, folder_source, ae_batch, workers, folder_threads, {}),
        ("latents + tokens", 2, config, latents, dm_batch, 0, 0, latent_options),
    ]
    rows = []
    for name, stage, plan_config, source, batch, plan_workers, threads, options in plans:
        rate = _pipeline_rate(
            plan_config.copy_and_resolve_references(),
            source,
            mesh,
            batch_size=batch,
            workers=plan_workers,
            threads=threads,
            **options,
        )
        is_default = plan_workers == config.data.worker_count and threads == (
            0 if stage == 2 else default.get(plan_config.data.source)
        )
        rows.append(
            dict(
                pipeline=name,
                stage=stage,
                batch=batch,
                workers=plan_workers,
                threads=threads,
                default=is_default,
                images_per_second=rate,
            )
        )
    return rows


def _consumption(config, mesh, rules) -> dict[int, float]:
    """Images/s of the stage-1 and stage-2 train steps, as training builds them."""
    key = jax.random.key(1)
    batch_sharding = sharding.batch_sharding(mesh)
    size = config.data.image_size
    rates = {}
    with jax.set_mesh(mesh):
        modules, lpips_params = autoencoder.build_loss_modules(config)
        init_fn, step_fn = autoencoder.stage_functions(config, modules)
        state, _ = sharding.create_sharded(init_fn, mesh, rules, jax.random.key(0))
        ae_batch = config.autoencoder.train.batch_size
        images = jax.device_put(
            np.random.default_rng(0).integers(0, 256, (ae_batch, size, size, 3), np.uint8),
            batch_sharding,
        )
        _, seconds = time_step(
            lambda s, *a: step_fn(s, *a, use_gan=False),
            state,
            ({"image": images}, key, lpips_params),
            _STEPS.value,
        )
        rates[1] = ae_batch / seconds

        # Stage 2 as `ldm-jax compile` builds it (a placeholder tokenizer of 1,000 words).
        init_fn, step_fn, specs, frozen, _ = compile_lib.stage_program(
            config, mesh, rules, "diffusion"
        )
        frozen = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), frozen)
        state, _ = sharding.create_sharded(init_fn, mesh, rules, jax.random.key(0))
        dm_batch = config.diffusion.train.batch_size
        rng = np.random.default_rng(0)
        batch = {
            name: jax.device_put(
                rng.integers(1, 8, (dm_batch, *shape)).astype(dtype)
                if jnp.issubdtype(dtype, jnp.integer)
                else rng.standard_normal((dm_batch, *shape)).astype(dtype),
                batch_sharding,
            )
            for name, (shape, dtype) in specs.items()
        }
        _, seconds = time_step(step_fn, state, (batch, key, frozen), _STEPS.value)
        rates[2] = dm_batch / seconds
    return rates


def main(_):
    config = _CONFIG.value
    mesh = mesh_lib.create_mesh(data=-1)
    rules = mesh_lib.axis_rules_from_config(config.mesh.axis_rules)
    png_size = _FOLDER_IMAGE_SIZE.value or 2 * config.data.image_size
    with tempfile.TemporaryDirectory() as tmp:
        folder = _image_folder(pathlib.Path(tmp), _FOLDER_IMAGES.value, png_size)
        rows = _pipeline_rows(config, mesh, folder)
    consumption = _consumption(config, mesh, rules)

    print(
        f"devices: {jax.device_count()} x {jax.devices()[0].platform}; image size "
        f"{config.data.image_size}; {_FOLDER_IMAGES.value} PNGs of {png_size} px in the folder"
    )
    print(
        f"consumption: stage 1 (autoencoder step) {consumption[1]:.1f} images/s, "
        f"stage 2 (diffusion step from latents) {consumption[2]:.1f} images/s"
    )
    print(
        f"{'pipeline':<17} {'batch':>5} {'workers':>7} {'threads':>7} {'images/s':>9} "
        f"{'/ stage 1':>9} {'/ stage 2':>9}  configured"
    )
    for row in rows:
        stage = row["stage"]
        row["ratio_stage1"] = row["images_per_second"] / consumption[1] if stage == 1 else None
        row["ratio_stage2"] = row["images_per_second"] / consumption[2]
        stage1 = f"{row['ratio_stage1']:>8.1f}x" if row["ratio_stage1"] else f"{'-':>9}"
        print(
            f"{row['pipeline']:<17} {row['batch']:>5} {row['workers']:>7} {row['threads']:>7} "
            f"{row['images_per_second']:>9.1f} {stage1} {row['ratio_stage2']:>8.1f}x  "
            f"{'yes' if row['default'] else ''}"
        )
    configured = [
        row["images_per_second"] / consumption[row["stage"]]
        for row in rows
        if row["default"] and row["pipeline"] != "image folder"
    ]
    print(
        f"quickstart pipelines / their stage's step (shapes -> stage 1, latents -> stage 2): "
        f"lowest {min(configured):.1f}x (target >= 5x)"
    )
    print(
        json.dumps(
            {
                "consumption_images_per_second": {
                    f"stage{k}": round(v, 2) for k, v in consumption.items()
                },
                "pipelines": [
                    {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
                    for row in rows
                ],
                "lowest_configured_ratio": round(min(configured), 2),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
