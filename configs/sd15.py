"""Stable Diffusion 1.x (1.5) architecture: 860M-parameter U-Net, KL-f8 autoencoder, frozen
CLIP ViT-L/14 text encoder (width 768), 512x512 images, epsilon prediction.

The weights come from a diffusers pipeline the user has on disk; importing it makes a
workdir with this architecture and config (the usual path):

  ldm-jax import --from=diffusers /path/to/stable-diffusion-v1-5 --workdir=/tmp/sd15

This file describes the same architecture for training from scratch (or on the imported
weights) with the CLIP text model given by path:

  ldm-jax train --config=configs/sd15.py --workdir=DIR \
      --config.diffusion.text_encoder.pretrained=/path/to/sd15/text_encoder \
      --config.diffusion.text_encoder.tokenizer=/path/to/sd15/tokenizer \
      --config.data.source=image_folder --config.data.path=/data/images

Variant `:v2` is Stable Diffusion 2.x at 768x768 (v-prediction, OpenCLIP ViT-H width 1024,
64-wide attention heads, linear projections in the spatial transformers).
"""

from ldm_jax import config as config_lib


def get_config(arg: str | None = None):
    config = config_lib.base_config()
    config.stage = "diffusion"
    config.dtype = "bfloat16"
    config.mesh.fsdp = -1
    config.mesh.data = 1
    config.data.source = "image_folder"  # set --config.data.path
    config.data.image_size = 512
    config.data.max_caption_length = 77

    ae = config.autoencoder.model
    ae.block_out_channels = (128, 256, 512, 512)  # f = 8
    ae.layers_per_block = 2
    ae.latent_channels = 4
    ae.norm_num_groups = 32

    dm = config.diffusion
    dm.conditioning = "text"
    dm.schedule = "scaled_linear"
    dm.beta_start, dm.beta_end = 0.00085, 0.012
    dm.prediction_type = "epsilon"
    u = dm.unet
    u.block_out_channels = (320, 640, 1280, 1280)
    u.layers_per_block = 2
    u.attention_levels = (True, True, True, False)
    u.num_attention_heads = 8
    u.norm_num_groups = 32
    t = dm.text_encoder
    t.kind, t.width = "clip", 768
    dm.train.batch_size = 256
    dm.train.learning_rate = 1e-4
    dm.train.warmup_steps = 10_000
    dm.train.steps = 200_000

    s = config.sample
    s.sampler, s.num_steps, s.guidance_scale = "ddim", 50, 7.5
    s.steps_offset, s.set_alpha_to_one = 1, False

    if arg == "v2":
        config.data.image_size = 768
        dm.prediction_type = "v"
        u.attention_head_dim = 64
        u.use_linear_projection = True
        t.width = 1024
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} for configs/sd15.py; allowed: ['v2']")
    return config
