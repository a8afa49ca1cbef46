"""`ldm-jax compile`: the real train step compiled ahead of time for a TPU topology."""

import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from ldm_jax import config as config_lib
from ldm_jax.data import tokenizer as tokenizer_lib
from ldm_jax.models import lora
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.pipeline import builders, finetuned
from ldm_jax.train import compile as compile_lib
from tests.conftest import load_config, run_cli


@pytest.mark.parametrize(
    "name, libtpu_name, chips, config_name, accelerator_type",
    [
        ("v5p-8", "v5:2x2x1", 4, "megacore", "v5p-8"),
        ("v5p-64", "v5:2x4x4", 32, "megacore", "v5p-64"),
        ("v4-32", "v4:2x2x4", 16, "megacore", "v4-32"),
        ("v5e-256", "v5e:16x16", 256, "default", "v5litepod-256"),
        ("v5litepod-8", "v5e:2x4", 8, "default", "v5litepod-8"),
        ("v6e-16", "v6e:4x4", 16, "default", "v6e-16"),
        ("v5e:2x2", "v5e:2x2", 4, "default", "v5litepod-4"),
        ("v5p:2x2x2", "v5:2x2x2", 8, "megacore", "v5p-16"),
    ],
)
def test_topology_names_map_to_libtpu_topologies(
    name, libtpu_name, chips, config_name, accelerator_type
):
    topology = compile_lib.parse_topology(name)
    assert (
        topology.name,
        topology.num_chips,
        topology.chip_config_name,
        topology.accelerator_type,
    ) == (libtpu_name, chips, config_name, accelerator_type)


@pytest.mark.parametrize("name", ["v5q-8", "v5p-12", "tpu", "v5e:2xx"])
def test_bad_topology_is_one_clear_error(name):
    with pytest.raises(ValueError, match="--topology"):
        compile_lib.parse_topology(name)


