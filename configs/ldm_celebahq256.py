"""The CompVis CelebA-HQ LDM-4 (models/ldm/celeba256): unconditional faces at 256x256.

A vq-f4 first stage (8192 codes, 64x64x3 latents) and a 274M-parameter U-Net (224, 448,
672, 896 channels) whose attention blocks are plain group-normed self-attention with
32-channel heads at the three lower levels (diffusers' UNet2DModel):

  ldm-jax train --config=configs/ldm_celebahq256.py --workdir=DIR --config.data.path=/data/celebahq
  ldm-jax train --config=configs/ldm_celebahq256.py:tiny --workdir=DIR   # 32x32 shapes, on a CPU
  ldm-jax sample --workdir=DIR --num_per_prompt=16
"""

from ldm_jax.config import presets


def get_config(arg: str | None = None):
    return presets.latent_diffusion_config("celebahq256", arg)
