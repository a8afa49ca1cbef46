"""Data: grain sources, transforms and loaders, the embedded "shapes" dataset, tokenizers."""

from ldm_jax.data.clip_tokenizer import ClipTokenizer
from ldm_jax.data.image_folder import ImageFolderSource
from ldm_jax.data.pipeline import global_batch, make_loader
from ldm_jax.data.shapes import ShapesSource
from ldm_jax.data.tfds_source import TfdsSource
from ldm_jax.data.tokenizer import build_word_tokenizer, encode, load_tokenizer, save_tokenizer
from ldm_jax.data.transforms import NormalizeImage, RandomFlip, ResizeAndCrop, SelectKeys, Tokenize

__all__ = [
    "ClipTokenizer",
    "ImageFolderSource",
    "NormalizeImage",
    "RandomFlip",
    "ResizeAndCrop",
    "SelectKeys",
    "ShapesSource",
    "TfdsSource",
    "Tokenize",
    "build_word_tokenizer",
    "encode",
    "global_batch",
    "load_tokenizer",
    "make_loader",
    "save_tokenizer",
]
