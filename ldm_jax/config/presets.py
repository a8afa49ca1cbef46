"""The CompVis models as configs: the first stages kl-f4, kl-f8, kl-f16, vq-f4, vq-f8, and
the latent diffusion models on them (the class-conditional ImageNet LDM, the CelebA-HQ LDM-4).

Each has its full size (256x256 images from an image folder, the published architecture and
loss weights) and a ``tiny`` variant: the same kind and downsampling factor at a width a
2-core CPU trains in minutes on the embedded 32x32 "shapes" dataset.
"""

from __future__ import annotations

import ml_collections

from ldm_jax.config import schema

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
    config = schema.base_config()
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


# The CompVis latent diffusion models: first stage, U-Net (model_channels x channel_mult,
# attention at the levels of attention_resolutions, heads of 32 channels), conditioning,
# and the base learning rate x batch size of their configs. Both use the schedule
# linear_start=0.0015, linear_end=0.0195 (diffusers' "scaled_linear") and a latent scale of 1.
_LDM = {
    # models/ldm/cin256-v2: ImageNet classes as one cross-attention token (ClassEmbedder,
    # 1001 rows: label 1000 is the unconditional one).
    "cin256": dict(
        first_stage="vq_f8",
        channels=(256, 512, 1024),
        attention=(True, True, True),
        attention_type="transformer",
        conditioning="class",
        class_context_dim=512,
        num_classes=1000,
        batch_size=64,
        base_learning_rate=1e-6,
        guidance_scale=3.0,
    ),
    # models/ldm/celeba256: unconditional, plain self-attention blocks (no transformer).
    "celebahq256": dict(
        first_stage="vq_f4",
        channels=(224, 448, 672, 896),
        attention=(False, True, True, True),
        attention_type="plain",
        conditioning="none",
        class_context_dim=0,
        num_classes=0,
        batch_size=48,
        base_learning_rate=2e-6,
        guidance_scale=1.0,
    ),
}
_LDM_TINY = {
    "cin256": dict(channels=(32, 64), attention=(True, True), class_context_dim=64),
    "celebahq256": dict(channels=(32, 64), attention=(False, True), class_context_dim=0),
}


def latent_diffusion_config(name: str, variant: str | None) -> ml_collections.ConfigDict:
    """Both stages of CompVis latent diffusion model ``name`` (a key of ``_LDM``)."""
    spec = _LDM[name]
    config = first_stage_config(spec["first_stage"], variant)
    config.stage = "both"
    dm = config.diffusion
    dm.conditioning = spec["conditioning"]
    dm.schedule = "scaled_linear"
    dm.beta_start, dm.beta_end = 0.0015, 0.0195
    dm.num_timesteps = 1000
    dm.prediction_type = "epsilon"
    dm.cond_drop_prob = 0.1 if spec["conditioning"] != "none" else 0.0
    u = dm.unet
    u.attention_levels = spec["attention"]
    u.attention_type = spec["attention_type"]
    u.mid_block_attention = True
    u.use_linear_projection = False
    u.transformer_depth = 1
    config.sample.sampler, config.sample.num_steps = "ddim", 50
    config.sample.guidance_scale = spec["guidance_scale"]
    config.sample.steps_offset = 0
    if variant == "tiny":
        tiny = _LDM_TINY[name]
        u.block_out_channels = tiny["channels"]
        u.attention_levels = tiny["attention"]
        u.class_context_dim = tiny["class_context_dim"]
        u.layers_per_block = 1
        u.norm_num_groups = 8
        u.attention_head_dim = 8
        dm.train.steps = 300
        dm.train.batch_size = 32
        dm.train.learning_rate = 8e-4
        dm.train.warmup_steps = 50
        dm.train.ema_decay = 0.995
        config.sample.num_steps = 20
    else:
        u.block_out_channels = spec["channels"]
        u.class_context_dim = spec["class_context_dim"]
        u.layers_per_block = 2
        u.norm_num_groups = 32
        u.attention_head_dim = 32  # num_head_channels
        config.data.num_classes = spec["num_classes"]
        config.dtype = "bfloat16"
        dm.train.batch_size = spec["batch_size"]
        dm.train.learning_rate = spec["base_learning_rate"] * spec["batch_size"]
        dm.train.warmup_steps = 10_000
        dm.train.weight_decay = 0.0
        dm.train.steps = 400_000
    return config
