"""Stage 1: train the KL autoencoder, then measure the latent scale factor.

The loss is the pixel L1 reconstruction plus a small KL term. Perceptual (LPIPS) and
adversarial terms join in ``autoencoder_losses``: it returns named terms that the step sums.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from ldm_jax import config as config_lib
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.evaluate.grid import save_grid
from ldm_jax.generate import pixels_from_uint8, pixels_to_uint8
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.train import data as data_lib
from ldm_jax.train import state as state_lib
from ldm_jax.train.loop import jit_train_step, run_steps
from ldm_jax.train.metrics import MetricsWriter
from ldm_jax.train.state import TrainState, apply_gradients, create_train_state, make_optimizer

log = logging.getLogger(__name__)

STAGE = "autoencoder"
LATENT_SCALE_FILE = "latent_scale.json"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints", STAGE)


def init_state(
    key: jax.Array, *, model, optimizer: optax.GradientTransformation, image_size: int
) -> TrainState:
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params = model.init({"params": key, "sample": key}, images)["params"]
    return create_train_state({"autoencoder": params}, optimizer)


def autoencoder_losses(
    params: Any, images: jax.Array, key: jax.Array, *, model, kl_weight: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and its named terms for a batch of images in [-1, 1].

    Both terms are per-element means; the KL is divided by the number of pixel values, so
    ``kl_weight`` has the meaning it has in the CompVis configs, whose terms are both sums
    over an image.
    """
    reconstruction, posterior = model.apply({"params": params}, images, rngs={"sample": key})
    l1 = jnp.mean(jnp.abs(images - reconstruction.astype(jnp.float32)))
    kl = jnp.mean(posterior.kl()) / np.prod(images.shape[1:])
    loss = l1 + kl_weight * kl
    return loss, {"loss": loss, "l1": l1, "kl": kl}


def train_step(
    state: TrainState,
    batch: dict,
    root_key: jax.Array,
    *,
    model,
    optimizer: optax.GradientTransformation,
    kl_weight: float,
    ema_decay: float,
) -> tuple[TrainState, dict[str, jax.Array]]:
    key = jax.random.fold_in(root_key, state.step)
    images = pixels_from_uint8(batch["image"])
    grad_fn = jax.grad(autoencoder_losses, has_aux=True)
    grads, metrics = grad_fn(
        state.params["autoencoder"], images, key, model=model, kl_weight=kl_weight
    )
    metrics["grad_norm"] = optax.global_norm(grads)
    state = apply_gradients(state, {"autoencoder": grads}, optimizer, ema_decay)
    return state, metrics


def reconstruct(params: Any, images: jax.Array, *, model) -> jax.Array:
    """uint8 reconstructions through the posterior mode."""
    posterior = model.apply({"params": params}, pixels_from_uint8(images), method="encode")
    return pixels_to_uint8(model.apply({"params": params}, posterior.mode(), method="decode"))


