"""The latent diffusion U-Net, with the module tree of diffusers' `UNet2DConditionModel`.

`conv_in`, `time_embedding` (and `class_embedding`), `down_blocks_{i}`, `mid_block`,
`up_blocks_{i}` (levels in reverse, as diffusers), `conv_norm_out`, `conv_out`. A level
with attention has an attention block after each of its resnets; the up path
concatenates the down path's features (skip connections) before each of its resnets.

Attention blocks are `SpatialTransformer`s (`attention_type="transformer"`: self- and
cross-attention, as Stable Diffusion and diffusers' `UNet2DConditionModel`) or plain
group-normed self-attention (`"plain"`: CompVis' `AttentionBlock`, the unconditional LDMs,
diffusers' `UNet2DModel`). Every configuration is that of one of those two diffusers
classes, with the same tensors, or (class labels as a cross-attention token, the CompVis
class-conditional ImageNet LDM) of the original CompVis U-Net.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import SpatialTransformer, spatial_self_attention
from ldm_jax.models.layers import (
    BATCH_IMAGE_AXES,
    EMBEDDING_TABLE_AXES,
    Downsample,
    ResnetBlock,
    TimestepEmbedding,
    Upsample,
    conv,
    group_norm,
    timestep_embedding,
)

# "transformer": a SpatialTransformer after each resnet; "plain": group-normed self-attention.
ATTENTION_TYPES = ("transformer", "plain")
# Rematerialisation of the resnets and spatial transformers (a key of `REMAT_POLICIES`;
# plain self-attention blocks are never rematerialised): "none"
# keeps every activation for the backward pass; "full" keeps only each block's inputs and
# recomputes the rest; "save_dots" also keeps the outputs of the matmuls without batch
# dimensions (the q/k/v/out, feed-forward and projection layers) and recomputes the
# convolutions, norms, attention scores and elementwise ops, the largest activations.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# Where a class label enters: its embedding added to the timestep embedding ("time",
# diffusers' `num_class_embeds`), or as the one token of the cross-attention context
# ("context", CompVis' `ClassEmbedder`).
CLASS_CONDITIONINGS = ("time", "context")


class _LevelBlock(nn.Module):
    """Fields and sub-module builders shared by the U-Net's down, mid and up blocks."""

    out_channels: int
    num_heads: int
    use_attention: bool = True
    attention_type: str = "transformer"
    transformer_depth: int = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    remat: str = "none"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _block_class(self, module_class: type[nn.Module], **static: int) -> type[nn.Module]:
        """`module_class`, rematerialised with the level's policy unless it is "none"."""
        if self.remat == "none":
            return module_class
        return nn.remat(module_class, policy=REMAT_POLICIES[self.remat], **static)

    def resnet(self, name: str) -> ResnetBlock:
        """The resnet `name`; call it as `(x, temb, train)` (`train` static under remat)."""
        return self._block_class(ResnetBlock, static_argnums=(3,))(
            self.out_channels,
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            dropout=self.dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def attend(self, name: str, x: jax.Array, context: jax.Array | None) -> jax.Array:
        """The level's attention block `name` on `x` (called from a compact method)."""
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if self.attention_type == "plain":
            return spatial_self_attention(
                x,
                num_heads=self.num_heads,
                norm_num_groups=self.norm_num_groups,
                norm_eps=self.norm_eps,
                **kwargs,
            )
        return self._block_class(SpatialTransformer)(
            self.num_heads,
            depth=self.transformer_depth,
            use_linear_projection=self.use_linear_projection,
            norm_num_groups=self.norm_num_groups,
            **kwargs,
        )(x, context)


class DownBlock(_LevelBlock):
    """`resnets_{j}` (each followed by `attentions_{j}`), then `downsamplers_0`."""

    num_layers: int = 2
    add_downsample: bool = True

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array | None, *, train: bool
    ) -> tuple[jax.Array, list[jax.Array]]:
        """Returns the block's output and its features for the up path's skips."""
        skips = []
        for j in range(self.num_layers):
            x = self.resnet(f"resnets_{j}")(x, temb, train)
            if self.use_attention:
                x = self.attend(f"attentions_{j}", x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample(
                self.out_channels,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="downsamplers_0",
            )(x)
            skips.append(x)
        return x, skips


class MidBlock(_LevelBlock):
    """`resnets_0`, `attentions_0`, `resnets_1`; only `resnets_0` without attention.

    These are diffusers' `UNetMidBlock2DCrossAttn` and, without attention, the
    `UNetMidBlock2D` that `UNet2DConditionModel` builds (no attention, no second resnet).
    """

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array | None, *, train: bool
    ) -> jax.Array:
        x = self.resnet("resnets_0")(x, temb, train)
        if self.use_attention:
            x = self.attend("attentions_0", x, context)
            x = self.resnet("resnets_1")(x, temb, train)
        return x


