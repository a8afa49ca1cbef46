"""The U-Net: shapes, the diffusers module tree, conditioning, gradients and dropout."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import UNet

# rbg keys compile far faster than threefry on CPU, and compiling dominates these tests.
KEY = jax.random.key(0, impl="rbg")
BATCH, SIZE, CONTEXT_LENGTH, CONTEXT_DIM, NUM_CLASSES = 2, 8, 3, 8, 3
TINY = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    attention_levels=(True, False),
    num_attention_heads=2,
    norm_num_groups=4,
)


def inputs(context_dim=None, num_classes=None, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, SIZE, SIZE, 4)).astype(np.float32)
    timesteps = np.array([3, 700])
    context = None
    if context_dim is not None:
        context = rng.normal(size=(BATCH, CONTEXT_LENGTH, context_dim)).astype(np.float32)
    labels = None if num_classes is None else np.array([0, num_classes])
    return x, timesteps, context, labels


@pytest.mark.parametrize(
    "context_dim,num_classes,out_channels",
    [(CONTEXT_DIM, None, 4), (None, NUM_CLASSES, 8), (None, None, 4)],
    ids=["context", "classes", "unconditional"],
)
def test_output_has_input_size_and_out_channels(context_dim, num_classes, out_channels):
    model = UNet(
        out_channels=out_channels, context_dim=context_dim, num_classes=num_classes, **TINY
    )
    out, _ = jax.eval_shape(model.init_with_output, KEY, *inputs(context_dim, num_classes))
    assert out.shape == (BATCH, SIZE, SIZE, out_channels)


def test_scalar_timestep_and_bfloat16_compute_with_float32_params():
    model = UNet(dtype=jnp.bfloat16, **TINY)
    x, _, _, _ = inputs()
    out, variables = jax.eval_shape(model.init_with_output, KEY, x, jnp.array(10))
    assert out.shape == x.shape and out.dtype == jnp.bfloat16
    param_dtypes = {leaf.dtype for leaf in jax.tree.leaves(nn.meta.unbox(variables))}
    assert param_dtypes == {jnp.dtype(jnp.float32)}


def test_module_tree_mirrors_diffusers():
    model = UNet(context_dim=CONTEXT_DIM, num_classes=NUM_CLASSES, **TINY)
    variables = jax.eval_shape(model.init, KEY, *inputs(CONTEXT_DIM, NUM_CLASSES))
    shapes = {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf.shape
        for path, leaf in jax.tree.leaves_with_path(nn.meta.unbox(variables)["params"])
    }
    block = "down_blocks_0/attentions_0/transformer_blocks_0"
    expected = {
        "conv_in/kernel": (3, 3, 4, 8),
        "time_embedding/linear_1/kernel": (8, 32),
        "time_embedding/linear_2/kernel": (32, 32),
        "class_embedding/embedding": (NUM_CLASSES + 1, 32),
        "down_blocks_0/resnets_0/time_emb_proj/kernel": (32, 8),
        f"{block}/attn1/to_q/kernel": (8, 8),
        f"{block}/attn2/to_k/kernel": (CONTEXT_DIM, 8),
        f"{block}/attn2/to_out_0/bias": (8,),
        f"{block}/ff/net_0/proj/kernel": (8, 64),
        f"{block}/ff/net_2/kernel": (32, 8),
        f"{block}/norm3/scale": (8,),
        "down_blocks_0/attentions_0/proj_in/kernel": (1, 1, 8, 8),
        "down_blocks_0/downsamplers_0/conv/kernel": (3, 3, 8, 8),
        "down_blocks_1/resnets_0/conv_shortcut/kernel": (1, 1, 8, 16),
        "mid_block/resnets_0/conv1/kernel": (3, 3, 16, 16),
        "mid_block/attentions_0/norm/scale": (16,),
        "mid_block/resnets_1/conv2/kernel": (3, 3, 16, 16),
        # Up blocks hold layers_per_block + 1 resnets whose inputs carry the skips, with the
        # same input channels as diffusers' CrossAttnUpBlock2D / UpBlock2D.
        "up_blocks_0/resnets_0/conv1/kernel": (3, 3, 32, 16),
        "up_blocks_0/resnets_1/conv1/kernel": (3, 3, 24, 16),
        "up_blocks_0/upsamplers_0/conv/kernel": (3, 3, 16, 16),
        "up_blocks_1/resnets_0/conv1/kernel": (3, 3, 24, 8),
        "up_blocks_1/resnets_1/conv_shortcut/kernel": (1, 1, 16, 8),
        "up_blocks_1/attentions_1/proj_out/kernel": (1, 1, 8, 8),
        "conv_norm_out/scale": (8,),
        "conv_out/kernel": (3, 3, 8, 4),
    }
    assert {name: shapes.get(name) for name in expected} == expected
    assert not any(name.startswith("up_blocks_1/upsamplers") for name in shapes)
    assert not any(
        name.startswith(("down_blocks_1/attentions", "up_blocks_0/attentions")) for name in shapes
    )
    assert not any(name.startswith("down_blocks_1/downsamplers") for name in shapes)


def test_mid_block_without_attention_is_one_resnet_and_depth_can_vary_per_level():
    # diffusers' UNet2DConditionModel builds its "UNetMidBlock2D" with a single resnet.
    model = UNet(
        **{**TINY, "attention_levels": (True, True)},
        mid_block_attention=False,
        transformer_depth=(2, 1),
    )
    variables = jax.eval_shape(model.init, KEY, *inputs())
    params = nn.meta.unbox(variables)["params"]
    assert set(params["mid_block"]) == {"resnets_0"}
    blocks = lambda block: {name for name in block if name.startswith("transformer_blocks")}
    assert blocks(params["down_blocks_0"]["attentions_0"]) == {
        "transformer_blocks_0",
        "transformer_blocks_1",
    }
    assert blocks(params["up_blocks_0"]["attentions_0"]) == {"transformer_blocks_0"}
    assert blocks(params["up_blocks_1"]["attentions_0"]) == {
        "transformer_blocks_0",
        "transformer_blocks_1",
    }


@pytest.fixture(scope="module")
def conditional():
    """A tiny U-Net with cross-attention, class labels and dropout, its params and inputs.

    Attention only in the mid block: every kind of parameter is there, and each block
    more would add seconds of compile time.
    """
    model = UNet(
        context_dim=CONTEXT_DIM,
        num_classes=NUM_CLASSES,
        dropout=0.5,
        **{**TINY, "attention_levels": (False, False)},
    )
    x, timesteps, context, labels = inputs(CONTEXT_DIM, NUM_CLASSES)
    params = nn.meta.unbox(jax.jit(model.init)(KEY, x, timesteps, context, labels))
    return model, params, (x, timesteps, context, labels)


@pytest.fixture(scope="module")
def training_loss_and_grad(conditional):
    model, _, _ = conditional

    def loss(params, x, timesteps, context, labels, dropout_key):
        prediction = model.apply(
            params, x, timesteps, context, labels, train=True, rngs={"dropout": dropout_key}
        )
        return jnp.mean(jnp.square(prediction - jnp.flip(x, axis=1)))

    return jax.jit(jax.value_and_grad(loss))


def test_context_and_labels_change_the_prediction(conditional):
    model, params, (x, timesteps, context, labels) = conditional
    apply = jax.jit(model.apply)
    reference = apply(params, x, timesteps, context, labels)
    other_context = apply(params, x, timesteps, context[::-1], labels)
    other_labels = apply(params, x, timesteps, context, labels[::-1])
    for changed in (other_context, other_labels):
        assert np.abs(np.asarray(changed - reference)).max() > 1e-3
    np.testing.assert_array_equal(apply(params, x, timesteps, context, labels), reference)


def test_gradient_reaches_every_parameter(conditional, training_loss_and_grad):
    _, params, batch = conditional
    _, grads = training_loss_and_grad(params, *batch, jax.random.key(1, impl="rbg"))
    for path, grad in jax.tree.leaves_with_path(grads):
        assert np.all(np.isfinite(grad)), jax.tree_util.keystr(path)
        assert np.any(grad != 0), f"{jax.tree_util.keystr(path)} gets no gradient"


def test_dropout_draws_from_the_dropout_rng_in_training(conditional, training_loss_and_grad):
    model, params, batch = conditional
    losses = [
        training_loss_and_grad(params, *batch, jax.random.key(seed, impl="rbg"))[0]
        for seed in (1, 1, 2)
    ]
    assert losses[0] == losses[1] != losses[2]
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(lambda: model.apply(params, *batch, train=True))


@pytest.mark.parametrize(
    "fields,make_inputs,message",
    [
        (dict(), lambda: inputs(context_dim=CONTEXT_DIM), "context_dim is None"),
        (dict(context_dim=CONTEXT_DIM), lambda: inputs(), "context must be"),
        (dict(context_dim=4), lambda: inputs(context_dim=CONTEXT_DIM), "context must be"),
        (dict(num_classes=NUM_CLASSES), lambda: inputs(), "labels must be given"),
        (dict(), lambda: (np.zeros((1, 5, 5, 4)), np.zeros(1), None, None), "divisible by 2"),
        (dict(), lambda: (np.zeros((1, 8, 8, 3)), np.zeros(1), None, None), "in_channels=4"),
        (dict(attention_levels=(True,)), lambda: inputs(), "attention_levels"),
        (dict(num_attention_heads=(2, 2, 2)), lambda: inputs(), "num_attention_heads"),
        (dict(transformer_depth=(1, 1, 1)), lambda: inputs(), "transformer_depth"),
    ],
)
def test_invalid_inputs_raise_a_clear_error(fields, make_inputs, message):
    model = UNet(**{**TINY, **fields})
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, KEY, *make_inputs())


def test_plain_attention_blocks_are_group_normed_self_attention_with_biases():
    model = UNet(attention_type="plain", **{**TINY, "num_attention_heads": (2, 4)})
    x, timesteps, _, _ = inputs()
    out, variables = jax.eval_shape(model.init_with_output, KEY, x, timesteps)
    assert out.shape == x.shape
    params = nn.meta.unbox(variables)["params"]
    attention = params["down_blocks_0"]["attentions_0"]
    assert set(attention) == {"group_norm", "to_q", "to_k", "to_v", "to_out_0"}
    assert all("bias" in attention[name] for name in ("to_q", "to_k", "to_v", "to_out_0"))
    assert attention["to_q"]["kernel"].shape == (8, 8)
    # The mid block has resnet, attention, resnet; levels without attention have none.
    assert set(params["mid_block"]) == {"resnets_0", "attentions_0", "resnets_1"}
    assert "attentions_0" not in params["down_blocks_1"]
    assert "transformer_blocks_0" not in str(jax.tree_util.tree_structure(params))


def test_class_as_context_is_one_cross_attention_token_of_the_label_embedding():
    as_context = UNet(
        context_dim=CONTEXT_DIM, num_classes=NUM_CLASSES, class_conditioning="context", **TINY
    )
    x, timesteps, _, labels = inputs(num_classes=NUM_CLASSES)
    params = nn.meta.unbox(as_context.init(KEY, x, timesteps, None, labels))["params"]
    table = params["class_embedding"]["embedding"]
    assert table.shape == (NUM_CLASSES + 1, CONTEXT_DIM)
    # The same U-Net given the embedded labels as its context computes the same thing.
    with_context = UNet(context_dim=CONTEXT_DIM, **TINY)
    rest = {k: v for k, v in params.items() if k != "class_embedding"}
    context = jnp.asarray(table)[labels][:, None, :]
    np.testing.assert_allclose(
        as_context.apply({"params": params}, x, timesteps, None, labels),
        with_context.apply({"params": rest}, x, timesteps, context),
        atol=1e-6,
    )
    other = as_context.apply({"params": params}, x, timesteps, None, labels[::-1])
    assert (
        np.abs(
            np.asarray(other - with_context.apply({"params": rest}, x, timesteps, context))
        ).max()
        > 1e-3
    )


@pytest.mark.parametrize(
    "fields,make_inputs,message",
    [
        (dict(attention_type="linear"), lambda: inputs(), "attention_type='linear'"),
        (
            dict(attention_type="plain", context_dim=CONTEXT_DIM),
            lambda: inputs(context_dim=CONTEXT_DIM),
            "plain attention has no cross-attention",
        ),
        (
            dict(context_dim=CONTEXT_DIM, num_classes=NUM_CLASSES, class_conditioning="context"),
            lambda: inputs(context_dim=CONTEXT_DIM, num_classes=NUM_CLASSES),
            "pass no context",
        ),
        (
            dict(num_classes=NUM_CLASSES, class_conditioning="context"),
            lambda: inputs(num_classes=NUM_CLASSES),
            "set context_dim",
        ),
        (dict(class_conditioning="both"), lambda: inputs(), "class_conditioning='both'"),
    ],
)
def test_invalid_attention_and_class_options_raise_a_clear_error(fields, make_inputs, message):
    model = UNet(**{**TINY, **fields})
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, KEY, *make_inputs())
