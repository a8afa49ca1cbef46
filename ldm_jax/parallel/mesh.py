"""Device meshes with the axes ('data', 'fsdp', 'tensor') and the logical axis rules for them.

Model code names its dimensions logically ('batch', 'embed', 'conv_out', ...); the rules below
say which mesh axis each logical name is split over. Pure data parallelism is the mesh
(data=N, fsdp=1, tensor=1); FSDP shards the large kernels over 'fsdp'; tensor parallelism
splits attention heads, MLP hidden units and conv output channels over 'tensor'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or axes or None). The batch is split over every data-like axis.
DEFAULT_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_out", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("norm", None),
)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Returns the mesh shape with at most one ``-1`` filled in so that it covers every device.

    Raises:
      ValueError: naming the ``mesh.*`` config keys when the shape cannot cover the devices.
    """
    shape = [data, fsdp, tensor]
    if any(d == 0 or d < -1 for d in shape):
        raise ValueError(
            f"mesh sizes must be positive or -1 (auto), got data={data}, "
            f"fsdp={fsdp}, tensor={tensor} (set --config.mesh.data/fsdp/tensor)"
        )
    if shape.count(-1) > 1:
        raise ValueError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1 (auto)")
    known = math.prod(d for d in shape if d != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"cannot fill the mesh: {num_devices} devices are not divisible by the fixed "
                f"mesh sizes (product {known}); set --config.mesh.data/fsdp/tensor"
            )
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = {math.prod(shape)} "
            f"devices, but {num_devices} are available; set --config.mesh.data/fsdp/tensor "
            f"(use -1 on one axis to fill it automatically)"
        )
    return shape[0], shape[1], shape[2]


