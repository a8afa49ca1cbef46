"""``ldm-jax`` and ``python -m ldm_jax``: the command line, in a process set up for speed.

The process first re-executes itself with glibc's malloc asking for transparent huge pages
where that helps (see `ldm_jax.host_memory`), before the CLI and JAX are imported; then it
keeps libtpu from probing for a TPU where none is attached (`ldm_jax.parallel.platforms`).
"""

from __future__ import annotations


def run() -> None:
    """Console-script entry point."""
    import sys

    from ldm_jax import host_memory

    host_memory.use_huge_pages()

    from ldm_jax.parallel import platforms

    platforms.skip_absent_tpu()

    from ldm_jax import cli

    # absl's --help prints the docstring of the __main__ module (here the console script's).
    sys.modules["__main__"].__doc__ = cli.__doc__
    cli.run()


if __name__ == "__main__":
    run()
