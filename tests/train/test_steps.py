"""One train step gives the same result on every mesh; FSDP really shards the big kernels."""

import functools

import jax
import numpy as np
import pytest

from ldm_jax.data import shapes, tokenizer
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.pipeline import builders
from ldm_jax.train import autoencoder as autoencoder_stage
from ldm_jax.train import diffusion as diffusion_stage
from ldm_jax.train.state import make_optimizer

RULES = mesh_lib.DEFAULT_AXIS_RULES


def _images(config, n):
    source = shapes.ShapesSource("train", image_size=config.data.image_size)
    return np.stack([source[i]["image"] for i in range(n)])


def _diffusion_setup(config):
    tok = tokenizer.build_word_tokenizer(shapes.caption_vocabulary())
    model = builders.build_model(config, tok, latent_scale=0.8)
    batch_size = config.diffusion.train.batch_size
    source = shapes.ShapesSource("train", image_size=config.data.image_size)
    captions = [source[i]["caption"] for i in range(batch_size)]
    batch = {
        "image": _images(config, batch_size),
        "tokens": tokenizer.encode(tok, captions, config.data.max_caption_length),
    }
    return model, batch


def _diffusion_step(config, mesh):
    model, batch = _diffusion_setup(config)
    optimizer = make_optimizer(config.diffusion.train)
    init_fn = functools.partial(
        diffusion_stage.init_state,
        model=model,
        optimizer=optimizer,
        max_caption_length=config.data.max_caption_length,
    )
    state, shardings = sharding.create_sharded(init_fn, mesh, RULES, jax.random.key(0))
    ae_fn, _ = autoencoder_stage.stage_functions(config)
    ae_state, ae_shardings = sharding.create_sharded(ae_fn, mesh, RULES, jax.random.key(1))
    step = jax.jit(
        functools.partial(
            diffusion_stage.train_step,
            model=model,
            optimizer=optimizer,
            ema_decay=0.99,
            cond_drop_prob=0.25,
            min_snr_gamma=None,
        ),
        in_shardings=(
            shardings,
            sharding.batch_sharding(mesh),
            sharding.replicated(mesh),
            {"autoencoder": ae_shardings.params["autoencoder"]},
        ),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
    with jax.set_mesh(mesh):
        frozen = {"autoencoder": ae_state.params["autoencoder"]}
        new_state, metrics = step(state, batch, jax.random.key(2), frozen)
    return sharding.to_host(new_state.params), float(metrics["loss"])


def _autoencoder_step(config, mesh):
    init_fn, step_fn = autoencoder_stage.stage_functions(config)
    state, shardings = sharding.create_sharded(init_fn, mesh, RULES, jax.random.key(0))
    step = jax.jit(
        step_fn,
        in_shardings=(
            shardings,
            sharding.batch_sharding(mesh),
            sharding.replicated(mesh),
            sharding.replicated(mesh),
        ),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    images = jax.device_put(
        _images(config, config.autoencoder.train.batch_size), sharding.batch_sharding(mesh)
    )
    with jax.set_mesh(mesh):
        new_state, metrics = step(state, {"image": images}, jax.random.key(2), {})
    return sharding.to_host(new_state.params), float(metrics["loss"])


def _assert_trees_close(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize(
    "run_step, stage", [(_autoencoder_step, "autoencoder"), (_diffusion_step, "diffusion")]
)
def test_one_step_is_the_same_on_every_mesh(tiny_config, run_step, stage):
    results = {
        "(2,2,2)": run_step(tiny_config, mesh_lib.create_mesh(2, 2, 2)),
        "(8,1,1)": run_step(tiny_config, mesh_lib.create_mesh(8, 1, 1)),
        "1 device": run_step(tiny_config, mesh_lib.create_mesh(1, 1, 1, jax.devices()[:1])),
    }
    (params_ref, loss_ref) = results["1 device"]
    for name, (params, loss) in results.items():
        assert np.isclose(loss, loss_ref, rtol=1e-5), (name, loss, loss_ref)
        _assert_trees_close(params, params_ref)
    # The step really changed the parameters (the comparison above is not vacuous).
    fresh_params = jax.tree.leaves(params_ref)
    assert any(np.abs(p).max() > 0 for p in fresh_params)


def test_fsdp_shards_the_large_kernels(tiny_config):
    config = tiny_config
    model, _ = _diffusion_setup(config)
    optimizer = make_optimizer(config.diffusion.train)
    init_fn = functools.partial(
        diffusion_stage.init_state,
        model=model,
        optimizer=optimizer,
        max_caption_length=config.data.max_caption_length,
    )
    mesh = mesh_lib.create_mesh(data=1, fsdp=8, tensor=1)
    state, shardings = sharding.create_sharded(init_fn, mesh, RULES, jax.random.key(0))
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    largest_path, largest = max(leaves, key=lambda kv: kv[1].size)
    per_device = largest.addressable_shards[0].data.size
    assert per_device * 8 == largest.size, jax.tree_util.keystr(largest_path)
    # Every kernel with a dimension divisible by 8 on its sharded axis is split, and the
    # optimizer moments follow the params.
    split = [p for _, p in leaves if p.addressable_shards[0].data.size < p.size]
    total = sum(p.size for _, p in leaves)
    assert sum(p.size for p in split) > 0.9 * total
    mu = state.opt_state[1][0].mu
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(mu), strict=True):
        assert p.sharding == m.sharding
