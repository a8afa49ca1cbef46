"""The stage-1 autoencoders, with the module trees of diffusers' `AutoencoderKL` and `VQModel`.

`encoder` (`conv_in`, `down_blocks_{i}`, `mid_block`, `conv_norm_out`, `conv_out`),
`quant_conv`, (VQ: `quantize`), `post_quant_conv` and `decoder` (`conv_in`, `mid_block`,
`up_blocks_{i}`, `conv_norm_out`, `conv_out`). A level with attention has `attentions_{j}`
after each `resnets_{j}` (diffusers' `AttnDownEncoderBlock2D` / `AttnUpDecoderBlock2D`).
Every GroupNorm has epsilon 1e-6, as diffusers.
"""

from collections.abc import Sequence
from typing import Literal

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import spatial_self_attention
from ldm_jax.models.layers import (
    BATCH_IMAGE_AXES,
    Downsample,
    ResnetBlock,
    Upsample,
    conv,
    group_norm,
)
from ldm_jax.models.quantizer import QuantizerOutput, VectorQuantizer

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


@flax.struct.dataclass
class DeterministicLatent:
    """The VQ encoder's latent: a point mass at `mean`, with the interface of `DiagonalGaussian`.

    `mean` is the latent before quantisation, which stage 2 diffuses; decoding quantises it.
    """

    mean: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.zeros_like(self.mean)

    @property
    def var(self) -> jax.Array:
        return jnp.zeros_like(self.mean)

    def sample(self, key: jax.Array) -> jax.Array:
        """The mean: there is nothing to draw (`key` is unused)."""
        del key
        return self.mean

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """No KL penalty: zeros of shape `(B,)`."""
        return jnp.zeros(self.mean.shape[:1], self.mean.dtype)


def _levels_with_attention(attention_levels: Sequence[bool], num_levels: int) -> tuple[bool, ...]:
    """One flag per level: `attention_levels`, or no attention anywhere when it is empty.

    Raises:
      ValueError: `attention_levels` is non-empty and not one entry per level.
    """
    if not attention_levels:
        return (False,) * num_levels
    if len(attention_levels) != num_levels:
        raise ValueError(
            f"attention_levels={tuple(attention_levels)} must have one entry per entry of "
            f"block_out_channels ({num_levels}), or be empty for no attention in the levels."
        )
    return tuple(bool(level) for level in attention_levels)


def _attention(x: jax.Array, norm_num_groups: int, name: str, kwargs: dict) -> jax.Array:
    """The autoencoders' single-head attention block."""
    return spatial_self_attention(
        x,
        num_heads=1,
        norm_num_groups=norm_num_groups,
        norm_eps=AUTOENCODER_NORM_EPS,
        name=name,
        **kwargs,
    )


class AutoencoderBlock(nn.Module):
    """`resnets_{j}` (each followed by `attentions_{j}` with `use_attention`), then
    `downsamplers_0` or `upsamplers_0` when `resample` is set."""

    out_channels: int
    num_layers: int
    resample: Literal["down", "up"] | None = None
    norm_num_groups: int = 32
    use_attention: bool = False
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
            if self.use_attention:
                x = _attention(x, self.norm_num_groups, f"attentions_{j}", kwargs)
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
        channels = x.shape[-1]
        resnet_kwargs = dict(
            norm_num_groups=self.norm_num_groups, norm_eps=AUTOENCODER_NORM_EPS, **kwargs
        )
        x = ResnetBlock(channels, name="resnets_0", **resnet_kwargs)(x)
        if self.use_attention:
            x = _attention(x, self.norm_num_groups, "attentions_0", kwargs)
        return ResnetBlock(channels, name="resnets_1", **resnet_kwargs)(x)


