"""Attention and transformer blocks, as diffusers' `Attention` and `Transformer2DModel`.

Heads are always given as a number of heads (`num_heads`); the width of a head is
`channels // num_heads`, where `channels` is the width of the query input.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import (
    ATTENTION_OUT_KERNEL_AXES,
    ATTENTION_QKV_KERNEL_AXES,
    DENSE_IN_KERNEL_AXES,
    DENSE_OUT_KERNEL_AXES,
    conv,
    dense,
    group_norm,
    layer_norm,
)


def dot_product_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *, is_causal: bool = False
) -> jax.Array:
    """`softmax(q k^T / sqrt(head_dim)) v`, the one place every model attends.

    The logits and softmax are in float32 whatever the inputs' dtype. On GPU and TPU, and
    for the causal mask of a language model, this is `jax.nn.dot_product_attention`, which
    dispatches to the fused kernels present there. On XLA's CPU backend, without a mask, it
    is `attention_by_heads` on heads-first tensors, measured faster forwards and backwards
    (benchmarks/train_step.py).

    Args:
      query: `(B, T, heads, head_dim)`.
      key: `(B, S, heads, head_dim)`.
      value: `(B, S, heads, head_dim)`.
      is_causal: query `t` attends only to keys `s <= t` (a language model's mask).

    Returns:
      `(B, T, heads, head_dim)`.
    """
    if is_causal or jax.default_backend() != "cpu":
        return jax.nn.dot_product_attention(query, key, value, is_causal=is_causal)
    scaled_query = query * jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    heads_first = [jnp.swapaxes(x, 1, 2) for x in (scaled_query, key, value)]
    return jnp.swapaxes(attention_by_heads(*heads_first), 1, 2)


@jax.custom_vjp
def attention_by_heads(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """`softmax(q k^T) v` of `(B, heads, T, d)` queries and `(B, heads, S, d)` keys and values.

    The query comes scaled. Every matrix product contracts the last axis of its left operand
    and one of the two last axes of its right one: the layouts in which XLA's CPU backend
    fuses the products with the softmax between them into one library call. Undifferentiated
    (sampling), the softmax is normalised after the product with the values, on `(T, d)`
    rather than `(T, S)`, which lets that fusion stream over rows of the logits. The
    gradient is the softmax's closed form from the saved probabilities (as the backward pass
    of flash attention: `ds = p * (dp - rowsum(do * o))`).
    """
    logits = _logits(query, key)
    unnormalized = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out = jnp.einsum(
        "bnts,bnsd->bntd",
        unnormalized.astype(value.dtype),
        value,
        preferred_element_type=jnp.float32,
    )
    return (out / jnp.sum(unnormalized, axis=-1, keepdims=True)).astype(value.dtype)


def _logits(query: jax.Array, key: jax.Array) -> jax.Array:
    return jnp.einsum("bntd,bnsd->bnts", query, key, preferred_element_type=jnp.float32)


def _attention_forward(query, key, value):
    probabilities = jax.nn.softmax(_logits(query, key), axis=-1)
    out = jnp.einsum("bnts,bnsd->bntd", probabilities.astype(value.dtype), value)
    return out, (query, key, value, out, probabilities)


def _attention_backward(residuals, d_out):
    query, key, value, out, probabilities = residuals
    d_value = jnp.swapaxes(jnp.swapaxes(d_out, -1, -2) @ probabilities.astype(d_out.dtype), -1, -2)
    d_probabilities = jnp.einsum(
        "bntd,bnsd->bnts", d_out, value, preferred_element_type=jnp.float32
    )
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_logits = (probabilities * (d_probabilities - row_dot)).astype(query.dtype)
    d_query = d_logits @ key
    d_key = jnp.swapaxes(jnp.swapaxes(query, -1, -2) @ d_logits, -1, -2)
    return d_query.astype(query.dtype), d_key.astype(key.dtype), d_value.astype(value.dtype)


attention_by_heads.defvjp(_attention_forward, _attention_backward)


class Attention(nn.Module):
    """Multi-head attention with projections `to_q`, `to_k`, `to_v` and `to_out_0`.

    Queries come from `x`, keys and values from `context` (cross-attention) or from `x`
    itself when `context` is None. With `norm_num_groups` set, this is the autoencoder's
    mid-block attention: `x + attention(group_norm(x))`, the norm named `group_norm`.
    With `causal`, each token attends only to itself and earlier tokens (CLIP's text
    transformer); meant for self-attention.
    """

    num_heads: int
    use_qkv_bias: bool = False
    norm_num_groups: int | None = None
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """Attends from `x` `(B, T, C)` to `context` `(B, S, D)`; returns `(B, T, C)`."""
        batch, length, channels = x.shape
        if channels % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide the attention width {channels}."
            )
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual = x
        if self.norm_num_groups is not None:
            x = group_norm(self.norm_num_groups, self.norm_eps, name="group_norm", **kwargs)(x)
        context = x if context is None else context

        def heads(projection_name: str, inputs: jax.Array) -> jax.Array:
            projected = dense(
                channels,
                ATTENTION_QKV_KERNEL_AXES,
                use_bias=self.use_qkv_bias,
                name=projection_name,
                **kwargs,
            )(inputs)
            return projected.reshape(*inputs.shape[:2], self.num_heads, -1)

        attended = dot_product_attention(
            heads("to_q", x),
            heads("to_k", context),
            heads("to_v", context),
            is_causal=self.causal,
        )
        out = dense(channels, ATTENTION_OUT_KERNEL_AXES, name="to_out_0", **kwargs)(
            attended.reshape(batch, length, channels)
        )
        return out if self.norm_num_groups is None else out + residual


def spatial_self_attention(
    x: jax.Array,
    *,
    num_heads: int,
    norm_num_groups: int,
    norm_eps: float,
    name: str,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Group-normed, residual self-attention over the pixels of `(B, H, W, C)` features.

    The autoencoders' attention blocks (one head) and the attention blocks of U-Nets
    without cross-attention (CompVis' `AttentionBlock`, the `Attn*Block2D`s of diffusers'
    `UNet2DModel`): `x + to_out_0(attention(group_norm(x)))`, q/k/v with biases. Call it
    inside a compact module: it adds the `Attention` submodule `name`.
    """
    batch, height, width, channels = x.shape
    tokens = Attention(
        num_heads=num_heads,
        use_qkv_bias=True,
        norm_num_groups=norm_num_groups,
        norm_eps=norm_eps,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )(x.reshape(batch, height * width, channels))
    return tokens.reshape(x.shape)


