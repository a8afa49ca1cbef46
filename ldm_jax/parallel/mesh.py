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
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a ('data', 'fsdp', 'tensor') mesh over ``devices`` (all devices by default).

    Axis types are Auto: Linen's logical sharding constraints need them (jax 0.10 defaults to
    Explicit axes).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    if len(devices) == jax.device_count() and jax.process_count() > 1:
        from jax.experimental import mesh_utils

        device_array = mesh_utils.create_device_mesh(shape, devices)
    else:
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


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
