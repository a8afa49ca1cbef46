"""Builders: the one place where config values become module fields, and the modules of a
config become the latent diffusion model."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax.config import latent_shape, num_classes
from ldm_jax.data import tokenizer as tokenizer_lib
from ldm_jax.diffusion import NoiseSchedule, concat_channels, make_schedule
from ldm_jax.models import AutoencoderKL, NLayerDiscriminator, TextEncoder, UNet, VQAutoencoder
from ldm_jax.pipeline.model import LatentDiffusion


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    return jnp.dtype(config.dtype)


def build_autoencoder(
    config: ml_collections.ConfigDict, training: bool = False
) -> AutoencoderKL | VQAutoencoder:
    """The stage-1 autoencoder. Outside stage-1 training (``training=False``) a VQ model is
    a plain codebook lookup: its codebook (EMA or restarted codes included) is in its params,
    as ``pipeline.load.load_autoencoder`` gives them."""
    m = config.autoencoder.model
    shared = dict(
        block_out_channels=tuple(m.block_out_channels),
        layers_per_block=m.layers_per_block,
        latent_channels=m.latent_channels,
        norm_num_groups=m.norm_num_groups,
        mid_block_attention=m.mid_block_attention,
        attention_levels=tuple(bool(a) for a in m.attention_levels),
        dtype=compute_dtype(config),
    )
    if config.autoencoder.kind == "vq":
        return VQAutoencoder(
            num_embeddings=m.num_embeddings,
            commitment_beta=m.commitment_beta,
            codebook_ema=m.codebook_ema and training,
            ema_decay=m.codebook_ema_decay,
            dead_code_threshold=m.dead_code_threshold if training else 0.0,
            **shared,
        )
    return AutoencoderKL(**shared)


def build_discriminator(config: ml_collections.ConfigDict) -> NLayerDiscriminator:
    loss = config.autoencoder.loss
    return NLayerDiscriminator(
        base_channels=loss.disc_channels,
        num_layers=loss.disc_num_layers,
        norm=loss.disc_norm,
        dtype=compute_dtype(config),
    )


def build_unet(config: ml_collections.ConfigDict) -> UNet:
    dm = config.diffusion
    u = dm.unet
    channels = config.autoencoder.model.latent_channels
    return UNet(
        in_channels=channels + concat_channels(dm.concat_conditioning, channels),
        out_channels=channels,
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        attention_levels=tuple(bool(a) for a in u.attention_levels),
        mid_block_attention=u.mid_block_attention,
        num_attention_heads=(
            tuple(c // u.attention_head_dim for c in u.block_out_channels)
            if u.attention_head_dim > 0
            else u.num_attention_heads
        ),
        transformer_depth=tuple(u.transformer_depth_per_level) or u.transformer_depth,
        use_linear_projection=u.use_linear_projection,
        flip_sin_to_cos=u.flip_sin_to_cos,
        freq_shift=u.freq_shift,
        attention_type=u.attention_type,
        context_dim=_context_dim(config),
        num_classes=num_classes(config) if dm.conditioning == "class" else None,
        class_conditioning="context" if u.class_context_dim > 0 else "time",
        norm_num_groups=u.norm_num_groups,
        dropout=u.dropout,
        remat=u.remat,
        dtype=compute_dtype(config),
    )


def _context_dim(config: ml_collections.ConfigDict) -> int | None:
    """The U-Net's cross-attention width: the text encoder's, a class token's, or none."""
    dm = config.diffusion
    if dm.conditioning == "text":
        return dm.text_encoder.width
    if dm.conditioning == "class" and dm.unet.class_context_dim > 0:
        return dm.unet.class_context_dim
    return None


def build_text_encoder(config: ml_collections.ConfigDict, vocab_size: int) -> TextEncoder:
    t = config.diffusion.text_encoder
    return TextEncoder(
        vocab_size=vocab_size,
        max_length=config.data.max_caption_length,
        width=t.width,
        num_layers=t.num_layers,
        num_heads=t.num_heads,
        dtype=compute_dtype(config),
    )


def build_schedule(config: ml_collections.ConfigDict) -> NoiseSchedule:
    dm = config.diffusion
    return make_schedule(dm.schedule, dm.num_timesteps, dm.beta_start, dm.beta_end)


def build_model(
    config: ml_collections.ConfigDict,
    tokenizer: Any,
    latent_scale: float,
    text_encoder: Any = None,
) -> LatentDiffusion:
    """The stage-2 model of ``config``.

    Args:
      config: the run's config.
      tokenizer: the `tokenizers.Tokenizer` of text conditioning, else None.
      latent_scale: the autoencoder's latent scale factor.
      text_encoder: a pretrained (frozen) text encoder module; None builds the config's
        from-scratch encoder.
    """
    conditioning = config.diffusion.conditioning
    null_condition = np.zeros((), np.int32)
    if conditioning == "text":
        if text_encoder is None:
            text_encoder = build_text_encoder(config, tokenizer.get_vocab_size())
        null_condition = tokenizer_lib.encode(tokenizer, [""], config.data.max_caption_length)[0]
    elif conditioning == "class":
        null_condition = np.asarray(num_classes(config), np.int32)
    return LatentDiffusion(
        frozen_text_encoder=config.diffusion.text_encoder.kind == "clip",
        unet=build_unet(config),
        autoencoder=build_autoencoder(config),
        text_encoder=text_encoder,
        schedule=build_schedule(config),
        conditioning=conditioning,
        null_condition=null_condition,
        latent_shape=latent_shape(config),
        latent_scale=latent_scale,
        prediction_type=config.diffusion.prediction_type,
        concat_conditioning=config.diffusion.concat_conditioning,
        super_resolution_factor=config.diffusion.super_resolution_factor,
    )
