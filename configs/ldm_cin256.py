"""The CompVis class-conditional ImageNet LDM (models/ldm/cin256-v2) at 256x256.

A vq-f8 first stage (16384 codes, 32x32x4 latents) and a 400M-parameter U-Net (256, 512,
1024 channels, spatial transformers at every level, 32-channel heads) conditioned on the
class label as one 512-wide cross-attention token (CompVis' ClassEmbedder; label 1000 is
the unconditional class of classifier-free guidance). ImageNet as an image folder, one
subfolder per class, 1000 of them:

  ldm-jax train --config=configs/ldm_cin256.py --workdir=DIR --config.data.path=/data/imagenet
  ldm-jax train --config=configs/ldm_cin256.py:tiny --workdir=DIR   # 32x32 shapes, on a CPU
  ldm-jax sample --workdir=DIR --label=207 --guidance=3
"""

from ldm_jax.config import presets


def get_config(arg: str | None = None):
    return presets.latent_diffusion_config("cin256", arg)
