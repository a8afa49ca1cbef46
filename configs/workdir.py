"""The config stored in a workdir (`config.json`), to resume or fine-tune it.

  ldm-jax train --config=configs/workdir.py:/path/to/workdir --workdir=/path/to/workdir \
      --config.data.source=image_folder --config.data.path=/data/my_images

A workdir made by `ldm-jax import` starts stage 2 from its imported U-Net; every key can be
overridden with --config.KEY=VALUE as with any config file.
"""

from ldm_jax.config.from_workdir import get_config

__all__ = ["get_config"]
