"""Weight import and export: diffusers, original Stable Diffusion / CompVis, CLIP.

Every loader returns an `ImportedModel` (the Flax module, whose fields are its config, and
its params); nothing here unpickles a file. Workdirs to and from these formats (`ldm-jax
import` / `export`) are the trained-model layer's: `ldm_jax.pipeline.import_export`.
"""

from ldm_jax.interop.clip import load_clip_text_encoder, save_clip_text_encoder
from ldm_jax.interop.convert import ImportedModel, WeightsMismatchError
from ldm_jax.interop.diffusers import (
    load_diffusers_unet,
    load_diffusers_vae,
    save_diffusers_unet,
    save_diffusers_vae,
)
from ldm_jax.interop.pipeline import load_diffusers_pipeline, save_diffusers_pipeline
from ldm_jax.interop.safetensors_io import PickleRefusedError
from ldm_jax.interop.single_file import load_single_file, save_single_file

__all__ = [
    "ImportedModel",
    "PickleRefusedError",
    "WeightsMismatchError",
    "load_clip_text_encoder",
    "load_diffusers_pipeline",
    "load_diffusers_unet",
    "load_diffusers_vae",
    "load_single_file",
    "save_clip_text_encoder",
    "save_diffusers_pipeline",
    "save_diffusers_unet",
    "save_diffusers_vae",
    "save_single_file",
]
