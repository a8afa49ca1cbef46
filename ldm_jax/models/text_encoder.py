"""A small text transformer trained from scratch with the U-Net (the LDM paper's choice).

Token ids to context tokens for cross-attention: token plus learned position embeddings,
pre-LayerNorm layers of bidirectional self-attention and GEGLU feed-forward, a final
LayerNorm. Every position attends to every other, padding included, so the U-Net sees
the same number of context tokens for every prompt.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import Attention, FeedForward
from ldm_jax.models.layers import EMBEDDING_TABLE_AXES, POSITION_EMBEDDING_AXES, layer_norm

EMBEDDING_INIT_STD = 0.02


class TextEncoderLayer(nn.Module):
    """`x + self_attn(norm1(x))`, then `x + ff(norm2(x))`."""

    num_heads: int
    mlp_ratio: int = 4
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + Attention(self.num_heads, name="self_attn", **kwargs)(
            layer_norm(name="norm1", **kwargs)(x)
        )
        return x + FeedForward(self.mlp_ratio, name="ff", **kwargs)(
            layer_norm(name="norm2", **kwargs)(x)
        )


class TextEncoder(nn.Module):
    """Token ids `(B, L)` to context `(B, L, width)`.

    Attributes:
      vocab_size: rows of the token embedding table.
      max_length: the longest token sequence (rows of the position embedding).
      width: token width, also the U-Net's `context_dim`.
      num_layers: transformer layers (`layers_{i}`).
      num_heads: attention heads; `width` must be divisible by it.
      mlp_ratio: feed-forward hidden width over `width`.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    vocab_size: int
    max_length: int = 16
    width: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, token_ids: jax.Array) -> jax.Array:
        """Encodes `(B, L)` integer token ids, `L <= max_length`."""
        length = token_ids.shape[-1]
        if token_ids.ndim != 2 or length > self.max_length:
            raise ValueError(
                f"token_ids must be (B, L) with L <= max_length={self.max_length}; "
                f"got {token_ids.shape}."
            )
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embedding_init = nn.initializers.normal(EMBEDDING_INIT_STD)
        tokens = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=nn.with_logical_partitioning(embedding_init, EMBEDDING_TABLE_AXES),
            name="token_embedding",
            **kwargs,
        )(token_ids)
        positions = self.param(
            "position_embedding",
            nn.with_logical_partitioning(embedding_init, POSITION_EMBEDDING_AXES),
            (self.max_length, self.width),
            self.param_dtype,
        )
        x = tokens + positions[:length].astype(self.dtype)
        for i in range(self.num_layers):
            x = TextEncoderLayer(self.num_heads, self.mlp_ratio, name=f"layers_{i}", **kwargs)(x)
        return layer_norm(name="final_layer_norm", **kwargs)(x)