def test_multislice_devices_make_a_hybrid_mesh_with_data_parallelism_over_slices():
    devices = compile_lib.topology_devices(compile_lib.parse_topology("v5e:2x2"), num_slices=2)
    mesh = mesh_lib.create_mesh(data=1, fsdp=-1, tensor=1, devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for data_index in range(2):
        assert {d.slice_index for d in mesh.devices[data_index].flat} == {data_index}
    with pytest.raises(ValueError, match="mesh.dcn_"):
        mesh_lib.create_mesh(data=1, fsdp=-1, tensor=1, devices=devices, dcn_fsdp=4)
    # The TPU VM variables stood in only while libtpu loaded: this host is no TPU VM after.
    assert "TPU_WORKER_HOSTNAMES" not in os.environ
    assert "TPU_ACCELERATOR_TYPE" not in os.environ


@pytest.mark.slow
def test_compile_cli_reports_memory_flops_and_fit_for_the_quickstart():
    result = run_cli("compile", "--config=configs/quickstart.py", "--topology=v5e:2x2")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "mesh: {'data': 4, 'fsdp': 1, 'tensor': 1}; global batch 64 (16 per chip)" in out
    memory = re.search(r"per-chip memory: arguments ([\d.]+) GiB.*total ([\d.]+) GiB of 16.00", out)
    assert memory and 0 < float(memory.group(2)) < 16, out
    flops = re.search(r"FLOPs per step per chip: ([\d.e+]+)", out)
    assert flops and float(flops.group(1)) > 1e8, out
    assert out.strip().splitlines()[-1] == "fits"
    # libtpu loads without its discovery errors on this host without a TPU.
    assert "TPU" not in result.stderr and "libtpu" not in result.stderr, result.stderr[-3000:]


def test_compile_cli_bad_topology_is_one_line():
    result = run_cli("compile", "--config=configs/quickstart.py", "--topology=v9x-8")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("ldm-jax compile: error: --topology")


def test_sdxl_config_is_sdxl_size_without_its_added_embeddings():
    config = load_config("sdxl")
    config_lib.validate(config, 8, check_files=False)
    unet = builders.build_unet(config)
    assert unet.heads_per_level == (5, 10, 20) and unet.depth_per_level == (1, 2, 10)

    def init(key):
        latents = jnp.zeros((1, 128, 128, 4), jnp.float32)
        context = jnp.zeros((1, 77, 2048), jnp.float32)
        return unet.init(key, latents, jnp.zeros((1,), jnp.int32), context)["params"]

    shapes = jax.tree.leaves(jax.eval_shape(init, jax.random.key(0)))
    # SDXL's 2,567,463,684 less its add_embedding (2816 -> 1280 -> 1280): 5,245,440.
    assert sum(math.prod(s.shape) for s in shapes) == 2_567_463_684 - 5_245_440


def test_only_the_compiled_stage_batch_must_divide_the_mesh():
    # Stage 2 on a v5e-256 (256 batch shards) with the quickstart's stage-1 batch of 32: the
    # uncompiled stage's batch is rounded up, the compiled one is per_chip_batch per shard.
    config = load_config("quickstart")
    config.autoencoder.train.batch_size = 32
    compile_lib.set_batch_sizes(config, "diffusion", 256, per_chip_batch=4)
    assert config.diffusion.train.batch_size == 1024
    assert config.autoencoder.train.batch_size == 256
    assert config.finetune.train.batch_size == 256
    config_lib.validate(config, 256, check_files=False)
    with pytest.raises(ValueError, match="--per_chip_batch=0"):
        compile_lib.set_batch_sizes(config, "diffusion", 256, per_chip_batch=0)


def test_compiled_stage_defaults_to_the_configs_stage():
    config = load_config("quickstart", "tiny")
    stages = {}
    for stage in ("both", "autoencoder", "diffusion", "finetune"):
        config.stage = stage
        stages[stage] = compile_lib.default_stage(config)
    assert stages == {
        "both": "diffusion",
        "autoencoder": "autoencoder",
        "diffusion": "diffusion",
        "finetune": "finetune",
    }


@pytest.mark.slow
def test_lora_finetune_step_compiles_with_only_the_adapters_trained():
    # No base workdir: the base model is abstract, its shapes from the config.
    config = load_config("quickstart", "tiny")
    config.stage = "finetune"
    config.finetune.method = "lora"
    report = compile_lib.compile_for_topology(config, "v5e:2x2", per_chip_batch=2)

    tokenizer = tokenizer_lib.build_word_tokenizer(["a", "red", "circle"])
    model = builders.build_model(config, tokenizer, latent_scale=1.0)
    length = config.data.max_caption_length
    base = jax.eval_shape(
        lambda: finetuned.model_params(jax.random.key(0), model=model, max_caption_length=length)
    )
    adapters = jax.eval_shape(
        lambda: lora.init_adapters(jax.random.key(0), base["unet"], finetuned.lora_shape(config))
    )
    unet_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(base["unet"])))
    assert report.stage == "finetune" and report.mesh_shape["data"] == 4
    assert report.parameters == lora.num_params(adapters)
    assert 0 < report.parameters < unet_params // 10
    # The whole base is a frozen input; its autoencoder is not read on encoded latents, but
    # training holds it on the chips, and the fit counts it.
    assert report.frozen_parameters > unet_params
    assert 0 < report.unread_frozen_bytes < report.frozen_bytes
    assert report.resident_bytes == report.total_bytes + report.unread_frozen_bytes
    assert report.fits
    text = "\n".join(report.lines())
    assert f"trained parameters: {report.parameters:,}" in text
    assert "finetune (lora, rank 4" in text and "frozen params" in text


@pytest.mark.slow
def test_a_step_larger_than_the_chips_memory_is_one_clear_error():
    config = load_config("quickstart", "tiny")
    config.stage = "finetune"
    with pytest.raises(ValueError, match=r"does not fit: finetune's step .*--per_chip_batch"):
        compile_lib.compile_for_topology(config, "v5e:2x2", per_chip_batch=200_000)
