"""Reconstruction quality of a stage-1 autoencoder: PSNR, SSIM, LPIPS and codebook usage.

Images are read from a random-access source in global batches sharded over the mesh's
data-parallel axes; every JAX process reads only its own rows. Reconstruction and the
per-image metrics run in one jitted function on the devices; only the per-image values
(and, for a VQ model, a histogram of the codes) come back to the hosts.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from ldm_jax import storage
from ldm_jax.data import pipeline
from ldm_jax.data.transforms import ResizeAndCrop
from ldm_jax.evaluate import batches
from ldm_jax.evaluate.image_metrics import psnr, ssim
from ldm_jax.parallel import sharding
from ldm_jax.pipeline.grids import save_grid
from ldm_jax.pipeline.model import pixels_from_uint8

RESULTS_FILE = "reconstruction.json"
GRID_FILE = "reconstruction.png"

ImageFn = Callable[[Any, jax.Array], jax.Array]


def evaluate_reconstruction(
    reconstruct_fn: ImageFn,
    source: Sequence[Mapping[str, Any]],
    *,
    mesh: Mesh,
    batch_size: int,
    out_dir: str,
    num_images: int | None = None,
    image_size: int | None = None,
    lpips_fn: Callable[[Any, jax.Array, jax.Array], jax.Array] | None = None,
    codes_fn: ImageFn | None = None,
    num_codes: int = 0,
    grid_images: int = 16,
    step: int | None = None,
    params: Any = None,
) -> dict:
    """Reconstructs the first ``num_images`` images of ``source`` and scores them.

    Writes ``out_dir/reconstruction.json`` and ``out_dir/reconstruction.png`` (originals on
    top, reconstructions below) from process 0; every process returns the results.

    Args:
        reconstruct_fn: (params, uint8 images (B, H, W, 3)) -> uint8 reconstructions of the
            same shape; traced inside one jit with the metrics.
        source: Random-access records (``len`` and ``[i]``) with an "image", uint8 (H, W, 3).
        mesh: The mesh; batches are split over its data-parallel axes.
        batch_size: Images per global batch, a multiple of the data-parallel size and of
            the number of JAX processes. The last batch is padded; padded rows are not scored.
        out_dir: Folder for the JSON results and the PNG grid.
        num_images: Images to evaluate, the first ones of ``source``; all of them when None.
        image_size: Resize and centre-crop every image to this size (``ResizeAndCrop``);
            None when the records are already at the model's size.
        lpips_fn: Optional (params, images, reconstructions in [-1, 1]) -> (B,) perceptual
            distances.
        codes_fn: For a VQ model, (params, uint8 images) -> (B, h, w) int32 codebook indices.
        num_codes: The codebook size; required with ``codes_fn``.
        grid_images: Columns of the PNG grid (0 writes no grid).
        step: Training step of the evaluated params, recorded in the results.
        params: The pytree every function above gets first: passed to the jitted
            computation as an argument, not baked into it as constants.

    Returns:
        {"psnr", "psnr_std", "ssim", "ssim_std", ["lpips", "lpips_std"], "num_images",
        "step", ["codebook_size", "codebook_usage", "codebook_perplexity"]}: means and
        population standard deviations over the images. PSNR is in dB, capped at
        ``image_metrics.PSNR_CAP_DB`` for exact reconstructions.

    Raises:
        ValueError: For an empty source, a batch size the mesh or processes cannot split,
            ``codes_fn`` without ``num_codes``, records of mismatched image shapes, or codes
            outside [0, num_codes).
    """
    count = len(source) if num_images is None else min(num_images, len(source))
    _check_arguments(count, batch_size, mesh, codes_fn, num_codes)
    measure = jax.jit(
        functools.partial(
            _measure,
            reconstruct_fn=reconstruct_fn,
            lpips_fn=lpips_fn,
            codes_fn=codes_fn,
            num_codes=num_codes,
        )
    )
    batch_sharding = sharding.batch_sharding(mesh)
    resize = None if image_size is None else ResizeAndCrop(image_size, random_crop=False)
    per_image: dict[str, list[np.ndarray]] = {}
    code_counts = np.zeros(num_codes, np.int64)
    codes_out_of_range = 0
    originals, reconstructions = [], []
    is_main = jax.process_index() == 0
    with jax.set_mesh(mesh):
        bar = tqdm(total=count, desc="reconstruction", unit="img", disable=not is_main)
        for local in local_image_batches(source, count, batch_size, resize):
            batch = pipeline.global_batch(local, batch_sharding)
            recon, metrics = measure(params, batch["image"], batch["valid"])
            metrics = sharding.to_host(metrics)
            valid = sharding.to_host(batch["valid"])
            if codes_fn is not None:
                code_counts += metrics.pop("code_counts").astype(np.int64)
                codes_out_of_range += int(metrics.pop("codes_out_of_range"))
            for name, values in metrics.items():
                per_image.setdefault(name, []).append(values[valid])
            # Every process takes this branch alike: to_host is a collective.
            if sum(len(x) for x in originals) < grid_images:
                originals.append(sharding.to_host(batch["image"])[valid])
                reconstructions.append(sharding.to_host(recon)[valid])
            bar.update(int(valid.sum()))
        bar.close()

    results = _summarise({k: np.concatenate(v) for k, v in per_image.items()}, step)
    if codes_fn is not None:
        if codes_out_of_range:
            raise ValueError(
                f"codes_fn returned {codes_out_of_range} codes outside [0, num_codes={num_codes})"
            )
        results.update(_codebook_statistics(code_counts))
    if is_main:
        _write(results, originals, reconstructions, out_dir, grid_images)
    return results


def _check_arguments(
    count: int, batch_size: int, mesh: Mesh, codes_fn: ImageFn | None, num_codes: int
) -> None:
    if count <= 0:
        raise ValueError("the source holds no images to evaluate (or num_images is 0)")
    batches.check_batch_size(batch_size, mesh)
    if codes_fn is not None and num_codes <= 0:
        raise ValueError(f"codes_fn needs num_codes, the codebook size; got {num_codes}")


def local_image_batches(
    source: Sequence[Mapping[str, Any]],
    count: int,
    batch_size: int,
    resize: ResizeAndCrop | None,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of every global batch (``batches.local_rows``) of the first
    ``count`` records: {"image": uint8, "valid": bool}; padding rows repeat an image."""
    rng = np.random.default_rng(0)  # unused by a centre crop, but ResizeAndCrop asks for one
    image_shape = None
    for indices, valid in batches.local_rows(count, batch_size):
        loaded: dict[int, np.ndarray] = {}
        for index in dict.fromkeys(int(i) for i in indices):
            image = _load_image(source, index, resize, rng)
            image_shape = image_shape or image.shape
            if image.shape != image_shape:
                raise ValueError(
                    f"record {index} has an image of shape {image.shape}, earlier records "
                    f"{image_shape}; pass image_size to resize every image to one size"
                )
            loaded[index] = image
        yield {"image": np.stack([loaded[int(i)] for i in indices]), "valid": valid}


