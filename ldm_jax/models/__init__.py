"""Flax Linen models of latent diffusion: autoencoder, U-Net, text encoders and their layers."""

from ldm_jax.models.attention import (
    Attention,
    BasicTransformerBlock,
    FeedForward,
    SpatialTransformer,
    dot_product_attention,
)
from ldm_jax.models.autoencoder import (
    AutoencoderKL,
    Decoder,
    DeterministicLatent,
    DiagonalGaussian,
    Encoder,
    VQAutoencoder,
)
from ldm_jax.models.clip import CLIPTextTransformer
from ldm_jax.models.discriminator import DISCRIMINATOR_NORMS, NLayerDiscriminator
from ldm_jax.models.layers import (
    LOGICAL_AXIS_NAMES,
    Downsample,
    ResnetBlock,
    TimestepEmbedding,
    Upsample,
    timestep_embedding,
)
from ldm_jax.models.lpips import LPIPS, VGG16Features
from ldm_jax.models.quantizer import QuantizerOutput, VectorQuantizer
from ldm_jax.models.text_encoder import TextEncoder
from ldm_jax.models.unet import UNet

__all__ = [
    "DISCRIMINATOR_NORMS",
    "LOGICAL_AXIS_NAMES",
    "LPIPS",
    "Attention",
    "AutoencoderKL",
    "BasicTransformerBlock",
    "CLIPTextTransformer",
    "Decoder",
    "DeterministicLatent",
    "DiagonalGaussian",
    "Downsample",
    "Encoder",
    "FeedForward",
    "NLayerDiscriminator",
    "QuantizerOutput",
    "ResnetBlock",
    "SpatialTransformer",
    "TextEncoder",
    "TimestepEmbedding",
    "UNet",
    "VGG16Features",
    "VQAutoencoder",
    "VectorQuantizer",
    "Upsample",
    "dot_product_attention",
    "timestep_embedding",
]
