"""Measures inpainting and super-resolution on held-out shapes images.

  python benchmarks/applications.py inpaint --workdir=/tmp/qs [--num=60]
  python benchmarks/applications.py sr --workdir=/tmp/superres [--num=200] [--steps 1 5 25]

inpaint: on validation images, masks the shape's bounding box (plus a margin), prompts the
caption with another colour, inpaints (the workdir's sampler settings) with and without
pasting the input back outside the mask, and reports the PSNR of the unmasked pixels against
the autoencoder's reconstruction of the input (image-to-image at strength 0) and against the
input, and how often the shapes analyzer reads the prompted colour.

sr: downsamples validation images 4x (bicubic), upsamples them with the model and with
bicubic interpolation, and reports both PSNRs against the originals, with the autoencoder's
reconstruction PSNR, the ceiling of any latent model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from ldm_jax import config as config_lib
from ldm_jax import diffusion
from ldm_jax.data import degradation, shapes, shapes_analyzer
from ldm_jax.pipeline.load import load_model

# Shape colours have chroma (max - min channel) >= 160, the tinted backgrounds <= 16.
_SHAPE_CHROMA = 60
_MASK_MARGIN = 2


def _psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR in dB over the pixels of ``where`` (all if None), uint8 images (H, W, 3)."""
    squared = np.square(a.astype(np.float64) - b.astype(np.float64)).mean(axis=-1)
    mse = squared[where].mean() if where is not None else squared.mean()
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def _shape_box_mask(image: np.ndarray) -> np.ndarray:
    chroma = image.max(axis=-1).astype(int) - image.min(axis=-1)
    rows, columns = np.nonzero(chroma > _SHAPE_CHROMA)
    mask = np.zeros((*image.shape[:2], 1), np.uint8)
    top, left = max(rows.min() - _MASK_MARGIN, 0), max(columns.min() - _MASK_MARGIN, 0)
    mask[top : rows.max() + _MASK_MARGIN + 1, left : columns.max() + _MASK_MARGIN + 1] = 1
    return mask


def inpaint(workdir: str, num: int, seed: int) -> dict:
    loaded = load_model(workdir)
    generator, config = loaded.generator(), loaded.config
    source = shapes.ShapesSource("validation", image_size=config.data.image_size)
    records = [source[i] for i in range(num)]
    colours = list(shapes.COLOURS)
    prompts, targets = [], []
    for record in records:
        _, colour = shapes.describe_label(int(record["label"]))
        target = colours[(colours.index(colour) + 1) % len(colours)]
        prompts.append(str(record["caption"]).replace(colour, target, 1))
        targets.append(target)
    images = np.stack([r["image"] for r in records])
    masks = np.stack([_shape_box_mask(image) for image in images])
    conditions = generator.conditions(prompts, [int(r["label"]) for r in records])
    options = generator.options()
    reconstruction = generator(
        conditions,
        seed,
        dataclasses.replace(options, mode="img2img", strength=0.0),
        {"image": images},
    )
    # The pixels of latents the mask does not touch: what the latent model can keep exactly;
    # the rest of the unmasked pixels share a latent, or the decoder's view, with the hole.
    factor = config_lib.autoencoder_factor(config)
    touched = np.asarray(diffusion.latent_mask(masks.astype(np.float32), factor))
    touched = touched.repeat(factor, axis=1).repeat(factor, axis=2)[..., 0] > 0
    result = {"num_images": num, "mask_fraction": float(masks.mean())}
    for paste_back in (True, False):
        filled = generator(
            conditions,
            seed,
            dataclasses.replace(options, mode="inpaint", paste_back=paste_back),
            {"image": images, "mask": masks},
        )
        kept = [m[..., 0] == 0 for m in masks]
        psnrs = [_psnr(f, r, k) for f, r, k in zip(filled, reconstruction, kept, strict=True)]
        readings = shapes_analyzer.analyze_batch(filled)
        right = [r.colour == t for r, t in zip(readings, targets, strict=True)]
        result["paste_back" if paste_back else "decoder_only"] = {
            "psnr_unmasked_vs_reconstruction_db": float(np.mean(psnrs)),
            "psnr_unmasked_min_db": float(np.min(psnrs)),
            "psnr_unmasked_vs_input_db": float(
                np.mean([_psnr(f, i, k) for f, i, k in zip(filled, images, kept, strict=True)])
            ),
            "psnr_untouched_latents_db": float(
                np.mean(
                    [
                        _psnr(f, r, ~t)
                        for f, r, t in zip(filled, reconstruction, touched, strict=True)
                    ]
                )
            ),
            "prompted_colour_accuracy": float(np.mean(right)),
        }
    result["sampling"] = dataclasses.asdict(options)
    return result


def super_resolution(workdir: str, num: int, seed: int, steps: list[int]) -> dict:
    loaded = load_model(workdir)
    generator, config = loaded.generator(), loaded.config
    factor = config.diffusion.super_resolution_factor
    source = shapes.ShapesSource("validation", image_size=config.data.image_size)
    originals = np.stack([source[i]["image"] for i in range(num)])
    low_res = np.stack([degradation.downsample(image, factor) for image in originals])
    size = config.data.image_size
    bicubic = np.stack([degradation.bicubic_resize(image, size, size) for image in low_res])
    options = generator.options(mode="sr")
    conditions = generator.conditions([""] * num)
    model = generator.model
    latents = model.encode(generator.params, originals / 127.5 - 1.0)
    reconstruction = np.asarray(model.decode(generator.params, latents))
    by_steps = {}
    for num_steps in steps or [options.num_steps]:
        upsampled = generator(
            conditions,
            seed,
            dataclasses.replace(options, num_steps=num_steps),
            {"low_res": low_res},
        )
        by_steps[str(num_steps)] = float(
            np.mean([_psnr(a, b) for a, b in zip(upsampled, originals, strict=True)])
        )
    return {
        "num_images": num,
        "factor": factor,
        "psnr_model_db_by_steps": by_steps,
        "psnr_bicubic_db": float(
            np.mean([_psnr(a, b) for a, b in zip(bicubic, originals, strict=True)])
        ),
        "psnr_autoencoder_reconstruction_db": float(
            np.mean([_psnr(a, b) for a, b in zip(reconstruction, originals, strict=True)])
        ),
        "sampling": dataclasses.asdict(options),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["inpaint", "sr"])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps", type=int, nargs="*", default=[], help="sr: sampling steps to compare"
    )
    args = parser.parse_args()
    if args.what == "inpaint":
        result = inpaint(args.workdir, args.num, args.seed)
    else:
        result = super_resolution(args.workdir, args.num, args.seed, args.steps)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
