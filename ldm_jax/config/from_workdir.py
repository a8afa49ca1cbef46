"""The config stored in a workdir (``config.json``) as a config file, so that
``--config.KEY=VALUE`` overrides apply to it with the same types and checks as to any config
file: ``--config=ldm_jax/config/from_workdir.py:DIR`` (``configs/workdir.py`` is the same).
``ldm-jax sample``, ``evaluate`` and ``export`` read their workdir's config this way, so that
``--config.mesh.fsdp=8`` shards the model they load.
"""

from ldm_jax.config.schema import load_workdir_config


def get_config(workdir: str | None = None):
    if not workdir:
        raise ValueError("the workdir's config needs the workdir: --config=...workdir.py:DIR")
    return load_workdir_config(workdir)
