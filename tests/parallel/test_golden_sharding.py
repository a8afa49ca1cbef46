"""Golden snapshot of how the SD1.5-size U-Net is sharded on a (2, 2, 2) mesh.

Any change to a parameter's path, shape or PartitionSpec (model code, logical axis names,
axis rules, the fitting of specs to shapes) fails this test. When the change is intended,
rewrite the snapshot and review its diff:

  LDM_JAX_UPDATE_GOLDEN=1 python3 -m pytest tests/parallel/test_golden_sharding.py
"""

import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import LOGICAL_AXIS_NAMES
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.pipeline import builders
from tests.conftest import load_config

GOLDEN = pathlib.Path(__file__).parent / "golden" / "sd15_unet_2x2x2.json"
UPDATE_ENV = "LDM_JAX_UPDATE_GOLDEN"


def _abstract_unet_params():
    unet = builders.build_unet(load_config("sd15"))

    def init(key):
        latents = jnp.zeros((1, 64, 64, 4), jnp.float32)
        context = jnp.zeros((1, 77, unet.context_dim), jnp.float32)
        return unet.init(key, latents, jnp.zeros((1,), jnp.int32), context)["params"]

    # eval_shape only: the 860M parameters are never materialised.
    return jax.eval_shape(init, jax.random.key(0))


def _path(key_path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in key_path)


def _spec_json(spec) -> list:
    return [list(axes) if isinstance(axes, tuple) else axes for axes in spec]


def _snapshot() -> dict:
    boxed = _abstract_unet_params()
    mesh = mesh_lib.create_mesh(data=2, fsdp=2, tensor=2)
    rules = mesh_lib.axis_rules_from_config(load_config("sd15").mesh.axis_rules)
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    shapes = nn.meta.unbox(boxed)
    leaves = jax.tree_util.tree_leaves_with_path(shardings)
    return {
        _path(path): {
            "shape": list(shape.shape),
            "spec": _spec_json(named.spec),
        }
        for (path, named), shape in zip(leaves, jax.tree.leaves(shapes), strict=True)
    }


def test_every_unet_parameter_names_its_axes():
    boxed = _abstract_unet_params()
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) - {None} <= LOGICAL_AXIS_NAMES


def test_sd15_unet_sharding_matches_the_golden_snapshot():
    snapshot = _snapshot()
    if os.environ.get(UPDATE_ENV):
        GOLDEN.write_text(json.dumps(snapshot, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    changed = sorted(k for k in golden.keys() & snapshot.keys() if golden[k] != snapshot[k])
    message = (
        f"the SD1.5 U-Net's sharding changed: {len(snapshot.keys() - golden.keys())} new, "
        f"{len(golden.keys() - snapshot.keys())} removed, {len(changed)} changed "
        f"(first: {(changed or sorted(snapshot.keys() ^ golden.keys()) or [''])[0]}). If "
        f"intended, rewrite the snapshot with {UPDATE_ENV}=1 python3 -m pytest "
        f"tests/parallel/test_golden_sharding.py and review its diff"
    )
    assert snapshot == golden, message
    # What the rules promise: FSDP over the model width, tensor parallelism over heads/MLP.
    attention = "down_blocks_1/attentions_0/transformer_blocks_0"
    assert golden[f"{attention}/attn1/to_q/kernel"]["spec"] == ["fsdp", "tensor"]
    assert golden[f"{attention}/attn1/to_out_0/kernel"]["spec"] == ["tensor", "fsdp"]
    assert golden[f"{attention}/ff/net_0/proj/kernel"]["spec"] == ["fsdp", "tensor"]
    assert golden[f"{attention}/ff/net_2/kernel"]["spec"] == ["tensor", "fsdp"]
