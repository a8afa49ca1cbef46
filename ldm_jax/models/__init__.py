"""Flax Linen models of latent diffusion: autoencoder, U-Net, text encoders and their layers."""

from ldm_jax.models.attention import (
    Attention,
    BasicTransformerBlock,
    FeedForward,
    SpatialTransformer,
    dot_product_attention,
)
from ldm_jax.models.autoencoder import AutoencoderKL, Decoder, DiagonalGaussian, Encoder
from ldm_jax.models.clip import CLIPTextTransformer
from ldm_jax.models.layers import (
    LOGICAL_AXIS_NAMES,
    Downsample,
    ResnetBlock,
    TimestepEmbedding,
    Upsample,
    timestep_embedding,
)
from ldm_jax.models.text_encoder import TextEncoder
from ldm_jax.models.unet import UNet

__all__ = [
    "LOGICAL_AXIS_NAMES",
    "Attention",
    "AutoencoderKL",
    "BasicTransformerBlock",
    "CLIPTextTransformer",
    "Decoder",
    "DiagonalGaussian",
    "Downsample",
    "Encoder",
    "FeedForward",
    "ResnetBlock",
    "SpatialTransformer",
    "TextEncoder",
    "TimestepEmbedding",
    "UNet",
    "Upsample",
    "dot_product_attention",
    "timestep_embedding",
]
