"""The first-stage objective: pixel + perceptual reconstruction, KL or codebook penalty, and
a patch-GAN whose generator term is weighted adaptively (the CompVis LPIPSWithDiscriminator).

All terms are means over elements, so the weights keep their CompVis meaning as ratios: the
KL is divided by the number of pixel values, and the adaptive GAN weight is a ratio of
gradient norms, unchanged by a common scale.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax.train import gan

# The generator-side metrics a step reports whether or not the GAN is on yet, so that every
# step returns the same keys.
GAN_METRICS = ("g_loss", "d_weight", "disc_factor", "d_loss", "logits_real", "logits_fake")


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The static settings of the first-stage loss (``config.autoencoder.loss`` and kind)."""

    kind: str = "kl"
    pixel: str = "l1"
    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0
    learn_logvar: bool = True
    codebook_weight: float = 1.0
    disc_weight: float = 0.0
    disc_start: int = 0
    disc_loss: str = "hinge"

    @property
    def gan(self) -> bool:
        """Whether the run has a discriminator at all."""
        return self.disc_weight > 0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> LossSettings:
        ae = config.autoencoder
        loss = ae.loss
        return cls(
            kind=ae.kind,
            pixel=loss.pixel,
            kl_weight=float(ae.kl_weight),
            perceptual_weight=float(loss.perceptual_weight),
            learn_logvar=bool(loss.learn_logvar),
            codebook_weight=float(loss.codebook_weight),
            disc_weight=float(loss.disc_weight),
            disc_start=int(loss.disc_start),
            disc_loss=loss.disc_loss,
        )


@dataclasses.dataclass(frozen=True)
class LossModules:
    """The modules the loss runs: the autoencoder, and the discriminator and LPIPS or None."""

    autoencoder: Any
    discriminator: Any = None
    lpips: Any = None


def reconstruction(
    variables: dict,
    images: jax.Array,
    key: jax.Array,
    *,
    autoencoder: Any,
    settings: LossSettings,
) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array], dict]:
    """Reconstructs ``images`` through a posterior sample (KL) or the quantised latent (VQ).

    Returns:
      (reconstruction in float32, the decoder's last-layer input, the weighted latent penalty,
      its metrics, the autoencoder's updated non-parameter variables (EMA codebook) or {}).
    """
    if settings.kind == "kl":
        posterior = autoencoder.apply(variables, images, method="encode")
        latents = posterior.sample(key)
        recon, features = autoencoder.apply(
            variables, latents, return_features=True, method="decode"
        )
        kl = jnp.mean(posterior.kl()) / np.prod(images.shape[1:])
        return recon.astype(jnp.float32), features, settings.kl_weight * kl, {"kl": kl}, {}
    mutable = [name for name in variables if name != "params"]
    outputs = autoencoder.apply(
        variables,
        images,
        train=True,
        return_features=True,
        rngs={"codebook": key},
        mutable=mutable or False,
    )
    (recon, quantized, features), updated = outputs if mutable else (outputs, {})
    metrics = {
        "codebook_loss": quantized.loss,
        "perplexity": quantized.perplexity,
        "code_usage": quantized.usage,
    }
    penalty = settings.codebook_weight * quantized.loss
    return recon.astype(jnp.float32), features, penalty, metrics, dict(updated)


def negative_log_likelihood(
    recon: jax.Array,
    images: jax.Array,
    loss_params: dict,
    lpips_params: Any,
    *,
    lpips: Any,
    settings: LossSettings,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pixel (L1 or L2) plus weighted LPIPS, over a learned variance when enabled."""
    difference = images - recon
    pixel = jnp.abs(difference) if settings.pixel == "l1" else jnp.square(difference)
    per_element = pixel
    metrics = {"pixel": jnp.mean(pixel)}
    if lpips is not None and settings.perceptual_weight > 0:
        perceptual = lpips.apply({"params": lpips_params}, images, recon)
        per_element = per_element + settings.perceptual_weight * perceptual[:, None, None, None]
        metrics["lpips"] = jnp.mean(perceptual)
    if settings.learn_logvar:
        logvar = loss_params["logvar"]
        per_element = per_element / jnp.exp(logvar) + logvar
        metrics["logvar"] = logvar
    nll = jnp.mean(per_element)
    metrics["nll"] = nll
    return nll, metrics


def generator_loss(
    params: dict,
    model_state: dict,
    disc_params: Any,
    lpips_params: Any,
    images: jax.Array,
    key: jax.Array,
    *,
    modules: LossModules,
    settings: LossSettings,
    use_gan: bool,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict, jax.Array]]:
    """The autoencoder's loss; with ``use_gan`` the generator term is weighted adaptively.

    The adaptive weight is ||grad nll|| / ||grad g_loss|| at the decoder's last conv kernel
    (times ``disc_weight``), held constant (no gradient flows through it). Both kernel
    gradients come from the gradients at the reconstruction, without a second backward
    pass through the decoder.

    Returns:
      (loss, (metrics, updated model state, the reconstruction for the discriminator)).
    """
    variables = {"params": params["autoencoder"], **model_state}
    recon, features, penalty, metrics, updated = reconstruction(
        variables, images, key, autoencoder=modules.autoencoder, settings=settings
    )

    def nll_of(r):
        return negative_log_likelihood(
            r,
            images,
            params.get("loss", {}),
            lpips_params,
            lpips=modules.lpips,
            settings=settings,
        )

    # vjp keeps each forward pass for the gradients at the reconstruction that the adaptive
    # weight needs, instead of running LPIPS and the discriminator a second time.
    nll, nll_vjp, nll_metrics = jax.vjp(nll_of, recon, has_aux=True)
    metrics.update(nll_metrics)
    loss = nll + penalty
    if use_gan:

        def g_of(r):
            logits = modules.discriminator.apply({"params": disc_params}, r)
            return gan.generator_loss(logits.astype(jnp.float32))

        g_loss, g_vjp = jax.vjp(g_of, recon)
        features = jax.lax.stop_gradient(features).astype(jnp.float32)
        kernel = jax.lax.stop_gradient(params["autoencoder"]["decoder"]["conv_out"]["kernel"])

        def last_kernel_grad(vjp):
            (output_grad,) = vjp(jnp.ones((), jnp.float32))
            return gan.conv_kernel_grad(features, jax.lax.stop_gradient(output_grad), kernel)

        d_weight = gan.adaptive_weight(last_kernel_grad(nll_vjp), last_kernel_grad(g_vjp))
        d_weight = d_weight * settings.disc_weight
        loss = loss + d_weight * g_loss
        metrics.update(g_loss=g_loss, d_weight=d_weight, disc_factor=jnp.ones((), jnp.float32))
    elif settings.gan:  # before disc_start: the same metrics, as zeros
        metrics.update({name: jnp.zeros((), jnp.float32) for name in GAN_METRICS})
    metrics["loss"] = loss
    return loss, (metrics, updated, recon)


def discriminator_loss(
    disc_params: Any,
    images: jax.Array,
    recon: jax.Array,
    *,
    discriminator: Any,
    settings: LossSettings,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The discriminator's hinge or vanilla loss on real images and fixed reconstructions."""
    logits_real = discriminator.apply({"params": disc_params}, images).astype(jnp.float32)
    logits_fake = discriminator.apply({"params": disc_params}, jax.lax.stop_gradient(recon)).astype(
        jnp.float32
    )
    loss = gan.DISCRIMINATOR_LOSSES[settings.disc_loss](logits_real, logits_fake)
    return loss, {
        "d_loss": loss,
        "logits_real": jnp.mean(logits_real),
        "logits_fake": jnp.mean(logits_fake),
    }