def create_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
    *,
    dcn_data: int = 1,
    dcn_fsdp: int = 1,
    dcn_tensor: int = 1,
) -> Mesh:
    """Builds a ('data', 'fsdp', 'tensor') mesh over ``devices`` (all devices by default).

    ``data``, ``fsdp`` and ``tensor`` are the sizes inside one slice (over the fast ICI
    links, ``-1`` filling the slice); ``dcn_*`` multiply them across slices (over the slower
    data-centre network), so the mesh axis ``data`` has ``data * dcn_data`` devices. Devices
    that report several ``slice_index`` values (a multislice TPU job) with every ``dcn_*``
    left at 1 are data parallel across slices, the cheapest use of the DCN.

    Axis types are Auto: Linen's logical sharding constraints need them (jax 0.10 defaults to
    Explicit axes).

    Raises:
      ValueError: naming the ``mesh.*`` config keys when the shape cannot cover the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    dcn = [dcn_data, dcn_fsdp, dcn_tensor]
    if num_slices > 1 and dcn == [1, 1, 1]:
        dcn = [num_slices, 1, 1]
    ici = resolve_mesh_shape(
        data, fsdp, tensor, len(devices) // resolve_dcn_size(dcn, len(devices))
    )
    if num_slices > 1 and math.prod(dcn) != num_slices:
        raise ValueError(
            f"the devices span {num_slices} slices but mesh.dcn_data x dcn_fsdp x dcn_tensor = "
            f"{math.prod(dcn)}; set --config.mesh.dcn_* so that their product is {num_slices}"
        )
    physical = devices[0].platform != "cpu" or (
        len(devices) == jax.device_count() and jax.process_count() > 1
    )
    if num_slices > 1:
        device_array = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, allow_split_physical_axes=True
        )
    elif math.prod(dcn) > 1:
        device_array = _granule_mesh(ici, dcn, devices, physical)
    elif physical:
        device_array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        device_array = np.asarray(devices).reshape(ici)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def resolve_dcn_size(dcn: Sequence[int], num_devices: int) -> int:
    """The number of granules (slices) ``dcn`` sizes ask for; checks that they divide the devices.

    Raises:
      ValueError: naming the ``mesh.dcn_*`` config keys.
    """
    if any(not isinstance(d, int) or d < 1 for d in dcn):
        raise ValueError(
            f"mesh.dcn_data, mesh.dcn_fsdp and mesh.dcn_tensor must be positive integers, got "
            f"{tuple(dcn)} (set --config.mesh.dcn_*)"
        )
    if num_devices % math.prod(dcn):
        raise ValueError(
            f"{num_devices} devices cannot be split into mesh.dcn_data x dcn_fsdp x dcn_tensor = "
            f"{math.prod(dcn)} slices; set --config.mesh.dcn_*"
        )
    return math.prod(dcn)


def mesh_shape(
    data: int,
    fsdp: int,
    tensor: int,
    num_devices: int,
    dcn_data: int = 1,
    dcn_fsdp: int = 1,
    dcn_tensor: int = 1,
) -> tuple[int, int, int]:
    """The sizes of the mesh axes ('data', 'fsdp', 'tensor'): per-slice sizes times ``dcn_*``.

    Raises:
      ValueError: naming the ``mesh.*`` config keys when the shape cannot cover the devices.
    """
    dcn = (dcn_data, dcn_fsdp, dcn_tensor)
    ici = resolve_mesh_shape(data, fsdp, tensor, num_devices // resolve_dcn_size(dcn, num_devices))
    return ici[0] * dcn[0], ici[1] * dcn[1], ici[2] * dcn[2]


def _granule_mesh(
    ici: Sequence[int], dcn: Sequence[int], devices: Sequence[jax.Device], physical: bool
) -> np.ndarray:
    """A hybrid mesh whose "slices" are consecutive blocks of ``devices`` (processes on GPUs,
    simulated slices on CPU): axis ``i`` is ``dcn[i]`` blocks of ``ici[i]`` devices each,
    the same layout as ``mesh_utils.create_hybrid_device_mesh``."""
    if physical and jax.process_count() == math.prod(dcn):
        return mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=True, allow_split_physical_axes=True
        )
    blocks = np.asarray(devices).reshape(*dcn, *ici)
    # (dcn0, dcn1, dcn2, ici0, ici1, ici2) -> (dcn0, ici0, dcn1, ici1, dcn2, ici2) -> mesh.
    interleaved = blocks.transpose(0, 3, 1, 4, 2, 5)
    return interleaved.reshape([d * i for d, i in zip(dcn, ici, strict=True)])


def check_batch_size(key: str, batch_size: int, grad_accum_steps: int, shards: int) -> None:
    """Checks that a batch splits into ``grad_accum_steps`` microbatches over ``shards``.

    Raises:
      ValueError: naming ``{key}.batch_size`` (and ``{key}.grad_accum_steps``).
    """
    if batch_size % shards:
        raise ValueError(
            f"{key}.batch_size={batch_size} is not divisible by the mesh's data x fsdp = "
            f"{shards} shards; use a multiple of {shards}"
        )
    if batch_size % (grad_accum_steps * shards):
        raise ValueError(
            f"{key}.batch_size={batch_size} is not divisible by {key}.grad_accum_steps="
            f"{grad_accum_steps} x {shards} data x fsdp shards; use a multiple of "
            f"{grad_accum_steps * shards}"
        )


def axis_rules_from_config(
    rules: Sequence[Sequence],
) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Normalises rules read from a config or JSON (lists become tuples) and checks axis names."""
    normalised = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(
                f"each mesh.axis_rules entry is (logical_name, mesh_axes), got {rule!r}"
            )
        name, axes = rule
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            unknown = [a for a in axes if a not in MESH_AXES]
        else:
            unknown = [] if axes is None or axes in MESH_AXES else [axes]
        if unknown:
            raise ValueError(
                f"mesh.axis_rules maps {name!r} to unknown mesh axes {unknown}; "
                f"allowed: {MESH_AXES}"
            )
        normalised.append((str(name), axes))
    return tuple(normalised)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of shards the batch is split into (data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
