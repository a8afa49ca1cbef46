"""``ldm-jax cache-latents``: encode a dataset once with the frozen stage-1 encoder.

Every JAX process reads a contiguous range of the source (so the cache's record order is
the source's), the ranges are encoded together as global batches split over every device,
and each process writes the rows of its own range to its own ArrayRecord shards. Process 0
writes ``metadata.json`` last, once every process is done: a cache without it is
unfinished, and readers refuse it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from ldm_jax import config as config_lib
from ldm_jax import storage
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.data import latent_cache, pipeline
from ldm_jax.data.transforms import ResizeAndCrop
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.pipeline import builders
from ldm_jax.pipeline import workdir as workdir_lib
from ldm_jax.pipeline.datasets import make_source
from ldm_jax.pipeline.model import pixels_from_uint8
from ldm_jax.train import frozen

log = logging.getLogger(__name__)

# What identifies a cache: the same values mean the same latents.
_IDENTITY_KEYS = ("source", "autoencoder", "autoencoder_step", "latent_shape", "keys")


class EncoderInput(grain.transforms.MapWithIndex):
    """A source record as the encoder takes it: the centre-cropped image, the label, the
    caption, and the record's index in the source."""

    def __init__(self, image_size: int):
        self.resize = ResizeAndCrop(image_size, random_crop=False)

    def map_with_index(self, index: int, element: dict) -> dict:
        # A centre crop draws no random numbers; the generator only fills the signature.
        image = self.resize.random_map(element, np.random.default_rng(0))["image"]
        return {
            "image": image,
            "label": np.int32(element["label"]),
            "caption": str(element["caption"]),
            "index": np.int64(index),
        }


def process_range(num_records: int, process_index: int, process_count: int) -> range:
    """The contiguous records of one process: sizes differ by at most one."""
    return range(
        process_index * num_records // process_count,
        (process_index + 1) * num_records // process_count,
    )


