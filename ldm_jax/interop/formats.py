"""The formats `ldm-jax import` reads and `ldm-jax export` writes (light: the CLI's flags)."""

IMPORT_FORMATS = ("diffusers", "single-file", "clip")
EXPORT_FORMATS = ("diffusers", "safetensors")
