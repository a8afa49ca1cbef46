"""CLIP's vision transformer and the joint image-text embedding of transformers' `CLIPModel`.

Images are cut into patches by a strided convolution, a learned class token is put first,
position embeddings added, then `pre_layrnorm` (transformers' spelling), the same encoder
layers as the text transformer without the causal mask, and `post_layernorm` on the class
token. `CLIPImageTextModel` projects that and the text transformer's end-of-text state into
one embedding space (`visual_projection`, `text_projection`, both without bias), where the
cosine of an image and a caption says how well they fit (the CLIP score). Module names are
transformers' (`vision_model/embeddings/patch_embedding`, ...), so weights map one to one.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.clip import (
    EMBEDDING_INIT_STD,
    CLIPEncoder,
    CLIPTextTransformer,
    pooled_output,
)
from ldm_jax.models.layers import (
    CONV_KERNEL_AXES,
    DENSE_IN_KERNEL_AXES,
    POSITION_EMBEDDING_AXES,
    dense,
    layer_norm,
)

# The mean and standard deviation OpenAI's CLIP normalises RGB in [0, 1] with.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPVisionEmbeddings(nn.Module):
    """`[class_embedding, patch_embedding(x)] + position_embedding(0..num_patches)`."""

    width: int
    image_size: int
    patch_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        init = nn.initializers.normal(EMBEDDING_INIT_STD)
        patches = nn.Conv(
            self.width,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(init, CONV_KERNEL_AXES),
            name="patch_embedding",
        )(pixels)
        batch = pixels.shape[0]
        patches = patches.reshape(batch, -1, self.width)  # row-major, as torch's flatten(2)
        class_token = self.param(
            "class_embedding",
            nn.with_logical_partitioning(init, ("embed",)),
            (self.width,),
            self.param_dtype,
        )
        tokens = jnp.concatenate(
            [jnp.broadcast_to(class_token.astype(patches.dtype), (batch, 1, self.width)), patches],
            axis=1,
        )
        num_positions = (self.image_size // self.patch_size) ** 2 + 1
        positions = nn.Embed(
            num_positions,
            self.width,
            embedding_init=nn.with_logical_partitioning(init, POSITION_EMBEDDING_AXES),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="position_embedding",
        )(jnp.arange(num_positions))
        return tokens + positions


class CLIPVisionTransformer(nn.Module):
    """Normalised images `(B, S, S, 3)` to the `(B, width)` pooled output, as transformers'
    `CLIPVisionModel` (`pooler_output`).

    Attributes:
      image_size: the side `S` the position embeddings are made for.
      patch_size: the side of each patch; must divide `image_size`.
      width, num_layers, num_heads, mlp_width, activation, layer_norm_eps: as for
        `CLIPTextTransformer`.
    """

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        if pixels.ndim != 4 or pixels.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"the CLIP vision transformer takes (B, {self.image_size}, {self.image_size}, 3) "
                f"images; got {pixels.shape}"
            )
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPVisionEmbeddings(
            self.width, self.image_size, self.patch_size, name="embeddings", **kwargs
        )(pixels)
        x = layer_norm(self.layer_norm_eps, name="pre_layrnorm", **kwargs)(x)
        x = CLIPEncoder(
            self.num_layers,
            self.num_heads,
            self.mlp_width,
            self.activation,
            self.layer_norm_eps,
            causal=False,
            name="encoder",
            **kwargs,
        )(x, self.num_layers)
        return layer_norm(self.layer_norm_eps, name="post_layernorm", **kwargs)(x[:, 0])


class CLIPImageTextModel(nn.Module):
    """transformers' `CLIPModel`: images and token ids into one embedding space.

    Attributes:
      vision_model: the vision transformer.
      text_model: the text transformer.
      projection_dim: width of the joint embedding.
      eos_token_id: the text config's `eos_token_id`, where the text is pooled.
    """

    vision_model: CLIPVisionTransformer
    text_model: CLIPTextTransformer
    projection_dim: int = 512
    eos_token_id: int = 49407

    def setup(self) -> None:
        self.visual_projection = dense(
            self.projection_dim, DENSE_IN_KERNEL_AXES, use_bias=False, dtype=self.vision_model.dtype
        )
        self.text_projection = dense(
            self.projection_dim, DENSE_IN_KERNEL_AXES, use_bias=False, dtype=self.text_model.dtype
        )

    def encode_images(self, pixels: jax.Array) -> jax.Array:
        """`(B, S, S, 3)` normalised images to `(B, projection_dim)` (not unit-normalised)."""
        return self.visual_projection(self.vision_model(pixels))

    def encode_text(self, token_ids: jax.Array) -> jax.Array:
        """`(B, L)` token ids to `(B, projection_dim)` (not unit-normalised)."""
        hidden = self.text_model(token_ids)
        return self.text_projection(pooled_output(hidden, token_ids, self.eos_token_id))

    def __call__(self, pixels: jax.Array, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encode_images(pixels), self.encode_text(token_ids)
