"""The patch-GAN discriminator of stage-1 autoencoder training (pix2pix, as in taming).

`NLayerDiscriminator` maps images to a grid of logits, one per overlapping patch: with the
default three layers, each logit sees a 70x70 receptive field and a 32x32 image gives a
2x2 grid.

Module names follow the PyTorch `nn.Sequential` of taming's `NLayerDiscriminator`: layer
`main.{i}` of the Sequential is `main_{i}` here, counting the LeakyReLUs that hold no
parameters, so ``ldm_jax.interop.convert.torch_to_flax`` loads a taming discriminator's
state dict directly (ignoring BatchNorm's running-statistics buffers). With the defaults:
`main_0` conv, `main_2` conv, `main_3` norm, `main_5` conv, `main_6` norm, `main_8` conv,
`main_9` norm, `main_11` the last conv. With `norm="none"` the norms are left out of the
count: `main_0`, `main_2`, `main_4`, `main_6`, `main_8`.
"""

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import NORM_AXES, conv

DISCRIMINATOR_KERNEL_SIZE = 4
DISCRIMINATOR_PADDING = ((1, 1), (1, 1))
LEAKY_RELU_SLOPE = 0.2
MAX_CHANNEL_MULTIPLIER = 8
BATCH_NORM_EPS = 1e-5
# taming's weights_init: conv kernels N(0, 0.02), norm scales N(1, 0.02), norm biases 0.
# Conv biases start at 0 (taming leaves PyTorch's small uniform default there).
INIT_STDDEV = 0.02
DISCRIMINATOR_NORMS = ("batch", "none")


def _normal_around_one(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    return 1.0 + INIT_STDDEV * jax.random.normal(key, shape, dtype)


class TrainingBatchNorm(nn.Module):
    """BatchNorm that always normalises with the statistics of the current batch.

    Mean and biased variance are taken over batch, height and width, as PyTorch's
    `BatchNorm2d` in training mode. Under `jit` on a batch sharded across devices,
    `jnp.mean` over the batch axis is the global statistic, so every device normalises
    alike (PyTorch's SyncBatchNorm). No running averages are kept: the discriminator is only
    ever applied in training mode, so it has no `batch_stats` collection.
    """

    epsilon: float = BATCH_NORM_EPS
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(_normal_around_one, NORM_AXES),
            (channels,),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), NORM_AXES),
            (channels,),
            self.param_dtype,
        )
        # Statistics in at least float32: a bfloat16 mean over a whole batch loses digits.
        stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
        x32 = x.astype(stats_dtype)
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x32, axis=axes)
        variance = jnp.mean(jnp.square(x32 - mean), axis=axes)
        normalised = (x32 - mean) * jax.lax.rsqrt(variance + self.epsilon)
        return (normalised * scale.astype(stats_dtype) + bias.astype(stats_dtype)).astype(
            self.dtype
        )


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: NHWC images in [-1, 1] to patch logits `(B, h, w, 1)`.

    A 4x4 stride-2 conv and LeakyReLU(0.2); `num_layers - 1` blocks of 4x4 stride-2 conv,
    norm and LeakyReLU with `base_channels * min(2**n, 8)` channels; one such block with
    stride 1; a last 4x4 stride-1 conv to one channel. Every conv pads by 1 on each side.
    Convs followed by a norm have no bias (the norm's bias takes its place).

    Attributes:
      base_channels: channels of the first conv (taming's `ndf`).
      num_layers: number of stride-2 convs (taming's `n_layers`).
      norm: "batch" for `TrainingBatchNorm`, "none" for no normalisation.
      dtype: computation dtype.
      param_dtype: parameter dtype.
    """

    base_channels: int = 64
    num_layers: int = 3
    norm: Literal["batch", "none"] = "batch"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _conv(self, features: int, strides: int, use_bias: bool, name: str) -> nn.Conv:
        return conv(
            features,
            DISCRIMINATOR_KERNEL_SIZE,
            strides=strides,
            padding=DISCRIMINATOR_PADDING,
            use_bias=use_bias,
            kernel_init=nn.initializers.normal(INIT_STDDEV),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """Patch logits of `images` `(B, H, W, C)`; see the module docstring for `h, w`."""
        if self.norm not in DISCRIMINATOR_NORMS:
            raise ValueError(
                f"NLayerDiscriminator norm must be one of {DISCRIMINATOR_NORMS}, got {self.norm!r}."
            )
        if self.num_layers < 1:
            raise ValueError(
                f"NLayerDiscriminator num_layers must be at least 1, got {self.num_layers}."
            )
        normed = self.norm == "batch"
        # (channels, stride, normalised) of each conv + [norm +] LeakyReLU block.
        blocks = [(self.base_channels, 2, False)]
        for n in range(1, self.num_layers + 1):
            channels = self.base_channels * min(2**n, MAX_CHANNEL_MULTIPLIER)
            blocks.append((channels, 2 if n < self.num_layers else 1, normed))

        x = images
        index = 0  # the layer's position in taming's nn.Sequential
        for channels, strides, with_norm in blocks:
            x = self._conv(channels, strides, not with_norm, f"main_{index}")(x)
            if with_norm:
                x = TrainingBatchNorm(
                    dtype=self.dtype, param_dtype=self.param_dtype, name=f"main_{index + 1}"
                )(x)
            x = nn.leaky_relu(x, LEAKY_RELU_SLOPE)
            index += 3 if with_norm else 2
        return self._conv(1, 1, True, f"main_{index}")(x)