def restore_or_create(
    config: ml_collections.ConfigDict,
    checkpointer: Checkpointer,
    mesh: Mesh,
    rules,
    data_iterator: Any = None,
) -> tuple[TrainState, Any]:
    """The stage-1 state, restored from ``checkpointer`` when it holds one, else fresh."""
    model = config_lib.build_autoencoder(config)
    init_fn = functools.partial(
        init_state,
        model=model,
        optimizer=make_optimizer(config.autoencoder.train),
        image_size=config.data.image_size,
    )
    return state_lib.restore_or_create(
        init_fn,
        state_lib.init_key(config.seed, 1, mesh.size),
        checkpointer,
        mesh,
        rules,
        data_iterator,
    )


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh: Mesh,
    rules,
    should_stop: Callable[[int], bool] | None = None,
) -> TrainState:
    """Trains stage 1 to ``config.autoencoder.train.steps`` and writes the latent scale."""
    train_config = config.autoencoder.train
    model = config_lib.build_autoencoder(config)
    optimizer = make_optimizer(train_config)
    source = data_lib.make_source(config.data, config.data.train_split, config.seed)
    data_iterator, batches = data_lib.make_batches(
        config.data, source, batch_size=train_config.batch_size, seed=config.seed + 1, mesh=mesh
    )
    checkpointer = Checkpointer(
        checkpoint_dir(workdir),
        max_to_keep=config.train.max_to_keep,
        async_checkpointing=config.train.async_checkpointing,
    )
    state, shardings = restore_or_create(config, checkpointer, mesh, rules, data_iterator)

    step = jit_train_step(
        functools.partial(
            train_step,
            model=model,
            optimizer=optimizer,
            kl_weight=config.autoencoder.kl_weight,
            ema_decay=train_config.ema_decay,
        ),
        shardings,
        mesh,
    )
    step_key = jax.random.fold_in(jax.random.key(config.seed), 2)
    writer = MetricsWriter(workdir, STAGE)

    preview = _preview_images(config, mesh)
    reconstruct_fn = jax.jit(functools.partial(reconstruct, model=model))

    def write_reconstructions(step_number: int, current: TrainState) -> None:
        with jax.set_mesh(mesh):
            recon = sharding.to_host(reconstruct_fn(current.ema_params["autoencoder"], preview))
        if jax.process_index() == 0:
            grid = save_grid(
                np.concatenate([sharding.to_host(preview), recon]),
                os.path.join(workdir, "samples", f"{STAGE}_{step_number:06d}.png"),
                columns=len(recon),
            )
            writer.write_images(step_number, "reconstructions", grid)

    state = run_steps(
        stage=STAGE,
        config=config,
        mesh=mesh,
        state=state,
        step_fn=lambda s, b: step(s, b, step_key),
        batches=batches,
        data_iterator=data_iterator,
        checkpointer=checkpointer,
        writer=writer,
        hook=write_reconstructions,
        should_stop=should_stop,
    )
    writer.close()
    checkpointer.close()
    finished = int(state.step) == train_config.steps
    if finished and read_latent_scale(workdir, int(state.step)) is None:
        scale = measure_latent_scale(config, state.ema_params["autoencoder"], mesh)
        write_latent_scale(workdir, scale, int(state.step))
    return state


def _preview_images(config: ml_collections.ConfigDict, mesh: Mesh) -> jax.Array:
    """A fixed batch of validation images for reconstruction grids."""
    source = data_lib.make_source(config.data, config.data.eval_split, config.seed)
    shards = mesh_lib.data_parallel_size(mesh)
    count = -(-8 // shards) * shards
    images = np.stack([_resized(config, source[i % len(source)]["image"]) for i in range(count)])
    return jax.device_put(images, sharding.batch_sharding(mesh))


def _resized(config: ml_collections.ConfigDict, image: np.ndarray) -> np.ndarray:
    from ldm_jax.data.transforms import ResizeAndCrop

    resize = ResizeAndCrop(config.data.image_size, random_crop=False)
    return resize.random_map({"image": image}, np.random.default_rng(0))["image"]


def measure_latent_scale(config: ml_collections.ConfigDict, params: Any, mesh: Mesh) -> float:
    """1 / std of posterior samples over ``config.autoencoder.latent_scale_batches`` batches.

    Scaling latents to unit variance keeps the diffusion schedule's signal-to-noise ratios
    what they were designed for (the LDM paper's ``scale_by_std``).
    """
    model = config_lib.build_autoencoder(config)
    batch_size = config.autoencoder.train.batch_size
    source = data_lib.make_source(config.data, config.data.train_split, config.seed)
    _, batches = data_lib.make_batches(
        config.data, source, batch_size=batch_size, seed=config.seed + 3, mesh=mesh
    )

    @jax.jit
    def moments(images, key):
        posterior = model.apply({"params": params}, pixels_from_uint8(images), method="encode")
        z = posterior.sample(key)
        return jnp.sum(z), jnp.sum(z * z), z.size

    total, total_sq, count = 0.0, 0.0, 0
    key = jax.random.fold_in(jax.random.key(config.seed), 3)
    with jax.set_mesh(mesh):
        for i in range(config.autoencoder.latent_scale_batches):
            s, sq, n = moments(next(batches)["image"], jax.random.fold_in(key, i))
            total, total_sq, count = total + float(s), total_sq + float(sq), count + int(n)
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean * mean, 1e-12)))
    log.info("latent std %.4f over %d values: latent scale %.4f", std, count, 1.0 / std)
    return 1.0 / std


def write_latent_scale(workdir: str, scale: float, step: int) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, LATENT_SCALE_FILE), "w", encoding="utf-8") as f:
            json.dump({"latent_scale": scale, "autoencoder_step": step}, f)


def read_latent_scale(workdir: str, autoencoder_step: int) -> float | None:
    """The stored latent scale if it was measured on the autoencoder at ``autoencoder_step``."""
    path = os.path.join(workdir, LATENT_SCALE_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if record["autoencoder_step"] != autoencoder_step:
        return None
    return float(record["latent_scale"])