class Encoder(nn.Module):
    """Images `(B, H, W, C)` to `(B, H/f, W/f, out_channels)`, `f = 2 ** (levels - 1)`."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int = 1
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    attention_levels: Sequence[bool] = ()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups = self.norm_num_groups
        attention = _levels_with_attention(self.attention_levels, len(self.block_out_channels))
        h = conv(self.block_out_channels[0], name="conv_in", **kwargs)(images)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(self.block_out_channels):
            h = AutoencoderBlock(
                channels,
                self.layers_per_block,
                resample="down" if i < last else None,
                norm_num_groups=groups,
                use_attention=attention[i],
                name=f"down_blocks_{i}",
                **kwargs,
            )(h)
        h = AutoencoderMidBlock(groups, self.mid_block_attention, name="mid_block", **kwargs)(h)
        h = group_norm(groups, AUTOENCODER_NORM_EPS, name="conv_norm_out", **kwargs)(h)
        return conv(self.out_channels, name="conv_out", **kwargs)(nn.silu(h))


class Decoder(nn.Module):
    """Latents `(B, h, w, c)` to images `(B, h*f, w*f, out_channels)`; levels in reverse.

    Up block `i` decodes level `last - i`, so it has attention when `attention_levels[last - i]`
    does: the same resolutions attend in the encoder and the decoder.
    """

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int = 1
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    attention_levels: Sequence[bool] = ()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, latents: jax.Array, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Decodes latents to images.

        Args:
          latents: `(B, h, w, c)`.
          return_features: also return the input of `conv_out` (after `conv_norm_out` and
            silu), through which a loss reaches the last layer's kernel (the adaptive GAN
            weight of stage-1 training).

        Returns:
          images, or `(images, features)` with `return_features`.
        """
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups = self.norm_num_groups
        attention = _levels_with_attention(self.attention_levels, len(self.block_out_channels))
        h = conv(self.block_out_channels[-1], name="conv_in", **kwargs)(latents)
        h = AutoencoderMidBlock(groups, self.mid_block_attention, name="mid_block", **kwargs)(h)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(reversed(self.block_out_channels)):
            h = AutoencoderBlock(
                channels,
                self.layers_per_block + 1,
                resample="up" if i < last else None,
                norm_num_groups=groups,
                use_attention=attention[last - i],
                name=f"up_blocks_{i}",
                **kwargs,
            )(h)
        h = group_norm(groups, AUTOENCODER_NORM_EPS, name="conv_norm_out", **kwargs)(h)
        features = nn.silu(h)
        images = conv(self.out_channels, name="conv_out", **kwargs)(features)
        return (images, features) if return_features else images


