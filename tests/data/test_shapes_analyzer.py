import numpy as np
import pytest

from ldm_jax.data import shapes, shapes_analyzer


def _dataset_batch(split: str, image_size: int, count: int) -> tuple[np.ndarray, list[int]]:
    source = shapes.ShapesSource(split, image_size=image_size)
    records = [source[index] for index in range(count)]
    return np.stack([r["image"] for r in records]), [int(r["label"]) for r in records]


@pytest.mark.parametrize("image_size", [32, 64])
def test_reads_dataset_images_right(image_size):
    # 2 sizes x 2 splits x 500 images = 2000 images.
    for split in ("train", "validation"):
        images, labels = _dataset_batch(split, image_size, 500)
        metrics = shapes_analyzer.score(images, labels)
        assert metrics["shape_accuracy"] >= 0.98, (split, metrics)
        assert metrics["colour_accuracy"] >= 0.98, (split, metrics)


def test_reads_large_and_noisy_images():
    images, labels = _dataset_batch("validation", 256, 12)
    assert shapes_analyzer.score(images, labels)["both_accuracy"] == 1.0
    images, labels = _dataset_batch("validation", 32, 200)
    noise = np.random.default_rng(0).normal(0, 10, images.shape)
    noisy = np.clip(images + noise, 0, 255).astype(np.uint8)
    assert shapes_analyzer.score(noisy, labels)["both_accuracy"] >= 0.95


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((32, 32, 3), np.uint8),
        np.full((64, 64, 3), 255, np.uint8),
        np.full((32, 32, 3), 128, np.uint8) + np.arange(32, dtype=np.uint8)[:, None, None],
        np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8),
    ],
    ids=["black", "white", "grey-gradient", "uniform-noise"],
)
def test_images_without_a_shape_read_as_none(image):
    reading = shapes_analyzer.analyze(image)
    assert (reading.shape, reading.colour) == ("none", "none")


def test_score_reports_overall_and_per_class_accuracy():
    images, labels = _dataset_batch("validation", 32, 36)
    metrics = shapes_analyzer.score(images, labels)
    assert metrics["both_accuracy"] == 1.0
    assert {f"colour_accuracy/{c}" for c in shapes.COLOURS} <= set(metrics)
    assert {f"shape_accuracy/{s}" for s in shapes.SHAPES} <= set(metrics)
    # Labels with the next colour and the same shape: every colour is wrong, every shape right.
    colours = list(shapes.COLOURS)
    next_colour = {colour: colours[(i + 1) % len(colours)] for i, colour in enumerate(colours)}
    shifted = [
        shapes.label_of(shape, next_colour[colour])
        for shape, colour in map(shapes.describe_label, labels)
    ]
    metrics = shapes_analyzer.score(images, shifted)
    assert metrics["colour_accuracy"] == 0.0 and metrics["shape_accuracy"] == 1.0
    assert metrics["both_accuracy"] == 0.0


def test_rejects_images_that_are_not_uint8_rgb():
    with pytest.raises(ValueError, match="uint8"):
        shapes_analyzer.analyze(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="labels"):
        shapes_analyzer.score(np.zeros((2, 32, 32, 3), np.uint8), [0])
