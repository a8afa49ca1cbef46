"""Per-device memory and FLOPs of the stage-2 train step as FSDP splits it over 1, 2, 4 and 8
simulated CPU devices (fsdp = n, no data or tensor parallelism), side by side in one run.

  python benchmarks/fsdp_scaling.py [--config=configs/ldm_celebahq256.py] [--batch=32]
      [--devices=1,2,4,8]

Each row compiles the real train step (``ldm_jax.train.compile.compile_train_step``, what
``ldm-jax compile`` runs for a TPU topology) for the first n devices with the same global
batch, and reports what XLA says one device needs: argument, temporary and output bytes
(``compiled.memory_analysis()``), their total less the outputs written over donated
arguments, and FLOPs (``compiled.cost_analysis()``). "state" is the train state alone
(params, EMA params, optimizer moments) in the shardings the step takes it in: XLA's argument
bytes of a program taking just the state. No weights are materialised.

The ratios compare each row with an n-th of the one-device row (1.00x: split perfectly;
replicated small tensors and per-device copies of gathered weights make them larger). The
figure kept from the earlier fsdp=1 vs fsdp=8 measurement: the 8-device state per device
over an eighth of the 1-device state (target <= 1.15x). A measurement, never a test.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ldm_jax import config as config_lib  # noqa: E402
from ldm_jax.parallel import mesh as mesh_lib  # noqa: E402
from ldm_jax.parallel import sharding  # noqa: E402
from ldm_jax.train import compile as compile_lib  # noqa: E402
from ldm_jax.train import state as state_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ldm_celebahq256.py", lock_config=False)
_BATCH = flags.DEFINE_integer(
    "batch", 32, "Global batch of every row (0: the config's diffusion.train.batch_size)."
)
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts to compile for.")
_STAGE = "diffusion"
_MIB = 2**20


def _fsdp_config(config, devices: int):
    config = config.copy_and_resolve_references()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, devices, 1
    if _BATCH.value:
        config.diffusion.train.batch_size = _BATCH.value
    return config


def state_bytes_per_device(config, devices) -> tuple[int, int]:
    """(XLA's per-device argument bytes of the train state, the state's elements)."""
    config_lib.validate(config, len(devices), check_files=False)
    mesh = mesh_lib.create_mesh(**config_lib.mesh_sizes(config), devices=devices)
    rules = mesh_lib.axis_rules_from_config(config.mesh.axis_rules)
    init_fn = compile_lib.stage_program(config, mesh, rules, _STAGE)[0]
    abstract, shardings = sharding.abstract_state(
        init_fn, mesh, rules, state_lib.init_key(config.seed, 11, mesh.size)
    )
    # The identity on the state: its arguments are the train step's state argument.
    compiled = jax.jit(lambda s: s, in_shardings=(shardings,)).lower(abstract).compile()
    elements = sum(leaf.size for leaf in jax.tree.leaves(abstract))
    return compiled.memory_analysis().argument_size_in_bytes, elements


def measure(config, count: int) -> dict:
    devices = jax.devices()[:count]
    config = _fsdp_config(config, count)
    state_bytes, elements = state_bytes_per_device(config, devices)
    start = time.perf_counter()
    report = compile_lib.compile_train_step(config, devices, stage=_STAGE)
    return dict(
        devices=count,
        mesh=report.mesh_shape,
        per_device_batch=report.per_chip_batch,
        parameters=report.parameters,
        state_elements=elements,
        state_bytes=state_bytes,
        argument_bytes=report.argument_bytes,
        temp_bytes=report.temp_bytes,
        output_bytes=report.output_bytes,
        alias_bytes=report.alias_bytes,
        total_bytes=report.total_bytes,
        flops=report.flops,
        compile_seconds=time.perf_counter() - start,
    )


def main(argv) -> None:
    del argv
    counts = [int(n) for n in _DEVICES.value]
    if counts[0] != 1:
        raise ValueError("--devices must start with 1: the ratios are against one device")
    rows = [measure(_CONFIG.value, n) for n in counts]
    one = rows[0]
    print(
        f"stage {_STAGE}: {one['parameters']:,} trained parameters, global batch "
        f"{one['per_device_batch']:g}; per device (MiB, GFLOP); ratios: row x n / 1-device row"
    )
    print(
        f"{'devices':>7} {'batch':>6} {'state':>9} {'args':>9} {'temps':>9} {'outputs':>9} "
        f"{'total':>9} {'GFLOP':>9} {'state':>6} {'total':>6} {'FLOPs':>6} {'compile s':>9}"
    )
    for row in rows:
        n = row["devices"]
        row["state_ratio"] = row["state_bytes"] * n / one["state_bytes"]
        row["total_ratio"] = row["total_bytes"] * n / one["total_bytes"]
        row["flops_ratio"] = row["flops"] * n / one["flops"] if one["flops"] else float("nan")
        print(
            f"{n:>7} {row['per_device_batch']:>6g} {row['state_bytes'] / _MIB:>9,.1f} "
            f"{row['argument_bytes'] / _MIB:>9,.1f} {row['temp_bytes'] / _MIB:>9,.1f} "
            f"{row['output_bytes'] / _MIB:>9,.1f} {row['total_bytes'] / _MIB:>9,.1f} "
            f"{row['flops'] / 1e9:>9,.1f} {row['state_ratio']:>5.3f}x {row['total_ratio']:>5.3f}x "
            f"{row['flops_ratio']:>5.3f}x {row['compile_seconds']:>9.1f}"
        )
    largest = rows[-1]
    print(
        f"state per device at {largest['devices']} devices / ({largest['devices']}-th of 1 device)"
        f" = {largest['state_ratio']:.4f}x (target <= 1.15x)"
    )
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    print(json.dumps({"config": config_file, "rows": rows}, default=str))


if __name__ == "__main__":
    app.run(main)