class GEGLU(nn.Module):
    """`hidden * gelu(gate)` with `(hidden, gate)` the two halves of `proj(x)`; exact gelu."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        projected = dense(
            2 * self.features,
            DENSE_IN_KERNEL_AXES,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(x)
        hidden, gate = jnp.split(projected, 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers' GEGLU `FeedForward`: `net_2(net_0(x))`, hidden width `mult * width`."""

    mult: int = 4
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = x.shape[-1]
        hidden = GEGLU(self.mult * width, name="net_0", **kwargs)(x)
        return dense(width, DENSE_OUT_KERNEL_AXES, name="net_2", **kwargs)(hidden)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention `attn1`, cross-attention `attn2`, GEGLU `ff`.

    Each of the three is residual and preceded by its LayerNorm (`norm1`, `norm2`, `norm3`,
    eps 1e-5). Without a context, `attn2` attends to the block's own (normed) tokens.
    """

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + Attention(self.num_heads, name="attn1", **kwargs)(
            layer_norm(name="norm1", **kwargs)(x)
        )
        x = x + Attention(self.num_heads, name="attn2", **kwargs)(
            layer_norm(name="norm2", **kwargs)(x), context
        )
        return x + FeedForward(name="ff", **kwargs)(layer_norm(name="norm3", **kwargs)(x))


class SpatialTransformer(nn.Module):
    """diffusers' `Transformer2DModel` on images: tokens are pixels, residual around all.

    `x + proj_out(blocks(proj_in(norm(x))))`, with `norm` a GroupNorm (eps 1e-6) and
    `proj_in`/`proj_out` 1x1 convolutions (Stable Diffusion 1) or dense layers
    (`use_linear_projection`, Stable Diffusion 2). The blocks are `transformer_blocks_{k}`.
    """

    num_heads: int
    depth: int = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """Maps `(B, H, W, C)` features, attending to `context` `(B, S, D)`, to the same."""
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, channels = x.shape
        tokens = group_norm(self.norm_num_groups, 1e-6, name="norm", **kwargs)(x)
        if self.use_linear_projection:
            tokens = tokens.reshape(batch, height * width, channels)
            tokens = dense(channels, DENSE_IN_KERNEL_AXES, name="proj_in", **kwargs)(tokens)
        else:
            tokens = conv(channels, 1, name="proj_in", **kwargs)(tokens)
            tokens = tokens.reshape(batch, height * width, channels)
        for k in range(self.depth):
            tokens = BasicTransformerBlock(
                self.num_heads, name=f"transformer_blocks_{k}", **kwargs
            )(tokens, context)
        if self.use_linear_projection:
            tokens = dense(channels, DENSE_OUT_KERNEL_AXES, name="proj_out", **kwargs)(tokens)
            out = tokens.reshape(batch, height, width, channels)
        else:
            out = tokens.reshape(batch, height, width, channels)
            out = conv(channels, 1, name="proj_out", **kwargs)(out)
        return x + out
