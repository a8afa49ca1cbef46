import collections
import pickle

import numpy as np
import pytest

from ldm_jax.data import shapes


def _chroma(image: np.ndarray) -> np.ndarray:
    return image.max(axis=-1).astype(np.int16) - image.min(axis=-1)


def test_same_index_gives_identical_record_across_instances_and_pickling():
    first = shapes.ShapesSource("train", image_size=32)
    second = pickle.loads(pickle.dumps(shapes.ShapesSource("train", image_size=32)))
    for index in (0, 1, 49_999):
        a, b = first[index], second[index]
        assert a["image"].tobytes() == b["image"].tobytes()
        assert a["label"] == b["label"] and a["caption"] == b["caption"]


def test_splits_and_seeds_are_different_streams():
    train = shapes.ShapesSource("train")
    validation = shapes.ShapesSource("validation")
    reseeded = shapes.ShapesSource("train", seed=1)
    for index in range(20):
        image = train[index]["image"]
        assert not np.array_equal(image, validation[index]["image"])
        assert not np.array_equal(image, reseeded[index]["image"])
    assert len(train) == 50_000 and len(validation) == 1_000


@pytest.mark.parametrize("image_size", [32, 64, 128, 256])
def test_records_have_the_common_format_at_every_size(image_size):
    record = shapes.ShapesSource("validation", image_size=image_size)[3]
    assert record["image"].shape == (image_size, image_size, 3)
    assert record["image"].dtype == np.uint8
    assert record["label"].dtype == np.int32 and record["label"].shape == ()
    # The scene does not depend on the resolution.
    assert record["caption"] == shapes.ShapesSource("validation", image_size=32)[3]["caption"]


def test_caption_names_the_labelled_shape_colour_and_position():
    source = shapes.ShapesSource("train", image_size=64)
    vocabulary = set(shapes.caption_vocabulary())
    with_position = 0
    for index in range(300):
        record = source[index]
        shape, colour = shapes.describe_label(record["label"])
        caption = record["caption"]
        assert caption.startswith(f"a {colour} {shape}")
        assert set(caption.split()) <= vocabulary
        position = caption.removeprefix(f"a {colour} {shape}").strip()
        if not position:
            continue
        with_position += 1
        assert position in shapes.POSITIONS
        # The shape's bounding-box centre lies in the named cell of a 3x3 grid.
        rows, columns = np.nonzero(_chroma(record["image"]) > 80)
        center_y = (rows.min() + rows.max() + 1) / 2
        center_x = (columns.min() + columns.max() + 1) / 2
        row, column = divmod(shapes.POSITIONS.index(position), 3)
        assert column * 64 / 3 - 1 <= center_x <= (column + 1) * 64 / 3 + 1
        assert row * 64 / 3 - 1 <= center_y <= (row + 1) * 64 / 3 + 1
    # About a third of the captions omit the position.
    assert 0.55 <= with_position / 300 <= 0.8


def test_shapes_are_large_and_inside_a_low_chroma_background():
    source = shapes.ShapesSource("train", image_size=64)
    for index in range(100):
        chroma = _chroma(source[index]["image"])
        border = np.concatenate([chroma[0], chroma[-1], chroma[:, 0], chroma[:, -1]])
        assert border.max() < 30
        rows, columns = np.nonzero(chroma > 80)
        width = columns.max() - columns.min() + 1
        assert 0.3 * 64 <= width <= 0.7 * 64


def test_classes_are_roughly_balanced():
    source = shapes.ShapesSource("train", num_examples=2000)
    counts = collections.Counter(int(source[i]["label"]) for i in range(2000))
    expected = 2000 / shapes.NUM_CLASSES
    assert set(counts) == set(range(shapes.NUM_CLASSES))
    assert all(0.6 * expected <= count <= 1.4 * expected for count in counts.values())


def test_labels_and_prompts_cover_every_shape_and_colour():
    assert len(shapes.COLOURS) >= 6
    assert shapes.NUM_CLASSES == len(shapes.SHAPES) * len(shapes.COLOURS)
    prompts = shapes.class_prompts()
    assert [label for _, label in prompts] == list(range(shapes.NUM_CLASSES))
    for prompt, label in prompts:
        shape, colour = shapes.describe_label(label)
        assert prompt == f"a {colour} {shape}"
        assert shapes.label_of(shape, colour) == label
    assert shapes.describe_label(len(shapes.COLOURS)) == ("square", next(iter(shapes.COLOURS)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "test"}, "train"),
        ({"image_size": 48}, "256"),
        ({"num_examples": 0}, "positive"),
    ],
)
def test_invalid_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        shapes.ShapesSource(**kwargs)


def test_out_of_range_index_and_label_raise():
    source = shapes.ShapesSource("validation", num_examples=10)
    with pytest.raises(IndexError):
        source[10]
    with pytest.raises(ValueError, match="label"):
        shapes.describe_label(shapes.NUM_CLASSES)
