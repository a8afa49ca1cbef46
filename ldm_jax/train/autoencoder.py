"""Stage 1: train the autoencoder (KL or VQ, with LPIPS and a patch-GAN), then measure the
latent scale factor.

The generator (autoencoder and the learned log-variance) and the discriminator are updated
in one jitted, sharded step; both optimizer states live in the train state. The GAN joins at
``config.autoencoder.loss.disc_start``: before it the step skips the discriminator entirely.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from ldm_jax.checkpoint import Checkpointer
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.pipeline import builders, load
from ldm_jax.pipeline import workdir as workdir_lib
from ldm_jax.pipeline.datasets import make_source
from ldm_jax.pipeline.grids import save_grid
from ldm_jax.pipeline.model import pixels_from_uint8, reconstruct
from ldm_jax.train import data as data_lib
from ldm_jax.train import random_streams
from ldm_jax.train import state as state_lib
from ldm_jax.train.autoencoder_loss import (
    LossModules,
    LossSettings,
    discriminator_loss,
    generator_loss,
)
from ldm_jax.train.loop import jit_train_step, run_steps
from ldm_jax.train.metrics import MetricsWriter
from ldm_jax.train.state import TrainState, apply_gradients, create_train_state, make_optimizer

log = logging.getLogger(__name__)

STAGE = workdir_lib.AUTOENCODER


@flax.struct.dataclass
class AutoencoderTrainState:
    """The stage-1 state: the generator's train state, the discriminator and its optimizer,
    and the autoencoder's variables that are not trained by gradients (EMA codebook).

    ``generator.params`` holds "autoencoder" and "loss" (the learned log-variance).
    Without a GAN, ``disc_params`` is empty.
    """

    generator: TrainState
    disc_params: Any
    disc_opt_state: optax.OptState
    model_state: Any

    @property
    def step(self) -> jax.Array:
        return self.generator.step

    @property
    def params(self) -> Any:
        return self.generator.params

    @property
    def ema_params(self) -> Any:
        return self.generator.ema_params


def discriminator_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with the discriminator's betas and learning rate, on the autoencoder's schedule."""
    loss = config.autoencoder.loss
    train = ml_collections.ConfigDict(config.autoencoder.train.to_dict())
    train.learning_rate = loss.disc_learning_rate or train.learning_rate
    train.b1, train.b2, train.weight_decay = loss.disc_b1, loss.disc_b2, 0.0
    return make_optimizer(train)


def init_state(
    key: jax.Array,
    *,
    modules: LossModules,
    settings: LossSettings,
    optimizer: optax.GradientTransformation,
    disc_optimizer: optax.GradientTransformation,
    image_size: int,
) -> AutoencoderTrainState:
    ae_key, disc_key = jax.random.split(key)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = dict(load.autoencoder_variables(modules.autoencoder, image_size, ae_key))
    params = {"autoencoder": variables.pop("params")}
    if settings.learn_logvar:
        params["loss"] = {"logvar": jnp.zeros((), jnp.float32)}
    disc_params = {}
    if settings.gan:
        disc_params = modules.discriminator.init(disc_key, images)["params"]
    return AutoencoderTrainState(
        generator=create_train_state(params, optimizer),
        disc_params=disc_params,
        disc_opt_state=disc_optimizer.init(disc_params),
        model_state=variables,
    )


def _update(
    state: AutoencoderTrainState,
    images: jax.Array,
    key: jax.Array,
    lpips_params: Any,
    *,
    modules: LossModules,
    settings: LossSettings,
    optimizer: optax.GradientTransformation,
    disc_optimizer: optax.GradientTransformation,
    ema_decay: float,
    use_gan: bool,
) -> tuple[AutoencoderTrainState, dict[str, jax.Array]]:
    grads, (metrics, model_state, recon) = jax.grad(generator_loss, has_aux=True)(
        state.generator.params,
        state.model_state,
        state.disc_params,
        lpips_params,
        images,
        key,
        modules=modules,
        settings=settings,
        use_gan=use_gan,
    )
    metrics["grad_norm"] = optax.tree.norm(grads)
    generator = apply_gradients(state.generator, grads, optimizer, ema_decay)
    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    if use_gan:
        disc_grads, disc_metrics = jax.grad(discriminator_loss, has_aux=True)(
            disc_params,
            images,
            recon,
            discriminator=modules.discriminator,
            settings=settings,
        )
        updates, disc_opt_state = disc_optimizer.update(disc_grads, disc_opt_state, disc_params)
        disc_params = optax.apply_updates(disc_params, updates)
        metrics.update(disc_metrics)
    generator, model_state = _apply_code_restarts(generator, model_state or state.model_state)
    new_state = AutoencoderTrainState(
        generator=generator,
        disc_params=disc_params,
        disc_opt_state=disc_opt_state,
        model_state=model_state,
    )
    return new_state, metrics


