"""Per-device memory of the stage-2 train state (params, EMA params, optimizer state) as FSDP
splits it over 8 simulated CPU devices: fsdp = 1, 2, 4, 8 (the rest data parallel).

  python benchmarks/fsdp_memory.py [--config=configs/sd15.py]

The bytes are XLA's (``memory_analysis().argument_size_in_bytes``) for a program that takes
the state in exactly the shardings the train step takes it in; no weights are materialised.
Prints one line per mesh, the ratio of fsdp=8's bytes to an eighth of fsdp=1's (the ideal is
1.0: everything split; replicated small tensors make it larger) and one JSON line.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()

import json  # noqa: E402

import jax  # noqa: E402
from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ldm_jax import config as config_lib  # noqa: E402
from ldm_jax.parallel import mesh as mesh_lib  # noqa: E402
from ldm_jax.parallel import sharding  # noqa: E402
from ldm_jax.train import compile as compile_lib  # noqa: E402
from ldm_jax.train import state as state_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sd15.py", lock_config=True)
FSDP_SIZES = (1, 2, 4, 8)


def state_bytes_per_device(config, fsdp: int) -> tuple[int, int]:
    """(XLA's per-device argument bytes of the state, the number of state elements)."""
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, fsdp, 1
    config_lib.validate(config, jax.device_count(), check_files=False)
    mesh = mesh_lib.create_mesh(**config_lib.mesh_sizes(config))
    rules = mesh_lib.axis_rules_from_config(config.mesh.axis_rules)
    init_fn = compile_lib.stage_program(config, mesh, rules, "diffusion")[0]
    abstract, shardings = sharding.abstract_state(
        init_fn, mesh, rules, state_lib.init_key(config.seed, 11, mesh.size)
    )
    # The identity on the state: its arguments are the train step's state argument.
    compiled = jax.jit(lambda s: s, in_shardings=(shardings,)).lower(abstract).compile()
    elements = sum(leaf.size for leaf in jax.tree.leaves(abstract))
    return compiled.memory_analysis().argument_size_in_bytes, elements


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    results = {}
    for fsdp in FSDP_SIZES:
        per_device, elements = state_bytes_per_device(config, fsdp)
        results[fsdp] = per_device
        print(
            f"fsdp={fsdp} data={8 // fsdp}: state per device {per_device / 2**20:,.1f} MiB "
            f"({elements * 4 / 2**20:,.1f} MiB in all)"
        )
    ratio = results[8] / (results[1] / 8)
    print(f"fsdp=8 per device / (fsdp=1 per device / 8) = {ratio:.4f}")
    print(json.dumps({"state_bytes_per_device": results, "ratio_fsdp8": ratio}))


if __name__ == "__main__":
    app.run(main)
