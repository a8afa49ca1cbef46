"""Scores generated samples with the shapes analyzer: is the prompted colour and shape drawn?"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from ldm_jax.data import shapes, shapes_analyzer
from ldm_jax.pipeline.generator import Generator, SamplingOptions
from ldm_jax.pipeline.grids import save_grid


def evaluate_samples(
    generator: Generator, out_dir: str, *, num_per_prompt: int, seed: int, options: SamplingOptions
) -> dict:
    """Samples every colour x shape prompt (or class label) ``num_per_prompt`` times.

    Writes ``results.json`` (accuracies overall, per colour, per shape, and the sampling
    options) and ``samples.png`` (one row per prompt) to ``out_dir``; returns the results.
    """
    prompts, labels = zip(*shapes.class_prompts(), strict=True)
    prompts = [p for p in prompts for _ in range(num_per_prompt)]
    labels = np.repeat(np.asarray(labels, np.int32), num_per_prompt)
    images = generator(generator.conditions(prompts, list(labels)), seed=seed, options=options)
    results = {
        "num_samples": int(len(images)),
        "num_per_prompt": num_per_prompt,
        "seed": seed,
        "sampling": {k: getattr(options, k) for k in options.__dataclass_fields__},
        **shapes_analyzer.score(images, labels),
    }
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        save_grid(images, os.path.join(out_dir, "samples.png"), columns=num_per_prompt)
    return results
