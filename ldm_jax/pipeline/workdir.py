"""Where a workdir keeps what: the one description of its layout.

A workdir holds everything of one run: ``config.json``, ``checkpoints/{autoencoder,diffusion}/``
(a fine-tune run's: ``checkpoints/finetune/`` and its ``class_images/``),
the word tokenizer of a from-scratch text encoder (``tokenizer.json``), the latent scale
measured on the trained autoencoder (``latent_scale.json``), ``metrics.jsonl``, TensorBoard
events, ``samples/`` and evaluation outputs; an imported one also holds its weights as
diffusers / transformers folders, named by its config with paths relative to the workdir.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from ldm_jax import storage

AUTOENCODER = "autoencoder"
DIFFUSION = "diffusion"
FINETUNE = "finetune"
STAGES = (AUTOENCODER, DIFFUSION, FINETUNE)
TOKENIZER_FILE = "tokenizer.json"
LATENT_SCALE_FILE = "latent_scale.json"
SAMPLES_DIR = "samples"
# The images of DreamBooth's prior preservation, drawn by the base model once.
CLASS_IMAGES_DIR = "class_images"


def checkpoint_dir(workdir: str, stage: str) -> str:
    """The checkpoints of ``stage`` ("autoencoder", "diffusion" or "finetune")."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    return storage.join(workdir, "checkpoints", stage)


def autoencoder_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The workdir holding the trained autoencoder: ``config.autoencoder.workdir`` or this one."""
    return config.autoencoder.workdir or workdir


def resolve(workdir: str, path: str) -> str:
    """``path`` as given when absolute, else inside ``workdir``."""
    return path if os.path.isabs(path) or storage.is_remote(path) else storage.join(workdir, path)


def write_latent_scale(workdir: str, scale: float, autoencoder_step: int) -> None:
    """Records the latent scale measured on the autoencoder of ``autoencoder_step``."""
    if jax.process_index() == 0:
        record = {"latent_scale": scale, "autoencoder_step": autoencoder_step}
        storage.as_path(workdir).joinpath(LATENT_SCALE_FILE).write_text(json.dumps(record))


def read_latent_scale(workdir: str, autoencoder_step: int) -> float | None:
    """The stored latent scale if it was measured on the autoencoder at ``autoencoder_step``."""
    path = storage.as_path(workdir) / LATENT_SCALE_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if record["autoencoder_step"] != autoencoder_step:
        return None
    return float(record["latent_scale"])
