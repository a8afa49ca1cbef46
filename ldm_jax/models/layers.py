"""Building blocks shared by the U-Net and the autoencoder, with logical axis names.

Every parameter is created through `nn.with_logical_partitioning`, so the parallel layer can
map logical names to mesh axes with rules from the config (for example `conv_in` and
`embed` to `'fsdp'`; `conv_out`, `mlp` and `heads` to `'tensor'`). The logical names used
by the models of this package are, in full:

* ``conv_in``, ``conv_out``: input and output channels of a convolution kernel
  ``(kh, kw, cin, cout)``, which is named ``(None, None, "conv_in", "conv_out")``; the conv
  bias is ``("conv_out",)``.
* ``embed``, ``mlp``: a dense kernel from the model width to a hidden width is
  ``("embed", "mlp")`` and back ``("mlp", "embed")``; biases take the output axis name.
* ``heads``: attention query/key/value kernels are ``("embed", "heads")``, the attention
  output kernel ``("heads", "embed")``; biases take the output axis name.
* ``norm``: scale and bias of group and layer norms.
* ``vocab``: rows of an embedding table (``("vocab", "embed")``: tokens, class labels).
* ``length``: positions of a learned position embedding (``("length", "embed")``).
* ``batch``: not a parameter axis; the batch dimension of activations, constrained with
  `nn.with_logical_constraint` where the U-Net and the autoencoder take and return images.

Module and parameter names follow diffusers' `UNet2DConditionModel` and `AutoencoderKL`
(`norm1`, `conv1`, `time_emb_proj`, ...), with `name_{i}` where diffusers has `name.{i}`,
so that weights map one to one.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import cpu_conv

CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")
DENSE_IN_KERNEL_AXES = ("embed", "mlp")
DENSE_OUT_KERNEL_AXES = ("mlp", "embed")
ATTENTION_QKV_KERNEL_AXES = ("embed", "heads")
ATTENTION_OUT_KERNEL_AXES = ("heads", "embed")
NORM_AXES = ("norm",)
EMBEDDING_TABLE_AXES = ("vocab", "embed")
POSITION_EMBEDDING_AXES = ("length", "embed")
BATCH_IMAGE_AXES = ("batch", None, None, None)

LOGICAL_AXIS_NAMES = frozenset(
    {"conv_in", "conv_out", "embed", "mlp", "heads", "norm", "vocab", "length", "batch"}
)

Padding = Sequence[tuple[int, int]]


def dense(
    features: int,
    kernel_axes: tuple[str, str],
    *,
    use_bias: bool = True,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
    """A Dense layer whose kernel is named `kernel_axes` and whose bias the output axis."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), kernel_axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), kernel_axes[-1:]),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int = 3,
    *,
    strides: int = 1,
    padding: Padding | None = None,
    use_bias: bool = True,
    kernel_init: nn.initializers.Initializer | None = None,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    name: str | None = None,
) -> nn.Module:
    """A square convolution, by default padded by `kernel_size // 2` on every side.

    The padding is explicit (never "SAME") because a strided "SAME" convolution pads
    asymmetrically, unlike PyTorch's `padding=1`. The kernel initialiser defaults to LeCun
    normal. An unpadded 1x1 convolution of stride 1 is a `PointwiseConv`.
    """
    if padding is None:
        padding = ((kernel_size // 2, kernel_size // 2),) * 2
    kernel_init = nn.with_logical_partitioning(
        kernel_init or nn.initializers.lecun_normal(), CONV_KERNEL_AXES
    )
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), CONV_KERNEL_AXES[-1:])
    if kernel_size == 1 and strides == 1 and all(side == (0, 0) for side in padding):
        return PointwiseConv(
            features,
            use_bias=use_bias,
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=dtype,
            param_dtype=param_dtype,
            name=name,
        )
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        bias_init=bias_init,
        conv_general_dilated=cpu_conv.conv_general_dilated,  # oneDNN on one CPU device
        name=name,
    )


class PointwiseConv(nn.Module):
    """A 1x1 convolution computed as a matrix product over the channel axis.

    Its parameters are those of `nn.Conv` with a 1x1 kernel, initialised alike: `kernel`
    `(1, 1, in, features)` and `bias` `(features,)`. XLA's CPU backend runs the product, and
    above all its gradient, several times faster than the same convolution.
    """

    features: int
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        kernel = self.param(
            "kernel", self.kernel_init, (1, 1, channels, self.features), self.param_dtype
        )
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = x.reshape(-1, channels) @ kernel.reshape(channels, self.features)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.features)


def group_norm(
    num_groups: int,
    epsilon: float,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    name: str | None = None,
) -> "GroupNorm":
    """GroupNorm over the last (channel) axis, statistics over all non-batch axes."""
    return GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), NORM_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), NORM_AXES),
        name=name,
    )


