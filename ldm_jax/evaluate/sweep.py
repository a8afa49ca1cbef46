"""``ldm-jax evaluate --sweep=...``: sample a trained model at every point of a grid of
sampling settings and checkpoints, score each point, and tabulate and plot the scores.

Each point's prompts (the shapes prompts, or a prompts file, times the samples per prompt)
are split over every device and process (``ldm_jax.evaluate.batches``); the images, their
Inception features and CLIP scores are computed on the mesh and gathered to the hosts;
process 0 writes ``results.json`` / ``results.csv`` after every point, a grid per point
and, at the end, a plot per metric. A point whose row is in ``results.json`` with the same
settings is skipped, so an interrupted or extended sweep resumes where it was.

Metrics: FID and KID against the dataset's cached reference features (``--inception_weights``),
the CLIP score (``--clip_weights``), and the shapes analyzer's accuracies for the shapes
prompts. A metric without its weights is reported unavailable, naming the flag.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from ldm_jax import config as config_lib
from ldm_jax import storage
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.data import pipeline, shapes, shapes_analyzer
from ldm_jax.evaluate import batches, sweep_results
from ldm_jax.evaluate.clip_score import ClipScorer
from ldm_jax.evaluate.fid import GaussianStatistics, frechet_distance, kernel_inception_distance
from ldm_jax.evaluate.inception_features import InceptionFeatures, reference_features
from ldm_jax.evaluate.sweep_spec import LATEST, Point, parse_sweep, sweep_name
from ldm_jax.parallel import sharding
from ldm_jax.pipeline import grids
from ldm_jax.pipeline import workdir as workdir_lib
from ldm_jax.pipeline.datasets import make_source
from ldm_jax.pipeline.generator import Generator, sampling_options
from ldm_jax.pipeline.load import load_model

log = logging.getLogger(__name__)

SWEEP_DIR = "evaluate"
GRID_DIR = "grids"
GRID_MAX_IMAGES = 64
# The options a sweep key sets, by SamplingOptions field.
OPTION_OF_KEY = {
    "sampler": "sampler",
    "steps": "num_steps",
    "guidance": "guidance_scale",
    "guidance_rescale": "guidance_rescale",
    "eta": "eta",
}


@dataclasses.dataclass(frozen=True)
class Prompts:
    """What every point samples: each prompt (or label) ``num_per_prompt`` times.

    Attributes:
      prompts: one text per sample.
      labels: one class label per sample, or None (prompts from a file).
      digest: identifies the prompt list in a point's settings.
    """

    prompts: list[str]
    labels: list[int] | None
    num_per_prompt: int
    digest: str


@dataclasses.dataclass(frozen=True)
class SweepOutcome:
    out_dir: str
    rows: list[dict]
    swept: list[str]
    run: int
    skipped: int
    unavailable: list[str]
    plots: list[str]


def load_prompts(config, prompts_file: str | None, num_per_prompt: int) -> Prompts:
    """The shapes prompts (or the validation captions) by default, else a file's lines."""
    if num_per_prompt < 1:
        raise ValueError(f"--num_per_prompt={num_per_prompt} must be at least 1")
    if prompts_file:
        if config.diffusion.conditioning != "text":
            raise ValueError("--prompts_file needs a text-conditioned model")
        file = storage.as_path(prompts_file)
        if not file.is_file():
            raise FileNotFoundError(f"--prompts_file={prompts_file} not found")
        lines = file.read_text(encoding="utf-8").splitlines()
        texts = [line.strip() for line in lines if line.strip()]
        if not texts:
            raise ValueError(f"--prompts_file={prompts_file} holds no prompts (one per line)")
        labels = None
    else:
        texts, labels = grids.preview_conditions(config)
    digest = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:12]
    return Prompts(
        prompts=[t for t in texts for _ in range(num_per_prompt)],
        labels=None if labels is None else [n for n in labels for _ in range(num_per_prompt)],
        num_per_prompt=num_per_prompt,
        digest=digest,
    )


def resolve_checkpoint(value: object, saved: Sequence[int], directory: str) -> int | None:
    """A point's checkpoint step ('latest': the newest; None for an imported model)."""
    if value == LATEST:
        return max(saved) if saved else None
    if value not in saved:
        listed = ", ".join(map(str, saved)) or "none"
        raise ValueError(
            f"--sweep checkpoint={value}: no such checkpoint in {directory} (saved: {listed})"
        )
    return int(value)


