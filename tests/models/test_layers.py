"""Layers, attention maths and the logical axis names of every model's parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import (
    LOGICAL_AXIS_NAMES,
    Attention,
    AutoencoderKL,
    FeedForward,
    ResnetBlock,
    TextEncoder,
    UNet,
    dot_product_attention,
    timestep_embedding,
)
from ldm_jax.models.layers import Downsample, Upsample

# rbg keys compile far faster than threefry on CPU, and compiling dominates these tests.
KEY = jax.random.key(0, impl="rbg")


def normal(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def reference_timestep_embedding(timesteps, dim, flip_sin_to_cos, freq_shift, max_period=10000):
    """diffusers' get_timestep_embedding, written out in numpy."""
    half = dim // 2
    freqs = np.exp(-np.log(max_period) * np.arange(half) / (half - freq_shift))
    angles = np.asarray(timesteps, np.float64)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)
    if flip_sin_to_cos:
        emb = np.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb


@pytest.mark.parametrize(
    "dim,flip_sin_to_cos,freq_shift", [(32, True, 0), (32, False, 1), (33, True, 1)]
)
def test_timestep_embedding_matches_diffusers_formula(dim, flip_sin_to_cos, freq_shift):
    timesteps = np.array([0, 1, 17, 500, 999])
    got = timestep_embedding(
        jnp.asarray(timesteps), dim, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift
    )
    want = reference_timestep_embedding(timesteps, dim, flip_sin_to_cos, freq_shift)
    assert got.shape == (len(timesteps), dim)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)


def test_dot_product_attention_is_scaled_softmax():
    q, k, v = normal(3, 2, 5, 3, 8)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshd->bthd", weights, v)
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v)), want, atol=1e-5)


def test_cross_attention_matches_reference_and_uses_context():
    x = normal(2, 6, 8)
    context = normal(2, 3, 5, seed=1)
    module = Attention(num_heads=2)
    out, variables = module.init_with_output(KEY, x, context)
    p = nn.meta.unbox(variables)["params"]
    assert set(p) == {"to_q", "to_k", "to_v", "to_out_0"}
    assert "bias" not in p["to_q"] and "bias" in p["to_out_0"]

    def split(a):
        return a.reshape(*a.shape[:2], 2, 4)

    q = split(x @ p["to_q"]["kernel"])
    k = split(context @ p["to_k"]["kernel"])
    v = split(context @ p["to_v"]["kernel"])
    logits = np.einsum("bthd,bshd->bhts", q, k) / 2.0
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    attended = np.einsum("bhts,bshd->bthd", weights, v).reshape(2, 6, 8)
    want = attended @ p["to_out_0"]["kernel"] + p["to_out_0"]["bias"]
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)


def test_feed_forward_is_geglu_with_exact_gelu():
    x = normal(2, 3, 4)
    out, variables = FeedForward(mult=4).init_with_output(KEY, x)
    p = nn.meta.unbox(variables)["params"]
    assert p["net_0"]["proj"]["kernel"].shape == (4, 32)
    projected = x @ p["net_0"]["proj"]["kernel"] + p["net_0"]["proj"]["bias"]
    hidden, gate = projected[..., :16], projected[..., 16:]
    exact_gelu = 0.5 * gate * (1 + jax.scipy.special.erf(gate / np.sqrt(2)))
    want = (hidden * exact_gelu) @ p["net_2"]["kernel"] + p["net_2"]["bias"]
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("in_channels,with_temb", [(8, True), (4, False)])
def test_resnet_block_shortcut_and_time_projection_only_when_needed(in_channels, with_temb):
    x = jnp.zeros((2, 4, 4, in_channels))
    temb = jnp.zeros((2, 16)) if with_temb else None
    out, variables = jax.eval_shape(
        ResnetBlock(8, norm_num_groups=4).init_with_output, KEY, x, temb
    )
    names = set(variables["params"])
    assert out.shape == (2, 4, 4, 8)
    assert ("conv_shortcut" in names) == (in_channels != 8)
    assert ("time_emb_proj" in names) == with_temb
    assert {"norm1", "conv1", "norm2", "conv2"} <= names


@pytest.mark.parametrize(
    "module,want_shape",
    [
        (Downsample(6), (2, 4, 4, 6)),
        (Downsample(6, padding=((0, 1), (0, 1))), (2, 4, 4, 6)),
        (Upsample(6), (2, 16, 16, 6)),
    ],
)
def test_resampling_changes_size_by_two(module, want_shape):
    out, _ = jax.eval_shape(module.init_with_output, KEY, jnp.zeros((2, 8, 8, 3)))
    assert out.shape == want_shape


def test_upsample_is_nearest_neighbour():
    x = normal(1, 2, 2, 1)
    module = Upsample(1)
    variables = jax.eval_shape(module.init, KEY, x)
    identity = {"kernel": jnp.zeros((3, 3, 1, 1)).at[1, 1, 0, 0].set(1.0), "bias": jnp.zeros(1)}
    params = {"conv": identity}
    out = module.apply({"params": params}, x)
    assert jax.tree.structure(nn.meta.unbox(variables)["params"]) == jax.tree.structure(params)
    np.testing.assert_allclose(out[0, :, :, 0], np.kron(x[0, :, :, 0], np.ones((2, 2))))


MODELS = {
    "unet": (
        UNet(
            block_out_channels=(8, 16),
            layers_per_block=1,
            attention_levels=(True, False),
            num_attention_heads=2,
            norm_num_groups=4,
            context_dim=8,
            num_classes=3,
        ),
        lambda: (jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,)), jnp.zeros((1, 2, 8)), jnp.zeros(1, int)),
    ),
    "unet_linear_projection": (
        UNet(
            block_out_channels=(8,),
            layers_per_block=1,
            attention_levels=(True,),
            num_attention_heads=2,
            norm_num_groups=4,
            use_linear_projection=True,
        ),
        lambda: (jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,))),
    ),
    "autoencoder": (
        AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4),
        lambda: (jnp.zeros((1, 4, 4, 3)),),
    ),
    "text_encoder": (
        TextEncoder(vocab_size=11, max_length=4, width=8, num_layers=1, num_heads=2),
        lambda: (jnp.zeros((1, 4), int),),
    ),
}


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_every_param_has_documented_logical_names(model_name):
    model, make_inputs = MODELS[model_name]
    rngs = {"params": KEY, "sample": KEY}
    variables = jax.eval_shape(model.init, rngs, *make_inputs())
    leaves = jax.tree.leaves_with_path(
        variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    assert len(leaves) > 10
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.Partitioned), f"{name} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim, f"{name}: {leaf.names} vs {leaf.value.shape}"
        assert set(leaf.names) - {None} <= LOGICAL_AXIS_NAMES, f"{name}: {leaf.names}"
        assert any(axis is not None for axis in leaf.names), name
