"""The LPIPS perceptual distance: its properties as a loss, on random VGG16 weights."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.lpips import LPIPS

MODEL = LPIPS()
BATCH, SIZE = 2, 32


def smooth_images(seed=0):
    """Images in [-1, 1] with structure at several scales, as photos have."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1.0, 1.0, (BATCH, 4, 4, 3))
    upsampled = np.asarray(jax.image.resize(coarse, (BATCH, SIZE, SIZE, 3), "linear"))
    return np.clip(upsampled + 0.1 * rng.standard_normal(upsampled.shape), -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def params():
    """Random He-scaled VGG16 weights and non-negative heads, as the published heads are.

    Drawn with numpy: initialising 15M parameters through `MODEL.init` takes seconds here.
    """
    image = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
    abstract = nn.meta.unbox(jax.eval_shape(MODEL.init, jax.random.key(0), image, image))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        values = rng.standard_normal(leaf.shape, dtype=np.float32)
        if path[-1].key == "bias":
            return 0.1 * values
        values *= np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        return np.abs(values) if path[0].key.startswith("lin_") else values

    return jax.tree_util.tree_map_with_path(draw, abstract["params"])


@jax.jit
def distance(params, images, references):
    return MODEL.apply({"params": params}, images, references)


@jax.jit
def layer_distances(params, images, references):
    return MODEL.apply({"params": params}, images, references, method=LPIPS.layer_distances)


def test_parameters_are_named_by_torchvision_index():
    image = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
    abstract = nn.meta.unbox(jax.eval_shape(MODEL.init, jax.random.key(0), image, image))
    shapes = {
        name: leaf.shape
        for name, leaf in flax.traverse_util.flatten_dict(abstract["params"], sep=".").items()
    }
    convs = sorted(int(name.split(".")[1][5:]) for name in shapes if name.endswith(".bias"))
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert shapes["vgg.conv_0.kernel"] == (3, 3, 3, 64)
    assert shapes["vgg.conv_10.kernel"] == (3, 3, 128, 256)
    assert shapes["vgg.conv_28.kernel"] == (3, 3, 512, 512)
    heads = [shapes[f"lin_{k}.kernel"] for k in range(5)]
    assert heads == [(64, 1), (128, 1), (256, 1), (512, 1), (512, 1)]
    assert len(shapes) == 2 * 13 + 5


def test_identical_images_are_at_zero_and_distance_is_symmetric(params):
    x, y = smooth_images(0), smooth_images(1)
    same = distance(params, x, x)
    forward, backward = distance(params, x, y), distance(params, y, x)
    assert same.shape == forward.shape == (BATCH,)
    assert forward.dtype == jnp.float32
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    assert np.all(forward > 1e-3)
    np.testing.assert_allclose(forward, backward, rtol=1e-5)


def test_distance_grows_with_noise(params):
    x = smooth_images(0)
    noise = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    distances = np.stack([distance(params, x, x + std * noise) for std in (0.05, 0.2, 0.6)])
    assert np.all(np.diff(distances, axis=0) > 0), distances


def test_layer_terms_sum_to_the_distance(params):
    x, y = smooth_images(0), smooth_images(1)
    terms = layer_distances(params, x, y)
    assert terms.shape == (BATCH, 5)
    assert np.all(terms > 0)
    np.testing.assert_allclose(terms.sum(-1), distance(params, x, y), rtol=1e-5)


def test_gradient_is_finite_where_features_vanish(params):
    # A strongly negative bias zeroes relu5_3 everywhere: the unit normalisation divides zero
    # by a zero norm, and the loss must still give finite gradients (and 0 for that layer).
    # 16x16 images, the smallest VGG16 takes, keep the backward pass cheap.
    last_conv = {**params["vgg"]["conv_28"], "bias": jnp.full((512,), -1e4)}
    dead = {**params, "vgg": {**params["vgg"], "conv_28": last_conv}}
    x, y = smooth_images(0)[:, ::2, ::2], smooth_images(1)[:, ::2, ::2]

    def loss(images, params):
        terms = MODEL.apply({"params": params}, images, y, method=LPIPS.layer_distances)
        return jnp.sum(terms), terms

    (_, terms), gradient = jax.jit(jax.value_and_grad(loss, has_aux=True))(x, dead)
    np.testing.assert_array_equal(terms[:, 4], 0.0)
    assert np.all(terms[:, :4] > 0)
    assert np.all(np.isfinite(gradient)) and np.any(gradient != 0)


def test_images_too_small_for_vgg_are_refused():
    image = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    with pytest.raises(ValueError, match="at least 16"):
        jax.eval_shape(MODEL.init, jax.random.key(0), image, image)
