"""Test set-up: 8 simulated CPU devices, so sharding is exercised on every run."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, variant: str | None = None):
    """``get_config(variant)`` of ``configs/<name>.py``, as ``--config=configs/NAME.py:VARIANT``."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.fixture
def tiny_config():
    """The quickstart's tiny variant: a few steps of each stage on very small models."""
    return load_config("quickstart", "tiny")
