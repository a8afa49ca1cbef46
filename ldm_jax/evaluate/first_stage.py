"""``ldm-jax evaluate --what=reconstruction``: score a workdir's stage-1 autoencoder on the
validation split (PSNR, SSIM, LPIPS when weights are given, codebook usage for VQ)."""

from __future__ import annotations

import functools

import ml_collections

from ldm_jax import config as config_lib
from ldm_jax.evaluate import batches
from ldm_jax.evaluate.reconstruction import evaluate_reconstruction
from ldm_jax.pipeline import builders
from ldm_jax.pipeline.datasets import make_source
from ldm_jax.pipeline.load import inference_mesh, load_autoencoder
from ldm_jax.pipeline.model import pixels_from_uint8, reconstruct


def evaluate_workdir(
    workdir: str,
    out_dir: str,
    *,
    num_images: int,
    lpips_weights: str | None = None,
    config: ml_collections.ConfigDict | None = None,
) -> dict:
    """Reconstructs the first ``num_images`` validation images with the EMA autoencoder, on
    the mesh of the workdir's config (batches split over its data-parallel axes).

    Args:
      workdir: a workdir with a stage-1 checkpoint (or a pretrained autoencoder).
      out_dir: where reconstruction.json and reconstruction.png go.
      num_images: how many validation images to score.
      lpips_weights: an LPIPS safetensors file; None: the config's
        ``autoencoder.loss.lpips_weights``; "": no LPIPS.
      config: the workdir's config with overrides (``--config.mesh.*``); None: its own.

    Returns:
      The results written to ``out_dir/reconstruction.json``.
    """
    config = config_lib.load_workdir_config(workdir) if config is None else config
    mesh, rules = inference_mesh(config)
    model = builders.build_autoencoder(config)
    autoencoder = load_autoencoder(config, workdir, mesh, rules)
    params = {"autoencoder": autoencoder.params}

    weights = config.autoencoder.loss.lpips_weights if lpips_weights is None else lpips_weights
    lpips_fn = None
    if weights:
        from ldm_jax.interop.lpips_weights import load_lpips

        lpips, params["lpips"] = load_lpips(weights)
        lpips_fn = lambda p, x, y: lpips.apply({"params": p["lpips"]}, x, y)  # noqa: E731

    codes_fn, num_codes = None, 0
    if config.autoencoder.kind == "vq":
        num_codes = config.autoencoder.model.num_embeddings
        codes_fn = lambda p, x: model.apply(  # noqa: E731
            {"params": p["autoencoder"]}, pixels_from_uint8(x), method="encode_indices"
        )

    batch_size = batches.batch_size_for(mesh, num_images)
    source = make_source(config.data, config.data.eval_split, config.seed)
    reconstruct_fn = functools.partial(reconstruct, model=model)
    return evaluate_reconstruction(
        lambda p, x: reconstruct_fn(p["autoencoder"], x),
        source,
        mesh=mesh,
        batch_size=batch_size,
        out_dir=out_dir,
        num_images=num_images,
        image_size=config.data.image_size,
        lpips_fn=lpips_fn,
        codes_fn=codes_fn,
        num_codes=num_codes,
        step=autoencoder.step,
        params=params,
    )
