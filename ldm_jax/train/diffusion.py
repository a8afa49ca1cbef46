"""Stage 2: train the latent U-Net (and the text encoder) on latents of the frozen autoencoder."""

from __future__ import annotations

import functools
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
from tqdm import tqdm

from ldm_jax import config as config_lib
from ldm_jax import diffusion
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.data import shapes, transforms
from ldm_jax.data.in_memory import InMemorySource
from ldm_jax.models.autoencoder import DiagonalGaussian
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.pipeline import builders, grids, pretrained
from ldm_jax.pipeline import workdir as workdir_lib
from ldm_jax.pipeline.datasets import make_source
from ldm_jax.pipeline.generator import Generator
from ldm_jax.pipeline.model import LatentDiffusion, init_trained_params, pixels_from_uint8
from ldm_jax.train import accumulate, latent_cache, random_streams
from ldm_jax.train import data as data_lib
from ldm_jax.train import frozen as frozen_inputs
from ldm_jax.train import state as state_lib
from ldm_jax.train.loop import jit_train_step, run_steps
from ldm_jax.train.metrics import MetricsWriter
from ldm_jax.train.state import TrainState, apply_gradients, create_train_state, make_optimizer

log = logging.getLogger(__name__)

STAGE = workdir_lib.DIFFUSION


def init_state(
    key: jax.Array,
    *,
    model: LatentDiffusion,
    optimizer: optax.GradientTransformation,
    max_caption_length: int,
) -> TrainState:
    """A fresh stage-2 state: the params inference loads (``init_trained_params``), their EMA
    and the optimizer's state."""
    params = init_trained_params(key, model=model, max_caption_length=max_caption_length)
    return create_train_state(params, optimizer)


def example_draws(
    key: jax.Array, batch_size: int, *, model: LatentDiffusion, cond_drop_prob: float
) -> tuple[dict[str, jax.Array], jax.Array]:
    """The randomness of each example of a step, drawn for the whole batch at once.

    A step that accumulates gradients over microbatches hands each example its own draws, so
    it computes exactly what one step on the whole batch does.

    Returns:
      ({"posterior_noise", "t", "noise", "drop"}, each with a leading batch dimension), and
      the key of the rest (the U-Net's dropout).
    """
    posterior_key, loss_key = jax.random.split(key)
    t_key, noise_key, drop_key, dropout_key = jax.random.split(loss_key, 4)
    latent_shape = (batch_size, *model.latent_shape)
    draws = {
        "posterior_noise": jax.random.normal(posterior_key, latent_shape, jnp.float32),
        "t": jax.random.randint(t_key, (batch_size,), 0, model.schedule.num_timesteps),
        "noise": jax.random.normal(noise_key, latent_shape, jnp.float32),
        "drop": jax.random.uniform(drop_key, (batch_size,)) < cond_drop_prob,
    }
    return draws, dropout_key


def diffusion_losses(
    params: Any,
    inputs: dict,
    dropout_key: jax.Array,
    *,
    model: LatentDiffusion,
    min_snr_gamma: float | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The denoising loss of a batch: ``inputs`` holds its latents, conditions and draws.

    Args:
      params: the trained params and the frozen ones but the autoencoder's.
      inputs: "latents", "condition" (or None), "concat" (or None: see
        ``LatentDiffusion.concat_input``), the draws of ``example_draws`` and optionally
        each example's "loss_weight" (DreamBooth's prior preservation).
      dropout_key: the U-Net's dropout key.
      model: the stage-2 model.
      min_snr_gamma: see ``diffusion.diffusion_loss``.
    """
    latents, condition, t, noise = (inputs[k] for k in ("latents", "condition", "t", "noise"))
    z_t = diffusion.q_sample(model.schedule, latents, t, noise)
    if condition is not None:
        condition = model.drop_condition(condition, inputs["drop"])
    concat, rngs = inputs["concat"], {"dropout": dropout_key}
    output = model.predict(params, z_t, t, condition, concat=concat, train=True, rngs=rngs)
    loss, per_example = diffusion.diffusion_loss(
        model.schedule,
        model.prediction_type,
        output.astype(jnp.float32),
        latents,
        noise,
        t,
        min_snr_gamma,
    )
    if inputs.get("loss_weight") is not None:
        loss = jnp.mean(per_example * inputs["loss_weight"])
    return loss, {"loss": loss}


def _latents(batch: dict, posterior_noise: jax.Array, ae_params: Any, model: LatentDiffusion):
    """Scaled latent samples of a batch's images (or of its stored posterior moments)."""
    if "latent_mean" in batch:  # encoded once before training (config.diffusion.encode_once)
        posterior = DiagonalGaussian.from_mean_std(batch["latent_mean"], batch["latent_std"])
    else:
        posterior = model.autoencoder.apply(
            {"params": ae_params}, pixels_from_uint8(batch["image"]), method="encode"
        )
    sample = posterior.mean + posterior.std * posterior_noise
    return jax.lax.stop_gradient(sample.astype(jnp.float32) * model.latent_scale)