def unavailable_metrics(inception_weights: str | None, clip_weights: str | None) -> list[str]:
    """The metrics left out for want of weights, each with the flag that brings it."""
    missing = []
    if not inception_weights:
        missing.append("fid, kid: set --inception_weights=FILE")
    if not clip_weights:
        missing.append("clip_score: set --clip_weights=DIR")
    return missing


class _Metrics:
    """The metrics the given weights make available, computed on the mesh."""

    def __init__(self, workdir, config, mesh, inception_weights, clip_weights, num_reference):
        self.inception = self.clip = None
        self.reference: np.ndarray | None = None
        if inception_weights:
            self.inception = InceptionFeatures(inception_weights, mesh)
            data = config.data
            source = make_source(data, data.eval_split, config.seed)
            description = {
                "source": data.source,
                "path": data.path,
                "tfds_name": data.tfds_name,
                "split": data.eval_split,
                "seed": config.seed,
            }
            self.reference = reference_features(
                self.inception,
                source,
                workdir=workdir,
                description=description,
                count=num_reference,
                image_size=data.image_size,
            )
        if clip_weights and config.diffusion.conditioning != "none":
            self.clip = ClipScorer(clip_weights, mesh)

    def from_features(self, features: np.ndarray) -> dict:
        if self.reference is None:
            return {}
        kid, kid_std = kernel_inception_distance(features, self.reference)
        fid = frechet_distance(
            GaussianStatistics.of(features), GaussianStatistics.of(self.reference)
        )
        return {"fid": fid, "kid": kid, "kid_std": kid_std}


def _sample_point(
    generator: Generator, options, prompts: Prompts, seed: int, metrics: _Metrics, mesh: Mesh
) -> dict[str, np.ndarray]:
    """Images, features and CLIP scores of every sample of a point, on every host."""
    count = len(prompts.prompts)
    local = {"condition": generator.conditions(prompts.prompts, prompts.labels)}
    if metrics.clip is not None:
        local["clip_tokens"] = metrics.clip.tokens(prompts.prompts)
    batch_size = batches.batch_size_for(mesh, count)
    key = jax.random.key(seed)
    gathered: dict[str, list[np.ndarray]] = {}
    for index, (rows, valid) in enumerate(batches.local_rows(count, batch_size)):
        batch = pipeline.global_batch(
            {**{k: v[rows] for k, v in local.items()}, "valid": valid},
            sharding.batch_sharding(mesh),
        )
        images = generator.generate_global(
            batch["condition"], jax.random.fold_in(key, index), options
        )
        outputs = {"images": images, "valid": batch["valid"]}
        if metrics.inception is not None:
            outputs["features"] = metrics.inception(images)
        if metrics.clip is not None:
            outputs["clip_score"] = metrics.clip(images, batch["clip_tokens"])
        host = sharding.to_host(outputs)
        keep = host.pop("valid")
        for name, values in host.items():
            gathered.setdefault(name, []).append(values[keep])
    return {name: np.concatenate(values) for name, values in gathered.items()}


def _point_metrics(samples: dict[str, np.ndarray], prompts: Prompts, metrics: _Metrics) -> dict:
    results: dict = {"num_samples": int(len(samples["images"]))}
    if "features" in samples:
        results.update(metrics.from_features(samples["features"]))
    if "clip_score" in samples:
        results["clip_score"] = float(samples["clip_score"].mean())
    if prompts.labels is not None and prompts.digest == _shapes_digest():
        results.update(shapes_analyzer.score(samples["images"], prompts.labels))
    return results


def _shapes_digest() -> str:
    texts = [prompt for prompt, _ in shapes.class_prompts()]
    return hashlib.sha1("\n".join(texts).encode()).hexdigest()[:12]


def _point_name(point: Point) -> str:
    return "_".join(f"{k}{v}" for k, v in point.items())


