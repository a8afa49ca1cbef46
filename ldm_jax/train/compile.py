"""Ahead-of-time compilation of a stage's real train step for a TPU topology, from any host.

``ldm-jax compile`` builds the state, the batch and the frozen inputs as abstract
``ShapeDtypeStruct``s carrying their ``NamedSharding``s (no weights, no data), lowers the jitted
train step that ``ldm-jax train`` runs, compiles it with libtpu for the topology's devices and
reports what XLA says one chip needs: memory (arguments, temporaries, outputs) against the chip's
HBM, and FLOPs per step. A frozen pretrained CLIP text model is stood in for by an abstract one
of the configured width, a from-scratch text encoder by one with a
``PLACEHOLDER_VOCABULARY``-word vocabulary (the real one is built from the captions). A
fine-tune run's base model is abstract too (its params sharded as their logical axis names
say, as loading puts them), so no base workdir is read.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import math
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ldm_jax import config as config_lib
from ldm_jax.data import tokenizer as tokenizer_lib
from ldm_jax.models import LPIPS
from ldm_jax.models.clip import CLIPTextTransformer
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import platforms, sharding
from ldm_jax.pipeline import builders, finetuned
from ldm_jax.pipeline.model import LatentDiffusion
from ldm_jax.train import autoencoder as autoencoder_stage
from ldm_jax.train import diffusion as diffusion_stage
from ldm_jax.train import finetune as finetune_stage
from ldm_jax.train import frozen as frozen_inputs
from ldm_jax.train import random_streams
from ldm_jax.train import state as state_lib
from ldm_jax.train.autoencoder_loss import LossModules
from ldm_jax.train.loop import jit_train_step

GIB = 1024**3
# HBM per chip, by generation.
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
# libtpu's name of each generation in a topology string ("v5:2x4x4" is a v5p slice).
_LIBTPU_GENERATION = {"v4": "v4", "v5e": "v5e", "v5p": "v5", "v6e": "v6e"}
# Generations whose chips hold two TensorCores run as one device ("megacore"); their
# accelerator types (v5p-64) count TensorCores, the others' (v5e-256) chips.
_MEGACORE = ("v4", "v5p")
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
# Encoder widths of the published CLIP text models: (layers, heads, MLP width).
_CLIP_SIZES = {768: (12, 12, 3072), 1024: (24, 16, 4096), 1280: (32, 20, 5120)}
CLIP_VOCABULARY = 49408
PLACEHOLDER_VOCABULARY = 1_000
COMPILE_STAGES = ("diffusion", "autoencoder", "finetune")
_INIT_STREAMS = {
    "diffusion": random_streams.DIFFUSION_INIT,
    "autoencoder": random_streams.AUTOENCODER_INIT,
    "finetune": random_streams.FINETUNE_INIT,
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: its chip generation and the grid of its chips."""

    generation: str
    chip_grid: tuple[int, ...]

    @property
    def num_chips(self) -> int:
        return math.prod(self.chip_grid)

    @property
    def hbm_bytes(self) -> int:
        return HBM_BYTES[self.generation]

    @property
    def name(self) -> str:
        """libtpu's topology string, e.g. ``v5:2x4x4``."""
        return f"{_LIBTPU_GENERATION[self.generation]}:{'x'.join(map(str, self.chip_grid))}"

    @property
    def accelerator_type(self) -> str:
        """Cloud TPU's name of the slice, e.g. ``v5p-64`` (TensorCores) or ``v5litepod-16``."""
        if self.generation in _MEGACORE:
            return f"{self.generation}-{2 * self.num_chips}"
        prefix = "v5litepod" if self.generation == "v5e" else self.generation
        return f"{prefix}-{self.num_chips}"

    @property
    def chip_config_name(self) -> str:
        return "megacore" if self.generation in _MEGACORE else "default"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Four chips per host in a 2x2 block (a single host of a small v5e/v6e holds all)."""
        grid = (*self.chip_grid, 1)[:3]
        if len(self.chip_grid) == 2 and self.num_chips <= 8:
            return grid
        return tuple(min(d, b) for d, b in zip(grid, (2, 2, 1), strict=True))


def parse_topology(name: str) -> Topology:
    """``v5p-64``, ``v5e-256``, ``v6e-16``, ``v4-8`` (accelerator types) or ``v5e:2x2``,
    ``v5p:2x2x1`` (a generation and its chip grid).

    Raises:
      ValueError: naming ``--topology`` and the accepted forms.
    """
    usage = (
        f"--topology={name!r} is not a TPU topology; use an accelerator type such as v5p-64, "
        f"v5e-256, v6e-16, v4-8 or a chip grid such as v5e:2x2, v5p:2x2x1 (generations "
        f"{tuple(HBM_BYTES)})"
    )
    match = re.fullmatch(r"(v\d+[a-z]*)([-:])([\dx]+)", name.strip().lower())
    if not match:
        raise ValueError(usage)
    generation, separator, size = match.groups()
    generation = _ALIASES.get(generation, generation)
    if generation not in HBM_BYTES:
        raise ValueError(usage)
    dims = 3 if generation in _MEGACORE else 2
    if separator == ":":
        grid = tuple(int(d) for d in size.split("x") if d)
        if len(grid) not in (2, 3) or min(grid) < 1:
            raise ValueError(usage)
        return Topology(generation, grid)
    if "x" in size:
        raise ValueError(usage)
    chips = int(size) // (2 if generation in _MEGACORE else 1)
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{usage}; the count must give a power of two of chips")
    return Topology(generation, _chip_grid(chips, dims))


def _chip_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shapes of Cloud TPU: double the last of the smallest sides until it holds
    ``chips`` (v5p: 4 -> 2x2x1, 16 -> 2x2x4, 32 -> 2x4x4; v5e: 8 -> 2x4, 256 -> 16x16)."""
    grid = [2, 2, 1] if dims == 3 and chips >= 4 else [1] * dims
    while math.prod(grid) < chips:
        smallest = min(grid)
        grid[max(i for i, d in enumerate(grid) if d == smallest)] *= 2
    return tuple(grid)


