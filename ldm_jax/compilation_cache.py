"""Where compiled XLA programs persist between runs, so a restart, a new workdir or a later
`ldm-jax sample` skips the compilations an earlier run already did.

JAX keys each entry by the program, its compile options, the device set and the jax/XLA
versions, so one cache can serve every run of a user. The default is per user
(``$XDG_CACHE_HOME/ldm_jax/xla``, else ``~/.cache/ldm_jax/xla``): a cache inside each
workdir would leave every new workdir cold. A job of several processes uses the workdir's
``xla_cache/`` instead: only process 0 writes entries, and the workdir is the place every
process of the job can read. JAX's threshold stays: programs that compile in under a second
are not written (writing them too measured no faster start, benchmarks/startup.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

from ldm_jax import storage

DISABLED = "none"


def default_directory(workdir: str, process_count: int, environ: Mapping[str, str]) -> str:
    """The cache directory when none is given (see the module docstring)."""
    if process_count > 1:
        return storage.join(workdir, "xla_cache")
    user_cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(user_cache, "ldm_jax", "xla")


def configure(
    directory: str | None, workdir: str, environ: Mapping[str, str] = os.environ
) -> str | None:
    """Points JAX's persistent compilation cache at a directory; returns it (None: off).

    Args:
      directory: ``--compilation_cache_dir``: a path, ``"none"`` to turn the cache off, or
        None for ``JAX_COMPILATION_CACHE_DIR`` when set, else ``default_directory``.
      workdir: the run's workdir.
      environ: the environment (``XDG_CACHE_HOME``).
    """
    if directory == DISABLED or not jax.config.jax_enable_compilation_cache:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = (
        directory
        or jax.config.jax_compilation_cache_dir
        or default_directory(workdir, jax.process_count(), environ)
    )
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory
