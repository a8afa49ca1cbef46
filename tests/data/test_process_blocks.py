"""Global batches that do not depend on the process count, and their iterator state."""

import json

import jax
import numpy as np
import pytest

from ldm_jax.data import pipeline, shapes
from ldm_jax.data.process_blocks import rescale_loader_state
from ldm_jax.data.transforms import RandomFlip, SelectKeys


def _loader(monkeypatch, process_index, process_count, num_epochs=None):
    monkeypatch.setattr(jax, "process_index", lambda: process_index)
    monkeypatch.setattr(jax, "process_count", lambda: process_count)
    return pipeline.make_loader(
        shapes.ShapesSource("validation", num_examples=20),
        [RandomFlip(), SelectKeys(("image", "label"))],
        global_batch_size=8,
        seed=3,
        num_epochs=num_epochs,
    )


def _global_batches(monkeypatch, process_count, count):
    """The first ``count`` global batches, each the processes' local batches in order."""
    iterators = [iter(_loader(monkeypatch, p, process_count)) for p in range(process_count)]
    batches = []
    for _ in range(count):
        local = [next(iterator) for iterator in iterators]
        batches.append({k: np.concatenate([b[k] for b in local]) for k in ("image", "label")})
    return batches


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batches_are_the_same_for_any_process_count(monkeypatch, process_count):
    # 5 batches of 8 from 20 records: across an epoch boundary, random flips included.
    expected = _global_batches(monkeypatch, 1, 5)
    for a, b in zip(expected, _global_batches(monkeypatch, process_count, 5), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_state_saved_on_two_processes_resumes_on_one(monkeypatch):
    saved = iter(_loader(monkeypatch, 0, 2))
    for _ in range(3):
        next(saved)
    state = json.loads(saved.get_state())
    resumed = iter(_loader(monkeypatch, 0, 1))
    resumed.set_state(json.dumps(rescale_loader_state(state, 2, 1)).encode())
    straight = iter(_loader(monkeypatch, 0, 1))
    for _ in range(3):
        next(straight)
    np.testing.assert_array_equal(next(resumed)["image"], next(straight)["image"])


def test_finite_sequence_splits_its_last_partial_batch_in_order(monkeypatch):
    counts = [[len(b["label"]) for b in _loader(monkeypatch, p, 2, num_epochs=1)] for p in range(2)]
    assert counts == [[4, 4, 4], [4, 4]]  # 20 records: 8, 8, then 4 on process 0


def test_state_of_grain_workers_is_not_rescaled():
    state = {"worker_count": 2, "last_seen_indices": {"0": 3, "1": 4}}
    with pytest.raises(ValueError, match="resume it on 2 processes"):
        rescale_loader_state(state, 2, 1)
