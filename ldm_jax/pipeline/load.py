"""A trained (or imported) model loaded for inference, sharded as it was trained.

``load_model`` reads a workdir's config, builds the mesh its ``config.mesh`` describes (a
caller's overrides included, ``--config.mesh.fsdp=8``) and the modules, and restores only
the params sampling needs, straight into the shardings the config's logical axis rules give
them: the EMA params (or, with ``raw``, the online ones) of the newest or a chosen stage-2
checkpoint, no optimizer state and no train state, each device reading its own shards. A
model trained with FSDP is thus sampled, evaluated and exported with FSDP: no device ever
holds a copy of the whole U-Net unless the mesh replicates it.

The trainer's checkpoints are read through the paths below, the field names of its train
states (``ldm_jax.train.state.TrainState``, ``ldm_jax.train.autoencoder``'s
``AutoencoderTrainState``); nothing here imports the trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from ldm_jax import config as config_lib
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.data import tokenizer as tokenizer_lib
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.pipeline import builders, finetuned, pretrained
from ldm_jax.pipeline import workdir as workdir_lib
from ldm_jax.pipeline.generator import Generator
from ldm_jax.pipeline.model import LatentDiffusion, init_trained_params

log = logging.getLogger(__name__)

# Where a stage's checkpoint keeps what inference reads: the EMA params (or the online ones)
# of stage 2, stage 1's autoencoder params and its variables that gradients do not train
# (an EMA codebook).
DIFFUSION_PARAMS = {"ema": ("ema_params",), "online": ("params",)}
AUTOENCODER_PARAMS = {
    "ema": ("generator", "ema_params", "autoencoder"),
    "online": ("generator", "params", "autoencoder"),
}
AUTOENCODER_VARIABLES = ("model_state",)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model with its params on ``mesh``.

    Attributes:
      params: {"unet", "autoencoder", and "text_encoder" for text conditioning}.
      tokenizer: the tokenizer of a text-conditioned model, else None.
      step: the stage-2 checkpoint step read, None for imported weights.
    """

    model: LatentDiffusion
    params: dict
    tokenizer: Any
    config: ml_collections.ConfigDict
    mesh: Mesh
    step: int | None

    def generator(self, batch_size: int = 64) -> Generator:
        return Generator(
            self.model,
            self.params,
            self.mesh,
            self.config.sample,
            tokenizer=self.tokenizer,
            max_caption_length=self.config.data.max_caption_length,
            batch_size=batch_size,
        )


def inference_mesh(config: ml_collections.ConfigDict) -> tuple[Mesh, Any]:
    """The mesh of ``config.mesh`` over this job's devices, and its logical axis rules.

    Raises:
      ConfigError: naming ``--config.mesh.*`` when the devices cannot make that mesh.
    """
    try:
        mesh = mesh_lib.create_mesh(**config_lib.mesh_sizes(config))
        rules = mesh_lib.axis_rules_from_config(config.mesh.axis_rules)
    except ValueError as error:
        sizes = ", ".join(f"{k}={v}" for k, v in config_lib.mesh_sizes(config).items())
        raise config_lib.ConfigError(
            f"the model's mesh ({sizes}) does not fit the {jax.device_count()} devices here: "
            f"{error}"
        ) from None
    return mesh, rules


def _partial(path: Sequence[str], tree: Any) -> dict:
    """``tree`` nested under the keys of ``path``."""
    for key in reversed(path):
        tree = {key: tree}
    return tree