def encode_batch(params: Any, images: jax.Array, *, model: Any, store_codes: bool) -> dict:
    """Posterior means and stds (float32) of uint8 images, and VQ codes when asked."""
    pixels = pixels_from_uint8(images)
    posterior = model.apply({"params": params}, pixels, method="encode")
    encoded = {
        "latent_mean": posterior.mean.astype(jnp.float32),
        "latent_std": posterior.std.astype(jnp.float32),
    }
    if store_codes:
        codes = model.apply({"params": params}, pixels, method="encode_indices")
        encoded["codes"] = codes.astype(jnp.int32)
    return encoded


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order it gave them.

    Reads only the process's own shards (no all-gather); rows that several devices hold
    (replicas over the 'tensor' axis) are taken once.
    """
    shards = {}
    for shard in array.addressable_shards:
        shards.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def encode_source(
    config: ml_collections.ConfigDict,
    source: Any,
    ae_params: Any,
    mesh: Mesh,
    rules,
    *,
    batch_size: int,
) -> Iterator[dict]:
    """Encodes ``source`` once over every device of every process; yields this process's
    records (its ``process_range``), in source order.

    Every process must iterate to the end: each step is one global batch of ``batch_size``
    (rounded to a multiple of the data-parallel size and of the process count), the last
    ones padded. Records are ``{"latent_mean", "latent_std", "label", "caption", "index"}``
    and ``"codes"`` for a VQ autoencoder (``config.autoencoder.kind == "vq"``).
    """
    process_index, process_count = jax.process_index(), jax.process_count()
    num_records, image_size = len(source), config.data.image_size
    unit = math.lcm(mesh_lib.data_parallel_size(mesh), process_count)
    global_batch_size = max(unit, batch_size // unit * unit)
    global_batch_size = min(global_batch_size, math.ceil(num_records / unit) * unit)
    local_batch_size = global_batch_size // process_count
    counts = [len(process_range(num_records, p, process_count)) for p in range(process_count)]
    num_steps = math.ceil(max(counts) / local_batch_size)
    mine = process_range(num_records, process_index, process_count)

    batches = iter(
        grain.MapDataset.source(source)
        .map_with_index(EncoderInput(image_size))[mine.start : mine.stop]
        .to_iter_dataset(grain.ReadOptions())  # threads decode and resize ahead of the encoder
        .batch(local_batch_size, drop_remainder=False)
    )
    batch_sharding = sharding.batch_sharding(mesh)
    encode = jax.jit(
        functools.partial(
            encode_batch,
            model=builders.build_autoencoder(config),
            store_codes=config.autoencoder.kind == "vq",
        ),
        out_shardings=batch_sharding,
    )
    padding = np.zeros((local_batch_size, image_size, image_size, 3), np.uint8)
    progress = tqdm(
        total=num_records, desc="caching latents", unit="img", disable=process_index != 0
    )
    for step in range(num_steps):
        # Every process joins every step; one whose range is used up sends padding only.
        batch = next(batches, None)
        count = 0 if batch is None else len(batch["index"])
        images = padding if batch is None else np.concatenate([batch["image"], padding[count:]])
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            images = pipeline.global_batch({"image": images}, batch_sharding)["image"]
            encoded = jax.tree.map(local_rows, encode(ae_params, images))
        for row in range(count):
            yield {
                **{key: value[row] for key, value in encoded.items()},
                "label": batch["label"][row],
                "caption": str(batch["caption"][row]),
                "index": batch["index"][row],
            }
        rows = slice(step * local_batch_size, (step + 1) * local_batch_size)
        progress.update(sum(len(range(c)[rows]) for c in counts))
    progress.close()


def cache_description(
    config: ml_collections.ConfigDict, workdir: str, split: str, num_records: int
) -> dict[str, Any]:
    """What identifies a cache: the source records, the autoencoder and its step."""
    data = config.data
    source = {
        "source": data.source,
        "split": split,
        "image_size": data.image_size,
        "num_records": num_records,
    }
    if data.source == "shapes":
        source["seed"] = config.seed  # shapes records depend on the seed
    elif data.source == "image_folder":
        source["path"] = str(storage.as_path(data.path))
    elif data.source == "tfds":
        source.update(tfds_name=data.tfds_name, tfds_data_dir=data.tfds_data_dir)
    kind = config.autoencoder.kind
    if config.autoencoder.pretrained:
        autoencoder, step = {"kind": kind, "pretrained": config.autoencoder.pretrained}, None
    else:
        ae_workdir = str(storage.as_path(workdir_lib.autoencoder_workdir(config, workdir)))
        checkpointer = Checkpointer(
            workdir_lib.checkpoint_dir(ae_workdir, workdir_lib.AUTOENCODER),
            async_checkpointing=False,
        )
        step = checkpointer.latest_step()
        checkpointer.close()
        autoencoder = {"kind": kind, "workdir": ae_workdir}
    keys = ["latent_mean", "latent_std", "label", "caption", "index"]
    return {
        "source": source,
        "autoencoder": autoencoder,
        "autoencoder_step": step,
        "latent_shape": list(config_lib.latent_shape(config)),
        "keys": keys + (["codes"] if kind == "vq" else []),
    }


def _existing_cache(out_dir: str, description: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata of the same finished cache in ``out_dir``, else None once ``out_dir`` is
    ready to write (left-over shards of an unfinished cache are removed).

    Raises:
      FileExistsError: if ``out_dir`` holds another cache or files that are not a cache's.
    """
    folder = storage.as_path(out_dir)
    if not folder.is_dir():
        return None
    existing = latent_cache.read_metadata(out_dir)
    if existing is not None:
        wanted = json.loads(json.dumps(description))
        differing = [key for key in _IDENTITY_KEYS if existing.get(key) != wanted[key]]
        if differing:
            raise FileExistsError(
                f"--out={out_dir} holds a latent cache of another dataset or autoencoder "
                f"(it differs in {differing}); pass another --out or delete {out_dir}"
            )
        try:
            latent_cache.LatentCacheSource(out_dir)
        except (FileNotFoundError, ValueError) as error:
            raise FileExistsError(
                f"--out={out_dir} holds this latent cache, damaged ({error}); delete {out_dir} "
                "and run again"
            ) from None
        return existing
    stale = set(latent_cache.shard_files(out_dir))
    foreign = sorted({p.name for p in folder.iterdir()} - stale)
    if foreign:
        raise FileExistsError(
            f"--out={out_dir} is not empty and holds no latent cache (found {foreign[:5]}); "
            "pass an empty or new folder as --out"
        )
    if stale and jax.process_index() == 0:
        log.info("removing %d shards of an unfinished cache in %s", len(stale), out_dir)
        for name in stale:
            (folder / name).unlink()
    return None


