"""Which JAX platforms a process starts: libtpu only where a TPU is attached.

With libtpu installed (the ``tpu`` extra, which the ``test`` extra includes, for
``ldm-jax compile``), JAX initialises the TPU backend in every process that touches a device,
and on a machine without a TPU libtpu then prints its discovery errors ("could not determine
TPU accelerator type", "unexpected worker hostname", a source-location trace) before
falling back to the CPU; it also takes ``/tmp/libtpu_lockfile``, so a second process on the
host gets an "Internal error when accessing libtpu multi-process lockfile" of its own.
Where no TPU chip is attached and no GPU is visible, ``skip_absent_tpu`` limits JAX to the
CPU backend before any backend starts. ``ldm-jax compile`` is unaffected: it loads libtpu
for a topology description, not as a backend. A TPU VM, a GPU machine, an explicit
``JAX_PLATFORMS`` or ``JAX_FORCE_TPU_INIT`` are left alone.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import MutableMapping

PLATFORMS_VARIABLE = "JAX_PLATFORMS"
_FORCE_TPU_VARIABLE = "JAX_FORCE_TPU_INIT"


def _attached_accelerators() -> tuple[int, bool]:
    """(TPU chips attached through PCI, whether a GPU is visible), as JAX itself detects them
    (``jax._src.hardware_utils``: the PCI ids of every TPU generation, NVIDIA's device files,
    AMD's KFD nodes). Unknown (an older or newer jax without those helpers): a TPU is
    assumed, so nothing is changed."""
    try:
        from jax._src import hardware_utils

        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
        gpu = hardware_utils.has_visible_nvidia_gpu() or (
            hardware_utils.num_available_amd_gpus(stop_at=1) != 0
        )
    except (ImportError, AttributeError, OSError):
        return 1, False
    return int(chips), bool(gpu)


def tpu_attached() -> bool:
    """Whether a TPU chip is attached to this host (assumed when JAX cannot tell)."""
    return _attached_accelerators()[0] > 0


def cpu_only_platforms(
    environ: MutableMapping[str, str],
    *,
    libtpu_installed: bool,
    tpu_chips: int,
    gpu_visible: bool,
) -> str | None:
    """The ``JAX_PLATFORMS`` value to start with ("cpu"), or None to leave JAX's choice.

    Only a process that would load libtpu for nothing is limited: libtpu installed, no TPU
    chip attached, no GPU visible, and neither ``JAX_PLATFORMS`` nor ``JAX_FORCE_TPU_INIT``
    set by the user.
    """
    if PLATFORMS_VARIABLE in environ or _FORCE_TPU_VARIABLE in environ:
        return None
    if not libtpu_installed or tpu_chips > 0 or gpu_visible:
        return None
    return "cpu"


def skip_absent_tpu(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Limits this process (and the processes it starts) to the CPU backend where libtpu
    would only probe for a TPU that is not there. Call before any JAX backend starts.

    Returns:
      True when the platforms were limited.
    """
    libtpu_installed = importlib.util.find_spec("libtpu") is not None
    if not libtpu_installed or PLATFORMS_VARIABLE in environ:
        return False  # nothing to skip: no need to look at the hardware
    tpu_chips, gpu_visible = _attached_accelerators()
    platforms = cpu_only_platforms(
        environ, libtpu_installed=True, tpu_chips=tpu_chips, gpu_visible=gpu_visible
    )
    if platforms is None:
        return False
    environ[PLATFORMS_VARIABLE] = platforms  # for the processes this one starts
    if "jax" in sys.modules:  # JAX read the variable at import: tell its config too
        import jax

        jax.config.update("jax_platforms", platforms)
    return True