def _get(tree: dict, path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def with_codebook(params: Any, variables: Any) -> Any:
    """Autoencoder params for inference: an EMA-updated VQ codebook, kept outside the params
    while training, put in."""
    quantizer_state = variables.get("codebook", {}).get("quantize", {})
    if "embedding" in quantizer_state:
        params = {**params, "quantize": {"embedding": quantizer_state["embedding"]}}
    return params


def autoencoder_variables(module: Any, image_size: int, key: jax.Array) -> Any:
    """The variables of a stage-1 autoencoder as training creates them: its "params" and the
    collections gradients do not train (an EMA codebook)."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return module.init({"params": key, "sample": key, "codebook": key}, images)


@dataclasses.dataclass(frozen=True)
class LoadedAutoencoder:
    """Autoencoder params on a mesh; ``latent_scale`` None when it was never measured (a
    stage-1 run that stage 2 has not yet used), ``step`` None for imported weights."""

    params: Any
    latent_scale: float | None
    step: int | None


def load_autoencoder(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, rules, raw: bool = False
) -> LoadedAutoencoder:
    """The autoencoder a stage-2 model of ``config`` decodes with: pretrained weights the
    config names, else the EMA (``raw``: online) params of the newest stage-1 checkpoint.

    Raises:
      ConfigError: when there is no stage-1 checkpoint, naming what to run or set.
    """
    if config.autoencoder.pretrained:
        params, _, scale = pretrained.load_autoencoder(config, workdir, mesh, rules)
        return LoadedAutoencoder(params, scale, None)
    ae_workdir = workdir_lib.autoencoder_workdir(config, workdir)
    checkpointer = Checkpointer(
        workdir_lib.checkpoint_dir(ae_workdir, workdir_lib.AUTOENCODER), async_checkpointing=False
    )
    step = checkpointer.latest_step()
    if step is None:
        raise config_lib.ConfigError(
            f"stage 2 needs a trained autoencoder, but {checkpointer.directory} holds no "
            "checkpoint: run stage 1 first (--config.stage=both or autoencoder) or point "
            "--config.autoencoder.workdir at a workdir that has one"
        )
    module = builders.build_autoencoder(config, training=True)
    init = lambda key: autoencoder_variables(module, config.data.image_size, key)  # noqa: E731
    abstract, _ = sharding.abstract_state(init, mesh, rules, jax.random.key(0))
    abstract = dict(abstract)
    params_path = AUTOENCODER_PARAMS["online" if raw else "ema"]
    part = {
        **_partial(params_path, abstract.pop("params")),
        **_partial(AUTOENCODER_VARIABLES, abstract),
    }
    restored = checkpointer.restore_part(part, step)
    checkpointer.close()
    params = with_codebook(_get(restored, params_path), _get(restored, AUTOENCODER_VARIABLES))
    return LoadedAutoencoder(params, workdir_lib.read_latent_scale(ae_workdir, step), step)


def load_conditioning(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, rules, tokenizer: Any = None
) -> tuple[Any, Any, dict]:
    """The tokenizer, a pretrained text encoder and its frozen params on the mesh.

    Args:
      tokenizer: the word tokenizer of a from-scratch text encoder when the caller has it
        (training builds it from the captions on its first run); None reads the workdir's.

    Returns:
      (tokenizer or None, text encoder module or None, frozen params): the params hold
      "text_encoder" for a pretrained CLIP text model, else nothing; a from-scratch encoder
      is trained with the U-Net and built by ``builders.build_model``.
    """
    if config.diffusion.conditioning != "text":
        return None, None, {}
    if config.diffusion.text_encoder.kind == "scratch":
        if tokenizer is None:
            path = os.path.join(workdir, workdir_lib.TOKENIZER_FILE)
            tokenizer = tokenizer_lib.load_tokenizer(path)
        return tokenizer, None, {}
    module, params, clip_tokenizer = pretrained.load_clip(config, workdir)
    if module.max_length != config.data.max_caption_length:
        raise config_lib.ConfigError(
            f"config.data.max_caption_length={config.data.max_caption_length} must equal the "
            f"CLIP text model's max_length {module.max_length}"
        )
    tokens = jnp.zeros((1, module.max_length), jnp.int32)
    params, _ = pretrained.place(params, module, mesh, rules, tokens)
    return clip_tokenizer.tokenizer, module, {"text_encoder": params}


def load_trained_params(
    config: ml_collections.ConfigDict,
    workdir: str,
    model: LatentDiffusion,
    mesh: Mesh,
    rules,
    step: int | None = None,
    raw: bool = False,
) -> tuple[dict, int | None]:
    """Stage 2's trained params on the mesh: from its checkpoint (the newest, or ``step``),
    else the pretrained U-Net the config names. Returns (params, checkpoint step or None).

    Raises:
      FileNotFoundError: when there is neither, naming what to run.
    """
    init = lambda key: init_trained_params(  # noqa: E731
        key, model=model, max_caption_length=config.data.max_caption_length
    )
    abstract, shardings = sharding.abstract_state(init, mesh, rules, jax.random.key(0))
    directory = workdir_lib.checkpoint_dir(workdir, workdir_lib.DIFFUSION)
    if step is None and config.diffusion.unet.pretrained:
        checkpointer = Checkpointer(directory, async_checkpointing=False)
        latest = checkpointer.latest_step()
        checkpointer.close()
        if latest is None:
            host = {"unet": pretrained.initial_unet_params(config, workdir)}
            with jax.set_mesh(mesh):
                return jax.device_put(host, {"unet": shardings["unet"]}), None
    return restore_params(directory, abstract, step, raw, "stage-2", "the diffusion stage")


def restore_params(
    directory: str, abstract: Any, step: int | None, raw: bool, what: str, stage: str
) -> tuple[Any, int]:
    """The EMA (``raw``: online) params of a train state's checkpoint in ``directory``, the
    newest or ``step``, restored into the shardings ``abstract`` carries.

    Raises:
      FileNotFoundError: naming ``what`` checkpoint is missing and the ``stage`` to train.
    """
    checkpointer = Checkpointer(directory, async_checkpointing=False)
    try:
        latest = checkpointer.latest_step()
        if latest is None:
            raise FileNotFoundError(
                f"no {what} checkpoint in {checkpointer.directory}: train {stage} first "
                "(ldm-jax train)"
            )
        if step is not None and step not in checkpointer.all_steps():
            saved = ", ".join(map(str, checkpointer.all_steps()))
            raise FileNotFoundError(
                f"no {what} checkpoint of step {step} in {checkpointer.directory} (saved: {saved})"
            )
        step = latest if step is None else step
        path = DIFFUSION_PARAMS["online" if raw else "ema"]
        restored = checkpointer.restore_part(_partial(path, abstract), step)
        return _get(restored, path), step
    finally:
        checkpointer.close()


def load_finetuned_parts(
    workdir: str, config: ml_collections.ConfigDict, step: int | None = None, raw: bool = False
) -> tuple[LoadedModel, dict, int]:
    """A fine-tune workdir's base model and what the run trained (adapters or weights, EMA
    or ``raw`` online, of the newest checkpoint or ``step``), both on the config's mesh.

    Returns:
      (base model, trained params, checkpoint step).
    """
    base_dir = finetuned.base_workdir(config)
    base = load_model(base_dir, finetuned.base_config(config))
    rules = mesh_lib.axis_rules_from_config(config.mesh.axis_rules)
    init = lambda key: finetuned.init_finetuned(key, config=config, model=base.model)  # noqa: E731
    abstract, _ = sharding.abstract_state(init, base.mesh, rules, jax.random.key(0))
    directory = workdir_lib.checkpoint_dir(workdir, workdir_lib.FINETUNE)
    trained, step = restore_params(directory, abstract, step, raw, "fine-tune", "it")
    log.info("loaded fine-tune step %d from %s on the base %s", step, workdir, base_dir)
    return base, trained, step


def _load_finetuned(
    workdir: str, config: ml_collections.ConfigDict, step: int | None, raw: bool
) -> LoadedModel:
    """A fine-tune workdir's model: its base, with the trained adapters or weights applied."""
    base, trained, step = load_finetuned_parts(workdir, config, step, raw)
    params = finetuned.compose(base.params, trained, config)
    return LoadedModel(base.model, params, base.tokenizer, config, base.mesh, step)


