"""CLIP's text transformer, as transformers' `CLIPTextModel`, for Stable Diffusion prompts.

Token ids to hidden states: token plus learned position embeddings, pre-LayerNorm layers
of causal self-attention and a two-layer MLP, a final LayerNorm. The module tree mirrors
transformers' `text_model` (`embeddings/token_embedding`, `encoder/layers_{i}/self_attn`,
`mlp/fc1`, `final_layer_norm`, ...), so weights map one to one; the attention projections
are this package's `to_q`/`to_k`/`to_v`/`to_out_0` (CLIP's `q_proj`/.../`out_proj`).
"""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import Attention
from ldm_jax.models.layers import (
    DENSE_IN_KERNEL_AXES,
    DENSE_OUT_KERNEL_AXES,
    EMBEDDING_TABLE_AXES,
    POSITION_EMBEDDING_AXES,
    dense,
    layer_norm,
)

EMBEDDING_INIT_STD = 0.02
# transformers' configs said eos_token_id=2 before it was fixed; such models pool at the
# largest token id (the end-of-text token is the last of CLIP's vocabulary).
LEGACY_EOS_TOKEN_ID = 2


def quick_gelu(x: jax.Array) -> jax.Array:
    """`x * sigmoid(1.702 x)`, the gelu approximation the original CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(nn.gelu, approximate=False),
}


class CLIPTextEmbeddings(nn.Module):
    """`token_embedding(ids) + position_embedding(0..L-1)`."""

    vocab_size: int
    max_length: int
    width: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, token_ids: jax.Array) -> jax.Array:
        embedding_init = nn.initializers.normal(EMBEDDING_INIT_STD)
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=nn.with_logical_partitioning(embedding_init, EMBEDDING_TABLE_AXES),
            name="token_embedding",
            **kwargs,
        )(token_ids)
        positions = nn.Embed(
            self.max_length,
            self.width,
            embedding_init=nn.with_logical_partitioning(embedding_init, POSITION_EMBEDDING_AXES),
            name="position_embedding",
            **kwargs,
        )(jnp.arange(token_ids.shape[-1]))
        return tokens + positions


class CLIPMLP(nn.Module):
    """`fc2(activation(fc1(x)))`, hidden width `mlp_width`."""

    mlp_width: int
    activation: str = "quick_gelu"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = dense(self.mlp_width, DENSE_IN_KERNEL_AXES, name="fc1", **kwargs)(x)
        hidden = ACTIVATIONS[self.activation](hidden)
        return dense(x.shape[-1], DENSE_OUT_KERNEL_AXES, name="fc2", **kwargs)(hidden)


class CLIPEncoderLayer(nn.Module):
    """`x + self_attn(layer_norm1(x))`, then `x + mlp(layer_norm2(x))`.

    The text transformer's attention is causal; the vision transformer's (`causal=False`)
    attends over every patch.
    """

    num_heads: int
    mlp_width: int
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    causal: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = Attention(
            self.num_heads, use_qkv_bias=True, causal=self.causal, name="self_attn", **kwargs
        )
        x = x + attention(layer_norm(self.layer_norm_eps, name="layer_norm1", **kwargs)(x))
        mlp = CLIPMLP(self.mlp_width, self.activation, name="mlp", **kwargs)
        return x + mlp(layer_norm(self.layer_norm_eps, name="layer_norm2", **kwargs)(x))


class CLIPEncoder(nn.Module):
    """The stack `layers_{i}`; returns the output of the first `num_layers_used` layers.

    Initialisation runs every layer, so the params hold all `num_layers` whatever the
    cut: one set of weights serves every `skip_last_layers`.
    """

    num_layers: int
    num_heads: int
    mlp_width: int
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    causal: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, num_layers_used: int) -> jax.Array:
        num_layers_run = self.num_layers if self.is_initializing() else num_layers_used
        hidden = x
        for i in range(num_layers_run):
            x = CLIPEncoderLayer(
                self.num_heads,
                self.mlp_width,
                self.activation,
                self.layer_norm_eps,
                self.causal,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"layers_{i}",
            )(x)
            if i + 1 == num_layers_used:
                hidden = x
        return hidden


class CLIPTextTransformer(nn.Module):
    """Token ids `(B, L)` to hidden states `(B, L, width)`, as transformers' `CLIPTextModel`.

    Attributes:
      vocab_size: rows of the token embedding table.
      max_length: the longest token sequence (rows of the position embedding).
      width: hidden width (`hidden_size`), the U-Net's `context_dim`.
      num_layers: transformer layers (`num_hidden_layers`).
      num_heads: attention heads; `width` must be divisible by it.
      mlp_width: hidden width of each layer's MLP (`intermediate_size`).
      activation: the MLP's activation (`hidden_act`), a key of `ACTIVATIONS`.
      layer_norm_eps: epsilon of every LayerNorm.
      skip_last_layers: with `k > 0`, the output is that of layer `num_layers - k`,
        passed through `final_layer_norm` (diffusers' `clip_skip`; 1 is the penultimate
        layer). The params are the same for every `k`: `module.clone(skip_last_layers=k)`.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    vocab_size: int
    max_length: int = 77
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    skip_last_layers: int = 0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, token_ids: jax.Array) -> jax.Array:
        """Encodes `(B, L)` integer token ids (`L <= max_length`) as `ClipTokenizer` makes them.

        Returns:
          `(B, L, width)` hidden states after `final_layer_norm`.
        """
        length = token_ids.shape[-1]
        if token_ids.ndim != 2 or length > self.max_length:
            raise ValueError(
                f"token_ids must be (B, L) with L <= max_length={self.max_length}; "
                f"got {token_ids.shape}."
            )
        if not 0 <= self.skip_last_layers < self.num_layers:
            raise ValueError(
                f"skip_last_layers must be in [0, {self.num_layers - 1}] for a "
                f"{self.num_layers}-layer text transformer; got {self.skip_last_layers}."
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)}; got {self.activation!r}."
            )
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPTextEmbeddings(
            self.vocab_size, self.max_length, self.width, name="embeddings", **kwargs
        )(token_ids)
        x = CLIPEncoder(
            self.num_layers,
            self.num_heads,
            self.mlp_width,
            self.activation,
            self.layer_norm_eps,
            name="encoder",
            **kwargs,
        )(x, self.num_layers - self.skip_last_layers)
        return layer_norm(self.layer_norm_eps, name="final_layer_norm", **kwargs)(x)


def pooled_output(hidden_states: jax.Array, token_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """The hidden state at each sequence's end-of-text token, transformers' `pooler_output`.

    The rule is transformers' `CLIPTextModel`: the first position holding `eos_token_id`
    (padding may repeat that token), or, for old configs whose `eos_token_id` is 2, the
    position of the largest token id.

    Args:
      hidden_states: `(B, L, width)`, the output of `CLIPTextTransformer`.
      token_ids: the `(B, L)` token ids they were computed from.
      eos_token_id: the model config's `eos_token_id`.

    Returns:
      `(B, width)`.
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        positions = jnp.argmax(token_ids, axis=-1)
    else:
        positions = jnp.argmax(token_ids == eos_token_id, axis=-1)
    return jnp.take_along_axis(hidden_states, positions[:, None, None], axis=1)[:, 0]