def _load_image(
    source: Sequence[Mapping[str, Any]],
    index: int,
    resize: ResizeAndCrop | None,
    rng: np.random.Generator,
) -> np.ndarray:
    image = np.asarray(source[index]["image"])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"record {index} has an image of {image.dtype} {image.shape}; expected uint8 (H, W, 3)"
        )
    if resize is not None:
        image = resize.random_map({"image": image}, rng)["image"]
    return image


def _measure(
    params: Any,
    images: jax.Array,
    valid: jax.Array,
    *,
    reconstruct_fn: ImageFn,
    lpips_fn: Callable[[Any, jax.Array, jax.Array], jax.Array] | None,
    codes_fn: ImageFn | None,
    num_codes: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reconstructions and per-image metrics of one global batch (jitted)."""
    recon = reconstruct_fn(params, images)
    metrics = {"psnr": psnr(images, recon), "ssim": ssim(images, recon)}
    if lpips_fn is not None:
        metrics["lpips"] = lpips_fn(params, pixels_from_uint8(images), pixels_from_uint8(recon))
    if codes_fn is not None:
        codes = codes_fn(params, images)
        in_range = (codes >= 0) & (codes < num_codes)
        counted = valid[:, None, None] & in_range
        metrics["code_counts"] = (
            jnp.zeros(num_codes, jnp.int32)
            .at[jnp.where(in_range, codes, 0).reshape(-1)]
            .add(counted.reshape(-1).astype(jnp.int32))
        )
        metrics["codes_out_of_range"] = jnp.sum(valid[:, None, None] & ~in_range)
    return recon, metrics


def _summarise(per_image: dict[str, np.ndarray], step: int | None) -> dict:
    """Means and population standard deviations of the per-image metrics."""
    results: dict[str, Any] = {"num_images": int(len(per_image["psnr"])), "step": step}
    for name, values in per_image.items():
        values = values.astype(np.float64)
        results[name] = float(values.mean())
        results[f"{name}_std"] = float(values.std())
    return results


def _codebook_statistics(code_counts: np.ndarray) -> dict:
    """The fraction of codes used and the perplexity exp(entropy) of their distribution.

    A perplexity of ``codebook_size`` means every code is used equally often; 1 means a
    single code stands for every position.
    """
    probabilities = code_counts / code_counts.sum()
    used = probabilities[probabilities > 0]
    return {
        "codebook_size": int(len(code_counts)),
        "codebook_usage": float(len(used) / len(code_counts)),
        "codebook_perplexity": float(np.exp(-np.sum(used * np.log(used)))),
    }


def _write(
    results: dict,
    originals: list[np.ndarray],
    reconstructions: list[np.ndarray],
    out_dir: str,
    grid_images: int,
) -> None:
    text = json.dumps(results, indent=2, sort_keys=True)
    storage.write_text(storage.join(out_dir, RESULTS_FILE), text)
    if grid_images > 0:
        top = np.concatenate(originals)[:grid_images]
        bottom = np.concatenate(reconstructions)[:grid_images]
        save_grid(np.concatenate([top, bottom]), storage.join(out_dir, GRID_FILE), len(top))