def cache_latents(
    config: ml_collections.ConfigDict,
    workdir: str,
    out_dir: str,
    mesh: Mesh,
    rules,
    split: str | None = None,
    *,
    batch_size: int | None = None,
    records_per_shard: int = 2048,
) -> dict[str, Any]:
    """Encodes ``split`` with the frozen autoencoder of ``workdir`` into a cache in ``out_dir``.

    Run by every JAX process. A finished cache of the same data and autoencoder in
    ``out_dir`` is kept as it is.

    Args:
      config: the stage-1 run's config (data source, image size, autoencoder).
      workdir: the workdir holding the stage-1 checkpoint (or ``config.autoencoder.workdir``
        / ``config.autoencoder.pretrained``).
      out_dir: the cache folder: new, empty, or holding this same cache.
      mesh: the devices to encode on.
      rules: logical axis rules.
      split: the split to encode (default ``config.data.train_split``).
      batch_size: images per global batch (default ``config.diffusion.train.batch_size``).
      records_per_shard: records per ArrayRecord file.

    Returns:
      The cache's metadata (see ``ldm_jax.data.latent_cache.write_metadata``).

    Raises:
      FileExistsError: if ``out_dir`` holds something else.
    """
    split = split or config.data.train_split
    source = make_source(config.data, split, config.seed)
    if len(source) == 0:
        raise ValueError(f"config.data split {split!r} holds no records to encode")
    description = cache_description(config, workdir, split, len(source))
    existing = _existing_cache(out_dir, description)
    if existing is not None:
        log.info("%s already holds this latent cache (%d records)", out_dir, len(source))
        return existing
    ae_params, latent_scale = frozen.load_autoencoder(config, workdir, mesh, rules)
    multihost_utils.sync_global_devices("latent_cache_out_dir_ready")

    records = encode_source(
        config,
        source,
        ae_params,
        mesh,
        rules,
        batch_size=batch_size or config.diffusion.train.batch_size,
    )
    with latent_cache.LatentCacheWriter(
        out_dir, jax.process_index(), jax.process_count(), records_per_shard
    ) as writer:
        for record in records:
            writer.write(record)
    multihost_utils.sync_global_devices("latent_cache_shards_written")
    if jax.process_index() == 0:
        latent_cache.write_metadata(
            out_dir,
            {**description, "num_records": len(source), "latent_scale": float(latent_scale)},
        )
    multihost_utils.sync_global_devices("latent_cache_metadata_written")
    metadata = latent_cache.read_metadata(out_dir)
    log.info("cached %d latents of %s in %s", metadata["num_records"], split, out_dir)
    return metadata


def cache_latents_of_workdir(workdir: str, out_dir: str, split: str | None = None) -> dict:
    """``ldm-jax cache-latents``: the cache of ``workdir``'s autoencoder, on all devices."""
    config = config_lib.load_workdir_config(workdir)
    config_lib.validate(config, jax.device_count())
    mesh = mesh_lib.create_mesh(**config_lib.mesh_sizes(config))
    rules = mesh_lib.axis_rules_from_config(config.mesh.axis_rules)
    return cache_latents(config, workdir, out_dir, mesh, rules, split=split)


def open_for_training(config: ml_collections.ConfigDict) -> latent_cache.LatentCacheSource:
    """The stage-2 source of ``config.data.latent_cache``, checked against the config."""
    source = latent_cache.LatentCacheSource(config.data.latent_cache)
    source.check_latent_shape(config_lib.latent_shape(config))
    log.info(
        "stage 2 reads %d cached latents from %s (autoencoder step %s)",
        len(source),
        config.data.latent_cache,
        source.metadata.get("autoencoder_step"),
    )
    return source
