import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from ldm_jax.data import pipeline, shapes
from ldm_jax.data.tokenizer import build_word_tokenizer
from ldm_jax.data.transforms import NormalizeImage, RandomFlip, SelectKeys, Tokenize

_OPERATIONS = (RandomFlip(), NormalizeImage(), SelectKeys(("image", "label")))


def _loader(seed: int = 0, num_examples: int = 20, **kwargs):
    source = shapes.ShapesSource("validation", num_examples=num_examples)
    return pipeline.make_loader(source, _OPERATIONS, global_batch_size=8, seed=seed, **kwargs)


def _take(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


def _assert_same_batches(first: list[dict], second: list[dict]) -> None:
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_batches_have_the_expected_shapes_and_dtypes():
    batch = next(iter(_loader()))
    assert sorted(batch) == ["image", "label"]
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32


def test_same_seed_same_batches_other_seed_other_batches():
    first = _take(iter(_loader(seed=1)), 3)
    _assert_same_batches(first, _take(iter(_loader(seed=1)), 3))
    other = _take(iter(_loader(seed=2)), 3)
    first_labels = np.stack([batch["label"] for batch in first])
    assert not np.array_equal(first_labels, np.stack([batch["label"] for batch in other]))


def test_unshuffled_single_epoch_reads_every_record_once_in_order():
    batches = list(_loader(num_examples=20, shuffle=False, num_epochs=1, drop_remainder=False))
    assert [len(batch["label"]) for batch in batches] == [8, 8, 4]
    source = shapes.ShapesSource("validation", num_examples=20)
    expected = [int(source[index]["label"]) for index in range(20)]
    assert np.concatenate([batch["label"] for batch in batches]).tolist() == expected


def test_restored_iterator_yields_exactly_the_next_batches_across_epochs():
    iterator = iter(_loader())
    _take(iterator, 2)
    state = iterator.get_state()
    # 20 records in batches of 8: the next batches cross the first epoch boundary.
    expected = _take(iterator, 3)
    resumed = iter(_loader())
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 3), expected)


def _captioned_loader(batch_level: bool, **kwargs):
    """Flipped images and tokenized captions, tokenized per record or once per batch."""
    source = shapes.ShapesSource("validation", num_examples=20)
    tokenizer_json = build_word_tokenizer(shapes.caption_vocabulary()).to_str()
    text = [Tokenize(tokenizer_json, max_length=12), SelectKeys(("image", "tokens"))]
    operations, batch_operations = (
        ([RandomFlip()], text) if batch_level else ([RandomFlip(), *text], [])
    )
    return pipeline.make_loader(
        source,
        operations,
        batch_operations=batch_operations,
        global_batch_size=8,
        seed=3,
        **kwargs,
    )


def _assert_same_captioned_batches(first: list[dict], second: list[dict]) -> None:
    for a, b in zip(first, second, strict=True):
        assert sorted(a) == sorted(b) == ["image", "tokens"]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        assert a["tokens"].dtype == np.int32 and a["tokens"].shape == (8, 12)


def test_batch_operations_and_read_threads_leave_the_batches_unchanged():
    per_record = _take(iter(_captioned_loader(batch_level=False)), 4)
    _assert_same_captioned_batches(_take(iter(_captioned_loader(batch_level=True)), 4), per_record)
    threaded = iter(_captioned_loader(batch_level=True, read_threads=4))
    _assert_same_captioned_batches(_take(threaded, 4), per_record)


def test_a_state_saved_with_per_record_operations_resumes_with_batch_operations():
    # Checkpoints written before captions were tokenized per batch resume where they stopped.
    iterator = iter(_captioned_loader(batch_level=False))
    _take(iterator, 2)
    state = iterator.get_state()
    expected = _take(iterator, 2)
    resumed = iter(_captioned_loader(batch_level=True))
    resumed.set_state(state)
    _assert_same_captioned_batches(_take(resumed, 2), expected)


def test_batch_size_must_divide_over_processes(monkeypatch):
    with pytest.raises(ValueError, match="global_batch_size=0"):
        pipeline.make_loader(shapes.ShapesSource(), (), global_batch_size=0, seed=0)
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ValueError, match="global_batch_size=8 with 3 processes"):
        pipeline.make_loader(shapes.ShapesSource(), (), global_batch_size=8, seed=0)


def test_global_batch_is_sharded_over_the_mesh():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    local = next(iter(_loader()))
    batch = pipeline.global_batch(local, sharding)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].shape == (8,)
    assert batch["image"].sharding == sharding and batch["label"].sharding == sharding
    assert len(batch["image"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])


def test_iterator_resumes_from_an_orbax_checkpoint(tmp_path):
    iterator = iter(_loader())
    _take(iterator, 2)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = _take(iterator, 1)
    resumed = iter(_loader())
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.restore(
            2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed))
        )
    _assert_same_batches(_take(resumed, 1), expected)