def train_step(
    state: TrainState,
    batch: dict,
    root_key: jax.Array,
    frozen_params: dict,
    *,
    model: LatentDiffusion,
    optimizer: optax.GradientTransformation,
    ema_decay: float,
    cond_drop_prob: float,
    min_snr_gamma: float | None,
    grad_accum_steps: int = 1,
    parallel_microbatches: bool = False,
    compose_params: Callable[[Any, dict, jax.Array], dict] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on ``batch``, its gradient accumulated over ``grad_accum_steps`` microbatches
    (encoding included, so only a microbatch's activations are alive at a time), or averaged
    over that many microbatches computed as independent branches with
    ``parallel_microbatches`` (see ``accumulate.accumulated_gradients``).

    ``compose_params(trained, frozen, key)`` makes the params the model computes with from the
    trained ones and the frozen ones but the autoencoder's (fine-tuning: adapters applied to
    a frozen base); by default the two are put together."""
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    draws, dropout_key = example_draws(
        jax.random.fold_in(root_key, state.step),
        batch_size,
        model=model,
        cond_drop_prob=cond_drop_prob if model.conditioning != "none" else 0.0,
    )
    frozen_modules = {k: v for k, v in frozen_params.items() if k != "autoencoder"}
    condition_key = {"text": "tokens", "class": "label"}.get(model.conditioning)

    def loss_fn(params: Any, inputs: dict, key: jax.Array):
        microbatch, micro_draws = inputs
        latents = _latents(
            microbatch, micro_draws["posterior_noise"], frozen_params.get("autoencoder"), model
        )
        concat = model.concat_input(
            {"autoencoder": frozen_params.get("autoencoder")}, microbatch, latents.shape
        )
        losses_inputs = {
            **micro_draws,
            "latents": latents,
            "condition": microbatch.get(condition_key) if condition_key else None,
            "concat": None if concat is None else jax.lax.stop_gradient(concat),
            "loss_weight": microbatch.get("loss_weight"),
        }
        if compose_params is None:
            model_params, model_key = {**params, **frozen_modules}, key
        else:
            model_key, compose_key = jax.random.split(key)
            model_params = compose_params(params, frozen_modules, compose_key)
        return diffusion_losses(
            model_params,
            losses_inputs,
            model_key,
            model=model,
            min_snr_gamma=min_snr_gamma,
        )

    grads, metrics = accumulate.accumulated_gradients(
        loss_fn, state.params, (batch, draws), dropout_key, grad_accum_steps, parallel_microbatches
    )
    metrics["grad_norm"] = optax.tree.norm(grads)
    return apply_gradients(state, grads, optimizer, ema_decay), metrics


def batch_keys(conditioning: str, encoded: bool, concat_conditioning: str = "") -> tuple[str, ...]:
    """What a stage-2 batch holds: images (or encoded latents), the condition and the images
    of concatenated conditioning."""
    inputs = ("latent_mean", "latent_std") if encoded else ("image",)
    condition = {"text": ("tokens",), "class": ("label",), "none": ()}[conditioning]
    return inputs + condition + diffusion.CONCAT_INPUT_KEYS[concat_conditioning]


def stage_functions(
    config: ml_collections.ConfigDict, model: LatentDiffusion
) -> tuple[Callable, Callable]:
    """``init_fn(key) -> state`` and ``step_fn(state, batch, key, frozen_params)`` of stage 2
    for ``model``: what the trainer, ``ldm-jax compile`` and the tests jit."""
    dm = config.diffusion
    optimizer = make_optimizer(dm.train)
    init_fn = functools.partial(
        init_state,
        model=model,
        optimizer=optimizer,
        max_caption_length=config.data.max_caption_length,
    )
    step_fn = functools.partial(
        train_step,
        model=model,
        optimizer=optimizer,
        ema_decay=dm.train.ema_decay,
        cond_drop_prob=dm.cond_drop_prob,
        min_snr_gamma=dm.min_snr_gamma or None,
        grad_accum_steps=dm.train.grad_accum_steps,
        parallel_microbatches=dm.train.parallel_microbatches,
    )
    return init_fn, step_fn


def encode_dataset(
    config: ml_collections.ConfigDict,
    source: Any,
    model: LatentDiffusion,
    ae_params: Any,
    mesh: Mesh,
) -> InMemorySource:
    """Encodes every image of ``source`` once with the frozen encoder, into host memory.

    Stage 2 then trains on the stored posterior means and stds (a fresh latent sample each
    time a record is drawn) without running the encoder at every step. Memory: 8 bytes per
    latent value per record.
    """
    shards = mesh_lib.data_parallel_size(mesh)
    chunk = max(shards, config.diffusion.train.batch_size // shards * shards)
    resize = transforms.ResizeAndCrop(config.data.image_size, random_crop=False)
    rng = np.random.default_rng(0)

    encode = jax.jit(
        functools.partial(latent_cache.encode_batch, model=model.autoencoder, store_codes=False)
    )

    means, stds, captions, labels = [], [], [], []
    is_main = jax.process_index() == 0
    with jax.set_mesh(mesh):
        for start in tqdm(range(0, len(source), chunk), desc="encoding", disable=not is_main):
            records = [source[i] for i in range(start, min(start + chunk, len(source)))]
            images = np.stack([resize.random_map(dict(r), rng)["image"] for r in records])
            padded = np.concatenate([images, np.repeat(images[-1:], chunk - len(images), 0)])
            encoded = encode(ae_params, jax.device_put(padded, sharding.batch_sharding(mesh)))
            means.append(sharding.to_host(encoded["latent_mean"])[: len(records)])
            stds.append(sharding.to_host(encoded["latent_std"])[: len(records)])
            captions += [str(r["caption"]) for r in records]
            labels += [int(r["label"]) for r in records]
    arrays = {
        "latent_mean": np.concatenate(means),
        "latent_std": np.concatenate(stds),
        "label": np.asarray(labels, np.int32),
    }
    log.info(
        "encoded %d images into %.1f MB of latents",
        len(captions),
        (arrays["latent_mean"].nbytes + arrays["latent_std"].nbytes) / 1e6,
    )
    return InMemorySource(arrays, captions)


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh: Mesh,
    rules,
    should_stop: Callable[[int], bool] | None = None,
) -> TrainState:
    """Trains stage 2 to ``config.diffusion.train.steps``; writes sample grids as it goes."""
    dm, train_config = config.diffusion, config.diffusion.train
    classes = config_lib.num_classes(config)
    if config.diffusion.conditioning == "class" and config.data.source == "shapes":
        if classes != shapes.NUM_CLASSES:  # an imported model's classes are not these
            raise config_lib.ConfigError(
                f"the model has {classes} classes (config.data.num_classes) but the shapes "
                f"dataset {shapes.NUM_CLASSES}: train it on its own data "
                "(--config.data.source=image_folder --config.data.path=...)"
            )
    ae_params, latent_scale = frozen_inputs.load_autoencoder(config, workdir, mesh, rules)
    source = make_source(config.data, config.data.train_split, config.seed)
    tokenizer, text_encoder, frozen = frozen_inputs.load_conditioning(
        config, workdir, mesh, rules, source
    )
    frozen = {**frozen, "autoencoder": ae_params}
    model = builders.build_model(config, tokenizer, latent_scale, text_encoder)
    encoded = config.diffusion.encode_once or bool(config.data.latent_cache)
    if config.data.latent_cache:
        source = latent_cache.open_for_training(config)
    elif encoded:
        source = encode_dataset(config, source, model, ae_params, mesh)
    data_iterator, batches = data_lib.make_batches(
        config.data,
        source,
        batch_size=train_config.batch_size,
        seed=random_streams.data_seed(config.seed, random_streams.DIFFUSION_DATA),
        mesh=mesh,
        tokenizer_json=tokenizer.to_str() if tokenizer else None,
        keys=batch_keys(config.diffusion.conditioning, encoded, dm.concat_conditioning),
        images=not encoded,
        record_operations=data_lib.conditioning_operations(
            dm.concat_conditioning, dm.super_resolution_factor
        ),
    )
    checkpointer = Checkpointer(
        workdir_lib.checkpoint_dir(workdir, STAGE),
        max_to_keep=config.train.max_to_keep,
        async_checkpointing=config.train.async_checkpointing,
    )
    state, shardings = restore_or_create(
        config, model, checkpointer, mesh, rules, data_iterator, workdir=workdir
    )
    checkpointer.check_space(state, config.train.min_free_gib)

    _, step_fn = stage_functions(config, model)
    step = jit_train_step(
        step_fn,
        shardings,
        mesh,
        frozen_inputs.shardings_of(frozen),
        nonfinite=config.train.nonfinite,
    )
    step_key = random_streams.step_key(config.seed, random_streams.DIFFUSION_STEPS)
    writer = MetricsWriter(workdir, STAGE)
    write_samples = _preview_writer(config, workdir, model, frozen, mesh, tokenizer, writer)
    state = run_steps(
        stage=STAGE,
        config=config,
        mesh=mesh,
        state=state,
        step_fn=lambda s, b: step(s, b, step_key, frozen),
        batches=batches,
        data_iterator=data_iterator,
        checkpointer=checkpointer,
        writer=writer,
        hook=write_samples,
        should_stop=should_stop,
    )
    writer.close()
    checkpointer.close()
    return state


def _preview_writer(
    config: ml_collections.ConfigDict,
    workdir: str,
    model: LatentDiffusion,
    frozen: dict,
    mesh: Mesh,
    tokenizer: Any,
    writer: MetricsWriter,
) -> Callable[[int, TrainState], None]:
    """``write(step, state)``: the preview grid of the EMA params, as a PNG in the workdir's
    samples and in TensorBoard (see ``pipeline.grids.preview_conditions``)."""
    prompts, labels = grids.preview_conditions(config)
    images = grids.preview_images(config)
    mode = "sr" if config.diffusion.concat_conditioning == "sr" else None

    def write(step_number: int, current: TrainState) -> None:
        generator = Generator(
            model,
            {**current.ema_params, **frozen},
            mesh,
            config.sample,
            tokenizer=tokenizer,
            max_caption_length=config.data.max_caption_length,
        )
        conditions = generator.conditions(prompts, labels)
        samples = generator(conditions, seed=config.seed, images=images, mode=mode)
        if jax.process_index() == 0:
            name = f"{STAGE}_{step_number:06d}.png"
            grid = grids.save_grid(samples, os.path.join(workdir, workdir_lib.SAMPLES_DIR, name))
            writer.write_images(step_number, "samples", grid)

    return write


def restore_or_create(
    config: ml_collections.ConfigDict,
    model: LatentDiffusion,
    checkpointer: Checkpointer,
    mesh: Mesh,
    rules,
    data_iterator: Any = None,
    step: int | None = None,
    workdir: str = "",
) -> tuple[TrainState, Any]:
    """The stage-2 state: restored from ``checkpointer`` when it holds one, else fresh,
    starting from ``config.diffusion.unet.pretrained`` when that is set."""
    init_fn, _ = stage_functions(config, model)
    initial_params = None
    if config.diffusion.unet.pretrained and checkpointer.latest_step() is None:
        initial_params = {"unet": pretrained.initial_unet_params(config, workdir)}
    return state_lib.restore_or_create(
        init_fn,
        state_lib.init_key(config.seed, random_streams.DIFFUSION_INIT, mesh.size),
        checkpointer,
        mesh,
        rules,
        data_iterator,
        step,
        initial_params=initial_params,
    )
