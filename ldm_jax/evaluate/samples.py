"""Scores generated samples with the shapes analyzer: is the prompted colour and shape drawn?"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np

from ldm_jax import storage
from ldm_jax.data import shapes, shapes_analyzer
from ldm_jax.pipeline.generator import Generator
from ldm_jax.pipeline.grids import save_grid


def evaluate_samples(
    generator: Generator,
    *,
    num_per_prompt: int,
    seed: int,
    out_dir: str | None = None,
    workdir: str = "",
    **overrides: Any,
) -> tuple[dict, str]:
    """Samples every colour x shape prompt (or class label) ``num_per_prompt`` times with the
    config's sampling options and ``overrides``.

    Writes ``results.json`` (accuracies overall, per colour, per shape, and the sampling
    options) and ``samples.png`` (one row per prompt) to ``out_dir``, by default
    ``workdir/eval/<sampler>_<steps>steps_guidance<scale>``.

    Returns:
      (the results, the folder they were written to).
    """
    options = generator.options(**overrides)
    name = f"{options.sampler}_{options.num_steps}steps_guidance{options.guidance_scale:g}"
    out_dir = out_dir or storage.join(workdir, "eval", name)
    prompts, labels = zip(*shapes.class_prompts(), strict=True)
    prompts = [p for p in prompts for _ in range(num_per_prompt)]
    labels = np.repeat(np.asarray(labels, np.int32), num_per_prompt)
    images = generator(generator.conditions(prompts, list(labels)), seed=seed, options=options)
    results = {
        "num_samples": int(len(images)),
        "num_per_prompt": num_per_prompt,
        "seed": seed,
        "sampling": dataclasses.asdict(options),
        **shapes_analyzer.score(images, labels),
    }
    if jax.process_index() == 0:
        text = json.dumps(results, indent=2, sort_keys=True)
        storage.write_text(storage.join(out_dir, "results.json"), text)
        save_grid(images, storage.join(out_dir, "samples.png"), columns=num_per_prompt)
    return results, out_dir
