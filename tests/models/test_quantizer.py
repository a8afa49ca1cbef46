"""The vector quantizer: nearest codes, straight-through gradients, losses, EMA and restarts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ldm_jax.models.quantizer import VectorQuantizer

KEY = jax.random.key(0, impl="rbg")


def quantize(table, latents, beta=0.25, **fields):
    """The output of a gradient-mode quantizer with codebook `table` on `latents`."""
    quantizer = VectorQuantizer(table.shape[0], table.shape[1], commitment_beta=beta, **fields)
    return quantizer.apply({"params": {"embedding": jnp.asarray(table)}}, jnp.asarray(latents))


def test_indices_are_the_nearest_codes_by_brute_force():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(16, 4)).astype(np.float32)
    latents = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    out = quantize(table, latents)
    distances = np.sum((latents[..., None, :] - table) ** 2, axis=-1)
    assert out.indices.dtype == jnp.int32
    np.testing.assert_array_equal(out.indices, np.argmin(distances, axis=-1))
    np.testing.assert_allclose(out.quantized, table[np.argmin(distances, axis=-1)], atol=1e-6)


def test_gradient_passes_straight_through_to_the_latents():
    rng = np.random.default_rng(1)
    table = rng.normal(size=(8, 3)).astype(np.float32)
    latents = rng.normal(size=(2, 2, 2, 3)).astype(np.float32)
    weights = rng.normal(size=latents.shape).astype(np.float32)
    grad = jax.grad(lambda z: jnp.sum(weights * quantize(table, z).quantized))(latents)
    np.testing.assert_array_equal(grad, weights)


# Both vectors sit on code 0 at squared distances 1 and 4: the mean squared error over the
# four elements is 5/4 for the codebook and the commitment terms alike.
TABLE = np.array([[0.0, 0.0], [10.0, 10.0]], np.float32)
LATENTS = np.array([[[[1.0, 0.0], [0.0, 2.0]]]], np.float32)


@pytest.mark.parametrize("use_ema,expected", [(False, 1.25 + 0.5 * 1.25), (True, 0.5 * 1.25)])
def test_loss_is_codebook_plus_beta_commitment(use_ema, expected):
    quantizer = VectorQuantizer(2, 2, commitment_beta=0.5, use_ema=use_ema)
    collection = "codebook" if use_ema else "params"
    variables = {collection: {"embedding": TABLE}}
    if use_ema:
        variables["codebook"] |= {"cluster_size": np.ones(2, np.float32), "embed_sum": TABLE}
    out = quantizer.apply(variables, LATENTS)
    np.testing.assert_allclose(out.loss, expected, rtol=1e-6)
    np.testing.assert_array_equal(out.indices, [[[0, 0]]])


def test_stop_gradients_split_the_loss_between_codebook_and_encoder():
    beta = 0.5
    grad_table, grad_latents = jax.grad(lambda t, z: quantize(t, z, beta).loss, argnums=(0, 1))(
        TABLE, LATENTS
    )
    vectors = LATENTS.reshape(-1, 2)
    # The codebook gets only d/dq mean((sg(z) - q)^2), the latents only the commitment term
    # beta * d/dz mean((z - sg(q))^2).
    expected_table = np.zeros_like(TABLE)
    expected_table[0] = np.sum(2 * (TABLE[0] - vectors), axis=0) / vectors.size
    np.testing.assert_allclose(grad_table, expected_table, rtol=1e-6)
    expected_latents = beta * 2 * (vectors - TABLE[0]) / vectors.size
    np.testing.assert_allclose(grad_latents.reshape(-1, 2), expected_latents, rtol=1e-6)


def test_perplexity_and_usage_of_known_assignments():
    table = 10.0 * np.eye(4, dtype=np.float32)
    all_on_one = quantize(table, np.tile(table[2], (1, 3, 2, 1)))
    np.testing.assert_allclose(all_on_one.perplexity, 1.0, rtol=1e-6)
    np.testing.assert_allclose(all_on_one.usage, 0.25)
    each_once = quantize(table, table.reshape(1, 2, 2, 4))
    np.testing.assert_allclose(each_once.perplexity, 4.0, rtol=1e-6)
    np.testing.assert_allclose(each_once.usage, 1.0)


def test_wrong_latent_width_raises_a_clear_error():
    with pytest.raises(ValueError, match="embedding_dim=2"):
        quantize(TABLE, np.zeros((1, 2, 2, 3), np.float32))


def two_clusters(seed=0):
    """16 vectors around (4, 4) and 16 around (-4, 0), as a (2, 4, 4, 2) batch."""
    rng = np.random.default_rng(seed)
    centres = np.repeat(np.array([[4.0, 4.0], [-4.0, 0.0]], np.float32), 16, axis=0)
    return (
        (centres + rng.normal(scale=0.5, size=centres.shape)).astype(np.float32).reshape(2, 4, 4, 2)
    )


def test_ema_codebook_moves_to_the_batch_means_and_gets_no_gradient():
    quantizer = VectorQuantizer(4, 2, use_ema=True, ema_decay=0.8)
    latents = two_clusters()
    variables = quantizer.init(KEY, latents)
    assert "params" not in variables

    @jax.jit
    def step(codebook, _):
        out, updated = quantizer.apply(
            {"codebook": codebook}, latents, train=True, mutable=["codebook"]
        )
        return updated["codebook"], out.indices

    codebook, indices = jax.lax.scan(step, variables["codebook"], length=60)
    vectors, last = latents.reshape(-1, 2), np.asarray(indices[-1]).reshape(-1)
    np.testing.assert_array_equal(indices[-20:], np.broadcast_to(indices[-1], indices[-20:].shape))
    table = np.asarray(nn.meta.unbox(codebook)["embedding"])
    for code in np.unique(last):
        # With the assignments settled, each used code converges to its vectors' mean.
        np.testing.assert_allclose(table[code], vectors[last == code].mean(0), atol=1e-3)

    grad = jax.grad(lambda cb: quantizer.apply({"codebook": cb}, latents).loss)(codebook)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grad))


@pytest.mark.parametrize("use_ema", [False, True])
def test_dead_codes_restart_on_batch_vectors(use_ema):
    quantizer = VectorQuantizer(
        4, 2, use_ema=use_ema, ema_decay=0.0, dead_code_threshold=0.5, epsilon=0.0
    )
    latents = two_clusters()
    far_away = np.array([[4.0, 4.0], [100.0, 100.0], [-100.0, 50.0], [60.0, -90.0]], np.float32)
    variables = nn.meta.unbox(quantizer.init(KEY, latents))
    if use_ema:
        variables["codebook"] |= {"embedding": far_away, "embed_sum": far_away}
    else:
        variables["params"]["embedding"] = far_away
    out, updated = quantizer.apply(
        variables, latents, train=True, mutable=["codebook"], rngs={"codebook": KEY}
    )
    np.testing.assert_array_equal(out.indices, 0)  # everything lands on code 0
    table = np.asarray(quantizer.apply({**variables, **updated}, method=VectorQuantizer.codebook))
    vectors = latents.reshape(-1, 2)
    np.testing.assert_allclose(table[0], vectors.mean(0) if use_ema else far_away[0], atol=1e-5)
    for code in (1, 2, 3):
        distance_to_batch = np.min(np.abs(vectors - table[code]).max(axis=1))
        assert distance_to_batch < 1e-4, f"code {code} was not restarted on a batch vector"


def test_updates_on_a_batch_sharded_over_devices_match_one_device():
    quantizer = VectorQuantizer(8, 2, use_ema=True, ema_decay=0.5, dead_code_threshold=1.0)
    latents = np.concatenate([two_clusters(seed) for seed in range(4)])  # (8, 4, 4, 2)
    variables = quantizer.init(KEY, latents)

    @jax.jit
    def step(latents):
        _, updated = quantizer.apply(
            variables, latents, train=True, mutable=["codebook"], rngs={"codebook": KEY}
        )
        return updated

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(latents, NamedSharding(mesh, PartitionSpec("data")))
    assert len(sharded.sharding.device_set) == len(jax.devices()) > 1
    on_one, on_many = jax.tree.leaves(step(latents)), jax.tree.leaves(step(sharded))
    for one, many in zip(on_one, on_many, strict=True):
        np.testing.assert_allclose(one, many, rtol=1e-5, atol=1e-6)
