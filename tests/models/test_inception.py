"""The Flax FID Inception against a PyTorch reference of pytorch-fid's network."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from inception_reference import FIDInception, randomized

from ldm_jax.interop.convert import torch_to_flax
from ldm_jax.interop.inception_weights import CLASSIFIER_PREFIX, inception_param_shapes
from ldm_jax.models.inception import (
    MIN_IMAGE_SIZE,
    FIDInceptionV3,
    resize_for_inception,
)

# Small enough for the test to run in seconds, large enough for every stride-2 stage.
SIZE = MIN_IMAGE_SIZE


def _converted_params(reference: torch.nn.Module) -> dict:
    state_dict = {
        name: value.numpy()
        for name, value in reference.state_dict().items()
        if not name.startswith(CLASSIFIER_PREFIX)
    }
    abstract = flax.traverse_util.unflatten_dict(
        {
            tuple(name.split(".")): jax.ShapeDtypeStruct(shape, jnp.float32)
            for name, shape in inception_param_shapes().items()
        }
    )
    return torch_to_flax(state_dict, abstract, ignore=("num_batches_tracked",))


def test_pool_features_match_the_pytorch_reference():
    reference = randomized(FIDInception(resize_to=SIZE))
    params = _converted_params(reference)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 40, 3), dtype=np.uint8)
    with torch.no_grad():
        want = reference(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).numpy()
    got = jax.jit(
        lambda p, x: FIDInceptionV3().apply({"params": p}, resize_for_inception(x, SIZE))
    )(params, images)
    assert got.shape == (2, 2048)
    error = np.max(np.abs(np.asarray(got) - want))
    print(f"max |flax - torch| = {error:.2e} (features up to {np.abs(want).max():.2f})")
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_every_parameter_of_the_reference_is_used():
    reference = FIDInception()
    names = {
        n
        for n in reference.state_dict()
        if not n.startswith(CLASSIFIER_PREFIX) and not n.endswith("num_batches_tracked")
    }
    assert len(names) == len(inception_param_shapes())


def test_too_small_images_are_refused():
    with pytest.raises(ValueError, match="at least 75 x 75"):
        jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