def run_sample_sweep(
    workdir: str,
    spec: str,
    *,
    config: ml_collections.ConfigDict | None = None,
    out_dir: str | None = None,
    num_per_prompt: int = 1,
    prompts_file: str | None = None,
    seed: int = 0,
    inception_weights: str | None = None,
    clip_weights: str | None = None,
    num_reference_images: int = 1024,
) -> SweepOutcome:
    """Samples and scores every point of ``spec`` not finished before; see the module doc.

    Args:
      workdir: a trained (or imported) stage-2 workdir.
      spec: the ``--sweep`` text.
      config: the workdir's config with overrides (``--config.mesh.*``: the mesh the model
        is sharded on and the samples split over); None: its own.
      out_dir: where the results go (default ``workdir/evaluate/sweep-<keys>``).
      num_per_prompt: samples per prompt.
      prompts_file: a text file of prompts, one per line (default: the shapes prompts).
      seed: the sampling seed of points that do not sweep ``seed``.
      inception_weights: the converted FID Inception safetensors file, for FID and KID.
      clip_weights: a transformers CLIPModel directory, for the CLIP score.
      num_reference_images: validation images of the FID reference statistics.
    """
    points = parse_sweep(spec)
    swept = list(points[0])
    out_dir = out_dir or storage.join(workdir, SWEEP_DIR, f"sweep-{sweep_name(points)}")
    config = config_lib.load_workdir_config(workdir) if config is None else config
    prompts = load_prompts(config, prompts_file, num_per_prompt)
    checkpointer = Checkpointer(
        workdir_lib.checkpoint_dir(workdir, workdir_lib.DIFFUSION), async_checkpointing=False
    )
    saved, directory = checkpointer.all_steps(), checkpointer.directory
    checkpointer.close()
    settings, point_options = [], []
    for point in points:
        options = sampling_options(
            config.sample, **{OPTION_OF_KEY[k]: v for k, v in point.items() if k in OPTION_OF_KEY}
        )
        point_options.append(options)
        settings.append(
            {
                **{key: getattr(options, field) for key, field in OPTION_OF_KEY.items()},
                "seed": point.get("seed", seed),
                "checkpoint": resolve_checkpoint(point.get("checkpoint", LATEST), saved, directory),
                "num_per_prompt": num_per_prompt,
                "prompts": prompts.digest,
            }
        )
    rows = sweep_results.read_rows(out_dir)
    finished = {sweep_results.settings_key(r["settings"]) for r in rows}
    todo = [i for i, s in enumerate(settings) if sweep_results.settings_key(s) not in finished]
    for i, point in enumerate(points):
        if i not in todo:
            log.info("point %d/%d %s: finished before, skipped", i + 1, len(points), point)
    metrics = None
    generator, loaded_step = None, object()
    # Points of one checkpoint run together, so each checkpoint is loaded once.
    for i in sorted(todo, key=lambda i: (settings[i]["checkpoint"] or 0, i)):
        point, point_settings = points[i], settings[i]
        if point_settings["checkpoint"] != loaded_step:
            loaded_step = point_settings["checkpoint"]
            generator = load_model(workdir, config, step=loaded_step).generator()
        if metrics is None:
            metrics = _Metrics(
                workdir,
                config,
                generator.mesh,
                inception_weights,
                clip_weights,
                num_reference_images,
            )
        start = time.perf_counter()
        samples = _sample_point(
            generator, point_options[i], prompts, point_settings["seed"], metrics, generator.mesh
        )
        results = {**_point_metrics(samples, prompts, metrics)}
        results["seconds"] = round(time.perf_counter() - start, 2)
        rows.append({"settings": point_settings, "metrics": results})
        headline = {k: results[k] for k in sweep_results.SUMMARY_METRICS if k in results}
        log.info("point %d/%d %s: %s", i + 1, len(points), point, headline)
        if jax.process_index() == 0:
            grid = samples["images"][:GRID_MAX_IMAGES]
            columns = prompts.num_per_prompt if prompts.num_per_prompt > 1 else None
            grids.save_grid(
                grid, storage.join(out_dir, GRID_DIR, f"{_point_name(point)}.png"), columns
            )
            sweep_results.write_rows(out_dir, rows, spec)
    # The rows of this spec's points, in its order (rows of other specs stay in the files).
    order = {sweep_results.settings_key(s): i for i, s in enumerate(settings)}
    current = sorted(
        (r for r in rows if sweep_results.settings_key(r["settings"]) in order),
        key=lambda r: order[sweep_results.settings_key(r["settings"])],
    )
    plots = []
    if jax.process_index() == 0:
        plots = sweep_results.write_plots(out_dir, current, swept)
    return SweepOutcome(
        out_dir=out_dir,
        rows=current,
        swept=swept,
        run=len(todo),
        skipped=len(points) - len(todo),
        unavailable=unavailable_metrics(inception_weights, clip_weights),
        plots=plots,
    )
