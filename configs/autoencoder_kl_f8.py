"""Stage 1 alone: the CompVis kl-f8 autoencoder (see ldm_jax/config/presets.py for its numbers).

ldm-jax train --config=configs/autoencoder_kl_f8.py --workdir=DIR --config.data.path=/data/images
ldm-jax train --config=configs/autoencoder_kl_f8.py:tiny --workdir=DIR   # 32x32 shapes, on a CPU
"""

from ldm_jax.config import presets


def get_config(arg: str | None = None):
    return presets.first_stage_config("kl_f8", arg)
