"""The image inputs of ``ldm-jax sample --mode=...``, read from PNG files with one-line errors.

"outpaint" is inpainting on an extended canvas: the image padded by ``--outpaint`` pixels
(edge colours repeated), the padding masked.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ldm_jax import storage
from ldm_jax.data import masks

CLI_MODES = ("txt2img", "img2img", "inpaint", "outpaint", "sr")


def read_image(path: str | None, flag: str, mode: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB of the PNG (or any PIL-readable image) at ``path`` (a file or a
    bucket object)."""
    if not path:
        raise ValueError(f"--mode={mode} needs {flag}=PNG")
    try:
        with storage.as_path(path).open("rb") as file, Image.open(file) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{flag}={path} cannot be read as an image: {error}") from None


def read_mask(path: str | None, mode: str) -> np.ndarray:
    """uint8 (H, W, 1) in {0, 1} of a mask image: white (above mid-grey) is regenerated."""
    grey = read_image(path, "--mask", mode).mean(axis=-1)
    return (grey > 127.5).astype(np.uint8)[:, :, None]


def parse_outpaint(value: str | None) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) pixels from "PIXELS" or "LEFT,RIGHT,TOP,BOTTOM"."""
    parts = (value or "").split(",")
    try:
        pixels = [int(part) for part in parts]
    except ValueError:
        pixels = []
    if len(pixels) == 1:
        pixels *= 4
    if len(pixels) != 4 or min(pixels) < 0 or max(pixels) == 0:
        raise ValueError(
            f"--outpaint={value} must be PIXELS or LEFT,RIGHT,TOP,BOTTOM: pixels >= 0 to add, "
            "not all 0"
        )
    return tuple(pixels)


def mode_inputs(
    mode: str,
    init_image: str | None,
    mask: str | None,
    outpaint: str | None,
) -> tuple[str, dict[str, np.ndarray]]:
    """The generation mode and its uint8 image inputs (one image each, no batch axis).

    Raises:
        ValueError: One line naming the flag: an unknown mode, a missing or unreadable image,
            a flag the mode does not use.
    """
    if mode not in CLI_MODES:
        raise ValueError(f"--mode={mode} is not one of {CLI_MODES}")
    uses = {"img2img": "i", "inpaint": "im", "outpaint": "io", "sr": "i"}.get(mode, "")
    for flag, value, letter in (
        ("--init_image", init_image, "i"),
        ("--mask", mask, "m"),
        ("--outpaint", outpaint, "o"),
    ):
        if value and letter not in uses:
            raise ValueError(f"{flag} is not used by --mode={mode}")
    images: dict[str, np.ndarray] = {}
    if mode in ("img2img", "inpaint", "outpaint"):
        images["image"] = read_image(init_image, "--init_image", mode)
    if mode == "inpaint":
        images["mask"] = read_mask(mask, mode)
    if mode == "outpaint":
        images["image"], images["mask"] = masks.outpaint_canvas(
            images["image"], *parse_outpaint(outpaint)
        )
    if mode == "sr":
        images["low_res"] = read_image(init_image, "--init_image", mode)
    return ("inpaint" if mode == "outpaint" else mode), images
