"""The CompVis KL autoencoders for stage 1: `:f4` (kl-f4: 3 latent channels, channel
multipliers 1,2,4) and `:f8` (kl-f8, the one Stable Diffusion uses: 4 latent channels,
1,2,4,4), at 256x256 on an image folder.

  ldm-jax train --config=configs/autoencoder_kl.py:f8 --workdir=DIR \
      --config.data.path=/data/images
"""

from ldm_jax import config as config_lib

_VARIANTS = {
    "f4": dict(block_out_channels=(128, 256, 512), latent_channels=3),
    "f8": dict(block_out_channels=(128, 256, 512, 512), latent_channels=4),
}


def get_config(arg: str | None = None):
    if arg not in _VARIANTS:
        raise ValueError(
            f"configs/autoencoder_kl.py needs a variant: one of {sorted(_VARIANTS)}, "
            "e.g. --config=configs/autoencoder_kl.py:f8"
        )
    config = config_lib.base_config()
    config.stage = "autoencoder"
    config.data.source = "image_folder"
    config.data.image_size = 256
    config.data.random_crop = True
    config.data.random_flip = True
    ae = config.autoencoder
    ae.model.update(_VARIANTS[arg])
    ae.model.layers_per_block = 2
    ae.model.norm_num_groups = 32
    ae.train.batch_size = 64
    ae.train.learning_rate = 4.5e-6 * 64  # the LDM recipe: base rate x batch size
    ae.train.steps = 200_000
    return config