def load_model(
    workdir: str,
    config: ml_collections.ConfigDict | None = None,
    step: int | None = None,
    raw: bool = False,
) -> LoadedModel:
    """The trained (or imported) model of a workdir on the mesh of its config.

    Args:
      workdir: a workdir written by ``ldm-jax train`` or ``ldm-jax import``.
      config: the workdir's config with a caller's overrides (``--config.mesh.fsdp=8``);
        None reads ``config.json``.
      step: the stage-2 checkpoint step (default: the newest).
      raw: the online params instead of their EMA.
    """
    config = config_lib.load_workdir_config(workdir) if config is None else config
    if finetuned.is_finetune(config):
        return _load_finetuned(workdir, config, step, raw)
    mesh, rules = inference_mesh(config)
    autoencoder = load_autoencoder(config, workdir, mesh, rules)
    if autoencoder.latent_scale is None:
        raise FileNotFoundError(
            f"{workdir_lib.autoencoder_workdir(config, workdir)} holds no latent scale of its "
            f"autoencoder's step {autoencoder.step} ({workdir_lib.LATENT_SCALE_FILE}): stage 2 "
            "measures it when it starts; train the diffusion stage (ldm-jax train)"
        )
    tokenizer, text_encoder, frozen = load_conditioning(config, workdir, mesh, rules)
    model = builders.build_model(config, tokenizer, autoencoder.latent_scale, text_encoder)
    trained, loaded_step = load_trained_params(config, workdir, model, mesh, rules, step, raw)
    if loaded_step is not None:
        log.info("loaded stage-2 step %d from %s", loaded_step, workdir)
    params = {**trained, **frozen, "autoencoder": autoencoder.params}
    return LoadedModel(model, params, tokenizer, config, mesh, loaded_step)


def load_generator(
    workdir: str, config: ml_collections.ConfigDict | None = None, step: int | None = None
) -> Generator:
    """A Generator with the EMA params of a workdir's model (see ``load_model``)."""
    return load_model(workdir, config, step).generator()
