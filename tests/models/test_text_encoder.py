"""The small from-scratch text encoder."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from ldm_jax.models import TextEncoder

# rbg keys compile far faster than threefry on CPU, and compiling dominates these tests.
KEY = jax.random.key(0, impl="rbg")
VOCAB_SIZE, MAX_LENGTH, WIDTH = 13, 6, 8


def encoder(**fields):
    return TextEncoder(
        vocab_size=VOCAB_SIZE,
        max_length=MAX_LENGTH,
        width=WIDTH,
        num_layers=2,
        num_heads=2,
        **fields,
    )


@pytest.mark.parametrize("length", [3, MAX_LENGTH])
def test_output_is_one_token_of_width_per_input_token(length):
    token_ids = np.zeros((2, length), np.int32)
    out, variables = jax.eval_shape(encoder().init_with_output, KEY, token_ids)
    assert out.shape == (2, length, WIDTH)
    params = nn.meta.unbox(variables)["params"]
    assert params["token_embedding"]["embedding"].shape == (VOCAB_SIZE, WIDTH)
    assert params["position_embedding"].shape == (MAX_LENGTH, WIDTH)
    assert set(params) == {
        "token_embedding",
        "position_embedding",
        "layers_0",
        "layers_1",
        "final_layer_norm",
    }


def test_sequences_longer_than_max_length_raise_a_clear_error():
    with pytest.raises(ValueError, match="max_length=6"):
        jax.eval_shape(encoder().init, KEY, np.zeros((1, MAX_LENGTH + 1), np.int32))


def test_attention_is_bidirectional_and_positions_matter():
    model = encoder()
    token_ids = np.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]], np.int32)
    params = nn.meta.unbox(jax.jit(model.init)(KEY, token_ids))
    apply = jax.jit(model.apply)
    out = np.asarray(apply(params, token_ids))
    # Only the last token differs, yet the first position's output changes.
    assert np.abs(out[0, 0] - out[1, 0]).max() > 1e-4
    repeated = np.full((2, MAX_LENGTH), 3, np.int32)
    out = np.asarray(apply(params, repeated))
    assert np.abs(out[0, 0] - out[0, 1]).max() > 1e-4
