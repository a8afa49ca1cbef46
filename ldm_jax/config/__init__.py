"""The run's configuration: one ``ml_collections.ConfigDict`` from ``configs/NAME.py``.

- ``schema``: every key with its default (``base_config``), the allowed values of the choices,
  what follows from the keys (``latent_shape``, ``num_classes``, ``mesh_sizes``), and the
  ``config.json`` a workdir keeps.
- ``checks``: the one ``validate``, run at start-up; a mistake is one line naming the key.
- ``values``: reading one value with its type and range checked (``ConfigError``).
- ``presets``: the CompVis first stages and latent diffusion models as configs.

It imports nothing from training: the trainer, the trained-model layer and the commands all
read the config through this package.
"""

from ldm_jax.config.checks import validate
from ldm_jax.config.schema import (
    WORKDIR_CONFIG_FILE,
    autoencoder_factor,
    base_config,
    from_json,
    latent_shape,
    load_workdir_config,
    mesh_sizes,
    num_classes,
    to_json,
)
from ldm_jax.config.values import ConfigError

__all__ = [
    "WORKDIR_CONFIG_FILE",
    "ConfigError",
    "autoencoder_factor",
    "base_config",
    "from_json",
    "latent_shape",
    "load_workdir_config",
    "mesh_sizes",
    "num_classes",
    "to_json",
    "validate",
]
