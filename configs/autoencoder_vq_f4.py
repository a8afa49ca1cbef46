"""Stage 1 alone: the CompVis vq-f4 autoencoder (see ldm_jax/config/presets.py for its numbers).

ldm-jax train --config=configs/autoencoder_vq_f4.py --workdir=DIR --config.data.path=/data/images
ldm-jax train --config=configs/autoencoder_vq_f4.py:tiny --workdir=DIR   # 32x32 shapes, on a CPU
"""

from ldm_jax.config import presets


def get_config(arg: str | None = None):
    return presets.first_stage_config("vq_f4", arg)
