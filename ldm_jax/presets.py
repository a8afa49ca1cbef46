"""The CompVis first-stage models as configs: kl-f4, kl-f8, kl-f16, vq-f4, vq-f8.

Each has its full size (256x256 images from an image folder, the published architecture and
loss weights) and a ``tiny`` variant: the same kind and downsampling factor at a width a
2-core CPU trains in minutes on the embedded 32x32 "shapes" dataset.
"""

from __future__ import annotations

import ml_collections

from ldm_jax import config as config_lib

# kind, channels per level (ch x ch_mult), latent channels (z_channels = embed_dim), levels
# with attention (attn_resolutions at 256x256), codebook size, GAN start and weight.
_COMPVIS = {
    "kl_f4": dict(
        kind="kl", channels=(128, 256, 512), latent=3, attention=(), codes=0, disc=(50_001, 0.5)
    ),
    "kl_f8": dict(
        kind="kl",
        channels=(128, 256, 512, 512),
        latent=4,
        attention=(),
        codes=0,
        disc=(50_001, 0.5),
    ),
    "kl_f16": dict(
        kind="kl",
        channels=(128, 128, 256, 256, 512),
        latent=16,
        attention=(False, False, False, False, True),
        codes=0,
        disc=(50_001, 0.5),
    ),
    "vq_f4": dict(
        kind="vq", channels=(128, 256, 512), latent=3, attention=(), codes=8192, disc=(0, 0.75)
    ),
    "vq_f8": dict(
        kind="vq",
        channels=(128, 256, 256, 512),
        latent=4,
        attention=(False, False, False, True),
        codes=16384,
        disc=(0, 0.75),
    ),
}

# The CPU variants: channels per level and codebook size.
_TINY = {
    "kl_f4": dict(channels=(16, 32, 32), codes=0),
    "kl_f8": dict(channels=(32, 64, 64, 64), codes=0),
    "kl_f16": dict(channels=(32, 32, 64, 64, 64), codes=0),
    "vq_f4": dict(channels=(16, 32, 32), codes=256),
    "vq_f8": dict(channels=(32, 64, 64, 64), codes=512),
}

VARIANTS = ("tiny",)


def first_stage_config(name: str, variant: str | None) -> ml_collections.ConfigDict:
    """The config of first-stage model ``name`` (a key of the table above) and variant."""
    if variant not in (None, "", *VARIANTS):
        raise ValueError(
            f"unknown variant {variant!r} for configs/autoencoder_{name}.py; allowed: "
            f"none (full size) or {', '.join(VARIANTS)}"
        )
    spec = _COMPVIS[name]
    config = config_lib.base_config()
    config.stage = "autoencoder"
    ae = config.autoencoder
    ae.kind = spec["kind"]
    ae.model.latent_channels = spec["latent"]
    ae.model.attention_levels = spec["attention"]
    ae.loss.disc_start, ae.loss.disc_weight = spec["disc"]
    ae.loss.learn_logvar = spec["kind"] == "kl"  # CompVis' VQ loss has no variance term
    ae.kl_weight = 1e-6
    if variant == "tiny":
        _tiny(config, _TINY[name])
    else:
        _full_size(config, spec)
    return config


def _full_size(config: ml_collections.ConfigDict, spec: dict) -> None:
    config.data.source = "image_folder"
    config.data.image_size = 256
    config.data.random_crop = True
    config.data.random_flip = True
    ae = config.autoencoder
    ae.model.block_out_channels = spec["channels"]
    ae.model.layers_per_block = 2
    ae.model.norm_num_groups = 32
    if spec["codes"]:
        ae.model.num_embeddings = spec["codes"]
    ae.train.batch_size = 64
    ae.train.learning_rate = 4.5e-6 * 64  # the CompVis recipe: base rate x batch size
    ae.train.b1, ae.train.b2 = 0.5, 0.9
    ae.train.weight_decay = 0.0
    ae.train.steps = 200_000
    ae.train.warmup_steps = 0
    ae.train.end_learning_rate_fraction = 1.0
    config.train.checkpoint_every = 5000
    config.train.sample_every = 5000
    config.train.log_every = 100


def _tiny(config: ml_collections.ConfigDict, spec: dict) -> None:
    config.data.source = "shapes"
    config.data.image_size = 32
    config.data.num_train_examples = 20_000
    ae = config.autoencoder
    ae.model.block_out_channels = spec["channels"]
    ae.model.layers_per_block = 1
    ae.model.norm_num_groups = 8
    if spec["codes"]:
        ae.model.num_embeddings = spec["codes"]
        ae.model.dead_code_threshold = 1.0
    ae.train.steps = 1000
    ae.train.batch_size = 32
    ae.train.learning_rate = 2e-3
    ae.train.warmup_steps = 100
    ae.train.ema_decay = 0.995
    # The GAN joins for the last 300 steps; a 2-layer discriminator fits 32x32 images.
    ae.loss.disc_start = 700
    ae.loss.disc_weight = 0.5
    ae.loss.disc_num_layers = 2
    ae.loss.disc_channels = 32
    ae.latent_scale_batches = 4
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.sample_every = 0
