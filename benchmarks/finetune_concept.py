"""Teaches the quickstart model a concept the shapes dataset never shows, from 8 images, with
LoRA and with DreamBooth's prior preservation, and measures what it learnt and what it broke.

  python benchmarks/finetune_concept.py --base=runs/quickstart [--out=/tmp/finetune_concept]
      [--num_identifier=64] [--num_per_prompt=16] [--seed=1] [--reuse]

The concept: outlined shapes. The dataset fills every shape; the 8 instance images are blue
circle outlines (a ring 3/32 of the image side wide, 50%-65% of the side across), drawn as
the dataset draws a shape (anti-aliased, wholly inside the image, on its tinted grey
backgrounds with their gradient and noise), captioned "a sks blue circle": "sks" is a word
the quickstart tokenizer never saw, so it reads as its [UNK] token, DreamBooth's rare
identifier. (A background colour the dataset never uses cannot be taught to this model: its
frozen f=4 autoencoder, trained only on grey backgrounds, turns an orange or a green one into
grey, so no latent the U-Net could learn decodes to it.)

The fine-tunes, each an ``ldm-jax train --config=configs/finetune.py:VARIANT,BASE`` process
(printed), run one at a time, from the same 8 images:
- LoRA without prior preservation (``dreambooth_lora``, the instance prompt only);
- LoRA and every U-Net weight (``dreambooth``) with DreamBooth's prior preservation as the
  trainer has it: the base model draws 64 images of the class prompt "a blue circle";
- LoRA and every U-Net weight with a prior over every ordinary prompt: the instance images
  beside 4 shapes images of each of the 18 colour x shape classes with their own captions (a
  captioned image folder, so the plain ``lora`` variant and ``dreambooth`` without an instance
  prompt). The instance images are written 9 times so that they are half the records, as the
  trainer's DreamBooth balances them. The prior images are dataset images rather than the
  base model's own samples: a sample re-encoded passes twice through this weak autoencoder, and
  training on it teaches the blur (measured: triangle accuracy fell to 42%-67% that way).
Every model, the base included, samples with the workdir's sampling settings and the same
seeds: ``--num_identifier`` samples of "a sks blue circle", ``--num_per_prompt`` samples of
each of the 18 ordinary prompts "a {colour} {shape}" (those of ``ldm-jax evaluate``), and 4 of
each "a sks {colour} {shape}" (does the identifier carry the concept to other subjects?). The
default seed is 1 because the trainer draws its class images with seed 0.

The pixel statistic, "shows the concept": the shape is hollow, i.e. the middle of its
bounding box (the central third in each direction) is covered less than halfway, with
coverage read as the shapes analyzer reads it (chroma rescaled between the border's median,
the background, and the shape's level; see ``centre_coverage``). Why this statistic:
- it reads what outlining changes and nothing else: a filled shape covers the middle of its
  bounding box (an upright triangle too: its bounding box's middle third lies inside it), an
  outline leaves the background there; colour, position and size do not enter;
- it is relative to each image's own contrast, as the analyzer is, so a dark or a bright
  background, a blurred edge or a faint generated shape does not shift it;
- 1/2 is halfway between background and shape, and the two sides are far apart: the
  dataset's shapes read 0.94-1.0, the base model's samples 0.74 and up, concept images ~0,
  and ~0.15 after the autoencoder;
- it is validated before any model runs: it must read the concept in every fresh concept
  image (256, drawn as the 8 are) and in none of 1,000 shapes validation images, both as
  drawn and through the frozen autoencoder (what a latent model can draw at best); the four
  shares are printed.

Also printed: the shapes analyzer's colour and shape accuracy on the ordinary prompts, each
fine-tune's wall clock (the whole ``ldm-jax train`` process: start-up, compilation, the class
images the base model draws, the steps, the checkpoint and the final preview grid), and the
LoRA's size against the model's: the adapters' float32 bytes, the safetensors file ``ldm-jax
export --what=lora`` writes, the base U-Net's float32 bytes. Sample grids are written under
``--out``. It is a measurement, never a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shlex
import subprocess
import sys
import time

import jax
import numpy as np
from flax import linen as nn
from scipy import ndimage

from ldm_jax import config as config_lib
from ldm_jax import storage
from ldm_jax.data import shapes, shapes_analyzer
from ldm_jax.models import lora
from ldm_jax.pipeline import grids, import_export, load

SUBJECT_SHAPE, SUBJECT_COLOUR = "circle", "blue"
IDENTIFIER = "sks"
INSTANCE_PROMPT = f"a {IDENTIFIER} {SUBJECT_COLOUR} {SUBJECT_SHAPE}"
CLASS_PROMPT = f"a {SUBJECT_COLOUR} {SUBJECT_SHAPE}"
NUM_INSTANCE_IMAGES = 8
# The outline's width and the circle's diameter, in fractions of the image side. The quickstart
# autoencoder (f=4, frozen while fine-tuning) fills the hole of smaller rings: of rings 35%-65%
# across only ~75% stay hollow through it, of 50%-65% all (the dataset draws 35%-65%).
OUTLINE_WIDTH = 3 / 32
MIN_SIZE, MAX_SIZE = 0.5, 0.65
# A shape is hollow when the middle of its bounding box is covered less than this: halfway
# between the background (0) and the shape (1).
HOLLOW_MAX_CENTRE_COVERAGE = 0.5
# Below this chroma contrast between the most saturated pixels and the border, no shape.
MIN_CHROMA_CONTRAST = 40.0
# Concept images drawn afresh, and shapes validation records, that validate the statistic.
NUM_VALIDATION_IMAGES = 256, 1000
# Samples of each "a sks {colour} {shape}" prompt.
NUM_PER_IDENTIFIER_VARIANT = 4
# Random streams of the concept images: the training set and the statistic's validation.
INSTANCE_STREAM, VALIDATION_STREAM = 0, 1
# The prior over every ordinary prompt: shapes training images per class, and how many times
# the instance images are written beside them (8 x 9 = 72 = 4 x 18: half the records).
PRIOR_IMAGES_PER_CLASS, INSTANCE_COPIES = 4, 9


@dataclasses.dataclass(frozen=True)
class Run:
    """One fine-tune: its name in the table, its workdir name, its configs/finetune.py
    variant, its data ("instances": the 8 images with the instance prompt; "with_prior": the
    captioned folder with the prior over every ordinary prompt), whether the trainer's prior
    preservation draws class images, and its config overrides."""

    name: str
    slug: str
    variant: str
    data: str
    class_prompt: bool
    overrides: dict


# The settings, chosen by measuring (a sweep of rank, targets, steps, learning rate, batch,
# text encoder training and prior data); each fine-tune takes 1.5-3 minutes on 2 CPU cores.
# Batches of 16 (DreamBooth's default is 4): on a CPU a step of 16 costs little more than one
# of 4 (~265 against ~60-120 images/s). 1,200 steps: with the prior of every prompt, 300 drew
# the outline in only 39%-73% of identifier samples, and 600 lost more shape accuracy (5-16
# points) than 1,200 (4-13), the concept learnt either way. No condition dropout (the base
# drops 10% of captions; diffusers' DreamBooth scripts drop none): an unconditional branch
# trained on 8 outlines would reach every prompt through classifier-free guidance.
COMMON = {
    "finetune.train.batch_size": 16,
    "finetune.train.steps": 1200,
    "diffusion.cond_drop_prob": 0.0,
}
# Rank-4 or -8 adapters on the attention projections alone (the trainer's default targets)
# drew an outline in 0%-11% of identifier samples after 400-1500 steps at 1e-4 to 3e-3: the
# outline needs the resnets' convolutions too (kohya's "LoCon").
LORA = {
    **COMMON,
    "finetune.lora.rank": 4,
    "finetune.lora.alpha": 4.0,
    "finetune.lora.targets": "('attention', 'projections', 'feed_forward', 'convolutions')",
    "finetune.train.learning_rate": 1e-3,
}
# diffusers' 5e-6 is for Stable Diffusion's 860M weights; this 1M-weight U-Net at 2e-5 to 5e-5
# drew the outline in 28%-41% of identifier samples.
FULL = {**COMMON, "finetune.train.learning_rate": 1e-4}
CLASS_IMAGES = {"finetune.num_class_images": 64, "finetune.prior_loss_weight": 1.0}


def runs() -> list[Run]:
    return [
        Run("LoRA, no prior preservation", "lora", "dreambooth_lora", "instances", False, LORA),
        Run(
            "LoRA + prior 'a blue circle'",
            "lora_class_prior",
            "dreambooth_lora",
            "instances",
            True,
            {**LORA, **CLASS_IMAGES},
        ),
        Run(
            "all weights + prior 'a blue circle'",
            "full_class_prior",
            "dreambooth",
            "instances",
            True,
            {**FULL, **CLASS_IMAGES},
        ),
        Run(
            "LoRA + prior of every prompt",
            "lora_every_prior",
            "lora",
            "with_prior",
            False,
            LORA,
        ),
        Run(
            "all weights + prior of every prompt",
            "full_every_prior",
            "dreambooth",
            "with_prior",
            False,
            FULL,
        ),
    ]


# -------------------------------------------------------------------------------------------
# The concept and its pixel statistic
# -------------------------------------------------------------------------------------------
def concept_images(count: int, stream: int, image_size: int) -> np.ndarray:
    """uint8 (count, H, W, 3): outlined circles of the subject's colour, drawn as the dataset
    draws a shape (anti-aliased, fully inside the image) on its tinted grey backgrounds (with
    their gradient and noise)."""
    rng = np.random.default_rng((stream, count))
    colour = np.array(shapes.COLOURS[SUBJECT_COLOUR], np.float32)
    ramp = np.linspace(-1, 1, image_size, dtype=np.float32)
    width, margin = OUTLINE_WIDTH * image_size, image_size / 32
    images = []
    for _ in range(count):
        size = rng.uniform(MIN_SIZE, MAX_SIZE) * image_size
        low, high = size / 2 + margin, image_size - size / 2 - margin
        center_x, center_y = low + rng.uniform(0, 1, size=2) * (high - low)
        brightness, tint = rng.uniform(70, 190), rng.uniform(-8, 8, size=3)
        strength, angle = rng.uniform(0, 30), rng.uniform(0, 2 * np.pi)
        shading = strength * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
        shading = shading + rng.normal(0, rng.uniform(0, 4), (image_size, image_size))
        background = (brightness + shading)[:, :, None] + tint
        disc = functools.partial(shapes._shape_coverage, SUBJECT_SHAPE, center_x, center_y)
        ring = np.clip(disc(size, image_size) - disc(size - 2 * width, image_size), 0, 1)
        image = background * (1 - ring[:, :, None]) + colour * ring[:, :, None]
        images.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return np.stack(images)


def centre_coverage(image: np.ndarray) -> float:
    """How much the shape covers the middle of its bounding box, 0 (background) to 1; NaN
    when the image shows no saturated shape.

    Coverage is read as the shapes analyzer reads it: chroma (max minus min channel) rescaled
    between the border's median (the background) and the median of the pixels above the
    midpoint to the 99th percentile (the shape). The shape is the largest 4-connected region
    covered more than half; the middle of its bounding box is the central third in each
    direction.
    """
    pixels = image.astype(np.float32)
    chroma = pixels.max(axis=-1) - pixels.min(axis=-1)
    border = np.concatenate([chroma[0], chroma[-1], chroma[1:-1, 0], chroma[1:-1, -1]])
    background = float(np.median(border))
    midpoint = (background + float(np.percentile(chroma, 99))) / 2
    if midpoint - background < MIN_CHROMA_CONTRAST / 2:
        return float("nan")
    coverage = (chroma - background) / (float(np.median(chroma[chroma > midpoint])) - background)
    labels, _ = ndimage.label(coverage > 0.5)
    shape = labels == 1 + np.argmax(np.bincount(labels.ravel())[1:])
    rows, columns = np.nonzero(shape)
    (top, bottom), (left, right) = (rows.min(), rows.max() + 1), (columns.min(), columns.max() + 1)
    third_rows, third_columns = (bottom - top) / 3, (right - left) / 3
    middle = coverage[
        round(top + third_rows) : max(round(bottom - third_rows), round(top + third_rows) + 1),
        round(left + third_columns) : max(
            round(right - third_columns), round(left + third_columns) + 1
        ),
    ]
    return float(middle.mean())


def shows_concept(images: np.ndarray) -> np.ndarray:
    """bool (N,): whether each image shows a hollow shape (see the module docstring)."""
    coverage = np.array([centre_coverage(image) for image in images])
    return np.nan_to_num(coverage, nan=1.0) < HOLLOW_MAX_CENTRE_COVERAGE


def autoencoded(loaded: load.LoadedModel, images: np.ndarray) -> np.ndarray:
    """uint8 images through the model's frozen autoencoder: what a latent model can draw."""
    latents = loaded.model.encode(loaded.params, images.astype(np.float32) / 127.5 - 1.0)
    return np.asarray(loaded.model.decode(loaded.params, latents))


