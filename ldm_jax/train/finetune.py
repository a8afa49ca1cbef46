"""Fine-tuning a trained or imported model (``config.stage = "finetune"``): LoRA adapters on a
frozen base, or every U-Net weight; on ``config.data``'s captions, or as DreamBooth (every
image captioned with ``finetune.instance_prompt``, and with ``finetune.class_prompt`` the
prior preservation of images the base model draws first).

The base model is loaded as inference loads it (``pipeline.load.load_model`` of
``finetune.base``), on this run's mesh. Only what is trained is in the train state, the
optimizer state and the checkpoints; the base stays as loaded (a frozen input of the step).
The training images are encoded once (a fine-tuning set is small) and each record carries
its loss weight: DreamBooth's loss ``instance + prior_loss_weight * prior`` is the batch mean
of weights 2 and ``2 * prior_loss_weight``, the instance images being repeated to as many
records as the class images.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from ldm_jax import storage
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.data.image_folder import IMAGE_EXTENSIONS, ImageFolderSource
from ldm_jax.data.in_memory import InMemorySource
from ldm_jax.pipeline import finetuned, grids, load
from ldm_jax.pipeline import workdir as workdir_lib
from ldm_jax.pipeline.datasets import make_source
from ldm_jax.pipeline.generator import Generator
from ldm_jax.train import data as data_lib
from ldm_jax.train import diffusion, random_streams
from ldm_jax.train import frozen as frozen_inputs
from ldm_jax.train import state as state_lib
from ldm_jax.train.loop import jit_train_step, run_steps
from ldm_jax.train.metrics import MetricsWriter
from ldm_jax.train.state import TrainState, create_train_state, make_optimizer

log = logging.getLogger(__name__)

STAGE = workdir_lib.FINETUNE
# Images of the class prompt drawn per call of the base model.
CLASS_IMAGE_CHUNK = 64


def stage_functions(config: ml_collections.ConfigDict, model: Any) -> tuple[Callable, Callable]:
    """``init_fn(key) -> state`` and ``step_fn(state, batch, key, frozen_params)`` of a
    fine-tune run: what the trainer and ``ldm-jax compile`` jit. The frozen params are the
    base's (all of them with LoRA; the parts not trained with full fine-tuning)."""
    ft = config.finetune
    optimizer = make_optimizer(ft.train)

    def init_fn(key: jax.Array) -> TrainState:
        return create_train_state(
            finetuned.init_finetuned(key, config=config, model=model), optimizer
        )

    def compose(trained: Any, frozen: dict, key: jax.Array) -> dict:
        return finetuned.compose(frozen, trained, config, dropout_key=key)

    step_fn = functools.partial(
        diffusion.train_step,
        model=model,
        optimizer=optimizer,
        ema_decay=ft.train.ema_decay,
        cond_drop_prob=config.diffusion.cond_drop_prob,
        min_snr_gamma=config.diffusion.min_snr_gamma or None,
        grad_accum_steps=ft.train.grad_accum_steps,
        parallel_microbatches=ft.train.parallel_microbatches,
        compose_params=compose,
    )
    return init_fn, step_fn


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """What a fine-tune batch holds: encoded latents, the condition and each loss weight."""
    return diffusion.batch_keys(config.diffusion.conditioning, True) + ("loss_weight",)


def frozen_params(config: ml_collections.ConfigDict, base_params: dict, model: Any) -> dict:
    """The base params a step takes as frozen inputs (see ``stage_functions``): with LoRA,
    every part, the adapted ones in ``finetune.base_dtype``."""
    if config.finetune.method == "lora":
        dtype = jnp.dtype(config.finetune.base_dtype)
        parts = finetuned.trained_parts(config, model)
        return {k: _cast(v, dtype) if k in parts else v for k, v in base_params.items()}
    trained = finetuned.trained_parts(config, model)
    return {k: v for k, v in base_params.items() if k not in trained}


def _cast(params: Any, dtype: jnp.dtype) -> Any:
    """Floating params in ``dtype``, each keeping its sharding."""
    if dtype == jnp.float32:
        return params
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(lambda tree: jax.tree.map(cast, tree), out_shardings=shardings)(params)


def draw_class_images(config: ml_collections.ConfigDict, base: load.LoadedModel, folder: str):
    """Draws the class images of prior preservation with the base model into ``folder``
    (``NNNNN.png``), the ones missing from an earlier, interrupted run only."""
    ft = config.finetune
    path = storage.as_path(folder)
    have = len([p for p in path.glob("*") if p.suffix in IMAGE_EXTENSIONS]) if path.exists() else 0
    missing = ft.num_class_images - have
    if missing <= 0:
        return
    generator = base.generator(batch_size=CLASS_IMAGE_CHUNK)
    is_main = jax.process_index() == 0
    log.info("drawing %d class images of %r with the base model", missing, ft.class_prompt)
    starts = range(have, ft.num_class_images, CLASS_IMAGE_CHUNK)
    for start in tqdm(starts, desc="class images", disable=not is_main):
        count = min(CLASS_IMAGE_CHUNK, ft.num_class_images - start)
        images = generator(
            generator.conditions([ft.class_prompt] * count), seed=config.seed + start
        )
        if is_main:
            for offset, image in enumerate(images):
                storage.write_png(storage.join(folder, f"{start + offset:05d}.png"), image)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("finetune class images")