def topology_devices(topology: Topology, num_slices: int = 1) -> list:
    """The (unattached) devices of ``num_slices`` slices of ``topology``, from libtpu.

    Raises:
      ValueError: when libtpu is not installed.
    """
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(
            "compiling for a TPU topology needs libtpu: pip install 'ldm_jax[tpu]' "
            "(or 'jax[tpu]' of the installed jax version)"
        )
    if num_slices < 1:
        raise ValueError(f"--num_slices={num_slices} must be at least 1")
    # Another process on this host may hold libtpu (a training job, a parallel test): the
    # topology description needs no chip, so sharing is safe.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    with _described_host(topology):
        description = topologies.get_topology_desc(
            topology_name=topology.name,
            platform="tpu",
            chip_config_name=topology.chip_config_name,
            chips_per_host_bounds=topology.chips_per_host_bounds,
            num_slices=num_slices,
            wrap=(False,) * 3,
        )
    return list(description.devices)


@contextlib.contextmanager
def _described_host(topology: Topology) -> Iterator[None]:
    """On a host without a TPU, the variables a TPU VM sets, while libtpu loads: without them
    it prints discovery errors ("could not determine TPU accelerator type", "unexpected worker
    hostname") that read as a failure. Set only for the load, so that nothing later in the
    process takes this host for a TPU VM (``parallel.distributed.detect_platform``)."""
    if platforms.tpu_attached():
        yield
        return
    stand_ins = {
        "TPU_ACCELERATOR_TYPE": topology.accelerator_type,
        "TPU_WORKER_HOSTNAMES": "localhost",
    }
    saved = {name: os.environ.get(name) for name in stand_ins}
    os.environ.update({name: value for name, value in stand_ins.items() if not saved[name]})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What XLA reports for one device of a compiled train step (bytes and FLOPs), with what
    its inputs hold: the trained parameters (the train state: params, EMA and optimizer
    state) and the frozen ones (the autoencoder, a pretrained text encoder, a fine-tune run's
    base model), and their bytes on one chip.

    ``unread_frozen_bytes``: frozen params that training keeps on the chips but the step
    does not read (a fine-tune run's autoencoder, on encoded latents). jit drops unread
    arguments, so XLA's argument bytes leave them out; ``resident_bytes`` adds them back.
    """

    stage: str
    mesh_shape: dict[str, int]
    global_batch: int
    per_chip_batch: float
    parameters: int
    state_bytes: int
    frozen_parameters: int
    frozen_bytes: int
    unread_frozen_bytes: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    flops: float
    method: str = ""
    hbm_bytes: int | None = None

    @property
    def total_bytes(self) -> int:
        """Arguments + temporaries + outputs, less the outputs written over donated arguments."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def resident_bytes(self) -> int:
        """``total_bytes`` and the frozen params on the chips that the step does not read."""
        return self.total_bytes + self.unread_frozen_bytes

    @property
    def fits(self) -> bool:
        return self.hbm_bytes is None or self.resident_bytes <= self.hbm_bytes

    def lines(self) -> list[str]:
        gib = lambda n: f"{n / GIB:.2f} GiB"
        hbm = f" of {gib(self.hbm_bytes)} HBM" if self.hbm_bytes is not None else ""
        stage = f"{self.stage} ({self.method})" if self.method else self.stage
        lines = [
            f"stage: {stage}; trained parameters: {self.parameters:,}; "
            f"frozen parameters: {self.frozen_parameters:,}",
            f"mesh: {self.mesh_shape}; global batch {self.global_batch} "
            f"({self.per_chip_batch:g} per chip)",
            f"per-chip inputs: train state (params, EMA, optimizer) {_size(self.state_bytes)}, "
            f"frozen params {_size(self.frozen_bytes)}"
            + (
                f" ({_size(self.unread_frozen_bytes)} of them not read by the step)"
                if self.unread_frozen_bytes
                else ""
            ),
            "per-chip memory: "
            f"arguments {gib(self.argument_bytes)}, temporaries {gib(self.temp_bytes)}, "
            f"outputs {gib(self.output_bytes)}, aliased {gib(self.alias_bytes)}, "
            f"total {gib(self.total_bytes)}" + ("" if self.unread_frozen_bytes else hbm),
        ]
        if self.unread_frozen_bytes:
            lines.append(
                f"with the unread frozen params training keeps on the chips: "
                f"{gib(self.resident_bytes)}{hbm}"
            )
        lines.append(f"FLOPs per step per chip: {self.flops:.4g}")
        if self.hbm_bytes is not None:
            lines.append("fits" if self.fits else "does not fit")
        return lines


def _size(n: int) -> str:
    """Bytes in GiB, or in MiB below a tenth of a GiB (a LoRA's train state)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def compile_for_topology(
    config: ml_collections.ConfigDict,
    topology: str,
    *,
    num_slices: int = 1,
    per_chip_batch: int | None = None,
    stage: str | None = None,
) -> CompileReport:
    """Compiles ``stage``'s train step of ``config`` (default: ``default_stage``) for
    ``num_slices`` slices of ``topology``."""
    parsed = parse_topology(topology)
    report = compile_train_step(
        config, topology_devices(parsed, num_slices), stage=stage, per_chip_batch=per_chip_batch
    )
    return dataclasses.replace(report, hbm_bytes=parsed.hbm_bytes)


def default_stage(config: ml_collections.ConfigDict) -> str:
    """The stage ``config.stage`` names, stage 2 for "both" (the larger step)."""
    return config.stage if config.stage in COMPILE_STAGES else "diffusion"


def set_batch_sizes(
    config: ml_collections.ConfigDict, stage: str, shards: int, per_chip_batch: int | None
) -> None:
    """Sets ``stage``'s batch to ``per_chip_batch`` per batch shard (if given), and rounds the
    other stages', which are not compiled, up to a multiple of ``shards`` so that validation
    does not stop the compile over a batch that is not used (stage 1's 32 on a v5e-256)."""
    if per_chip_batch is not None:
        if per_chip_batch < 1:
            raise ValueError(f"--per_chip_batch={per_chip_batch} must be at least 1")
        config[stage].train.batch_size = per_chip_batch * shards
    for other in COMPILE_STAGES:
        if other != stage:
            config[other].train.batch_size = shards * math.ceil(
                config[other].train.batch_size / shards
            )


def compile_train_step(
    config: ml_collections.ConfigDict,
    devices: Sequence[Any],
    *,
    stage: str | None = None,
    per_chip_batch: int | None = None,
) -> CompileReport:
    """Lowers and compiles ``stage``'s train step on the mesh ``config.mesh`` makes of ``devices``.

    Args:
      config: the run's config (not modified); its data and weight paths are not read.
      devices: TPU topology devices (``topology_devices``) or real ones.
      stage: "diffusion", "autoencoder" or "finetune" (with ``config.finetune``'s method);
        default: ``default_stage(config)``.
      per_chip_batch: examples per batch shard (data x fsdp shards); default: the config's
        ``<stage>.train.batch_size`` split over them.
    """
    stage = stage or default_stage(config)
    if stage not in COMPILE_STAGES:
        raise ValueError(f"--stage={stage!r}; choose one of {COMPILE_STAGES}")
    config = copy.deepcopy(config)
    mesh = mesh_lib.create_mesh(**config_lib.mesh_sizes(config), devices=devices)
    shards = mesh_lib.data_parallel_size(mesh)
    set_batch_sizes(config, stage, shards, per_chip_batch)
    config_lib.validate(config, len(devices), check_files=False)
    rules = mesh_lib.axis_rules_from_config(config.mesh.axis_rules)
    init_fn, step_fn, batch_specs, extra, extra_shardings = stage_program(
        config, mesh, rules, stage
    )
    abstract, shardings = sharding.abstract_state(
        init_fn, mesh, rules, state_lib.init_key(config.seed, _INIT_STREAMS[stage], mesh.size)
    )
    batch_size = config[stage].train.batch_size
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {
        name: jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=batch_sharding)
        for name, (shape, dtype) in batch_specs.items()
    }
    # A key as a ShapeDtypeStruct: an eager key op would run on the TPU mesh, which has no chips.
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    jitted = jit_train_step(
        step_fn, shardings, mesh, extra_shardings, nonfinite=config.train.nonfinite
    )
    with jax.set_mesh(mesh):
        try:
            compiled = jitted.lower(abstract, batch, key, extra).compile()
        except jax.errors.JaxRuntimeError as error:
            # libtpu refuses a program whose temporaries exceed the chip's HBM.
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            raise ValueError(
                f"does not fit: {stage}'s step at {batch_size / shards:g} examples per chip "
                f"({str(error).strip().splitlines()[0]}); lower --per_chip_batch or raise "
                f"--config.{stage}.train.grad_accum_steps"
            ) from None
    # jit drops the arguments the step does not read: their input sharding is None.
    read = jax.tree.leaves(compiled.input_shardings[0][3], is_leaf=lambda x: x is None)
    unread = [x for x, used in zip(jax.tree.leaves(extra), read, strict=True) if used is None]
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return CompileReport(
        stage=stage,
        method=_finetune_method(config) if stage == "finetune" else "",
        mesh_shape=dict(mesh.shape),
        global_batch=batch_size,
        per_chip_batch=batch_size / shards,
        parameters=_num_params(abstract.params),
        state_bytes=_bytes_per_chip(abstract),
        frozen_parameters=_num_params(extra),
        frozen_bytes=_bytes_per_chip(extra),
        unread_frozen_bytes=_bytes_per_chip(unread),
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        flops=float(cost.get("flops", 0.0)),
    )


def _num_params(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _bytes_per_chip(tree: Any) -> int:
    """The bytes one device holds of an abstract tree whose leaves carry their shardings."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


def _finetune_method(config: ml_collections.ConfigDict) -> str:
    ft = config.finetune
    if ft.method == "full":
        return "full"
    return f"lora, rank {ft.lora.rank}, targets {', '.join(ft.lora.targets)}"


def stage_program(config: ml_collections.ConfigDict, mesh, rules, stage: str):
    """What compiling ``stage``'s step needs, with no weights or data: ``(init_fn, step_fn,
    {batch key: (shape per example, dtype)}, abstract frozen inputs, their shardings)``."""
    build = {
        "diffusion": _diffusion_step,
        "autoencoder": _autoencoder_step,
        "finetune": _finetune_step,
    }[stage]
    return build(config, mesh, rules)


def _abstract_params(init: Any, mesh, rules) -> Any:
    """The params ``init(key)`` makes, as ``ShapeDtypeStruct``s carrying the shardings their
    logical axis names give (as loading places pretrained params)."""
    return sharding.abstract_state(init, mesh, rules, jax.random.key(0))[0]


def _abstract_clip(config: ml_collections.ConfigDict) -> CLIPTextTransformer:
    """A CLIP text model of the configured width (the published one's depth when known)."""
    width = config.diffusion.text_encoder.width
    layers, heads, mlp_width = _CLIP_SIZES.get(width, (12, max(width // 64, 1), 4 * width))
    return CLIPTextTransformer(
        vocab_size=CLIP_VOCABULARY,
        max_length=config.data.max_caption_length,
        width=width,
        num_layers=layers,
        num_heads=heads,
        mlp_width=mlp_width,
        skip_last_layers=config.diffusion.text_encoder.skip_last_layers,
        dtype=builders.compute_dtype(config),
    )


def _diffusion_model(config: ml_collections.ConfigDict) -> LatentDiffusion:
    """The stage-2 model of ``config``, with stand-ins for what is read from files: a word
    tokenizer of ``PLACEHOLDER_VOCABULARY`` words and a CLIP text model of the configured
    width."""
    dm = config.diffusion
    tokenizer = tokenizer_lib.build_word_tokenizer(
        f"word{i}" for i in range(PLACEHOLDER_VOCABULARY)
    )
    clip = None
    if dm.conditioning == "text" and dm.text_encoder.kind == "clip":
        clip = _abstract_clip(config)
    return builders.build_model(config, tokenizer, latent_scale=1.0, text_encoder=clip)


def _abstract_autoencoder(config: ml_collections.ConfigDict, model: LatentDiffusion, mesh, rules):
    """The autoencoder's params, abstract and sharded."""
    size = config.data.image_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    return _abstract_params(lambda key: model.autoencoder.init(key, images)["params"], mesh, rules)


def _diffusion_batch_specs(config: ml_collections.ConfigDict, keys: Sequence[str]) -> dict:
    """``{key: (shape per example, dtype)}`` of a stage-2 or fine-tune batch's ``keys``."""
    size, latent = config.data.image_size, config_lib.latent_shape(config)
    specs = {
        "image": ((size, size, 3), jnp.uint8),
        "latent_mean": (latent, jnp.float32),
        "latent_std": (latent, jnp.float32),
        "tokens": ((config.data.max_caption_length,), jnp.int32),
        "label": ((), jnp.int32),
        "loss_weight": ((), jnp.float32),
    }
    return {k: specs[k] for k in keys}


def _diffusion_step(config: ml_collections.ConfigDict, mesh, rules):
    """Stage 2: (init_fn, step_fn, batch specs, frozen params, their shardings)."""
    dm = config.diffusion
    model = _diffusion_model(config)
    frozen = {}
    encoded = dm.encode_once or bool(config.data.latent_cache)
    if not encoded:
        frozen["autoencoder"] = _abstract_autoencoder(config, model, mesh, rules)
    if model.conditioning == "text" and model.frozen_text_encoder:
        tokens = jnp.zeros((1, config.data.max_caption_length), jnp.int32)
        init = lambda key: model.text_encoder.init(key, tokens)["params"]
        frozen["text_encoder"] = _abstract_params(init, mesh, rules)
    init_fn, step_fn = diffusion_stage.stage_functions(config, model)
    specs = _diffusion_batch_specs(config, diffusion_stage.batch_keys(dm.conditioning, encoded))
    return init_fn, step_fn, specs, frozen, frozen_inputs.shardings_of(frozen)


def _finetune_step(config: ml_collections.ConfigDict, mesh, rules):
    """Fine-tuning (``config.finetune.method``): the trained part (LoRA adapters, or the U-Net
    and any text encoder trained) in the state; the base model's params, abstract and sharded
    as loading places them, the frozen inputs ``finetune.frozen_params`` picks, as training
    passes them (the autoencoder too, which the step on encoded latents does not read)."""
    model = _diffusion_model(config)
    length = config.data.max_caption_length
    base = _abstract_params(
        lambda key: finetuned.model_params(key, model=model, max_caption_length=length),
        mesh,
        rules,
    )
    base["autoencoder"] = _abstract_autoencoder(config, model, mesh, rules)
    frozen = finetune_stage.frozen_params(config, base, model)
    init_fn, step_fn = finetune_stage.stage_functions(config, model)
    # The batch of finetune.train: encoded latents, the condition and each record's loss weight.
    keys = finetune_stage.batch_keys(config)
    specs = _diffusion_batch_specs(config, keys)
    return init_fn, step_fn, specs, frozen, frozen_inputs.shardings_of(frozen)


def _autoencoder_step(config: ml_collections.ConfigDict, mesh, rules):
    """Stage 1, with the GAN and LPIPS when its loss has them (LPIPS replicated, as in training)."""
    modules = LossModules(
        builders.build_autoencoder(config, training=True), builders.build_discriminator(config)
    )
    lpips_params, lpips_shardings = {}, sharding.replicated(mesh)
    if config.autoencoder.loss.perceptual_weight > 0:
        modules = dataclasses.replace(modules, lpips=LPIPS(dtype=builders.compute_dtype(config)))
        size = config.data.image_size
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        abstract = jax.eval_shape(modules.lpips.init, jax.random.key(0), images, images)
        lpips_params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=lpips_shardings),
            nn.meta.unbox(abstract["params"]),
        )
    init_fn, step_fn = autoencoder_stage.stage_functions(config, modules)
    size = config.data.image_size
    specs = {"image": ((size, size, 3), jnp.uint8)}
    return init_fn, step_fn, specs, lpips_params, lpips_shardings
