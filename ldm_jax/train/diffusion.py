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

from ldm_jax import builders, diffusion, image_conditioning, pretrained
from ldm_jax import config as config_lib
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.data import shapes, transforms
from ldm_jax.data import tokenizer as tokenizer_lib
from ldm_jax.data.in_memory import InMemorySource
from ldm_jax.evaluate.grid import save_grid
from ldm_jax.generate import Generator, LatentDiffusion, SamplingOptions, pixels_from_uint8
from ldm_jax.models.autoencoder import DiagonalGaussian
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.train import accumulate, latent_cache, previews
from ldm_jax.train import data as data_lib
from ldm_jax.train import frozen as frozen_inputs
from ldm_jax.train import state as state_lib
from ldm_jax.train.loop import jit_train_step, run_steps
from ldm_jax.train.metrics import MetricsWriter
from ldm_jax.train.state import TrainState, apply_gradients, create_train_state, make_optimizer

log = logging.getLogger(__name__)

STAGE = "diffusion"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints", STAGE)


def build_model(
    config: ml_collections.ConfigDict,
    tokenizer: Any,
    latent_scale: float,
    text_encoder: Any = None,
) -> LatentDiffusion:
    """The stage-2 model of ``config``.

    Args:
      config: the run's config.
      tokenizer: the `tokenizers.Tokenizer` of text conditioning, else None.
      latent_scale: the autoencoder's latent scale factor.
      text_encoder: a pretrained (frozen) text encoder module; None builds the config's
        from-scratch encoder.
    """
    conditioning = config.diffusion.conditioning
    null_condition = np.zeros((), np.int32)
    if conditioning == "text":
        if text_encoder is None:
            text_encoder = builders.build_text_encoder(config, tokenizer.get_vocab_size())
        null_condition = tokenizer_lib.encode(tokenizer, [""], config.data.max_caption_length)[0]
    elif conditioning == "class":
        null_condition = np.asarray(config_lib.num_classes(config), np.int32)
    return LatentDiffusion(
        frozen_text_encoder=config.diffusion.text_encoder.kind == "clip",
        unet=builders.build_unet(config),
        autoencoder=builders.build_autoencoder(config),
        text_encoder=text_encoder,
        schedule=builders.build_schedule(config),
        conditioning=conditioning,
        null_condition=null_condition,
        latent_shape=config_lib.latent_shape(config),
        latent_scale=latent_scale,
        prediction_type=config.diffusion.prediction_type,
        concat_conditioning=config.diffusion.concat_conditioning,
        super_resolution_factor=config.diffusion.super_resolution_factor,
    )


