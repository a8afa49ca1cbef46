"""The latent cache format: records, shards written by several processes, the grain source."""

import json
import os
import pickle

import numpy as np
import pytest

from ldm_jax.data import latent_cache, pipeline
from ldm_jax.data.latent_cache import LatentCacheSource, LatentCacheWriter
from ldm_jax.data.transforms import SelectKeys

LATENT_SHAPE = (4, 4, 3)


def _record(i):
    rng = np.random.default_rng(i)
    return {
        "latent_mean": rng.normal(size=LATENT_SHAPE).astype(np.float32),
        "latent_std": rng.uniform(0.1, 1, size=LATENT_SHAPE).astype(np.float32),
        "label": np.int32(i % 5),
        "caption": f"ein grünes Dreieck №{i} ✓",
        "codes": rng.integers(0, 512, size=LATENT_SHAPE[:2]).astype(np.int32),
    }


def _metadata(**overrides):
    return {
        "latent_shape": list(LATENT_SHAPE),
        "latent_scale": 0.5,
        "keys": ["latent_mean", "latent_std", "label", "caption", "codes"],
        "autoencoder_step": 7,
        "source": {"source": "shapes", "split": "train"},
        **overrides,
    }


def _write_cache(directory, num_records, process_count=2, records_per_shard=3):
    """Each simulated process writes its contiguous range, as ``cache_latents`` does."""
    for process in range(process_count):
        start = process * num_records // process_count
        stop = (process + 1) * num_records // process_count
        with LatentCacheWriter(directory, process, process_count, records_per_shard) as writer:
            for i in range(start, stop):
                writer.write(_record(i))
    return latent_cache.write_metadata(directory, _metadata())


def _assert_records_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, str):
            assert actual[key] == value
        else:
            assert actual[key].dtype == value.dtype, key
            np.testing.assert_array_equal(actual[key], value)


def test_record_round_trip_keeps_dtypes_shapes_and_unicode():
    record = _record(3)
    decoded = latent_cache.decode_record(latent_cache.encode_record(record))
    _assert_records_equal(decoded, record)
    assert decoded["latent_mean"].shape == LATENT_SHAPE
    assert decoded["codes"].shape == LATENT_SHAPE[:2]
    assert np.ndim(decoded["label"]) == 0 and decoded["label"] == 3
    decoded["latent_mean"][0, 0, 0] = 1.0  # arrays come back writable


def test_record_refuses_what_it_cannot_store_without_pickle():
    with pytest.raises(TypeError, match="'meta'"):
        latent_cache.encode_record({"meta": {"a": 1}})
    with pytest.raises(TypeError, match="'names'.*dtype object"):
        latent_cache.encode_record({"names": np.array(["a", None], dtype=object)})


def test_shards_of_several_processes_read_back_in_source_order(tmp_path):
    metadata = _write_cache(str(tmp_path), num_records=11)
    assert metadata["num_records"] == 11
    # Process 0 wrote 5 records (2 shards of 3), process 1 wrote 6 (2 shards).
    assert metadata["files"] == [
        "latents-00000-of-00002-00000.array_record",
        "latents-00000-of-00002-00001.array_record",
        "latents-00001-of-00002-00000.array_record",
        "latents-00001-of-00002-00001.array_record",
    ]
    with open(tmp_path / "metadata.json", encoding="utf-8") as f:
        assert json.load(f) == metadata
    source = LatentCacheSource(str(tmp_path))
    assert len(source) == 11
    assert source.latent_shape == LATENT_SHAPE and source.latent_scale == 0.5
    for i in range(11):
        _assert_records_equal(source[i], _record(i))


def test_a_process_without_records_writes_no_file(tmp_path):
    with LatentCacheWriter(str(tmp_path), 1, 2) as writer:
        assert writer.num_written == 0
    assert os.listdir(tmp_path) == []


def test_source_pickles_and_reads_after_unpickling(tmp_path):
    _write_cache(str(tmp_path), num_records=5)
    source = LatentCacheSource(str(tmp_path))
    _ = source[0]  # opened readers must not travel with the pickle
    copy = pickle.loads(pickle.dumps(source))
    assert len(copy) == 5 and copy.metadata == source.metadata
    _assert_records_equal(copy[4], _record(4))


def test_source_batches_through_the_grain_loader(tmp_path):
    _write_cache(str(tmp_path), num_records=10)
    keys = ("latent_mean", "latent_std", "label")
    loader = pipeline.make_loader(
        LatentCacheSource(str(tmp_path)),
        [SelectKeys(keys)],
        global_batch_size=4,
        seed=0,
        shuffle=False,
        num_epochs=1,
        worker_count=0,
    )
    batches = list(loader)
    assert len(batches) == 2  # 10 records, drop_remainder
    assert batches[0]["latent_mean"].shape == (4, *LATENT_SHAPE)
    assert batches[0]["latent_std"].dtype == np.float32
    np.testing.assert_array_equal(batches[1]["label"], [4 % 5, 5 % 5, 6 % 5, 7 % 5])
    np.testing.assert_array_equal(batches[1]["latent_std"][3], _record(7)["latent_std"])


def test_missing_folder_and_unfinished_cache_say_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*ldm-jax cache-latents"):
        LatentCacheSource(str(tmp_path / "nowhere"))
    with LatentCacheWriter(str(tmp_path), 0, 1) as writer:
        writer.write(_record(0))
    with pytest.raises(FileNotFoundError, match="metadata.json not found.*cache-latents"):
        LatentCacheSource(str(tmp_path))


def test_records_lost_after_metadata_are_detected(tmp_path):
    metadata = _write_cache(str(tmp_path), num_records=8)
    with open(tmp_path / "metadata.json", "w", encoding="utf-8") as f:
        json.dump({**metadata, "num_records": 9}, f)
    with pytest.raises(ValueError, match="num_records=9 but its shards hold 8"):
        LatentCacheSource(str(tmp_path))
    os.remove(tmp_path / metadata["files"][-1])
    with pytest.raises(FileNotFoundError, match="incomplete"):
        LatentCacheSource(str(tmp_path))


def test_metadata_count_must_match_the_shards(tmp_path):
    with LatentCacheWriter(str(tmp_path), 0, 1) as writer:
        writer.write(_record(0))
    with pytest.raises(ValueError, match="num_records=2 but the shards"):
        latent_cache.write_metadata(str(tmp_path), _metadata(num_records=2))


def test_latent_shape_mismatch_names_the_config_keys(tmp_path):
    _write_cache(str(tmp_path), num_records=2)
    source = LatentCacheSource(str(tmp_path))
    source.check_latent_shape(LATENT_SHAPE)
    with pytest.raises(ValueError, match=r"config.data.image_size and config.autoencoder.model"):
        source.check_latent_shape((8, 8, 4))
