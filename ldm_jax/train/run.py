"""``ldm-jax train``: validate the config, build the mesh, run stage 1 and/or stage 2."""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import ml_collections

from ldm_jax import checkpoint, storage
from ldm_jax import config as config_lib
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.train import autoencoder, diffusion, finetune

log = logging.getLogger(__name__)


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    should_stop: Callable[[int], bool] | None = None,
) -> bool:
    """Trains the stages ``config.stage`` names (or fine-tunes ``config.finetune.base``),
    resuming from checkpoints in ``workdir``.

    Returns:
      True when every stage reached its step count; False when ``should_stop`` ended the run
      early (it is checkpointed, and the next call resumes it).
    """
    config_lib.validate(config, jax.device_count())
    check_workdir(workdir, config.train.min_free_gib)
    mesh = mesh_lib.create_mesh(**config_lib.mesh_sizes(config))
    rules = mesh_lib.axis_rules_from_config(config.mesh.axis_rules)
    log.info(
        "mesh %s over %d devices in %d processes",
        dict(mesh.shape),
        jax.device_count(),
        jax.process_count(),
    )
    if jax.process_index() == 0:
        config_file = storage.as_path(workdir) / config_lib.WORKDIR_CONFIG_FILE
        config_file.write_text(config_lib.to_json(config), encoding="utf-8")
    if config.stage == "finetune":
        state = finetune.train(config, workdir, mesh, rules, should_stop)
        return int(state.step) >= config.finetune.train.steps
    stages = {"autoencoder": autoencoder, "diffusion": diffusion}
    for name in ("autoencoder", "diffusion"):
        if name == "autoencoder" and config.autoencoder.pretrained:
            log.info("stage 1: using the pretrained autoencoder %s", config.autoencoder.pretrained)
            continue
        if config.stage in ("both", name):
            state = stages[name].train(config, workdir, mesh, rules, should_stop)
            if int(state.step) < config[name].train.steps:
                return False
    return True


def check_workdir(workdir: str, min_free_gib: float) -> None:
    """Fails before any compilation when ``workdir`` cannot be created or written (a disk
    folder, or a bucket prefix: a bucket that does not exist or is not writable), or its disk
    has less than ``min_free_gib`` GiB free (the stages check again, with the size of their
    checkpoints, once their state is built)."""
    checkpoint.check_location(workdir)
    storage.check_writable(workdir, "--workdir")
    free = storage.free_bytes(workdir)
    if free is not None and free / 1024**3 < min_free_gib:
        raise OSError(
            f"--workdir={workdir} has {free / 1024**3:.2f} GiB free, less than "
            f"config.train.min_free_gib={min_free_gib}; free space or choose another --workdir"
        )