def validate_statistic(loaded: load.LoadedModel) -> dict[str, float]:
    """The statistic's reading of fresh concept images (as drawn and through the autoencoder)
    and of shapes validation images (as drawn and through the autoencoder)."""
    image_size = loaded.config.data.image_size
    concept = concept_images(NUM_VALIDATION_IMAGES[0], VALIDATION_STREAM, image_size)
    source = shapes.ShapesSource("validation", image_size, NUM_VALIDATION_IMAGES[1])
    dataset = np.stack([source[i]["image"] for i in range(len(source))])
    return {
        "concept_images": float(shows_concept(concept).mean()),
        "concept_images_autoencoded": float(shows_concept(autoencoded(loaded, concept)).mean()),
        "dataset_images": float(shows_concept(dataset).mean()),
        "dataset_images_autoencoded": float(shows_concept(autoencoded(loaded, dataset)).mean()),
    }


# -------------------------------------------------------------------------------------------
# Fine-tuning and evaluation
# -------------------------------------------------------------------------------------------
def write_training_folders(out: str, image_size: int) -> dict[str, str]:
    """Writes the instance images and the captioned folder with the prior over every ordinary
    prompt; returns both folders by data name (see ``Run``)."""
    folders = {name: os.path.join(out, name) for name in ("instances", "with_prior")}
    instances = concept_images(NUM_INSTANCE_IMAGES, INSTANCE_STREAM, image_size)
    for index, image in enumerate(instances):
        storage.write_png(os.path.join(folders["instances"], f"{index:02d}.png"), image)
        for copy in range(INSTANCE_COPIES):
            stem = os.path.join(folders["with_prior"], f"instance_{index:02d}_{copy:02d}")
            storage.write_png(f"{stem}.png", image)
            storage.write_text(f"{stem}.txt", INSTANCE_PROMPT)
    # The first records of the shapes training split, PRIOR_IMAGES_PER_CLASS of each class.
    source = shapes.ShapesSource("train", image_size)
    taken = np.zeros(shapes.NUM_CLASSES, int)
    index = 0
    while taken.min() < PRIOR_IMAGES_PER_CLASS:
        record = source[index]
        if taken[record["label"]] < PRIOR_IMAGES_PER_CLASS:
            taken[record["label"]] += 1
            stem = os.path.join(folders["with_prior"], f"prior_{index:05d}")
            storage.write_png(f"{stem}.png", record["image"])
            storage.write_text(f"{stem}.txt", str(record["caption"]))
        index += 1
    return folders


