"""The KL-regularised autoencoder, with the module tree of diffusers' `AutoencoderKL`.

`encoder` (`conv_in`, `down_blocks_{i}`, `mid_block`, `conv_norm_out`, `conv_out`),
`quant_conv`, `post_quant_conv` and `decoder` (`conv_in`, `mid_block`, `up_blocks_{i}`,
`conv_norm_out`, `conv_out`). Every GroupNorm has epsilon 1e-6, as diffusers.
"""

from collections.abc import Sequence
from typing import Literal

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import Attention
from ldm_jax.models.layers import (
    BATCH_IMAGE_AXES,
    Downsample,
    ResnetBlock,
    Upsample,
    conv,
    group_norm,
)

AUTOENCODER_NORM_EPS = 1e-6
# diffusers' Downsample2D(padding=0) pads only the bottom and right before its stride-2 conv.
ENCODER_DOWNSAMPLE_PADDING = ((0, 1), (0, 1))


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior `N(mean, exp(logvar))`, independent per latent element.

    Build it with `from_moments`, which clips `logvar` to [-30, 20] for stability.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Splits `(..., 2 * C)` moments into mean (first C channels) and log-variance."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @classmethod
    def from_mean_std(cls, mean: jax.Array, std: jax.Array) -> "DiagonalGaussian":
        """The posterior from stored means and standard deviations (a latent cache)."""
        return cls(mean=mean, logvar=jnp.clip(2.0 * jnp.log(std), -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """Draws `mean + std * noise`, noise standard normal."""
        noise = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL divergence to N(0, I), summed over all non-batch axes: shape `(B,)`."""
        elementwise = 0.5 * (jnp.square(self.mean) + self.var - 1.0 - self.logvar)
        return jnp.sum(elementwise, axis=tuple(range(1, elementwise.ndim)))


class AutoencoderBlock(nn.Module):
    """`resnets_{j}`, then `downsamplers_0` or `upsamplers_0` when `resample` is set."""

    out_channels: int
    num_layers: int
    resample: Literal["down", "up"] | None = None
    norm_num_groups: int = 32
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock(
                self.out_channels,
                norm_num_groups=self.norm_num_groups,
                norm_eps=AUTOENCODER_NORM_EPS,
                name=f"resnets_{j}",
                **kwargs,
            )(x)
        if self.resample == "down":
            x = Downsample(
                self.out_channels,
                padding=ENCODER_DOWNSAMPLE_PADDING,
                name="downsamplers_0",
                **kwargs,
            )(x)
        elif self.resample == "up":
            x = Upsample(self.out_channels, name="upsamplers_0", **kwargs)(x)
        return x


class AutoencoderMidBlock(nn.Module):
    """`resnets_0`, single-head `attentions_0` (group-normed, residual), `resnets_1`."""

    norm_num_groups: int = 32
    use_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, channels = x.shape
        resnet_kwargs = dict(
            norm_num_groups=self.norm_num_groups, norm_eps=AUTOENCODER_NORM_EPS, **kwargs
        )
        x = ResnetBlock(channels, name="resnets_0", **resnet_kwargs)(x)
        if self.use_attention:
            tokens = Attention(
                num_heads=1,
                use_qkv_bias=True,
                norm_num_groups=self.norm_num_groups,
                norm_eps=AUTOENCODER_NORM_EPS,
                name="attentions_0",
                **kwargs,
            )(x.reshape(batch, height * width, channels))
            x = tokens.reshape(batch, height, width, channels)
        return ResnetBlock(channels, name="resnets_1", **resnet_kwargs)(x)


class Encoder(nn.Module):
    """Images `(B, H, W, C)` to `(B, H/f, W/f, out_channels)`, `f = 2 ** (levels - 1)`."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int = 1
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups = self.norm_num_groups
        h = conv(self.block_out_channels[0], name="conv_in", **kwargs)(images)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(self.block_out_channels):
            h = AutoencoderBlock(
                channels,
                self.layers_per_block,
                resample="down" if i < last else None,
                norm_num_groups=groups,
                name=f"down_blocks_{i}",
                **kwargs,
            )(h)
        h = AutoencoderMidBlock(groups, self.mid_block_attention, name="mid_block", **kwargs)(h)
        h = group_norm(groups, AUTOENCODER_NORM_EPS, name="conv_norm_out", **kwargs)(h)
        return conv(self.out_channels, name="conv_out", **kwargs)(nn.silu(h))


class Decoder(nn.Module):
    """Latents `(B, h, w, c)` to images `(B, h*f, w*f, out_channels)`; levels in reverse."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int = 1
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups = self.norm_num_groups
        h = conv(self.block_out_channels[-1], name="conv_in", **kwargs)(latents)
        h = AutoencoderMidBlock(groups, self.mid_block_attention, name="mid_block", **kwargs)(h)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(reversed(self.block_out_channels)):
            h = AutoencoderBlock(
                channels,
                self.layers_per_block + 1,
                resample="up" if i < last else None,
                norm_num_groups=groups,
                name=f"up_blocks_{i}",
                **kwargs,
            )(h)
        h = group_norm(groups, AUTOENCODER_NORM_EPS, name="conv_norm_out", **kwargs)(h)
        return conv(self.out_channels, name="conv_out", **kwargs)(nn.silu(h))


class AutoencoderKL(nn.Module):
    """Stage 1 of latent diffusion: images in [-1, 1] to a Gaussian posterior over latents.

    Attributes:
      in_channels: image channels in.
      out_channels: image channels out.
      block_out_channels: channels per level; the downsampling factor is
        `2 ** (len(block_out_channels) - 1)`.
      layers_per_block: resnets per encoder level (the decoder has one more).
      latent_channels: channels of the latents.
      norm_num_groups: GroupNorm groups.
      mid_block_attention: whether the mid blocks have their single-head attention.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64, 128, 128)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        """How many pixels per latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self) -> None:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shared = dict(
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            mid_block_attention=self.mid_block_attention,
            **kwargs,
        )
        self.encoder = Encoder(out_channels=2 * self.latent_channels, **shared)
        self.quant_conv = conv(2 * self.latent_channels, 1, **kwargs)
        self.post_quant_conv = conv(self.latent_channels, 1, **kwargs)
        self.decoder = Decoder(out_channels=self.out_channels, **shared)

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """Encodes `(B, H, W, in_channels)` images in [-1, 1], H and W divisible by the factor."""
        factor = self.downsample_factor
        if images.ndim != 4 or images.shape[-1] != self.in_channels:
            raise ValueError(
                f"images must be (B, H, W, in_channels={self.in_channels}); got {images.shape}."
            )
        if images.shape[1] % factor or images.shape[2] % factor:
            raise ValueError(
                f"image height and width must be divisible by the autoencoder's downsample "
                f"factor {factor}; got {images.shape[1]}x{images.shape[2]}."
            )
        images = nn.with_logical_constraint(images, BATCH_IMAGE_AXES)
        moments = self.quant_conv(self.encoder(images))
        return DiagonalGaussian.from_moments(nn.with_logical_constraint(moments, BATCH_IMAGE_AXES))

    def decode(self, latents: jax.Array) -> jax.Array:
        """Decodes `(B, h, w, latent_channels)` latents to `(B, h*f, w*f, out_channels)` images."""
        latents = nn.with_logical_constraint(latents, BATCH_IMAGE_AXES)
        images = self.decoder(self.post_quant_conv(latents))
        return nn.with_logical_constraint(images, BATCH_IMAGE_AXES)

    def __call__(
        self, images: jax.Array, sample_posterior: bool = True
    ) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstructs images through a posterior sample (rng "sample") or its mode."""
        posterior = self.encode(images)
        latents = (
            posterior.sample(self.make_rng("sample")) if sample_posterior else posterior.mode()
        )
        return self.decode(latents), posterior
