"""Test set-up: 8 simulated CPU devices, so sharding is exercised on every run.

Compilation dominates the suite's time on a small CPU, so tests compile with LLVM's
optimisation off (the tiny test programs run just as fast) and share a persistent
compilation cache, which subprocesses started by the CLI tests inherit through the
environment.
"""

import os
import tempfile

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS, "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ldm_jax_test_xla_cache")
)

# As `ldm-jax` does: no libtpu backend where no TPU is attached (the test extra installs
# libtpu for `ldm-jax compile`). The CLI subprocesses inherit the choice.
from ldm_jax.parallel import platforms  # noqa: E402

platforms.skip_absent_tpu()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import logging  # noqa: E402
import pathlib  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``ldm-jax ARGS`` in a subprocess on 2 simulated devices, from the project root."""
    return subprocess.run(
        [sys.executable, "-m", "ldm_jax.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            **os.environ,
            "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=2",
        },
    )


@contextlib.contextmanager
def cli_session(argv: list[str]):
    """Runs ``cli.main(cli._parse_flags(argv))`` in this process as the console script would:
    ``sys.argv`` is ``argv`` (ml_collections reads the overrides there), the flags are fresh,
    no signal handlers are set for the test process and the package logger is left as it was."""
    logger = logging.getLogger("ldm_jax")
    handlers, level = list(logger.handlers), logger.level
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", argv)
        patch.setattr(signal, "signal", lambda *args: None)
        try:
            yield
        finally:
            for name in [n for n in flags.FLAGS if n.startswith("config.")]:
                delattr(flags.FLAGS, name)
            flags.FLAGS.unparse_flags()
            logger.handlers[:] = handlers
            logger.setLevel(level)


class StopAtCall:
    """``should_stop`` that says yes at its n-th call (calls count steps across both stages)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, step):
        self.calls += 1
        return self.calls == self.n


def load_config(name: str, variant: str | None = None):
    """``get_config(variant)`` of ``configs/<name>.py`` (``--config=configs/NAME.py:VARIANT``)."""
    path = ROOT / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.fixture
def tiny_config():
    """The quickstart's tiny variant: a few steps of each stage on very small models."""
    return load_config("quickstart", "tiny")
