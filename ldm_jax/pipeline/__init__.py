"""The trained model: built from a config, loaded from a workdir for inference on the
configured mesh, sampled, and moved to and from other weight formats.

- ``builders``: config values -> module fields; ``build_model`` -> ``LatentDiffusion``.
- ``model``: ``LatentDiffusion``, the modules and fixed numbers every use of a model shares.
- ``generator``: ``SamplingOptions`` (from ``config.sample`` and overrides, the one place of
  every sampling default), ``generate`` and the ``Generator`` that runs it on a mesh.
- ``load``: a workdir's EMA (or online) params, restored straight into their shardings.
- ``image_inputs``: the images of img2img, inpainting, outpainting and super-resolution.
- ``grids``: PNG grids and what the preview grids show.
- ``datasets``: the dataset a config names; ``pretrained``: imported weights a config names.
- ``workdir``: where a workdir keeps what; ``import_export``: ``ldm-jax import`` / ``export``.
- ``finetuned``: a fine-tune workdir's base and trained part (LoRA adapters or weights) put
  together, and LoRA files merged into a model (``--lora``).

Nothing here imports the trainer (``ldm_jax.train``); training, evaluation and the commands
build and load models through this package.
"""

from ldm_jax.pipeline.builders import build_model
from ldm_jax.pipeline.generator import Generator, SamplingOptions, generate, sampling_options
from ldm_jax.pipeline.import_export import export_diffusers, export_workdir, import_model
from ldm_jax.pipeline.load import LoadedModel, load_generator, load_model
from ldm_jax.pipeline.model import LatentDiffusion, pixels_from_uint8, pixels_to_uint8

__all__ = [
    "Generator",
    "LatentDiffusion",
    "LoadedModel",
    "SamplingOptions",
    "build_model",
    "export_diffusers",
    "export_workdir",
    "generate",
    "import_model",
    "load_generator",
    "load_model",
    "pixels_from_uint8",
    "pixels_to_uint8",
    "sampling_options",
]
