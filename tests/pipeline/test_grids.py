"""What the preview grids show: every condition a model knows, as far as a grid can."""

import numpy as np
from PIL import Image

from ldm_jax.config import base_config
from ldm_jax.data import shapes
from ldm_jax.pipeline import grids


def _image_folder(tmp_path, classes: int, per_class: int = 2):
    for c in range(classes):
        folder = tmp_path / f"class_{c:02d}"
        folder.mkdir()
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 10 * c, np.uint8)).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(f"picture {c} {i}")
    return tmp_path


def test_a_class_conditional_image_folder_model_previews_every_class(tmp_path):
    config = base_config()
    config.data.source, config.data.path = "image_folder", str(_image_folder(tmp_path, 10))
    config.diffusion.conditioning, config.data.num_classes = "class", 10
    _, labels = grids.preview_conditions(config)
    assert labels == list(range(10))


def test_many_classes_are_previewed_evenly_spaced():
    labels = grids.preview_classes(1000)
    assert len(labels) == grids.MAX_PREVIEW_CLASSES == len(set(labels))
    assert labels[0] == 0 and labels[-1] == 999 and labels == sorted(labels)


def test_shapes_previews_every_colour_and_shape():
    prompts, labels = grids.preview_conditions(base_config())
    assert list(zip(prompts, labels, strict=True)) == shapes.class_prompts()


def test_a_text_model_on_an_image_folder_previews_validation_captions(tmp_path):
    config = base_config()
    config.data.source, config.data.path = "image_folder", str(_image_folder(tmp_path, 3))
    prompts, _ = grids.preview_conditions(config)
    assert len(prompts) == 6 and all(p.startswith("picture ") for p in prompts)
    assert grids.preview_images(config) == {}  # only super-resolution models take images