def init_state(
    key: jax.Array,
    *,
    model: LatentDiffusion,
    optimizer: optax.GradientTransformation,
    max_caption_length: int,
) -> TrainState:
    unet_key, text_key = jax.random.split(key)
    # The U-Net's input: the latents and any concatenated conditioning images.
    latents = jnp.zeros((1, *model.latent_shape[:2], model.unet.in_channels), jnp.float32)
    timesteps = jnp.zeros((1,), jnp.int32)
    params, context, labels = {}, None, None
    if model.conditioning == "text" and model.frozen_text_encoder:
        context = jnp.zeros((1, max_caption_length, model.unet.context_dim), jnp.float32)
    elif model.conditioning == "text":
        tokens = jnp.zeros((1, max_caption_length), jnp.int32)
        params["text_encoder"] = model.text_encoder.init(text_key, tokens)["params"]
        context = model.text_encoder.apply({"params": params["text_encoder"]}, tokens)
    elif model.conditioning == "class":
        labels = jnp.zeros((1,), jnp.int32)
    params["unet"] = model.unet.init(unet_key, latents, timesteps, context, labels)["params"]
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
        ``LatentDiffusion.concat_input``) and the draws of ``example_draws``.
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
    loss, _ = diffusion.diffusion_loss(
        model.schedule,
        model.prediction_type,
        output.astype(jnp.float32),
        latents,
        noise,
        t,
        min_snr_gamma,
    )
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
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on ``batch``, its gradient accumulated over ``grad_accum_steps`` microbatches
    (encoding included, so only a microbatch's activations are alive at a time), or averaged
    over that many microbatches computed as independent branches with
    ``parallel_microbatches`` (see ``accumulate.accumulated_gradients``)."""
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
        }
        return diffusion_losses(
            {**params, **frozen_modules},
            losses_inputs,
            key,
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
    return inputs + condition + image_conditioning.batch_keys(concat_conditioning)


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
    ae_params, ae_shardings, latent_scale = frozen_inputs.load_autoencoder(
        config, workdir, mesh, rules
    )
    source = data_lib.make_source(config.data, config.data.train_split, config.seed)
    tokenizer, text_encoder, frozen, frozen_shardings = frozen_inputs.load_conditioning(
        config, workdir, mesh, rules, source
    )
    frozen, frozen_shardings = (
        {**frozen, "autoencoder": ae_params},
        {**frozen_shardings, "autoencoder": ae_shardings},
    )
    model = build_model(config, tokenizer, latent_scale, text_encoder)
    optimizer = make_optimizer(train_config)
    encoded = config.diffusion.encode_once or bool(config.data.latent_cache)
    if config.data.latent_cache:
        source = latent_cache.open_for_training(config)
    elif encoded:
        source = encode_dataset(config, source, model, ae_params, mesh)
    data_iterator, batches = data_lib.make_batches(
        config.data,
        source,
        batch_size=train_config.batch_size,
        seed=config.seed + 11,
        mesh=mesh,
        tokenizer_json=tokenizer.to_str() if tokenizer else None,
        keys=batch_keys(config.diffusion.conditioning, encoded, dm.concat_conditioning),
        images=not encoded,
        record_operations=image_conditioning.training_operations(
            dm.concat_conditioning, dm.super_resolution_factor
        ),
    )
    checkpointer = Checkpointer(
        checkpoint_dir(workdir),
        max_to_keep=config.train.max_to_keep,
        async_checkpointing=config.train.async_checkpointing,
    )
    state, shardings = restore_or_create(
        config, model, checkpointer, mesh, rules, data_iterator, workdir=workdir
    )
    checkpointer.check_space(state, config.train.min_free_gib)

    step = jit_train_step(
        functools.partial(
            train_step,
            model=model,
            optimizer=optimizer,
            ema_decay=train_config.ema_decay,
            cond_drop_prob=config.diffusion.cond_drop_prob,
            min_snr_gamma=config.diffusion.min_snr_gamma or None,
            grad_accum_steps=train_config.grad_accum_steps,
            parallel_microbatches=train_config.parallel_microbatches,
        ),
        shardings,
        mesh,
        frozen_shardings,
        nonfinite=config.train.nonfinite,
    )
    step_key = jax.random.fold_in(jax.random.key(config.seed), 12)
    writer = MetricsWriter(workdir, STAGE)
    prompts, labels = previews.preview_prompts(config)
    preview_inputs = previews.preview_images(config)
    options = sampling_options(config, mode="sr" if dm.concat_conditioning == "sr" else None)

    def write_samples(step_number: int, current: TrainState) -> None:
        generator = Generator(
            model,
            {**current.ema_params, **frozen},
            mesh,
            tokenizer,
            config.data.max_caption_length,
        )
        conditions = generator.conditions(prompts, labels)
        images = generator(conditions, seed=config.seed, options=options, images=preview_inputs)
        if jax.process_index() == 0:
            grid = save_grid(
                images, os.path.join(workdir, "samples", f"{STAGE}_{step_number:06d}.png")
            )
            writer.write_images(step_number, "samples", grid)

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
    init_fn = functools.partial(
        init_state,
        model=model,
        optimizer=make_optimizer(config.diffusion.train),
        max_caption_length=config.data.max_caption_length,
    )
    initial_params = None
    if config.diffusion.unet.pretrained and checkpointer.latest_step() is None:
        initial_params = {"unet": pretrained.initial_unet_params(config, workdir)}
    return state_lib.restore_or_create(
        init_fn,
        state_lib.init_key(config.seed, 11, mesh.size),
        checkpointer,
        mesh,
        rules,
        data_iterator,
        step,
        initial_params=initial_params,
    )


def sampling_options(config: ml_collections.ConfigDict, **overrides) -> SamplingOptions:
    s = config.sample
    values = dict(
        sampler=s.sampler,
        num_steps=s.num_steps,
        guidance_scale=float(s.guidance_scale),
        guidance_rescale=float(s.guidance_rescale),
        eta=float(s.eta),
        timestep_spacing=s.timestep_spacing,
        steps_offset=s.steps_offset,
        set_alpha_to_one=s.set_alpha_to_one,
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SamplingOptions(**values)


def load_model(
    workdir: str, mesh: Mesh, step: int | None = None, raw: bool = False
) -> tuple[LatentDiffusion, dict, Any, ml_collections.ConfigDict]:
    """The trained (or imported) model of a workdir, with every module's params on ``mesh``.

    Args:
      workdir: a workdir written by ``ldm-jax train`` or ``ldm-jax import``.
      mesh: where to put the params.
      step: the stage-2 checkpoint step (default: the newest).
      raw: the online params instead of their EMA.

    Returns:
      (model, params {"unet", "autoencoder", maybe "text_encoder"}, tokenizer, config).
    """
    config = config_lib.load_workdir_config(workdir)
    rules = mesh_lib.axis_rules_from_config(config.mesh.axis_rules)
    checkpointer = Checkpointer(checkpoint_dir(workdir), async_checkpointing=False)
    if checkpointer.latest_step() is None and not config.diffusion.unet.pretrained:
        raise FileNotFoundError(
            f"no stage-2 checkpoint in {checkpointer.directory}: train the "
            "diffusion stage first (ldm-jax train)"
        )
    ae_params, _, latent_scale = frozen_inputs.load_autoencoder(config, workdir, mesh, rules)
    tokenizer, text_encoder, frozen, _ = frozen_inputs.load_conditioning(
        config, workdir, mesh, rules
    )
    model = build_model(config, tokenizer, latent_scale, text_encoder)
    state, _ = restore_or_create(
        config, model, checkpointer, mesh, rules, step=step, workdir=workdir
    )
    checkpointer.close()
    log.info("loaded stage-2 step %d from %s", int(state.step), workdir)
    trained = state.params if raw else state.ema_params
    return model, {**trained, **frozen, "autoencoder": ae_params}, tokenizer, config


def load_generator(workdir: str, mesh: Mesh, step: int | None = None) -> tuple[Generator, Any]:
    """A Generator with the EMA params of a trained workdir (``step``: default the newest)."""
    model, params, tokenizer, config = load_model(workdir, mesh, step)
    generator = Generator(model, params, mesh, tokenizer, config.data.max_caption_length)
    return generator, config