def _apply_code_restarts(generator: TrainState, model_state: dict) -> tuple[TrainState, dict]:
    """Moves the quantizer's restarted codes into the codebook parameter (online and EMA).

    The quantizer cannot change a parameter inside a gradient step, so it records restarts
    as an offset; folding it in after the update keeps the params the whole codebook, which
    is all that sampling, evaluation and export read.
    """
    quantizer_state = model_state.get("codebook", {}).get("quantize", {})
    if "restart_offset" not in quantizer_state:
        return generator, model_state
    offset = quantizer_state["restart_offset"]

    def moved(params):
        autoencoder = dict(params["autoencoder"])
        quantize = dict(autoencoder["quantize"])
        quantize["embedding"] = quantize["embedding"] + offset
        autoencoder["quantize"] = quantize
        return {**params, "autoencoder": autoencoder}

    generator = generator.replace(
        params=moved(generator.params), ema_params=moved(generator.ema_params)
    )
    cleared = {**quantizer_state, "restart_offset": jnp.zeros_like(offset)}
    codebook = {**model_state["codebook"], "quantize": cleared}
    return generator, {**model_state, "codebook": codebook}


def inference_params(state: AutoencoderTrainState) -> Any:
    """The EMA autoencoder params that previews and the latent scale use, as inference loads
    them from a checkpoint (``pipeline.load.load_autoencoder``)."""
    return load.with_codebook(state.ema_params["autoencoder"], state.model_state)


def train_step(
    state: AutoencoderTrainState,
    batch: dict,
    root_key: jax.Array,
    lpips_params: Any,
    *,
    modules: LossModules,
    settings: LossSettings,
    optimizer: optax.GradientTransformation,
    disc_optimizer: optax.GradientTransformation,
    ema_decay: float,
    use_gan: bool | None = None,
) -> tuple[AutoencoderTrainState, dict[str, jax.Array]]:
    """One generator and (with ``use_gan``) one discriminator update on a batch.

    ``use_gan`` is static: the training loop switches between the two compiled steps at
    ``disc_start`` (see ``gan_active``); None means "whenever the run has a GAN". A
    ``lax.cond`` on the step would keep one program, but XLA:CPU runs the convolutions
    inside a conditional branch orders of magnitude slower.
    """
    key = jax.random.fold_in(root_key, state.step)
    return _update(
        state,
        pixels_from_uint8(batch["image"]),
        key,
        lpips_params,
        modules=modules,
        settings=settings,
        optimizer=optimizer,
        disc_optimizer=disc_optimizer,
        ema_decay=ema_decay,
        use_gan=settings.gan if use_gan is None else use_gan,
    )


def gan_active(settings: LossSettings, step: int) -> bool:
    """Whether the update from ``step`` (updates done so far) trains with the GAN."""
    return settings.gan and step >= settings.disc_start


def build_loss_modules(config: ml_collections.ConfigDict) -> tuple[LossModules, Any]:
    """The autoencoder, the discriminator (when the GAN is on) and LPIPS with its weights.

    Without ``config.autoencoder.loss.lpips_weights`` the run trains on the pixel (and GAN)
    losses alone, and says so once.
    """
    loss = config.autoencoder.loss
    settings = LossSettings.from_config(config)
    discriminator = builders.build_discriminator(config) if settings.gan else None
    lpips, lpips_params = None, {}
    if loss.lpips_weights and loss.perceptual_weight > 0:
        from ldm_jax.interop.lpips_weights import load_lpips

        lpips, lpips_params = load_lpips(loss.lpips_weights)
    elif loss.perceptual_weight > 0:
        log.warning(
            "stage 1 trains without the LPIPS perceptual loss: no weights given. Convert the "
            "published VGG16 and LPIPS files with `python -m ldm_jax.interop.lpips_weights` "
            "and set --config.autoencoder.loss.lpips_weights"
        )
    modules = LossModules(builders.build_autoencoder(config, training=True), discriminator, lpips)
    return modules, lpips_params


def stage_functions(
    config: ml_collections.ConfigDict, modules: LossModules | None = None
) -> tuple[Callable, Callable]:
    """``init_fn(key) -> state`` and ``step_fn(state, batch, key, lpips_params)`` of stage 1.

    ``modules`` defaults to the config's autoencoder and discriminator, without LPIPS.
    """
    if modules is None:
        modules = LossModules(
            builders.build_autoencoder(config, training=True),
            builders.build_discriminator(config),
        )
    settings = LossSettings.from_config(config)
    optimizer = make_optimizer(config.autoencoder.train)
    disc_optimizer = discriminator_optimizer(config)
    shared = dict(
        modules=modules, settings=settings, optimizer=optimizer, disc_optimizer=disc_optimizer
    )
    init_fn = functools.partial(init_state, image_size=config.data.image_size, **shared)
    step_fn = functools.partial(train_step, ema_decay=config.autoencoder.train.ema_decay, **shared)
    return init_fn, step_fn


