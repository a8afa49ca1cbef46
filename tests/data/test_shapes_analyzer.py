import functools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm_jax.data import shapes, shapes_analyzer


@functools.cache
def _dataset_batch(split: str, image_size: int, count: int) -> tuple[np.ndarray, list[int]]:
    source = shapes.ShapesSource(split, image_size=image_size)
    records = [source[index] for index in range(count)]
    return np.stack([r["image"] for r in records]), [int(r["label"]) for r in records]


def _blur_like_an_autoencoder(images: np.ndarray, sigma: float, noise_std: float) -> np.ndarray:
    """Gaussian-blurs each image by ``sigma`` pixels and adds Gaussian noise."""
    blur = ImageFilter.GaussianBlur(sigma)
    blurred = np.stack([np.asarray(Image.fromarray(image).filter(blur)) for image in images])
    noise = np.random.default_rng(0).normal(0, noise_std, images.shape)
    return np.clip(np.rint(blurred + noise), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("image_size", [32, 64])
def test_reads_dataset_images_right(image_size):
    # 2 sizes x 2 splits x 500 images = 2000 images.
    for split in ("train", "validation"):
        images, labels = _dataset_batch(split, image_size, 500)
        metrics = shapes_analyzer.score(images, labels)
        assert metrics["shape_accuracy"] >= 0.98, (split, metrics)
        assert metrics["colour_accuracy"] >= 0.98, (split, metrics)


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize(("blur_sigma", "min_shape_accuracy"), [(1.0, 0.95), (1.5, 0.90)])
def test_reads_blurred_images_like_autoencoder_reconstructions(
    image_size, blur_sigma, min_shape_accuracy
):
    images, labels = _dataset_batch("validation", image_size, 600)
    # The blur is given in pixels of a 32-pixel image, so it hides the same detail at 64.
    blurred = _blur_like_an_autoencoder(images, blur_sigma * image_size / 32, noise_std=6)
    metrics = shapes_analyzer.score(blurred, labels)
    for shape in shapes.SHAPES:
        assert metrics[f"shape_accuracy/{shape}"] >= min_shape_accuracy, metrics
    assert metrics["colour_accuracy"] >= 0.98, metrics


def test_diagnostics_match_the_shapes_geometry():
    images, labels = _dataset_batch("validation", 64, 60)
    readings = shapes_analyzer.analyze_batch(images)
    expected_shapes = np.array([shapes.describe_label(label)[0] for label in labels])
    skewness = np.array([r.rows_skewness for r in readings])
    cumulant_ratio = np.array([r.diagonal_cumulant_ratio for r in readings])
    # An upright triangle's rows are skewed towards its base; circles and squares are level.
    np.testing.assert_allclose(skewness[expected_shapes == "triangle"], -0.566, atol=0.03)
    np.testing.assert_allclose(skewness[expected_shapes != "triangle"], 0, atol=0.03)
    # A square's fourth cumulant along its diagonals is half that along its sides.
    np.testing.assert_allclose(cumulant_ratio[expected_shapes == "square"], 0.5, atol=0.03)
    np.testing.assert_allclose(cumulant_ratio[expected_shapes == "circle"], 1, atol=0.03)


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


@pytest.mark.parametrize("image_size", [32, 64])
def test_uniform_noise_reads_as_none(image_size):
    noise = np.random.default_rng(1).integers(0, 256, (40, image_size, image_size, 3))
    readings = shapes_analyzer.analyze_batch(noise.astype(np.uint8))
    assert {(r.shape, r.colour) for r in readings} == {("none", "none")}


@pytest.mark.parametrize(("height", "width"), [(1, 1), (2, 3), (5, 300), (300, 7)])
def test_reads_images_of_any_size_without_failing(height, width):
    image = np.full((height, width, 3), 120, np.uint8)
    image[height // 4 : height // 2 + 1, width // 4 : width // 2 + 1] = shapes.COLOURS["red"]
    reading = shapes_analyzer.analyze(image)
    assert reading.shape in (*shapes.SHAPES, "none")
    assert reading.colour in ("red", "none")


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
