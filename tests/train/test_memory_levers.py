"""Memory levers of stage 2: gradient accumulation, rematerialisation, bfloat16 compute, and
the optimizer state sharded like the params."""

import functools

import jax
import numpy as np
import optax
import pytest

from ldm_jax import config as config_lib
from ldm_jax.data import shapes, tokenizer
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.pipeline import builders
from ldm_jax.train import autoencoder as autoencoder_stage
from ldm_jax.train import diffusion as diffusion_stage

RULES = mesh_lib.DEFAULT_AXIS_RULES
BATCH = 16


@functools.cache
def _inputs(image_size: int, max_length: int):
    source = shapes.ShapesSource("train", image_size=image_size)
    tok = tokenizer.build_word_tokenizer(shapes.caption_vocabulary())
    records = [source[i] for i in range(BATCH)]
    batch = {
        "image": np.stack([r["image"] for r in records]),
        "tokens": tokenizer.encode(tok, [r["caption"] for r in records], max_length),
    }
    return tok, batch


def _step(config, mesh, *, grad_accum_steps=1, parallel=False, remat="none", dtype="float32"):
    """One stage-2 step under plain SGD with learning rate 1: new params = params - grads."""
    config.diffusion.unet.remat = remat
    config.dtype = dtype
    tok, batch = _inputs(config.data.image_size, config.data.max_caption_length)
    model = builders.build_model(config, tok, latent_scale=0.8)
    optimizer = optax.sgd(1.0)
    init_fn = functools.partial(
        diffusion_stage.init_state,
        model=model,
        optimizer=optimizer,
        max_caption_length=config.data.max_caption_length,
    )
    state, shardings = sharding.create_sharded(init_fn, mesh, RULES, jax.random.key(0))
    ae_init, _ = autoencoder_stage.stage_functions(config)
    ae_state, ae_shardings = sharding.create_sharded(ae_init, mesh, RULES, jax.random.key(1))
    frozen = {"autoencoder": ae_state.params["autoencoder"]}
    step_fn = functools.partial(
        diffusion_stage.train_step,
        model=model,
        optimizer=optimizer,
        ema_decay=0.99,
        cond_drop_prob=0.25,
        min_snr_gamma=5.0,
        grad_accum_steps=grad_accum_steps,
        parallel_microbatches=parallel,
    )
    step = jax.jit(
        step_fn,
        in_shardings=(
            shardings,
            sharding.batch_sharding(mesh),
            sharding.replicated(mesh),
            {"autoencoder": ae_shardings.params["autoencoder"]},
        ),
    )
    placed = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
    key = jax.random.key(2)
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(step_fn)(state, placed, key, frozen))
        before = sharding.to_host(state.params)
        new_state, metrics = step(state, placed, key, frozen)
    grads = jax.tree.map(lambda b, a: b - a, before, sharding.to_host(new_state.params))
    return grads, jax.device_get(metrics), jaxpr, new_state


def _assert_close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_accumulating_k_microbatches_equals_one_step_on_the_whole_batch(tiny_config):
    # Each example's timestep, noise, posterior sample and condition drop are drawn for the
    # whole batch before it is split, so both steps see the same draws per example.
    mesh = mesh_lib.create_mesh(data=2, fsdp=1, tensor=1, devices=jax.devices()[:2])
    full_grads, full_metrics, _, _ = _step(tiny_config, mesh)
    accumulated, metrics, jaxpr, _ = _step(tiny_config, mesh, grad_accum_steps=4)
    assert "scan" in jaxpr
    np.testing.assert_allclose(metrics["loss"], full_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-4)
    _assert_close(accumulated, full_grads, rtol=1e-3, atol=1e-6)
    assert max(np.abs(g).max() for g in jax.tree.leaves(full_grads)) > 1e-3


def test_parallel_microbatches_give_the_update_of_the_whole_batch(tiny_config):
    # The CPU speed option: the same slices as accumulation, as branches of one graph.
    mesh = mesh_lib.create_mesh(data=2, fsdp=1, tensor=1, devices=jax.devices()[:2])
    full_grads, full_metrics, _, _ = _step(tiny_config, mesh)
    grads, metrics, jaxpr, _ = _step(tiny_config, mesh, grad_accum_steps=2, parallel=True)
    assert "scan" not in jaxpr
    np.testing.assert_allclose(metrics["loss"], full_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-4)
    _assert_close(grads, full_grads, rtol=1e-3, atol=1e-6)


def test_remat_gives_the_same_gradients(tiny_config):
    mesh = mesh_lib.create_mesh(1, 1, 1, devices=jax.devices()[:1])
    plain_grads, plain_metrics, plain_jaxpr, _ = _step(tiny_config, mesh)
    assert "remat" not in plain_jaxpr
    for remat in ("full", "save_dots"):
        grads, metrics, jaxpr, _ = _step(tiny_config, mesh, remat=remat)
        assert "remat" in jaxpr, remat
        np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-6)
        _assert_close(grads, plain_grads, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_loss(tiny_config):
    mesh = mesh_lib.create_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, metrics, jaxpr, state = _step(tiny_config, mesh, dtype="bfloat16")
    assert "bf16" in jaxpr
    assert metrics["loss"].dtype == np.float32 and np.isfinite(metrics["loss"])
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {np.dtype("float32")}


def test_optimizer_state_is_sharded_like_the_params(tiny_config):
    model = builders.build_model(
        tiny_config, _inputs(32, tiny_config.data.max_caption_length)[0], latent_scale=1.0
    )
    init_fn = functools.partial(
        diffusion_stage.init_state,
        model=model,
        optimizer=diffusion_stage.make_optimizer(tiny_config.diffusion.train),
        max_caption_length=tiny_config.data.max_caption_length,
    )
    mesh = mesh_lib.create_mesh(data=2, fsdp=4, tensor=1)
    state, _ = sharding.create_sharded(init_fn, mesh, RULES, jax.random.key(0))
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=_is_adam) if _is_adam(s)]
    assert len(adam) == 1
    param_specs = jax.tree.map(lambda p: p.sharding.spec, state.params)
    assert any(spec != jax.sharding.PartitionSpec() for spec in jax.tree.leaves(param_specs))
    for moments in (adam[0].mu, adam[0].nu):
        assert jax.tree.map(lambda m: m.sharding.spec, moments) == param_specs


def _is_adam(x) -> bool:
    return isinstance(x, optax.ScaleByAdamState)


def test_batch_must_divide_into_microbatches_per_shard(tiny_config):
    tiny_config.diffusion.train.batch_size = 16
    tiny_config.diffusion.train.grad_accum_steps = 4
    with pytest.raises(config_lib.ConfigError, match=r"diffusion\.train\.grad_accum_steps=4"):
        config_lib.validate(tiny_config, 8)
    tiny_config.diffusion.train.grad_accum_steps = 2
    config_lib.validate(tiny_config, 8)
