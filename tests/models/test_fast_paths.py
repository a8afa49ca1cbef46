"""The CPU fast paths compute what the generic layers they replace compute, with their params.

`PointwiseConv` stands in for a 1x1 `nn.Conv`, our `GroupNorm` for `nn.GroupNorm` and
`attention_by_heads` (with its hand-written gradient) for `jax.nn.dot_product_attention`:
checkpoints and imported weights rely on the same parameter tree, training on the same
gradients.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import dot_product_attention
from ldm_jax.models.attention import attention_by_heads
from ldm_jax.models.layers import GroupNorm, PointwiseConv, conv

KEY = jax.random.key(0, impl="rbg")


def normal(*shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def test_unpadded_1x1_conv_is_pointwise_and_matches_nn_conv():
    x = normal(2, 5, 5, 6)
    ours = conv(7, kernel_size=1, padding=((0, 0), (0, 0)))
    assert isinstance(ours, PointwiseConv)
    assert not isinstance(conv(7, kernel_size=3), PointwiseConv)
    params = nn.unbox(ours.init(KEY, x))["params"]
    assert jax.tree.map(jnp.shape, params) == {"kernel": (1, 1, 6, 7), "bias": (7,)}
    params = {"kernel": normal(1, 1, 6, 7, seed=1), "bias": normal(7, seed=2)}
    want = nn.Conv(7, (1, 1), padding="VALID").apply({"params": params}, x)
    got = ours.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("shape,groups", [((2, 4, 4, 64), 32), ((3, 7, 12), 4)])
def test_group_norm_matches_flax_forward_and_gradient(shape, groups):
    # An offset mean checks the variance is not lost to cancellation at activation scales.
    x = normal(*shape) * 3.0 + 2.0
    params = {"scale": normal(shape[-1], seed=1), "bias": normal(shape[-1], seed=2)}
    ours = GroupNorm(num_groups=groups, epsilon=1e-6)
    reference = nn.GroupNorm(num_groups=groups, epsilon=1e-6)

    def loss(module, params, x):
        return jnp.sum(jnp.sin(module.apply({"params": params}, x)))

    np.testing.assert_allclose(
        np.asarray(ours.apply({"params": params}, x)),
        np.asarray(reference.apply({"params": params}, x)),
        atol=2e-5,
    )
    got = jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1))(params, x)
    want = jax.grad(lambda p, x: loss(reference, p, x), argnums=(0, 1))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4)


def test_group_norm_names_the_bad_group_count():
    with pytest.raises(ValueError, match="num_groups=32 must divide the number of channels 48"):
        GroupNorm(num_groups=32).init(KEY, jnp.ones((1, 2, 2, 48)))


# Self-attention (T = S = 5) and cross-attention to a shorter context (S = 3).
@pytest.mark.parametrize("kv_length", [5, 3])
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_attention_matches_jax_attention_and_its_gradient(kv_length, dtype, atol):
    q = jnp.asarray(normal(2, 5, 4, 8), dtype)
    k = jnp.asarray(normal(2, kv_length, 4, 8, seed=1), dtype)
    v = jnp.asarray(normal(2, kv_length, 4, 8, seed=2), dtype)
    cotangent = jnp.asarray(normal(2, 5, 4, 8, seed=3), jnp.float32)

    def loss(attend, q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) * cotangent)

    got = dot_product_attention(q, k, v)
    want = jax.nn.dot_product_attention(q, k, v)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol)
    got_grads = jax.grad(lambda *a: loss(dot_product_attention, *a), (0, 1, 2))(q, k, v)
    want_grads = jax.grad(lambda *a: loss(jax.nn.dot_product_attention, *a), (0, 1, 2))(q, k, v)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), atol=atol * 4
        )


def test_attention_by_heads_gradient_under_jit_and_remat():
    # Heads-first (B, heads, T, d) and unscaled: softmax(q k^T) v.
    q, k, v = (jnp.asarray(normal(1, 2, 6, 4, seed=s)) for s in range(3))

    def heads_last(x):
        return jnp.swapaxes(x, 1, 2)

    def reference(q):
        return jax.nn.dot_product_attention(*map(heads_last, (q, k, v)), scale=1.0)

    got = jax.jit(jax.grad(jax.checkpoint(lambda q: jnp.sum(attention_by_heads(q, k, v) ** 3))))
    want = jax.grad(lambda q: jnp.sum(reference(q) ** 3))
    np.testing.assert_allclose(np.asarray(got(q)), np.asarray(want(q)), atol=1e-5)