class GroupNorm(nn.Module):
    """`nn.GroupNorm`'s function and parameters (`scale`, `bias`), computed channels first.

    The statistics are the per-channel means of `x` and `x²` over the positions, then the
    means of those over each group's channels (in float32); the normalisation is one
    per-channel scale and shift. Reducing over positions alone, with channels contiguous,
    is several times faster on XLA's CPU backend than reducing over positions and the
    channels of a group at once, forwards and backwards.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    scale_init: nn.initializers.Initializer = nn.initializers.ones_init()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises `(B, ..., C)`, C divisible by `num_groups`; returns the same shape."""
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(
                f"num_groups={self.num_groups} must divide the number of channels {channels}."
            )
        scale = self.param("scale", self.scale_init, (channels,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (channels,), self.param_dtype)
        positions = x.reshape(x.shape[0], -1, channels).astype(jnp.float32)
        grouped = (x.shape[0], self.num_groups, channels // self.num_groups)

        def group_mean(values: jax.Array) -> jax.Array:
            per_channel = jnp.mean(values, axis=1).reshape(grouped)
            return jnp.repeat(jnp.mean(per_channel, axis=-1), grouped[-1], axis=-1)

        mean = group_mean(positions)
        variance = jnp.maximum(group_mean(jnp.square(positions)) - jnp.square(mean), 0.0)
        channel_scale = jax.lax.rsqrt(variance + self.epsilon) * scale.astype(jnp.float32)
        channel_shift = bias.astype(jnp.float32) - mean * channel_scale
        y = positions * channel_scale[:, None, :] + channel_shift[:, None, :]
        dtype = self.dtype or jnp.result_type(x, scale, bias)
        return y.reshape(x.shape).astype(dtype)


def layer_norm(
    epsilon: float = 1e-5,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    name: str | None = None,
) -> nn.LayerNorm:
    """LayerNorm over the last axis (PyTorch's default epsilon 1e-5)."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), NORM_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), NORM_AXES),
        name=name,
    )


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal timestep features, as diffusers' `get_timestep_embedding`.

    With `half = dim // 2`, frequencies are `exp(-log(max_period) * i / (half - freq_shift))`
    for `i < half`; the features are `[sin(t f), cos(t f)]`, or `[cos, sin]` when
    `flip_sin_to_cos`, padded with one zero column when `dim` is odd.

    Args:
      timesteps: shape `(B,)`, integer or fractional timesteps.
      dim: number of features.
      flip_sin_to_cos: put the cosines first.
      freq_shift: `downscale_freq_shift` of diffusers.
      max_period: the longest period.

    Returns:
      float32 array of shape `(B, dim)`.
    """
    half = dim // 2
    exponent = -np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    embedding = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(embedding, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """The MLP on timestep features: `linear_2(silu(linear_1(x)))`."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = dense(self.features, DENSE_IN_KERNEL_AXES, name="linear_1", **kwargs)(features)
        return dense(self.features, DENSE_OUT_KERNEL_AXES, name="linear_2", **kwargs)(
            nn.silu(hidden)
        )


class ResnetBlock(nn.Module):
    """diffusers' `ResnetBlock2D` (default time-embedding mode, output scale 1).

    `conv2(dropout(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb))))))` plus
    the input, passed through a 1x1 `conv_shortcut` when the channel count changes.
    """

    out_channels: int
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """Applies the block (``train`` may be positional: a rematerialised block takes it as a
        static argument).

        Args:
          x: `(B, H, W, C)` features.
          temb: `(B, D)` time embedding, or None (the autoencoder) for no `time_emb_proj`.
          train: apply dropout, drawing from the "dropout" rng.

        Returns:
          `(B, H, W, out_channels)`.
        """
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm_kwargs = dict(num_groups=self.norm_num_groups, epsilon=self.norm_eps, **kwargs)
        h = nn.silu(group_norm(name="norm1", **norm_kwargs)(x))
        h = conv(self.out_channels, name="conv1", **kwargs)(h)
        if temb is not None:
            projected = dense(
                self.out_channels, DENSE_IN_KERNEL_AXES, name="time_emb_proj", **kwargs
            )(nn.silu(temb))
            h = h + projected[:, None, None, :]
        h = nn.silu(group_norm(name="norm2", **norm_kwargs)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.out_channels, name="conv2", **kwargs)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", **kwargs)(x)
        return x + h


class Downsample(nn.Module):
    """Halves height and width with a stride-2 3x3 convolution named `conv`.

    `padding` is ((1, 1), (1, 1)) in the U-Net and ((0, 1), (0, 1)) in the autoencoder's
    encoder, as diffusers' `Downsample2D(padding=1)` and `Downsample2D(padding=0)`.
    """

    out_channels: int
    padding: Padding = ((1, 1), (1, 1))
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv(
            self.out_channels,
            strides=2,
            padding=self.padding,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)


class Upsample(nn.Module):
    """Doubles height and width (nearest neighbour), then a 3x3 convolution named `conv`."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(
            x
        )
