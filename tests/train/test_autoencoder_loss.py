"""The first-stage objective term by term, the adaptive GAN weight, and the stage-1 step."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax.models import AutoencoderKL, NLayerDiscriminator
from ldm_jax.train import autoencoder as autoencoder_stage
from ldm_jax.train import gan
from ldm_jax.train.autoencoder_loss import (
    GAN_METRICS,
    LossModules,
    LossSettings,
    discriminator_loss,
    generator_loss,
    negative_log_likelihood,
    reconstruction,
)

SIZE = 16
AUTOENCODER = AutoencoderKL(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4)
DISCRIMINATOR = NLayerDiscriminator(base_channels=8, num_layers=2)


class MeanDistance(nn.Module):
    """A stand-in perceptual distance: the per-image mean absolute difference."""

    @nn.compact
    def __call__(self, x, y):
        return jnp.mean(jnp.abs(x - y), axis=(1, 2, 3))


def _images(seed=0, batch=4):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (batch, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def params():
    key = jax.random.key(0)
    images = jnp.asarray(_images())
    return nn.meta.unbox(
        {
            "autoencoder": AUTOENCODER.init({"params": key, "sample": key}, images)["params"],
            "loss": {"logvar": jnp.asarray(-0.5, jnp.float32)},
            "disc": DISCRIMINATOR.init(key, images)["params"],
        }
    )


@pytest.mark.parametrize("pixel", ["l1", "l2"])
def test_nll_is_the_pixel_loss_over_a_learned_variance(pixel):
    images, recon = _images(0), _images(1)
    logvar = -0.5
    settings = LossSettings(pixel=pixel, learn_logvar=True)
    nll, metrics = negative_log_likelihood(
        recon, images, {"logvar": jnp.asarray(logvar)}, {}, lpips=None, settings=settings
    )
    diff = images - recon
    per_element = np.abs(diff) if pixel == "l1" else diff**2
    np.testing.assert_allclose(nll, np.mean(per_element / np.exp(logvar) + logvar), rtol=1e-5)
    np.testing.assert_allclose(metrics["pixel"], np.mean(per_element), rtol=1e-5)


def test_perceptual_term_is_added_per_image_with_its_weight():
    images, recon = _images(0), _images(1)
    settings = LossSettings(perceptual_weight=0.7, learn_logvar=False)
    nll, metrics = negative_log_likelihood(
        recon, images, {}, {}, lpips=MeanDistance(), settings=settings
    )
    pixel = np.abs(images - recon)
    perceptual = pixel.mean(axis=(1, 2, 3))
    want = np.mean(pixel + 0.7 * perceptual[:, None, None, None])
    np.testing.assert_allclose(nll, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["lpips"], perceptual.mean(), rtol=1e-5)


def test_kl_penalty_is_weighted_per_pixel_value(params):
    images = jnp.asarray(_images())
    settings = LossSettings(kl_weight=0.01)
    variables = {"params": params["autoencoder"]}
    _, _, penalty, metrics, _ = reconstruction(
        variables, images, jax.random.key(1), autoencoder=AUTOENCODER, settings=settings
    )
    posterior = AUTOENCODER.apply(variables, images, method="encode")
    kl = np.mean(posterior.kl()) / images[0].size
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(penalty, 0.01 * kl, rtol=1e-5)


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_decoder_layer(params):
    """The weight from gradients at the reconstruction equals the one from full backprop."""
    images = jnp.asarray(_images())
    key = jax.random.key(3)
    settings = LossSettings(disc_weight=0.5, learn_logvar=True)
    modules = LossModules(AUTOENCODER, DISCRIMINATOR, MeanDistance())
    gen_params = {"autoencoder": params["autoencoder"], "loss": params["loss"]}
    _, (metrics, _, _) = generator_loss(
        gen_params, {}, params["disc"], {}, images, key,
        modules=modules, settings=settings, use_gan=True,
    )  # fmt: skip

    def terms(ae_params):
        recon, _, _, _, _ = reconstruction(
            {"params": ae_params}, images, key, autoencoder=AUTOENCODER, settings=settings
        )
        nll, _ = negative_log_likelihood(
            recon, images, params["loss"], {}, lpips=MeanDistance(), settings=settings
        )
        logits = DISCRIMINATOR.apply({"params": params["disc"]}, recon)
        return nll, gan.generator_loss(logits)

    def last_kernel_grad(index):
        grads = jax.grad(lambda p: terms(p)[index])(params["autoencoder"])
        return grads["decoder"]["conv_out"]["kernel"]

    ratio = np.linalg.norm(last_kernel_grad(0)) / (np.linalg.norm(last_kernel_grad(1)) + 1e-4)
    np.testing.assert_allclose(metrics["d_weight"], 0.5 * ratio, rtol=1e-4)
    nll, g_loss = terms(params["autoencoder"])
    penalty = settings.kl_weight * metrics["kl"]
    want = nll + penalty + metrics["d_weight"] * g_loss
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)


def test_before_disc_start_the_gan_terms_are_reported_as_zero(params):
    images = jnp.asarray(_images())
    settings = LossSettings(disc_weight=0.5)
    gen_params = {"autoencoder": params["autoencoder"], "loss": params["loss"]}
    loss, (metrics, _, _) = generator_loss(
        gen_params, {}, params["disc"], {}, images, jax.random.key(0),
        modules=LossModules(AUTOENCODER, DISCRIMINATOR), settings=settings, use_gan=False,
    )  # fmt: skip
    assert all(float(metrics[name]) == 0.0 for name in GAN_METRICS)
    np.testing.assert_allclose(loss, metrics["nll"] + settings.kl_weight * metrics["kl"])


def test_discriminator_loss_scores_fixed_reconstructions(params):
    images, recon = jnp.asarray(_images(0)), jnp.asarray(_images(1))
    settings = LossSettings(disc_weight=0.5, disc_loss="hinge")

    def loss_of(recon):
        return discriminator_loss(
            params["disc"], images, recon, discriminator=DISCRIMINATOR, settings=settings
        )[0]

    real = DISCRIMINATOR.apply({"params": params["disc"]}, images)
    fake = DISCRIMINATOR.apply({"params": params["disc"]}, recon)
    np.testing.assert_allclose(loss_of(recon), gan.hinge_discriminator_loss(real, fake), rtol=1e-6)
    assert not np.any(jax.grad(loss_of)(recon))  # the generator is not trained by it


def _tiny_stage1_config(kind: str):
    config = config_lib.base_config()
    config.data.image_size = SIZE
    ae = config.autoencoder
    ae.kind = kind
    ae.model.block_out_channels = (8, 8)
    ae.model.norm_num_groups = 4
    ae.model.num_embeddings = 16
    ae.model.dead_code_threshold = 0.5 if kind == "vq" else 0.0
    ae.train.batch_size = 4
    ae.train.warmup_steps = 1
    ae.loss.disc_weight = 0.5
    ae.loss.disc_start = 2
    ae.loss.disc_channels = 8
    ae.loss.disc_num_layers = 2
    return config


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_step_switches_the_discriminator_on_at_disc_start(kind):
    config = _tiny_stage1_config(kind)
    init_fn, step_fn = autoencoder_stage.stage_functions(config)
    state = jax.jit(lambda k: nn.meta.unbox(init_fn(k)))(jax.random.key(0))
    steps = {flag: jax.jit(functools.partial(step_fn, use_gan=flag)) for flag in (False, True)}
    settings = LossSettings.from_config(config)
    batch = {"image": ((_images() + 1) * 127.5).astype(np.uint8)}
    disc_before = state.disc_params
    history = []
    for done in range(4):
        step = steps[autoencoder_stage.gan_active(settings, done)]
        state, metrics = step(state, batch, jax.random.key(1), {})
        history.append({k: float(v) for k, v in metrics.items()})
    assert int(state.step) == 4
    assert history[0]["d_loss"] == history[1]["d_loss"] == 0.0
    assert history[2]["d_loss"] > 0 and history[2]["d_weight"] > 0
    # The discriminator trains from step 3 on (steps 1 and 2 are before disc_start=2); its
    # learning rate warms up from 0 at its own first update, so step 4 is its first change.
    # (Every kernel: the last bias has no hinge gradient while all logits are inside the
    # margin, where the real and fake terms cancel.)
    kernels = [name for name, layer in state.disc_params.items() if "kernel" in layer]
    assert len(kernels) == 4  # norms hold scale and bias only
    for name in kernels:
        assert np.any(state.disc_params[name]["kernel"] != disc_before[name]["kernel"]), name
    if kind == "vq":
        assert {"codebook_loss", "perplexity", "code_usage"} <= set(history[0])
        # Restarted codes are folded into the codebook parameter after every step.
        offset = state.model_state["codebook"]["quantize"]["restart_offset"]
        assert not np.any(offset)
        usage = state.model_state["codebook"]["quantize"]["usage"]
        assert np.all(usage >= 0.5 * 0.99**4)  # every unused code was restarted