def training_source(
    config: ml_collections.ConfigDict, workdir: str, base: load.LoadedModel, mesh: Mesh
) -> InMemorySource:
    """The encoded training records (latent moments, caption, label, loss weight)."""
    ft = config.finetune
    ae_params = base.params["autoencoder"]
    source = make_source(config.data, config.data.train_split, config.seed)
    instances = _encoded(diffusion.encode_dataset(config, source, base.model, ae_params, mesh))
    if ft.instance_prompt:
        instances["caption"] = [ft.instance_prompt] * len(instances["caption"])
    if not ft.class_prompt:
        instances["loss_weight"] = np.ones(len(instances["caption"]), np.float32)
        return _source(instances)
    folder = storage.join(workdir, workdir_lib.CLASS_IMAGES_DIR)
    draw_class_images(config, base, folder)
    classes = _encoded(
        diffusion.encode_dataset(config, ImageFolderSource(folder), base.model, ae_params, mesh)
    )
    classes["caption"] = [ft.class_prompt] * len(classes["caption"])
    repeats = max(1, math.ceil(len(classes["caption"]) / len(instances["caption"])))
    instances = {
        k: (v * repeats if isinstance(v, list) else np.concatenate([v] * repeats))
        for k, v in instances.items()
    }
    instances["loss_weight"] = np.full(len(instances["caption"]), 2.0, np.float32)
    classes["loss_weight"] = np.full(
        len(classes["caption"]), 2.0 * ft.prior_loss_weight, np.float32
    )
    log.info(
        "DreamBooth: %d instance records (%d images repeated %d times) and %d class images",
        len(instances["caption"]),
        len(instances["caption"]) // repeats,
        repeats,
        len(classes["caption"]),
    )
    return _source({k: _joined(instances[k], classes[k]) for k in instances})


def _encoded(source: InMemorySource) -> dict:
    records = [source[i] for i in range(len(source))]
    out = {k: np.stack([r[k] for r in records]) for k in ("latent_mean", "latent_std", "label")}
    out["caption"] = [str(r["caption"]) for r in records]
    return out


def _joined(a: Any, b: Any) -> Any:
    return a + b if isinstance(a, list) else np.concatenate([a, b])


def _source(records: dict) -> InMemorySource:
    arrays = {k: v for k, v in records.items() if k != "caption"}
    return InMemorySource(arrays, records["caption"])


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh: Mesh,
    rules,
    should_stop: Callable[[int], bool] | None = None,
) -> TrainState:
    """Fine-tunes ``config.finetune.base`` to ``config.finetune.train.steps``."""
    ft = config.finetune
    base_dir = finetuned.base_workdir(config)
    log.info("fine-tuning %s (%s)", base_dir, ft.method)
    base = load.load_model(base_dir, finetuned.base_config(config))
    model = base.model
    init_fn, step_fn = stage_functions(config, model)
    jax.eval_shape(init_fn, jax.random.key(0))  # bad LoRA targets fail before any encoding
    source = training_source(config, workdir, base, mesh)
    keys = batch_keys(config)
    data_iterator, batches = data_lib.make_batches(
        config.data,
        source,
        batch_size=ft.train.batch_size,
        seed=random_streams.data_seed(config.seed, random_streams.FINETUNE_DATA),
        mesh=mesh,
        tokenizer_json=base.tokenizer.to_str() if base.tokenizer else None,
        keys=keys,
        images=False,
    )
    checkpointer = Checkpointer(
        workdir_lib.checkpoint_dir(workdir, STAGE),
        max_to_keep=config.train.max_to_keep,
        async_checkpointing=config.train.async_checkpointing,
    )
    frozen = frozen_params(config, base.params, model)
    initial = None
    if ft.method == "full":
        initial = {part: base.params[part] for part in finetuned.trained_parts(config, model)}
    state, shardings = state_lib.restore_or_create(
        init_fn,
        state_lib.init_key(config.seed, random_streams.FINETUNE_INIT, mesh.size),
        checkpointer,
        mesh,
        rules,
        data_iterator,
        initial_params=initial,
    )
    checkpointer.check_space(state, config.train.min_free_gib)
    step = jit_train_step(
        step_fn,
        shardings,
        mesh,
        frozen_inputs.shardings_of(frozen),
        nonfinite=config.train.nonfinite,
    )
    step_key = random_streams.step_key(config.seed, random_streams.FINETUNE_STEPS)
    writer = MetricsWriter(workdir, STAGE)
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
        hook=_preview_writer(config, workdir, base, frozen, mesh, writer),
        should_stop=should_stop,
    )
    writer.close()
    checkpointer.close()
    return state


def preview_prompts(config: ml_collections.ConfigDict) -> tuple[list[str] | None, list[int]]:
    """The preview grid's conditions: the instance and class prompts of DreamBooth, else the
    base model's preview conditions."""
    ft = config.finetune
    if ft.instance_prompt:
        prompts = [ft.instance_prompt] + ([ft.class_prompt] if ft.class_prompt else [])
        return prompts * 4, [0] * (4 * len(prompts))
    return grids.preview_conditions(config)


def _preview_writer(
    config: ml_collections.ConfigDict,
    workdir: str,
    base: load.LoadedModel,
    frozen: dict,
    mesh: Mesh,
    writer: MetricsWriter,
) -> Callable[[int, TrainState], None]:
    prompts, labels = preview_prompts(config)

    def write(step_number: int, current: TrainState) -> None:
        params = finetuned.compose(frozen, current.ema_params, config)
        generator = Generator(
            base.model,
            params,
            mesh,
            config.sample,
            tokenizer=base.tokenizer,
            max_caption_length=config.data.max_caption_length,
        )
        samples = generator(generator.conditions(prompts, labels), seed=config.seed)
        if jax.process_index() == 0:
            name = f"{STAGE}_{step_number:06d}.png"
            path = storage.join(workdir, workdir_lib.SAMPLES_DIR, name)
            writer.write_images(step_number, "samples", grids.save_grid(samples, path))

    return write
