"""InceptionV3 as the FID network: the 2048-d pool features of TensorFlow's FID Inception.

FID (Heusel et al., 2017) and KID are defined on the pool3 features of the Inception
network TensorFlow released in 2015. pytorch-fid reproduces it as torchvision's
``Inception3`` with four blocks changed (``FIDInceptionA``, ``FIDInceptionC``,
``FIDInceptionE_1``, ``FIDInceptionE_2``: average pools that leave the padding out of the
count, and a max pool in the last block), and this module is that network, NHWC:

    stem (Conv2d_1a_3x3 ... Conv2d_4a_3x3, two 3x3/2 max pools) -> Mixed_5b..5d (A)
    -> Mixed_6a (B) -> Mixed_6b..6e (C) -> Mixed_7a (D) -> Mixed_7b, 7c (E) -> global mean.

Every convolution is torchvision's ``BasicConv2d``: a bias-free convolution, batch norm
(epsilon 1e-3, running statistics only) and a ReLU. Module names are torchvision's
(``Mixed_6b/branch7x7_2/conv``), so the published weights map one to one
(``ldm_jax.interop.inception_weights``); the classifier is left out. Input: images in
[-1, 1], 299 x 299 for the published statistics (at least 75 x 75).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import CONV_KERNEL_AXES, NORM_AXES

FEATURE_DIM = 2048
IMAGE_SIZE = 299
# Three stride-2 stages with valid padding leave a 1 x 1 map from 75 pixels.
MIN_IMAGE_SIZE = 75
BATCH_NORM_EPSILON = 1e-3

Pair = tuple[int, int]


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed running statistics, all four held as params.

    The names (``scale``, ``bias``, ``running_mean``, ``running_var``) are those of a
    PyTorch ``BatchNorm2d`` state dict (``weight`` as ``scale``).
    """

    epsilon: float = BATCH_NORM_EPSILON
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]

        def param(name: str, init: nn.initializers.Initializer) -> jax.Array:
            boxed = nn.with_logical_partitioning(init, NORM_AXES)
            return self.param(name, boxed, (channels,), self.param_dtype)

        scale = param("scale", nn.initializers.ones_init())
        bias = param("bias", nn.initializers.zeros_init())
        mean = param("running_mean", nn.initializers.zeros_init())
        var = param("running_var", nn.initializers.ones_init())
        inverse = scale * jax.lax.rsqrt(var + self.epsilon)
        return (x - mean.astype(x.dtype)) * inverse.astype(x.dtype) + bias.astype(x.dtype)


class BasicConv(nn.Module):
    """torchvision's ``BasicConv2d``: ``relu(bn(conv(x)))``, the convolution without bias."""

    features: int
    kernel_size: Pair = (1, 1)
    strides: int = 1
    padding: Pair = (0, 0)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        (pad_h, pad_w) = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=(self.strides, self.strides),
            padding=((pad_h, pad_h), (pad_w, pad_w)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), CONV_KERNEL_AXES
            ),
            name="conv",
        )(x)
        return nn.relu(FrozenBatchNorm(param_dtype=self.param_dtype, name="bn")(x))


