"""``cache_latents``: every record encoded once over 8 devices, equal to a one-device encode;
stage 2 trains from the cache; a stage-1 workdir's reconstructions are scored."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.data import shapes
from ldm_jax.data.latent_cache import LatentCacheSource
from ldm_jax.evaluate.first_stage import evaluate_workdir
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.pipeline import builders
from ldm_jax.pipeline import workdir as workdir_lib
from ldm_jax.pipeline.model import pixels_from_uint8
from ldm_jax.train import autoencoder as autoencoder_stage
from ldm_jax.train import frozen, run
from ldm_jax.train.latent_cache import cache_latents
from tests.conftest import TEST_XLA_FLAGS

RULES = mesh_lib.DEFAULT_AXIS_RULES
NUM_RECORDS = 37  # not a multiple of the 8 devices: the last batch is padded
STAGE1_STEP = 3


def _tiny_config():
    config = config_lib.base_config()
    config.data.image_size = 32
    config.data.num_train_examples = NUM_RECORDS
    ae = config.autoencoder
    ae.model.block_out_channels = (16, 16)
    ae.model.norm_num_groups = 8
    ae.model.mid_block_attention = False
    ae.train.batch_size = 8  # the latent scale is measured on one batch
    ae.latent_scale_batches = 1
    config.diffusion.train.batch_size = 16  # 3 global batches of 16 over the 37 records
    return config


def _one_device():
    return mesh_lib.create_mesh(data=1, devices=jax.devices()[:1])


def _stage1_checkpoint(config, workdir):
    """A stage-1 checkpoint, untrained: the cache needs the encoder's weights, not quality."""
    checkpointer = Checkpointer(
        workdir_lib.checkpoint_dir(workdir, workdir_lib.AUTOENCODER), async_checkpointing=False
    )
    state, _ = autoencoder_stage.restore_or_create(config, checkpointer, _one_device(), RULES)
    step = np.asarray(STAGE1_STEP, state.step.dtype)
    checkpointer.save(STAGE1_STEP, state.replace(generator=state.generator.replace(step=step)))
    checkpointer.close()
    return workdir


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    config = _tiny_config()
    return config, _stage1_checkpoint(config, str(tmp_path_factory.mktemp("stage1")))


@pytest.fixture(scope="module")
def reference(stage1):
    """The encoder's means and stds of the whole split, computed on one device."""
    config, workdir = stage1
    params, _ = frozen.load_autoencoder(config, workdir, _one_device(), RULES)
    model = builders.build_autoencoder(config)
    source = shapes.ShapesSource("train", image_size=32, num_examples=NUM_RECORDS)
    images = np.stack([source[i]["image"] for i in range(NUM_RECORDS)])
    posterior = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(
        params, pixels_from_uint8(images)
    )
    return np.asarray(posterior.mean), np.asarray(posterior.std), source


@pytest.fixture(scope="module")
def cached(stage1, tmp_path_factory):
    """A cache written on 8 devices, with batch rows replicated over the 'tensor' axis."""
    config, workdir = stage1
    out = str(tmp_path_factory.mktemp("cache"))
    mesh = mesh_lib.create_mesh(data=2, fsdp=2, tensor=2)
    return out, mesh, cache_latents(config, workdir, out, mesh, RULES, records_per_shard=16)


def _assert_matches_reference(cache, reference):
    """Every source record once, in source order, with the one-device posterior."""
    mean, std, source = reference
    assert len(cache) == NUM_RECORDS
    records = [cache[i] for i in range(NUM_RECORDS)]
    np.testing.assert_array_equal([r["index"] for r in records], np.arange(NUM_RECORDS))
    assert [r["caption"] for r in records] == [source[i]["caption"] for i in range(NUM_RECORDS)]
    assert [r["label"] for r in records] == [source[i]["label"] for i in range(NUM_RECORDS)]
    assert records[0]["latent_mean"].dtype == records[0]["latent_std"].dtype == np.float32
    np.testing.assert_allclose(np.stack([r["latent_mean"] for r in records]), mean, atol=1e-5)
    np.testing.assert_allclose(
        np.stack([r["latent_std"] for r in records]), std, rtol=1e-5, atol=1e-5
    )


def test_cache_holds_every_record_once_as_a_one_device_encode(cached, reference):
    out, _, _ = cached
    _assert_matches_reference(LatentCacheSource(out), reference)


def test_metadata_describes_the_cache(stage1, cached):
    config, workdir = stage1
    out, _, metadata = cached
    with open(f"{workdir}/{workdir_lib.LATENT_SCALE_FILE}", encoding="utf-8") as f:
        latent_scale = json.load(f)["latent_scale"]
    cache = LatentCacheSource(out)
    assert metadata == cache.metadata
    assert metadata["num_records"] == NUM_RECORDS
    assert metadata["latent_shape"] == [16, 16, 4]
    assert metadata["latent_scale"] == pytest.approx(latent_scale)
    assert metadata["autoencoder_step"] == STAGE1_STEP
    assert metadata["autoencoder"]["kind"] == "kl"
    assert metadata["source"] == {
        "source": "shapes",
        "split": "train",
        "image_size": 32,
        "num_records": NUM_RECORDS,
        "seed": 0,
    }
    assert metadata["files"] == [f"latents-00000-of-00001-{k:05d}.array_record" for k in range(3)]
    cache.check_latent_shape(config_lib.latent_shape(config))


