import jax
import pytest
from jax.sharding import AxisType

from ldm_jax.parallel import mesh as mesh_lib


def test_auto_axis_fills_the_devices():
    assert mesh_lib.resolve_mesh_shape(-1, 2, 1, 8) == (4, 2, 1)
    assert mesh_lib.resolve_mesh_shape(2, -1, 2, 8) == (2, 2, 2)


@pytest.mark.parametrize("shape", [(3, 1, 1), (-1, 3, 1), (-1, -1, 1), (0, 1, 1)])
def test_bad_mesh_names_the_config_keys(shape):
    with pytest.raises(ValueError, match="mesh"):
        mesh_lib.resolve_mesh_shape(*shape, 8)


def test_create_mesh_has_auto_axes_over_all_devices():
    mesh = mesh_lib.create_mesh(2, 2, 2)
    assert mesh.axis_names == mesh_lib.MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert mesh_lib.data_parallel_size(mesh) == 4


def test_axis_rules_from_json_lists_become_tuples_and_unknown_axes_fail():
    rules = mesh_lib.axis_rules_from_config(
        [["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["norm", None]]
    )
    assert rules == (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("norm", None))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        mesh_lib.axis_rules_from_config([["embed", "model"]])


def test_dcn_axes_multiply_the_slice_sizes_and_keep_slices_together():
    # Two simulated slices of 4 devices (consecutive blocks): FSDP across them, data and
    # tensor parallelism inside each.
    mesh = mesh_lib.create_mesh(2, 1, 2, dcn_fsdp=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    first_slice = {d.id for d in jax.devices()[:4]}
    for fsdp_index in range(2):
        ids = {d.id for d in mesh.devices[:, fsdp_index, :].flat}
        assert (ids <= first_slice) == (fsdp_index == 0)
    # -1 fills one slice: 8 devices / 2 slices = 4 per slice.
    assert mesh_lib.mesh_shape(-1, 1, 2, 8, dcn_data=2) == (4, 1, 2)
    assert dict(mesh_lib.create_mesh(-1, 1, 1, dcn_data=2).shape)["data"] == 8


@pytest.mark.parametrize("dcn", [(3, 1, 1), (0, 1, 1)])
def test_bad_dcn_sizes_name_the_config_keys(dcn):
    with pytest.raises(ValueError, match="mesh.dcn_"):
        mesh_lib.mesh_shape(-1, 1, 1, 8, *dcn)
