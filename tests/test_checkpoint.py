"""Checkpoints save a state's small replicated arrays packed (one array per dtype) and restore
every array exactly, onto the shardings asked for, whatever mesh saved them; checkpoints
written with every array on its own still restore."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from gcs_emulator import emulated_bucket
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax import storage
from ldm_jax.checkpoint import PACK_MAX_BYTES, Checkpointer, pack_small_arrays, read_arrays
from ldm_jax.parallel import mesh as mesh_lib


def _state(sharding=None):
    """A train-state-like tree: one large array, small float32/bfloat16/int32 ones."""
    rng = np.random.default_rng(0)
    large = rng.standard_normal((PACK_MAX_BYTES // 4 + 8,)).astype(np.float32)
    state = {
        "step": jnp.asarray(7, jnp.int32),
        "params": {
            "conv": {"kernel": rng.standard_normal((3, 3, 4, 8)).astype(np.float32)},
            "norm": {"scale": rng.standard_normal((8,)).astype(np.float32)},
            "half": rng.standard_normal((4, 2)).astype(jnp.bfloat16),
            "large": large,
        },
        "opt": [jnp.asarray(3, jnp.int32), rng.standard_normal((16, 8)).astype(np.float32)],
    }
    if sharding is None:
        return jax.tree.map(jnp.asarray, state)
    return jax.tree.map(lambda x: jax.device_put(x, sharding(x)), state)


def _abstract(state, sharding):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(x)), state
    )


def _saved_arrays(directory, step, item):
    """How many arrays a checkpoint item holds on disk (orbax's metadata)."""
    path = f"{directory}/{step}/{item}"
    return len(jax.tree.leaves(ocp.StandardCheckpointer().metadata(path).item_metadata))


def _equal(a, b):
    return all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_small_arrays_are_saved_one_per_dtype_and_restored_exactly(tmp_path):
    replicated = NamedSharding(mesh_lib.create_mesh(data=-1), P())
    state = _state(lambda _: replicated)
    checkpointer = Checkpointer(str(tmp_path), async_checkpointing=True)
    checkpointer.save(5, state)
    checkpointer.wait()
    # The large array is saved on its own; the six small ones as float32, bfloat16, int32.
    assert _saved_arrays(tmp_path, 5, "state") == 1
    assert _saved_arrays(tmp_path, 5, "small_arrays") == 3
    restored = Checkpointer(str(tmp_path)).restore(_abstract(state, lambda _: replicated))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert _equal(restored, state)
    assert all(x.sharding == replicated for x in jax.tree.leaves(restored))


def test_packed_arrays_restore_onto_another_mesh_sharded(tmp_path):
    mesh = mesh_lib.create_mesh(data=1, fsdp=-1)  # 8 devices along fsdp
    state = _state(lambda _: NamedSharding(mesh, P()))

    def sharded(x):  # the restoring run shards what divides by 8 along its first axis
        spec = P("fsdp") if x.ndim and x.shape[0] % 8 == 0 else P()
        return NamedSharding(mesh, spec)

    Checkpointer(str(tmp_path), async_checkpointing=False).save(1, state)
    restored = Checkpointer(str(tmp_path)).restore(_abstract(state, sharded))
    assert _equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert got.sharding == sharded(want)
    assert restored["opt"][1].sharding.spec == P("fsdp")  # a packed array, now sharded


def test_checkpoints_with_every_array_on_its_own_still_restore(tmp_path):
    device = jax.devices()[0]
    state = _state(lambda _: jax.sharding.SingleDeviceSharding(device))
    old = Checkpointer(str(tmp_path), pack_max_bytes=0, async_checkpointing=False)
    old.save(2, state)
    assert _saved_arrays(tmp_path, 2, "state") == len(jax.tree.leaves(state))
    assert not (tmp_path / "2" / "small_arrays").exists()
    restored = Checkpointer(str(tmp_path)).restore(
        _abstract(state, lambda _: jax.sharding.SingleDeviceSharding(device))
    )
    assert _equal(restored, state)


def test_a_packed_array_of_another_shape_is_named(tmp_path):
    state = _state()
    Checkpointer(str(tmp_path), async_checkpointing=False).save(3, state)
    abstract = _abstract(state, lambda x: x.sharding)
    abstract["params"]["norm"]["scale"] = jax.ShapeDtypeStruct((16,), jnp.float32)
    with pytest.raises(ValueError, match=r"params/norm/scale has shape \(8,\)"):
        Checkpointer(str(tmp_path)).restore(abstract)


def test_only_small_replicated_arrays_are_packed():
    mesh = mesh_lib.create_mesh(data=1, fsdp=-1)
    sharded = jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh, P("fsdp")))
    tree = {
        "sharded": sharded,
        "small": jnp.ones((4,)),
        "large": jnp.ones((PACK_MAX_BYTES // 4 + 1,)),
        "key": jax.random.key(0),
    }
    rest, packed, index = pack_small_arrays(tree)
    assert [entry["path"] for entry in index["arrays"]] == ["small"]
    assert rest["small"] is None and rest["sharded"] is sharded and rest["key"] is tree["key"]
    np.testing.assert_array_equal(packed["float32"], np.ones(4))


def test_read_arrays_gives_the_same_arrays_whether_packed_or_not(tmp_path, monkeypatch):
    state = _state()
    Checkpointer(str(tmp_path / "packed"), async_checkpointing=False).save(1, state)
    one_by_one = Checkpointer(str(tmp_path / "one_by_one"), pack_max_bytes=0)
    one_by_one.save(1, state)
    one_by_one.wait()
    monkeypatch.chdir(tmp_path)
    packed = read_arrays("packed/1")  # a path relative to the working directory, as typed
    one_by_one = read_arrays(str(tmp_path / "one_by_one" / "1"))
    assert (
        list(packed)
        == list(one_by_one)
        == [
            "opt/0",
            "opt/1",
            "params/conv/kernel",
            "params/half",
            "params/large",
            "params/norm/scale",
            "step",
        ]
    )
    for name, value in packed.items():
        assert value.dtype == one_by_one[name].dtype
        np.testing.assert_array_equal(value, one_by_one[name])
    np.testing.assert_array_equal(packed["params/half"], np.asarray(state["params"]["half"]))


@pytest.mark.parametrize("pack_max_bytes", [PACK_MAX_BYTES, 0])
def test_a_part_of_the_state_restores_alone_onto_its_shardings(tmp_path, pack_max_bytes):
    """Inference reads the params it needs (here "params", sharded over 8 devices) and
    nothing of the rest (the optimizer state), from packed and unpacked checkpoints."""
    mesh = mesh_lib.create_mesh(data=1, fsdp=-1)
    state = _state(lambda _: NamedSharding(mesh, P()))
    Checkpointer(str(tmp_path), async_checkpointing=False, pack_max_bytes=pack_max_bytes).save(
        3, state
    )

    def sharded(x):
        return NamedSharding(mesh, P("fsdp") if x.ndim and x.shape[0] % 8 == 0 else P())

    part = {"params": _abstract(state["params"], sharded)}
    restored = Checkpointer(str(tmp_path)).restore_part(part)
    assert set(restored) == {"params"}
    assert _equal(restored["params"], state["params"])
    large = restored["params"]["large"]
    assert large.sharding.spec == P("fsdp") and large.addressable_shards[0].data.size * 8 == (
        large.size
    )
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(str(tmp_path / "empty")).restore_part(part)


def test_in_a_bucket_a_step_without_its_commit_file_is_half_written_and_removed(tmp_path):
    """On GCS orbax writes a step in place and marks it complete last (commit_success.txt):
    a step a killed run left without it is removed, and the newest complete one restores."""
    with emulated_bucket(tmp_path) as bucket:
        directory = f"{bucket}/run/checkpoints/diffusion"
        replicated = NamedSharding(mesh_lib.create_mesh(data=-1), P())
        state = _state(lambda _: replicated)
        Checkpointer(directory, async_checkpointing=False).save(3, state)
        storage.write_text(f"{directory}/5/state/partial", "a save stopped here")
        checkpointer = Checkpointer(directory)
        assert checkpointer.latest_step() == 3
        assert not storage.as_path(f"{directory}/5").exists()
        assert _equal(checkpointer.restore(_abstract(state, lambda _: replicated)), state)
