"""LPIPS, the learned perceptual image distance (Zhang et al., CVPR 2018), on VGG16 features.

The stage-1 autoencoder's perceptual loss. `LPIPS` follows the `lpips` package's 'vgg'
network exactly: a fixed affine scaling of the [-1, 1] images, the five ReLU activations
relu1_2 ... relu5_3 of torchvision's VGG16, each unit-normalised over channels, the squared
difference of the two images' features weighted per channel by learned non-negative heads,
averaged over space and summed over the five layers.

Parameters (named for the weights they load; `ldm_jax.interop.lpips_weights` writes them as
one safetensors file whose tensor names are these paths joined with ".", in this layout):

* ``vgg.conv_{i}.kernel`` ``(3, 3, in, out)`` and ``vgg.conv_{i}.bias`` ``(out,)``: the
  convolution at index ``i`` of torchvision's ``vgg16().features`` (0, 2, 5, 7, 10, 12, 14,
  17, 19, 21, 24, 26, 28);
* ``lin_{k}.kernel`` ``(channels_k, 1)``, ``k = 0..4``: the channel weights of layer ``k``,
  the lpips package's 1x1 convolution ``lin{k}.model.1.weight`` ``(1, channels_k, 1, 1)``
  held as a dense kernel over channels.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import conv, dense

# Output channels of VGG16's convolutions, block by block; a 2x2 max-pool separates blocks.
VGG16_BLOCK_CHANNELS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# lpips' ScalingLayer: maps [-1, 1] images to the ImageNet statistics VGG16 was trained on.
SCALING_SHIFT = (-0.030, -0.088, -0.188)
SCALING_SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPSILON = 1e-10
# Four 2x2 pools precede relu5_3, which must keep at least one pixel.
MIN_IMAGE_SIZE = 16
HEAD_KERNEL_AXES = ("conv_in", "conv_out")


def _torchvision_conv_indices() -> tuple[tuple[int, ...], ...]:
    """Per block, each convolution's index in torchvision's `vgg16().features` Sequential.

    Every convolution is followed by a ReLU and every block by a max-pool, so the indices
    are (0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28).
    """
    indices, position = [], 0
    for channels in VGG16_BLOCK_CHANNELS:
        indices.append(tuple(range(position, position + 2 * len(channels), 2)))
        position += 2 * len(channels) + 1
    return tuple(indices)


VGG16_CONV_INDICES = _torchvision_conv_indices()


class VGG16Features(nn.Module):
    """The convolutional part of torchvision's VGG16, returning relu1_2 ... relu5_3.

    Attributes:
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, ...]:
        """The activations relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3.

        Args:
          images: (B, H, W, 3), normalised as VGG16 expects.

        Returns:
          Five (B, H / 2^k, W / 2^k, channels_k) arrays, k = 0..4 (pooling floors odd sizes).
        """
        x = images
        activations = []
        for block, (channels, indices) in enumerate(
            zip(VGG16_BLOCK_CHANNELS, VGG16_CONV_INDICES, strict=True)
        ):
            if block:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for width, index in zip(channels, indices, strict=True):
                layer = conv(
                    width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv_{index}"
                )
                x = nn.relu(layer(x))
            activations.append(x)
        return tuple(activations)


def _unit_normalize(features: jax.Array) -> jax.Array:
    """`features / (||features||_channels + 1e-10)`, as lpips' `normalize_tensor`.

    Where every channel of a pixel is zero the square root's derivative is infinite, but
    the ReLU before selects a zero gradient there, so the loss's gradient stays finite.
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True))
    return features / (norm + NORMALIZE_EPSILON)


class LPIPS(nn.Module):
    """The LPIPS distance with VGG16 features and linear heads (the lpips package's 'vgg').

    Attributes:
      dtype: compute dtype of the VGG16 convolutions; the normalisation and the distance are
        computed in float32 (a sum of squares over 512 channels loses too much in bfloat16).
      param_dtype: parameter dtype.
    """

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.vgg = VGG16Features(dtype=self.dtype, param_dtype=self.param_dtype)
        # A list attribute: Flax names the heads lin_0 ... lin_4.
        self.lin = [
            dense(
                1,
                HEAD_KERNEL_AXES,
                use_bias=False,
                dtype=jnp.float32,
                param_dtype=self.param_dtype,
            )
            for _ in VGG16_BLOCK_CHANNELS
        ]

    def __call__(self, images: jax.Array, references: jax.Array) -> jax.Array:
        """The perceptual distance of each image to its reference.

        Args:
          images: (B, H, W, 3) in [-1, 1], H and W at least 16.
          references: the same shape.

        Returns:
          (B,) float32 distances; 0 for identical images.
        """
        return jnp.sum(self.layer_distances(images, references), axis=-1)

    def layer_distances(self, images: jax.Array, references: jax.Array) -> jax.Array:
        """The five per-layer terms (relu1_2 ... relu5_3) whose sum is the distance: (B, 5)."""
        if images.shape != references.shape:
            raise ValueError(
                f"LPIPS compares images of one shape; got images {images.shape} and "
                f"references {references.shape}."
            )
        if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < MIN_IMAGE_SIZE:
            raise ValueError(
                f"LPIPS takes (batch, height, width, 3) images with height and width at least "
                f"{MIN_IMAGE_SIZE} (VGG16 pools them 4 times); got {images.shape}."
            )
        batch = images.shape[0]
        # One VGG16 pass over both sets of images.
        both = jnp.concatenate([images, references], axis=0)
        shift = jnp.asarray(SCALING_SHIFT, jnp.float32)
        scale = jnp.asarray(SCALING_SCALE, jnp.float32)
        features = self.vgg(((both.astype(jnp.float32) - shift) / scale).astype(self.dtype))
        terms = []
        for layer_features, head in zip(features, self.lin, strict=True):
            normalized = _unit_normalize(layer_features.astype(jnp.float32))
            squared_difference = jnp.square(normalized[:batch] - normalized[batch:])
            terms.append(jnp.mean(head(squared_difference), axis=(1, 2, 3)))
        return jnp.stack(terms, axis=-1)