def test_the_same_cache_is_kept_and_another_refused(stage1, cached):
    config, workdir = stage1
    out, mesh, metadata = cached
    assert cache_latents(config, workdir, out, mesh, RULES) == metadata
    with pytest.raises(FileExistsError, match=r"differs in \['source'\].*another --out"):
        cache_latents(config, workdir, out, mesh, RULES, split="validation")


def test_a_damaged_cache_is_not_taken_for_finished(stage1, cached, tmp_path):
    config, workdir = stage1
    out, mesh, metadata = cached
    damaged = shutil.copytree(out, tmp_path / "damaged")
    os.remove(damaged / metadata["files"][-1])
    with pytest.raises(FileExistsError, match="damaged.*delete"):
        cache_latents(config, workdir, str(damaged), mesh, RULES)


def test_refuses_a_folder_that_is_not_a_cache(stage1, tmp_path):
    config, workdir = stage1
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds no latent cache \(found \['notes.txt'\]"):
        cache_latents(config, workdir, str(tmp_path), mesh_lib.create_mesh(), RULES)


def test_a_vq_cache_stores_the_codes_over_an_unfinished_cache(tmp_path):
    config = _tiny_config()
    config.autoencoder.kind = "vq"
    config.autoencoder.model.num_embeddings = 32
    workdir, out = _stage1_checkpoint(config, str(tmp_path / "stage1")), tmp_path / "cache"
    out.mkdir()
    (out / "latents-00002-of-00003-00000.array_record").write_bytes(b"left by a stopped run")
    metadata = cache_latents(config, workdir, str(out), mesh_lib.create_mesh(), RULES)
    assert metadata["keys"][-1] == "codes" and metadata["autoencoder"]["kind"] == "vq"
    assert sorted(os.listdir(out)) == ["latents-00000-of-00001-00000.array_record", "metadata.json"]

    cache = LatentCacheSource(str(out))
    codes = np.stack([cache[i]["codes"] for i in range(NUM_RECORDS)])
    assert codes.dtype == np.int32 and codes.shape == (NUM_RECORDS, 16, 16)
    params, _ = frozen.load_autoencoder(config, workdir, _one_device(), RULES)
    model = builders.build_autoencoder(config)
    source = shapes.ShapesSource("train", image_size=32, num_examples=NUM_RECORDS)
    images = pixels_from_uint8(np.stack([source[i]["image"] for i in range(NUM_RECORDS)]))
    expected = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_indices"))(
        params, images
    )
    np.testing.assert_array_equal(codes, expected)


_PROCESS_SCRIPT = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
from ldm_jax import config as config_lib
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.train.latent_cache import cache_latents
with open(sys.argv[3], encoding="utf-8") as f:
    config = config_lib.from_json(f.read())
cache_latents(
    config, sys.argv[4], sys.argv[5], mesh_lib.create_mesh(), mesh_lib.DEFAULT_AXIS_RULES,
    records_per_shard=8,
)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_their_own_ranges_of_one_cache(stage1, reference, tmp_path):
    config, workdir = stage1
    config_path, out = tmp_path / "config.json", str(tmp_path / "cache")
    config_path.write_text(config_lib.to_json(config))
    env = {**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS}  # 4 devices per process, not 8
    port = _free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS_SCRIPT, str(port), str(i), config_path, workdir, out],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        errors = [p.communicate(timeout=120)[1] for p in processes]
    finally:
        for process in processes:  # one failed process leaves the other waiting at a barrier
            process.kill()
    for process, error in zip(processes, errors, strict=True):
        assert process.returncode == 0, error[-3000:]

    cache = LatentCacheSource(out)
    # Process 0 encodes records 0..17 (3 shards of at most 8), process 1 records 18..36.
    assert cache.metadata["files"] == [
        f"latents-{p:05d}-of-00002-{k:05d}.array_record" for p in range(2) for k in range(3)
    ]
    _assert_matches_reference(cache, reference)


def test_stage_two_trains_from_the_cache(stage1, cached, tmp_path):
    config, workdir = stage1
    out, _, _ = cached
    config = config_lib.from_json(config_lib.to_json(config))
    config.stage = "diffusion"
    config.data.latent_cache = out
    config.autoencoder.workdir = workdir
    dm = config.diffusion
    dm.unet.block_out_channels = (16, 16)
    dm.unet.norm_num_groups = 8
    dm.unet.num_attention_heads = 2
    dm.text_encoder.width = 16
    dm.text_encoder.num_layers = 1
    dm.train.steps = 2
    config.sample.num_steps = 2
    config.train.log_every = 1
    config.train.async_checkpointing = False
    assert run.train(config, str(tmp_path))
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
        logged = [json.loads(line) for line in f]
    assert [m["step"] for m in logged if m["stage"] == "diffusion"] == [1, 2]
    assert all(np.isfinite(m["loss"]) for m in logged)


def test_reconstruction_evaluation_of_a_workdir(stage1, reference, tmp_path):
    """`ldm-jax evaluate --what=reconstruction`: the workdir's EMA autoencoder, scored."""
    config, workdir = stage1
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config_lib.to_json(config))
    results = evaluate_workdir(workdir, str(tmp_path), num_images=10)
    assert results["num_images"] == 10 and results["step"] == STAGE1_STEP
    assert 0 < results["psnr"] < 100 and -1 <= results["ssim"] <= 1
    assert "lpips" not in results  # no LPIPS weights in the config
    with open(tmp_path / "reconstruction.json", encoding="utf-8") as f:
        assert json.load(f) == results
    assert os.path.exists(tmp_path / "reconstruction.png")
