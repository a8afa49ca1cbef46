"""Stable Diffusion XL size: a 2.56B-parameter U-Net on 128x128x4 latents of 1024x1024 images
(KL-f8 autoencoder), cross-attending to 2048-wide text tokens, epsilon prediction.

The U-Net has SDXL's levels (320, 640, 1280), transformer depths (none, 2, 10; 10 in the mid
block), 64-wide heads and linear projections. It lacks SDXL's added embeddings of the pooled
text and the image size and crop (`add_embedding`, 5,245,440 parameters), so its size and compute
are SDXL's up to those: 2,562,218,244 parameters against SDXL's 2,567,463,684. SDXL's two text
encoders (CLIP ViT-L and OpenCLIP ViT-bigG, whose hidden states are concatenated to width 2048)
are one frozen CLIP text model of width 2048 here; this config is meant for sizing and
compiling, e.g.

  ldm-jax compile --config=configs/sdxl.py --topology=v5p-64 --per_chip_batch=2
"""

from ldm_jax import config as config_lib


def get_config(arg: str | None = None):
    if arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} for configs/sdxl.py; it has none")
    config = config_lib.base_config()
    config.stage = "diffusion"
    config.dtype = "bfloat16"
    config.mesh.fsdp = -1
    config.mesh.data = 1
    config.data.source = "image_folder"  # set --config.data.path
    config.data.image_size = 1024
    config.data.max_caption_length = 77

    ae = config.autoencoder.model
    ae.block_out_channels = (128, 256, 512, 512)  # f = 8: 1024 -> 128
    ae.layers_per_block = 2
    ae.latent_channels = 4
    ae.norm_num_groups = 32

    dm = config.diffusion
    dm.conditioning = "text"
    dm.schedule = "scaled_linear"
    dm.beta_start, dm.beta_end = 0.00085, 0.012
    dm.prediction_type = "epsilon"
    u = dm.unet
    u.block_out_channels = (320, 640, 1280)
    u.layers_per_block = 2
    u.attention_levels = (False, True, True)
    u.transformer_depth_per_level = (1, 2, 10)  # level 0 has no attention; the mid block: 10
    u.attention_head_dim = 64
    u.use_linear_projection = True
    u.norm_num_groups = 32
    u.remat = "save_dots"
    t = dm.text_encoder
    t.kind, t.width = "clip", 2048
    dm.train.batch_size = 256
    dm.train.learning_rate = 1e-4
    dm.train.warmup_steps = 10_000
    dm.train.steps = 200_000

    s = config.sample
    s.sampler, s.num_steps, s.guidance_scale = "ddim", 50, 5.0
    s.steps_offset, s.set_alpha_to_one = 1, False
    return config