class UpBlock(_LevelBlock):
    """One resnet per skip (`resnets_{j}`, each after `attentions_{j}`), then `upsamplers_0`."""

    add_upsample: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        skips: Sequence[jax.Array],
        temb: jax.Array,
        context: jax.Array | None,
        *,
        train: bool,
    ) -> jax.Array:
        """Consumes `skips` from the last (the deepest) to the first."""
        for j, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip], axis=-1)
            x = self.resnet(f"resnets_{j}")(x, temb, train)
            if self.use_attention:
                x = self.attend(f"attentions_{j}", x, context)
        if self.add_upsample:
            x = Upsample(
                self.out_channels,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="upsamplers_0",
            )(x)
        return x


class UNet(nn.Module):
    """ε/v-prediction U-Net on latents `(B, H, W, in_channels)`.

    Attributes:
      in_channels: channels of the input (latents, plus any concatenated conditioning).
      out_channels: channels of the prediction.
      block_out_channels: channels per level; every level but the last halves the size.
      layers_per_block: resnets per level on the down path (the up path has one more).
      attention_levels: per level, whether an attention block follows each resnet.
      attention_type: "transformer" (spatial transformers with cross-attention) or
        "plain" (group-normed self-attention, no context); see `ATTENTION_TYPES`.
      mid_block_attention: True for a mid block of resnet, attention block, resnet
        (diffusers' "UNetMidBlock2DCrossAttn", or `UNet2DModel`'s "UNetMidBlock2D");
        False for a single resnet (the "UNetMidBlock2D" of `UNet2DConditionModel`).
      num_attention_heads: heads of every attention block, or one count per level (the
        mid block uses the last); the head width is `channels // heads`. In diffusers'
        `UNet2DConditionModel`, `attention_head_dim` is, despite its name, this number.
      transformer_depth: transformer blocks per spatial transformer, or one count per
        level (the mid block uses the last): diffusers' `transformer_layers_per_block`.
      context_dim: width of the cross-attention context, or None for a model without
        one (`attn2` then attends to the features themselves).
      num_classes: number of class labels, or None. Label `num_classes` is the "null"
        class of classifier-free guidance, so the embedding table `class_embedding` has
        `num_classes + 1` rows: a diffusers model with `num_class_embeds=N` is
        `num_classes=N - 1`, CompVis' ImageNet `ClassEmbedder(n_classes=1001)` is 1000.
      class_conditioning: "time" (the label's embedding is added to the timestep
        embedding) or "context" (it is the single cross-attention token, of width
        `context_dim`, and no context is passed); see `CLASS_CONDITIONINGS`.
      use_linear_projection: dense (Stable Diffusion 2) instead of 1x1 conv `proj_in`
        and `proj_out` in the spatial transformers.
      norm_num_groups: GroupNorm groups.
      norm_eps: epsilon of the resnets' and the output's GroupNorms (the transformers'
        GroupNorm has 1e-6 and their LayerNorms 1e-5, as in diffusers).
      dropout: dropout rate inside the resnets.
      remat: what the resnets and spatial transformers keep for the backward pass, a key of
        `REMAT_POLICIES`; the parameters are the same for every choice.
      flip_sin_to_cos: cosines first in the timestep features.
      freq_shift: `downscale_freq_shift` of the timestep features.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: Sequence[int] = (64, 128)
    layers_per_block: int = 2
    attention_levels: Sequence[bool] = (True, True)
    attention_type: str = "transformer"
    mid_block_attention: bool = True
    num_attention_heads: int | Sequence[int] = 4
    transformer_depth: int | Sequence[int] = 1
    context_dim: int | None = None
    num_classes: int | None = None
    class_conditioning: str = "time"
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    remat: str = "none"
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def takes_context(self) -> bool:
        """Whether callers pass a context: cross-attention whose tokens are not the labels."""
        class_context = self.num_classes is not None and self.class_conditioning == "context"
        return self.context_dim is not None and not class_context

    @property
    def heads_per_level(self) -> tuple[int, ...]:
        """Attention heads of each level, from `num_attention_heads`."""
        if isinstance(self.num_attention_heads, int):
            return (self.num_attention_heads,) * len(self.block_out_channels)
        return tuple(self.num_attention_heads)

    @property
    def depth_per_level(self) -> tuple[int, ...]:
        """Transformer blocks per spatial transformer of each level, from `transformer_depth`."""
        if isinstance(self.transformer_depth, int):
            return (self.transformer_depth,) * len(self.block_out_channels)
        return tuple(self.transformer_depth)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        timesteps: jax.Array,
        context: jax.Array | None = None,
        labels: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        """Predicts from noisy latents.

        Args:
          x: `(B, H, W, in_channels)`; H and W divisible by `2 ** (levels - 1)`.
          timesteps: `(B,)` or a scalar for the whole batch.
          context: `(B, S, context_dim)` cross-attention tokens; required exactly when
            `context_dim` is set, unless the labels are the context.
          labels: `(B,)` int class labels in `[0, num_classes]`; required exactly when
            `num_classes` is set.
          train: apply dropout, drawing from the "dropout" rng.

        Returns:
          `(B, H, W, out_channels)` in the compute dtype.
        """
        self._check_inputs(x, context, labels)
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(x, BATCH_IMAGE_AXES)
        levels = len(self.block_out_channels)
        time_features = timestep_embedding(
            jnp.broadcast_to(jnp.asarray(timesteps), (x.shape[0],)),
            self.block_out_channels[0],
            flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift,
        )
        time_embed_dim = 4 * self.block_out_channels[0]
        temb = TimestepEmbedding(time_embed_dim, name="time_embedding", **kwargs)(time_features)
        if self.num_classes is not None:
            as_context = self.class_conditioning == "context"
            class_embedding = nn.Embed(
                self.num_classes + 1,
                self.context_dim if as_context else time_embed_dim,
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(1.0), EMBEDDING_TABLE_AXES
                ),
                name="class_embedding",
                **kwargs,
            )(labels)
            if as_context:
                context = class_embedding[:, None, :]
            else:
                temb = temb + class_embedding

        block_kwargs = dict(
            attention_type=self.attention_type,
            use_linear_projection=self.use_linear_projection,
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            dropout=self.dropout,
            remat=self.remat,
            **kwargs,
        )
        heads, depths = self.heads_per_level, self.depth_per_level
        h = conv(self.block_out_channels[0], name="conv_in", **kwargs)(x)
        skips = [h]
        for level, channels in enumerate(self.block_out_channels):
            h, level_skips = DownBlock(
                channels,
                heads[level],
                use_attention=self.attention_levels[level],
                transformer_depth=depths[level],
                num_layers=self.layers_per_block,
                add_downsample=level < levels - 1,
                name=f"down_blocks_{level}",
                **block_kwargs,
            )(h, temb, context, train=train)
            skips.extend(level_skips)
        h = MidBlock(
            self.block_out_channels[-1],
            heads[-1],
            use_attention=self.mid_block_attention,
            transformer_depth=depths[-1],
            name="mid_block",
            **block_kwargs,
        )(h, temb, context, train=train)
        skips_per_level = self.layers_per_block + 1
        for i, level in enumerate(reversed(range(levels))):
            level_skips, skips = skips[-skips_per_level:], skips[:-skips_per_level]
            h = UpBlock(
                self.block_out_channels[level],
                heads[level],
                use_attention=self.attention_levels[level],
                transformer_depth=depths[level],
                add_upsample=level > 0,
                name=f"up_blocks_{i}",
                **block_kwargs,
            )(h, level_skips, temb, context, train=train)
        h = group_norm(self.norm_num_groups, self.norm_eps, name="conv_norm_out", **kwargs)(h)
        h = conv(self.out_channels, name="conv_out", **kwargs)(nn.silu(h))
        return nn.with_logical_constraint(h, BATCH_IMAGE_AXES)

    def _check_inputs(
        self, x: jax.Array, context: jax.Array | None, labels: jax.Array | None
    ) -> None:
        levels = len(self.block_out_channels)
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(
                f"attention_type={self.attention_type!r}; choose one of {ATTENTION_TYPES}."
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {tuple(REMAT_POLICIES)}.")
        if self.class_conditioning not in CLASS_CONDITIONINGS:
            raise ValueError(
                f"class_conditioning={self.class_conditioning!r}; choose one of "
                f"{CLASS_CONDITIONINGS}."
            )
        if len(self.attention_levels) != levels:
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries; it needs one per "
                f"level of block_out_channels ({levels})."
            )
        if len(self.heads_per_level) != levels:
            raise ValueError(
                f"num_attention_heads must be an int or have one entry per level ({levels}); "
                f"got {self.num_attention_heads}."
            )
        if len(self.depth_per_level) != levels:
            raise ValueError(
                f"transformer_depth must be an int or have one entry per level ({levels}); "
                f"got {self.transformer_depth}."
            )
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"UNet input must be (B, H, W, in_channels={self.in_channels}); got {x.shape}."
            )
        factor = 2 ** (levels - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"UNet input height and width must be divisible by {factor} "
                f"(2 ** (len(block_out_channels) - 1)); got {x.shape[1]}x{x.shape[2]}."
            )
        class_context = self.num_classes is not None and self.class_conditioning == "context"
        if self.attention_type == "plain" and self.context_dim is not None:
            raise ValueError(
                f"plain attention has no cross-attention: context_dim must be None, got "
                f"{self.context_dim} (use attention_type='transformer')."
            )
        if class_context:
            if self.context_dim is None or context is not None:
                raise ValueError(
                    "class_conditioning='context' makes the labels the context: set context_dim "
                    "(the class embedding width) and pass no context."
                )
        elif self.context_dim is None:
            if context is not None:
                raise ValueError("context was given but context_dim is None (no cross-attention).")
        elif context is None or context.shape[-1] != self.context_dim:
            shape = None if context is None else context.shape
            raise ValueError(
                f"context must be (B, S, context_dim={self.context_dim}); got {shape}."
            )
        if (self.num_classes is None) != (labels is None):
            raise ValueError(
                f"labels must be given exactly when num_classes is set (num_classes="
                f"{self.num_classes}, labels {'missing' if labels is None else 'given'})."
            )
