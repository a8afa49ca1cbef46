"""Stage batches from the config: keys, tokens of the right records, exact resume."""

import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax.data import shapes
from ldm_jax.data.in_memory import InMemorySource
from ldm_jax.data.tokenizer import build_word_tokenizer, encode
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.train import data as data_lib

_NUM_RECORDS, _BATCH = 24, 8


def _encoded_source() -> tuple[InMemorySource, list[str]]:
    """Latent records whose mean holds the record's index, each with its own caption."""
    vocabulary = shapes.caption_vocabulary()
    captions = [f"a {vocabulary[i % len(vocabulary)]} {i % 3}" for i in range(_NUM_RECORDS)]
    means = np.broadcast_to(
        np.arange(_NUM_RECORDS, dtype=np.float32)[:, None, None, None], (_NUM_RECORDS, 2, 2, 4)
    )
    arrays = {
        "latent_mean": np.ascontiguousarray(means),
        "latent_std": np.ones((_NUM_RECORDS, 2, 2, 4), np.float32),
        "label": np.arange(_NUM_RECORDS, dtype=np.int32),
    }
    return InMemorySource(arrays, captions), captions


def _batches(source, tokenizer_json, device_prefetch=1):
    data = config_lib.base_config().data
    data.source = "shapes"
    data.device_prefetch = device_prefetch
    return data_lib.make_batches(
        data,
        source,
        batch_size=_BATCH,
        seed=5,
        mesh=mesh_lib.create_mesh(data=-1),
        tokenizer_json=tokenizer_json,
        keys=("latent_mean", "latent_std", "tokens"),
        images=False,
    )


def test_batches_hold_the_asked_keys_and_each_record_its_own_caption_tokens():
    source, captions = _encoded_source()
    tokenizer = build_word_tokenizer(captions)
    max_length = config_lib.base_config().data.max_caption_length
    _, batches = _batches(source, tokenizer.to_str())
    seen = []
    for _ in range(3):  # one epoch
        batch = next(batches)
        assert sorted(batch) == ["latent_mean", "latent_std", "tokens"]
        assert batch["tokens"].shape == (_BATCH, max_length)
        indices = np.asarray(batch["latent_mean"])[:, 0, 0, 0].astype(int)
        expected = encode(tokenizer, [captions[i] for i in indices], max_length)
        np.testing.assert_array_equal(np.asarray(batch["tokens"]), expected)
        seen += indices.tolist()
    assert sorted(seen) == list(range(_NUM_RECORDS))


@pytest.mark.parametrize("saved_prefetch, resumed_prefetch", [(0, 0), (1, 0), (2, 1)])
def test_a_restored_iterator_gives_the_batches_that_followed(saved_prefetch, resumed_prefetch):
    source, captions = _encoded_source()
    tokenizer_json = build_word_tokenizer(captions).to_str()
    iterator, batches = _batches(source, tokenizer_json, saved_prefetch)
    next(batches), next(batches)
    # The position after the batches taken, not after those read ahead onto the devices.
    state = iterator.get_state()
    expected = [next(batches) for _ in range(3)]  # across the epoch boundary
    resumed_iterator, resumed = _batches(source, tokenizer_json, resumed_prefetch)
    resumed_iterator.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_prefetched_batches_are_the_batches_read_without_prefetch():
    source, captions = _encoded_source()
    tokenizer_json = build_word_tokenizer(captions).to_str()
    _, plain = _batches(source, tokenizer_json, device_prefetch=0)
    _, ahead = _batches(source, tokenizer_json, device_prefetch=2)
    for _ in range(4):
        want, got = next(plain), next(ahead)
        for key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