def train_command(run: Run, base: str, workdir: str, folder: str) -> list[str]:
    command = [
        sys.executable, "-m", "ldm_jax", "train",
        f"--config=configs/finetune.py:{run.variant},{base}",
        f"--workdir={workdir}",
        "--config.data.source=image_folder",
        f"--config.data.path={folder}",
    ]  # fmt: skip
    if run.data == "instances":
        command.append(f"--config.finetune.instance_prompt={INSTANCE_PROMPT}")
    if run.class_prompt:
        command.append(f"--config.finetune.class_prompt={CLASS_PROMPT}")
    return command + [f"--config.{key}={value}" for key, value in run.overrides.items()]


def finetune(run: Run, base: str, workdir: str, folder: str, reuse: bool) -> float:
    """Runs the fine-tune (its output to ``workdir.log``), or with ``reuse`` reads the time of
    a finished one; returns its wall clock in seconds."""
    timing = os.path.join(workdir, "concept_benchmark_time.json")
    if reuse and os.path.exists(timing):
        with open(timing) as file:
            return json.load(file)["seconds"]
    if os.path.exists(workdir):
        raise FileExistsError(f"{workdir} exists: remove it, or pass --reuse to keep it")
    command = train_command(run, base, workdir, folder)
    print("$", shlex.join(command), flush=True)
    start = time.perf_counter()
    with open(f"{workdir}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    with open(timing, "w") as file:
        json.dump({"seconds": seconds, "command": command}, file)
    return seconds


def evaluate(loaded: load.LoadedModel, folder: str, args: argparse.Namespace) -> dict:
    """The concept shares and the analyzer's accuracies of a model; its sample grids are
    written to ``folder``."""
    generator = loaded.generator()
    ordinary, labels = zip(*shapes.class_prompts(), strict=True)
    ordinary_prompts = [p for p in ordinary for _ in range(args.num_per_prompt)]
    ordinary_labels = np.repeat(np.asarray(labels), args.num_per_prompt)
    variants = [
        p.replace("a ", f"a {IDENTIFIER} ", 1)
        for p in ordinary
        for _ in range(NUM_PER_IDENTIFIER_VARIANT)
    ]

    def sample(prompts: list[str]) -> np.ndarray:
        return generator(generator.conditions(prompts), seed=args.seed)

    identifier_images = sample([INSTANCE_PROMPT] * args.num_identifier)
    ordinary_images = sample(ordinary_prompts)
    variant_images = sample(variants)
    scores = shapes_analyzer.score(ordinary_images, ordinary_labels)
    grids.save_grid(identifier_images[:64], os.path.join(folder, "identifier.png"), columns=16)
    grids.save_grid(
        ordinary_images, os.path.join(folder, "ordinary.png"), columns=args.num_per_prompt
    )
    grids.save_grid(
        variant_images,
        os.path.join(folder, "identifier_variants.png"),
        columns=NUM_PER_IDENTIFIER_VARIANT,
    )
    return {
        "identifier_concept": float(shows_concept(identifier_images).mean()),
        "ordinary_concept": float(shows_concept(ordinary_images).mean()),
        "identifier_variants_concept": float(shows_concept(variant_images).mean()),
        **{k: v for k, v in scores.items() if k.startswith(("colour_accuracy", "shape_accuracy"))},
    }


def lora_sizes(workdir: str) -> dict:
    """The adapters' float32 bytes, the exported safetensors file's bytes, the base U-Net's
    float32 bytes."""
    config = config_lib.load_workdir_config(workdir)
    base, trained, _ = load.load_finetuned_parts(workdir, config)
    path = os.path.join(workdir, "concept_lora.safetensors")
    import_export.export_lora(workdir, path, "diffusers", config=config)
    unet_params = sum(int(x.size) for x in jax.tree.leaves(nn.meta.unbox(base.params["unet"])))
    return {
        "lora_params": lora.num_params(trained["lora"]),
        "lora_bytes": lora.num_params(trained["lora"]) * 4,
        "lora_file_bytes": os.path.getsize(path),
        "unet_params": unet_params,
        "unet_bytes": unet_params * 4,
    }


# -------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------
def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def print_table(rows: list[tuple[str, float | None, dict]]) -> None:
    base = rows[0][2]
    header = (
        f"{'model':<36} {'fine-tune':>9} {'identifier':>10} {'ordinary':>8} {'sks+other':>9} "
        f"{'colour (change)':>16} {'shape (change)':>15}"
    )
    print(header)
    print("-" * len(header))
    for name, seconds, result in rows:
        time_text = "-" if seconds is None else f"{seconds / 60:.1f} min"
        accuracies = [
            f"{percent(result[key])} ({100 * (result[key] - base[key]):+.1f})"
            for key in ("colour_accuracy", "shape_accuracy")
        ]
        print(
            f"{name:<36} {time_text:>9} {percent(result['identifier_concept']):>10} "
            f"{percent(result['ordinary_concept']):>8} "
            f"{percent(result['identifier_variants_concept']):>9} "
            f"{accuracies[0]:>16} {accuracies[1]:>15}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the quickstart workdir")
    parser.add_argument("--out", default="/tmp/finetune_concept")
    parser.add_argument("--num_identifier", type=int, default=64)
    parser.add_argument("--num_per_prompt", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1, help="the sampling seed of every model")
    parser.add_argument("--reuse", action="store_true", help="keep finished fine-tunes")
    args = parser.parse_args()
    start = time.perf_counter()
    base = os.path.abspath(args.base)
    base_model = load.load_model(base)

    validation = validate_statistic(base_model)
    print(
        f"statistic 'hollow' (centre coverage < {HOLLOW_MAX_CENTRE_COVERAGE}) reads the concept "
        f"in {percent(validation['concept_images'])} of {NUM_VALIDATION_IMAGES[0]} fresh concept "
        f"images ({percent(validation['concept_images_autoencoded'])} through the autoencoder) "
        f"and in {percent(validation['dataset_images'])} of {NUM_VALIDATION_IMAGES[1]} shapes "
        f"validation images ({percent(validation['dataset_images_autoencoded'])} through it)",
        flush=True,
    )
    folders = write_training_folders(args.out, base_model.config.data.image_size)
    rows = [("base model", None, evaluate(base_model, os.path.join(args.out, "base"), args))]
    del base_model
    sizes = None
    for run in runs():
        workdir = os.path.join(args.out, run.slug)
        seconds = finetune(run, base, workdir, folders[run.data], args.reuse)
        result = evaluate(load.load_model(workdir), os.path.join(workdir, "concept_eval"), args)
        rows.append((run.name, seconds, result))
        if sizes is None and run.variant == "dreambooth_lora":
            sizes = lora_sizes(workdir)
        print(f"{run.name}: {json.dumps(result)}", flush=True)

    print(
        f"\nidentifier: share of {args.num_identifier} samples of {INSTANCE_PROMPT!r} showing "
        f"the concept; ordinary: of {len(shapes.class_prompts()) * args.num_per_prompt} samples "
        "of the 18 'a {colour} {shape}' prompts; sks+other: of "
        f"{len(shapes.class_prompts()) * NUM_PER_IDENTIFIER_VARIANT} of 'a sks {{colour}} "
        "{shape}'; colour, shape: the shapes analyzer's accuracy on the ordinary samples (in "
        f"points against the base model); sampling seed {args.seed}"
    )
    print_table(rows)
    if sizes:
        print(
            f"LoRA (rank {LORA['finetune.lora.rank']}): {sizes['lora_params']:,} params = "
            f"{sizes['lora_bytes'] / 1e3:.1f} kB float32, safetensors file "
            f"{sizes['lora_file_bytes'] / 1e3:.1f} kB; the base U-Net: "
            f"{sizes['unet_params']:,} params = {sizes['unet_bytes'] / 1e6:.2f} MB float32 "
            f"(the file is {100 * sizes['lora_file_bytes'] / sizes['unet_bytes']:.1f}% of it)"
        )
    print(f"whole script: {(time.perf_counter() - start) / 60:.1f} min")
    print(
        json.dumps({"validation": validation, "rows": {n: r for n, _, r in rows}, "sizes": sizes})
    )


if __name__ == "__main__":
    main()