def restore_or_create(
    config: ml_collections.ConfigDict,
    checkpointer: Checkpointer,
    mesh: Mesh,
    rules,
    data_iterator: Any = None,
    modules: LossModules | None = None,
) -> tuple[AutoencoderTrainState, Any]:
    """The stage-1 state, restored from ``checkpointer`` when it holds one, else fresh."""
    init_fn, _ = stage_functions(config, modules)
    return state_lib.restore_or_create(
        init_fn,
        state_lib.init_key(config.seed, random_streams.AUTOENCODER_INIT, mesh.size),
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
) -> AutoencoderTrainState:
    """Trains stage 1 to ``config.autoencoder.train.steps`` and writes the latent scale."""
    train_config = config.autoencoder.train
    modules, lpips_params = build_loss_modules(config)
    _, step_fn = stage_functions(config, modules)
    source = make_source(config.data, config.data.train_split, config.seed)
    data_iterator, batches = data_lib.make_batches(
        config.data,
        source,
        batch_size=train_config.batch_size,
        seed=random_streams.data_seed(config.seed, random_streams.AUTOENCODER_DATA),
        mesh=mesh,
    )
    checkpointer = Checkpointer(
        workdir_lib.checkpoint_dir(workdir, STAGE),
        max_to_keep=config.train.max_to_keep,
        async_checkpointing=config.train.async_checkpointing,
    )
    state, shardings = restore_or_create(
        config, checkpointer, mesh, rules, data_iterator, modules=modules
    )
    checkpointer.check_space(state, config.train.min_free_gib)
    lpips_params = jax.device_put(lpips_params, sharding.replicated(mesh))
    settings = LossSettings.from_config(config)
    steps = {  # compiled on first use: the GAN step only once disc_start is reached
        use_gan: jit_train_step(
            functools.partial(step_fn, use_gan=use_gan),
            shardings,
            mesh,
            sharding.replicated(mesh),
            nonfinite=config.train.nonfinite,
        )
        for use_gan in (False, True)
    }
    host_step = [int(state.step)]  # counted on the host: reading state.step would block

    def one_step(current: AutoencoderTrainState, batch: dict):
        use_gan = gan_active(settings, host_step[0])
        host_step[0] += 1
        return steps[use_gan](current, batch, step_key, lpips_params)

    step_key = random_streams.step_key(config.seed, random_streams.AUTOENCODER_STEPS)
    writer = MetricsWriter(workdir, STAGE)

    preview = _preview_images(config, mesh)
    reconstruct_fn = jax.jit(
        functools.partial(reconstruct, model=builders.build_autoencoder(config))
    )

    def write_reconstructions(step_number: int, current: AutoencoderTrainState) -> None:
        with jax.set_mesh(mesh):
            recon = sharding.to_host(reconstruct_fn(inference_params(current), preview))
        # On every process: to_host is a collective when the mesh spans several.
        originals = sharding.to_host(preview)
        if jax.process_index() == 0:
            grid = save_grid(
                np.concatenate([originals, recon]),
                os.path.join(workdir, workdir_lib.SAMPLES_DIR, f"{STAGE}_{step_number:06d}.png"),
                columns=len(recon),
            )
            writer.write_images(step_number, "reconstructions", grid)

    state = run_steps(
        stage=STAGE,
        config=config,
        mesh=mesh,
        state=state,
        step_fn=one_step,
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
    if finished and workdir_lib.read_latent_scale(workdir, int(state.step)) is None:
        scale = measure_latent_scale(config, inference_params(state), mesh)
        workdir_lib.write_latent_scale(workdir, scale, int(state.step))
    return state


def _preview_images(config: ml_collections.ConfigDict, mesh: Mesh) -> jax.Array:
    """A fixed batch of validation images for reconstruction grids."""
    source = make_source(config.data, config.data.eval_split, config.seed)
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
    model = builders.build_autoencoder(config)
    batch_size = config.autoencoder.train.batch_size
    source = make_source(config.data, config.data.train_split, config.seed)
    _, batches = data_lib.make_batches(
        config.data,
        source,
        batch_size=batch_size,
        seed=random_streams.data_seed(config.seed, random_streams.LATENT_SCALE),
        mesh=mesh,
    )

    @jax.jit
    def moments(images, key):
        posterior = model.apply({"params": params}, pixels_from_uint8(images), method="encode")
        z = posterior.sample(key)
        return jnp.sum(z), jnp.sum(z * z), z.size

    total, total_sq, count = 0.0, 0.0, 0
    key = random_streams.step_key(config.seed, random_streams.LATENT_SCALE)
    with jax.set_mesh(mesh):
        for i in range(config.autoencoder.latent_scale_batches):
            s, sq, n = moments(next(batches)["image"], jax.random.fold_in(key, i))
            total, total_sq, count = total + float(s), total_sq + float(sq), count + int(n)
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean * mean, 1e-12)))
    log.info("latent std %.4f over %d values: latent scale %.4f", std, count, 1.0 / std)
    return 1.0 / std
