import pickle

import numpy as np
import pytest

from ldm_jax.data import shapes
from ldm_jax.data.tokenizer import build_word_tokenizer, encode
from ldm_jax.data.transforms import (
    NormalizeImage,
    RandomFlip,
    ResizeAndCrop,
    SelectKeys,
    Tokenize,
)


def _record(image: np.ndarray) -> dict:
    return {"image": image, "label": np.int32(3), "caption": "a red circle"}


def _halves_image(height: int, width: int) -> np.ndarray:
    """Left half red, right half blue."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2, 0] = 255
    image[:, width // 2 :, 2] = 255
    return image


def test_center_crop_resizes_the_shorter_side_and_keeps_the_middle():
    out = ResizeAndCrop(32, random_crop=False).random_map(
        _record(_halves_image(64, 96)), np.random.default_rng(0)
    )
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8
    # The middle of a half-red, half-blue image is half red, half blue.
    assert (out["image"][:, :15, 0] > 200).all() and (out["image"][:, 17:, 2] > 200).all()
    assert out["label"] == 3 and out["caption"] == "a red circle"


def test_random_crop_varies_with_the_rng_and_repeats_with_the_seed():
    transform = ResizeAndCrop(32, random_crop=True)
    record = _record(_halves_image(32, 96))
    crops = [
        transform.random_map(record, np.random.default_rng(seed))["image"] for seed in range(8)
    ]
    assert all(crop.shape == (32, 32, 3) for crop in crops)
    assert len({crop.tobytes() for crop in crops}) > 1
    again = transform.random_map(record, np.random.default_rng(3))["image"]
    np.testing.assert_array_equal(again, crops[3])


def test_small_images_are_upscaled():
    out = ResizeAndCrop(64, random_crop=True).random_map(
        _record(np.full((10, 20, 3), 77, np.uint8)), np.random.default_rng(0)
    )
    assert out["image"].shape == (64, 64, 3)
    assert np.abs(out["image"].astype(int) - 77).max() <= 1
    with pytest.raises(ValueError, match="image_size"):
        ResizeAndCrop(0, random_crop=False)


def test_random_flip_mirrors_about_half_the_time():
    image = _halves_image(8, 8)
    outputs = [RandomFlip().random_map(_record(image), np.random.default_rng(s)) for s in range(40)]
    flipped = [np.array_equal(o["image"], image[:, ::-1]) for o in outputs]
    unchanged = [np.array_equal(o["image"], image) for o in outputs]
    assert all(f != u for f, u in zip(flipped, unchanged, strict=True))
    assert 10 <= sum(flipped) <= 30


def test_normalize_maps_uint8_to_minus_one_one():
    image = np.array([[[0, 128, 255]]], np.uint8)
    out = NormalizeImage().map(_record(image))["image"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[[-1.0, 128 / 127.5 - 1, 1.0]]], atol=1e-6)


def test_tokenize_pickles_before_and_after_use():
    tokenizer = build_word_tokenizer(shapes.caption_vocabulary())
    transform = Tokenize(tokenizer.to_str(), max_length=8)
    expected = encode(tokenizer, ["a red circle"], 8)[0]
    tokens = transform.map(_record(np.zeros((2, 2, 3), np.uint8)))["tokens"]
    assert tokens.dtype == np.int32 and tokens.shape == (8,)
    np.testing.assert_array_equal(tokens, expected)
    restored = pickle.loads(pickle.dumps(transform))
    np.testing.assert_array_equal(restored.map(_record(np.zeros((2, 2, 3))))["tokens"], expected)


def test_tokenize_maps_a_batch_of_captions_like_each_record():
    tokenizer = build_word_tokenizer(shapes.caption_vocabulary())
    captions = ["a red circle", "a blue square at the top left", ""]
    batch = {"caption": np.asarray(captions), "label": np.arange(3, dtype=np.int32)}
    out = Tokenize(tokenizer.to_str(), max_length=8).map(batch)
    assert out["tokens"].dtype == np.int32 and out["tokens"].shape == (3, 8)
    np.testing.assert_array_equal(out["tokens"], encode(tokenizer, captions, 8))
    np.testing.assert_array_equal(out["label"], batch["label"])


def test_select_keys_drops_the_rest_and_names_missing_keys():
    out = SelectKeys(["image", "label"]).map(_record(np.zeros((2, 2, 3), np.uint8)))
    assert sorted(out) == ["image", "label"]
    with pytest.raises(KeyError, match="tokens"):
        SelectKeys(["tokens"]).map(_record(np.zeros((2, 2, 3), np.uint8)))
