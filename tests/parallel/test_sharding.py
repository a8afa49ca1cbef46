import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding


class TwoKernels(nn.Module):
    @nn.compact
    def __call__(self, x):
        big = self.param(
            "big",
            nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "mlp")),
            (64, 32),
        )
        rgb = self.param(
            "rgb", nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "mlp")), (3, 32)
        )
        return x @ big + x[:, :3] @ rgb


def _init(key):
    return TwoKernels().init(key, jnp.ones((1, 64)))


def test_create_sharded_splits_kernels_and_replicates_indivisible_dims():
    mesh = mesh_lib.create_mesh(data=1, fsdp=4, tensor=2)
    params, shardings = sharding.create_sharded(
        _init, mesh, mesh_lib.DEFAULT_AXIS_RULES, jax.random.key(0)
    )
    big, rgb = params["params"]["big"], params["params"]["rgb"]
    assert shardings["params"]["big"].spec == PartitionSpec("fsdp", "tensor")
    assert big.addressable_shards[0].data.shape == (16, 16)
    # 3 rows cannot be split 4 ways: that dimension stays replicated, the other is still split.
    assert shardings["params"]["rgb"].spec == PartitionSpec(None, "tensor")
    assert rgb.addressable_shards[0].data.shape == (3, 16)
    reference = nn.meta.unbox(_init(jax.random.key(0)))
    np.testing.assert_allclose(np.asarray(big), np.asarray(reference["params"]["big"]), rtol=1e-6)


def test_abstract_state_carries_target_shardings():
    mesh = mesh_lib.create_mesh(data=2, fsdp=4, tensor=1)
    abstract, shardings = sharding.abstract_state(
        _init, mesh, mesh_lib.DEFAULT_AXIS_RULES, jax.random.key(0)
    )
    leaf = abstract["params"]["big"]
    assert isinstance(leaf, jax.ShapeDtypeStruct)
    assert leaf.shape == (64, 32)
    assert leaf.sharding == shardings["params"]["big"]


def test_batch_sharding_splits_over_data_and_fsdp_and_to_host_gathers():
    mesh = mesh_lib.create_mesh(data=2, fsdp=2, tensor=2)
    x = jax.device_put(np.arange(16 * 3).reshape(16, 3), sharding.batch_sharding(mesh))
    assert x.addressable_shards[0].data.shape == (4, 3)
    np.testing.assert_array_equal(sharding.to_host(x), np.arange(16 * 3).reshape(16, 3))