class _Autoencoder(nn.Module):
    """What the KL and VQ autoencoders share: fields, input checks and the decoder's tail.

    Subclasses define `encoder`, `quant_conv`, `post_quant_conv` and `decoder` in `setup`.

    Attributes:
      in_channels: image channels in.
      out_channels: image channels out.
      block_out_channels: channels per level; the downsampling factor is
        `2 ** (len(block_out_channels) - 1)`.
      layers_per_block: resnets per encoder level (the decoder has one more).
      latent_channels: channels of the latents.
      norm_num_groups: GroupNorm groups.
      mid_block_attention: whether the mid blocks have their single-head attention.
      attention_levels: per level, whether its resnets are followed by single-head
        self-attention (CompVis `attn_resolutions`); empty for none.
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
    attention_levels: Sequence[bool] = ()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        """How many pixels per latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def _coder_fields(self) -> dict:
        """The fields the encoder and decoder are built with."""
        return dict(
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            mid_block_attention=self.mid_block_attention,
            attention_levels=self.attention_levels,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def _encode_to_moments(self, images: jax.Array) -> jax.Array:
        """`quant_conv(encoder(images))` of `(B, H, W, in_channels)` images, H, W divisible by f."""
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
        return nn.with_logical_constraint(moments, BATCH_IMAGE_AXES)

    def _decode_latents(
        self, latents: jax.Array, return_features: bool
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """`decoder(post_quant_conv(latents))`, with the decoder's features when asked."""
        latents = nn.with_logical_constraint(latents, BATCH_IMAGE_AXES)
        images, features = self.decoder(self.post_quant_conv(latents), return_features=True)
        images = nn.with_logical_constraint(images, BATCH_IMAGE_AXES)
        return (images, features) if return_features else images


class AutoencoderKL(_Autoencoder):
    """Stage 1 of latent diffusion: images in [-1, 1] to a Gaussian posterior over latents.

    The fields are those of `_Autoencoder` (channels, levels, attention, dtypes).
    """

    def setup(self) -> None:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(out_channels=2 * self.latent_channels, **self._coder_fields())
        self.quant_conv = conv(2 * self.latent_channels, 1, **kwargs)
        self.post_quant_conv = conv(self.latent_channels, 1, **kwargs)
        self.decoder = Decoder(out_channels=self.out_channels, **self._coder_fields())

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """Encodes `(B, H, W, in_channels)` images in [-1, 1], H and W divisible by the factor."""
        return DiagonalGaussian.from_moments(self._encode_to_moments(images))

    def decode(
        self, latents: jax.Array, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Decodes `(B, h, w, latent_channels)` latents to `(B, h*f, w*f, out_channels)` images.

        With `return_features`, returns `(images, features)`, `features` the input of the
        decoder's `conv_out` (see `Decoder`).
        """
        return self._decode_latents(latents, return_features)

    def __call__(
        self, images: jax.Array, sample_posterior: bool = True
    ) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstructs images through a posterior sample (rng "sample") or its mode."""
        posterior = self.encode(images)
        latents = (
            posterior.sample(self.make_rng("sample")) if sample_posterior else posterior.mode()
        )
        return self.decode(latents), posterior


class VQAutoencoder(_Autoencoder):
    """Stage 1 with a vector-quantised latent (CompVis `VQModel`, diffusers' `VQModel`).

    `encode` gives the latent before quantisation (what stage 2 diffuses, as CompVis'
    `VQModelInterface`); `decode` quantises it to the nearest codes first. Besides the
    fields of `_Autoencoder`:

    Attributes:
      num_embeddings: codebook size.
      commitment_beta: weight of the commitment loss.
      codebook_ema: update the codebook by EMA (in the "codebook" collection) instead of by
        gradient.
      ema_decay: decay of the codebook's EMA statistics.
      dead_code_threshold: restart codes used less than this (EMA count per batch); 0 for
        none. See `VectorQuantizer`.
    """

    num_embeddings: int = 512
    commitment_beta: float = 0.25
    codebook_ema: bool = False
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.0

    def setup(self) -> None:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(out_channels=self.latent_channels, **self._coder_fields())
        self.quant_conv = conv(self.latent_channels, 1, **kwargs)
        self.quantize = VectorQuantizer(
            num_embeddings=self.num_embeddings,
            embedding_dim=self.latent_channels,
            commitment_beta=self.commitment_beta,
            use_ema=self.codebook_ema,
            ema_decay=self.ema_decay,
            dead_code_threshold=self.dead_code_threshold,
            **kwargs,
        )
        self.post_quant_conv = conv(self.latent_channels, 1, **kwargs)
        self.decoder = Decoder(out_channels=self.out_channels, **self._coder_fields())

    def encode(self, images: jax.Array) -> DeterministicLatent:
        """The pre-quantisation latent of `(B, H, W, in_channels)` images in [-1, 1]."""
        return DeterministicLatent(mean=self._encode_to_moments(images))

    def encode_indices(self, images: jax.Array) -> jax.Array:
        """The codes of `images`: `(B, h, w)` int32 indices into the codebook."""
        return self.quantize(self.encode(images).mean).indices

    def decode(
        self, latents: jax.Array, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Quantises `(B, h, w, latent_channels)` latents (straight-through), then decodes.

        With `return_features`, returns `(images, features)` (see `Decoder`).
        """
        return self._decode_latents(self.quantize(latents).quantized, return_features)

    def __call__(
        self, images: jax.Array, train: bool = True, return_features: bool = False
    ) -> tuple[jax.Array, QuantizerOutput] | tuple[jax.Array, QuantizerOutput, jax.Array]:
        """Reconstructs images through their quantised latents.

        Args:
          images: `(B, H, W, in_channels)` in [-1, 1].
          train: update the codebook's state (EMA, dead-code restarts) when the "codebook"
            collection is mutable; restarts draw from the "codebook" rng.
          return_features: also return the input of the decoder's `conv_out`.

        Returns:
          `(reconstruction, quantizer output)`, plus the features with `return_features`.
        """
        quantized = self.quantize(self.encode(images).mean, train=train)
        reconstruction, features = self._decode_latents(quantized.quantized, True)
        if return_features:
            return reconstruction, quantized, features
        return reconstruction, quantized