def _average_pool_3x3(x: jax.Array) -> jax.Array:
    """3 x 3, stride 1, padding 1, the padding left out of the count (pytorch-fid's blocks)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
    padding = ((1, 1), (1, 1)) if stride == 1 else ((0, 0), (0, 0))
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class _Block(nn.Module):
    """A mixed block: its branches are sequences of ``BasicConv`` after an optional pool."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def conv(self, name: str, features: int, kernel: Pair = (1, 1), **kwargs) -> BasicConv:
        padding = kwargs.pop("padding", (kernel[0] // 2, kernel[1] // 2))
        return BasicConv(
            features,
            kernel,
            padding=padding,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
            **kwargs,
        )

    def chain(self, x: jax.Array, layers: Sequence[tuple]) -> jax.Array:
        for name, *args in layers:
            x = self.conv(name, *args)(x)
        return x


class InceptionA(_Block):
    """``FIDInceptionA``: 1x1, 5x5, double 3x3 and average-pool branches."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate(
            [
                self.conv("branch1x1", 64)(x),
                self.chain(x, [("branch5x5_1", 48), ("branch5x5_2", 64, (5, 5))]),
                self.chain(
                    x,
                    [
                        ("branch3x3dbl_1", 64),
                        ("branch3x3dbl_2", 96, (3, 3)),
                        ("branch3x3dbl_3", 96, (3, 3)),
                    ],
                ),
                self.conv("branch_pool", self.pool_features)(_average_pool_3x3(x)),
            ],
            axis=-1,
        )


class InceptionB(_Block):
    """``InceptionB`` (Mixed_6a): a grid reduction by stride-2 branches and a max pool."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        valid = dict(padding=(0, 0), strides=2)
        return jnp.concatenate(
            [
                self.conv("branch3x3", 384, (3, 3), **valid)(x),
                self.conv("branch3x3dbl_3", 96, (3, 3), **valid)(
                    self.chain(x, [("branch3x3dbl_1", 64), ("branch3x3dbl_2", 96, (3, 3))])
                ),
                _max_pool_3x3(x, stride=2),
            ],
            axis=-1,
        )


class InceptionC(_Block):
    """``FIDInceptionC``: factorised 7x7 branches (1x7 then 7x1) and an average pool."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7, row, column = self.channels_7x7, (1, 7), (7, 1)
        return jnp.concatenate(
            [
                self.conv("branch1x1", 192)(x),
                self.chain(
                    x,
                    [("branch7x7_1", c7), ("branch7x7_2", c7, row), ("branch7x7_3", 192, column)],
                ),
                self.chain(
                    x,
                    [
                        ("branch7x7dbl_1", c7),
                        ("branch7x7dbl_2", c7, column),
                        ("branch7x7dbl_3", c7, row),
                        ("branch7x7dbl_4", c7, column),
                        ("branch7x7dbl_5", 192, row),
                    ],
                ),
                self.conv("branch_pool", 192)(_average_pool_3x3(x)),
            ],
            axis=-1,
        )


class InceptionD(_Block):
    """``InceptionD`` (Mixed_7a): the second grid reduction."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        valid = dict(padding=(0, 0), strides=2)
        branch3x3 = self.conv("branch3x3_2", 320, (3, 3), **valid)(self.conv("branch3x3_1", 192)(x))
        branch7x7x3 = self.chain(
            x,
            [
                ("branch7x7x3_1", 192),
                ("branch7x7x3_2", 192, (1, 7)),
                ("branch7x7x3_3", 192, (7, 1)),
            ],
        )
        branch7x7x3 = self.conv("branch7x7x3_4", 192, (3, 3), **valid)(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3(x, stride=2)], axis=-1)


class InceptionE(_Block):
    """``FIDInceptionE_1`` (average pool) or ``FIDInceptionE_2`` (``max_pool=True``)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def split(name: str, inputs: jax.Array) -> jax.Array:
            # A 1x3 and a 3x1 convolution side by side.
            return jnp.concatenate(
                [
                    self.conv(f"{name}a", 384, (1, 3))(inputs),
                    self.conv(f"{name}b", 384, (3, 1))(inputs),
                ],
                axis=-1,
            )

        pooled = _max_pool_3x3(x, stride=1) if self.max_pool else _average_pool_3x3(x)
        double = self.chain(x, [("branch3x3dbl_1", 448), ("branch3x3dbl_2", 384, (3, 3))])
        return jnp.concatenate(
            [
                self.conv("branch1x1", 320)(x),
                split("branch3x3_2", self.conv("branch3x3_1", 384)(x)),
                split("branch3x3dbl_3", double),
                self.conv("branch_pool", 192)(pooled),
            ],
            axis=-1,
        )


class FIDInceptionV3(nn.Module):
    """Images (B, H, W, 3) in [-1, 1] to the (B, 2048) pool3 features of the FID Inception.

    Attributes:
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or min(images.shape[1:3]) < MIN_IMAGE_SIZE:
            raise ValueError(
                f"the Inception network takes (B, H, W, 3) images of at least "
                f"{MIN_IMAGE_SIZE} x {MIN_IMAGE_SIZE} pixels; got {images.shape}"
            )
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = images.astype(self.dtype)
        stem = [
            ("Conv2d_1a_3x3", 32, (3, 3), 2, (0, 0)),
            ("Conv2d_2a_3x3", 32, (3, 3), 1, (0, 0)),
            ("Conv2d_2b_3x3", 64, (3, 3), 1, (1, 1)),
            None,
            ("Conv2d_3b_1x1", 80, (1, 1), 1, (0, 0)),
            ("Conv2d_4a_3x3", 192, (3, 3), 1, (0, 0)),
            None,
        ]
        for layer in stem:
            if layer is None:
                x = _max_pool_3x3(x, stride=2)
                continue
            name, features, kernel, strides, padding = layer
            x = BasicConv(features, kernel, strides, padding, name=name, **kwargs)(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features=pool_features, name=name, **kwargs)(x)
        x = InceptionB(name="Mixed_6a", **kwargs)(x)
        for name, channels in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160)):
            x = InceptionC(channels_7x7=channels, name=name, **kwargs)(x)
        x = InceptionC(channels_7x7=192, name="Mixed_6e", **kwargs)(x)
        x = InceptionD(name="Mixed_7a", **kwargs)(x)
        x = InceptionE(max_pool=False, name="Mixed_7b", **kwargs)(x)
        x = InceptionE(max_pool=True, name="Mixed_7c", **kwargs)(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def resize_for_inception(images: jax.Array, size: int = IMAGE_SIZE) -> jax.Array:
    """uint8 images (B, H, W, 3) to float [-1, 1] at ``size`` x ``size``, as pytorch-fid.

    Bilinear with half-pixel centres and no antialiasing: ``F.interpolate(mode='bilinear',
    align_corners=False)``, which pytorch-fid applies to every image.
    """
    pixels = images.astype(jnp.float32) / 255.0
    batch, _, _, channels = images.shape
    resized = jax.image.resize(
        pixels, (batch, size, size, channels), method="bilinear", antialias=False
    )
    return 2.0 * resized - 1.0
