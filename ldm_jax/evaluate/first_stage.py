"""``ldm-jax evaluate --what=reconstruction``: score a workdir's stage-1 autoencoder on the
validation split (PSNR, SSIM, LPIPS when weights are given, codebook usage for VQ)."""

from __future__ import annotations

import functools

from jax.sharding import Mesh

from ldm_jax import builders
from ldm_jax import config as config_lib
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.evaluate import batches
from ldm_jax.evaluate.reconstruction import evaluate_reconstruction
from ldm_jax.generate import pixels_from_uint8
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.train import autoencoder as autoencoder_stage
from ldm_jax.train import data as data_lib
from ldm_jax.train import frozen


def evaluate_workdir(
    workdir: str,
    mesh: Mesh,
    out_dir: str,
    *,
    num_images: int,
    lpips_weights: str | None = None,
) -> dict:
    """Reconstructs the first ``num_images`` validation images with the EMA autoencoder.

    Args:
      workdir: a workdir with a stage-1 checkpoint (or a pretrained autoencoder).
      mesh: batches are split over its data-parallel axes.
      out_dir: where reconstruction.json and reconstruction.png go.
      num_images: how many validation images to score.
      lpips_weights: an LPIPS safetensors file; None: the config's
        ``autoencoder.loss.lpips_weights``; "": no LPIPS.

    Returns:
      The results written to ``out_dir/reconstruction.json``.
    """
    config = config_lib.load_workdir_config(workdir)
    rules = mesh_lib.axis_rules_from_config(config.mesh.axis_rules)
    model = builders.build_autoencoder(config)
    ae_params, _, _ = frozen.load_autoencoder(config, workdir, mesh, rules)
    checkpointer = Checkpointer(
        autoencoder_stage.checkpoint_dir(frozen.autoencoder_workdir(config, workdir)),
        async_checkpointing=False,
    )
    step = checkpointer.latest_step()
    checkpointer.close()
    params = {"autoencoder": ae_params}

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
    source = data_lib.make_source(config.data, config.data.eval_split, config.seed)
    reconstruct = functools.partial(autoencoder_stage.reconstruct, model=model)
    return evaluate_reconstruction(
        lambda p, x: reconstruct(p["autoencoder"], x),
        source,
        mesh=mesh,
        batch_size=batch_size,
        out_dir=out_dir,
        num_images=num_images,
        image_size=config.data.image_size,
        lpips_fn=lpips_fn,
        codes_fn=codes_fn,
        num_codes=num_codes,
        step=step,
        params=params,
    )
