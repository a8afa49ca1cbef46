"""Transparent huge pages for the host memory of a run, through glibc's malloc.

XLA's CPU runtime allocates each execution's temporaries as one block (about 1.5 GB for the
benchmark U-Net's train step at batch 32) and frees it when the execution ends. glibc serves
a block that large with a fresh ``mmap``, so every step faults in all of its pages again, 4 KiB
at a time: some 380,000 page faults per step, a third of the step's time spent in the
kernel. With the glibc tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) malloc asks the
kernel for transparent huge pages on those blocks (``madvise(MADV_HUGEPAGE)``): 2 MiB pages,
some 1,000 faults per step, and fewer TLB misses while the step runs
(``benchmarks/train_step.py`` measures the step with it; the README gives the figures).

glibc reads its tunables when a process starts, so ``ldm-jax`` re-executes itself once,
before anything heavy is imported, with the tunable added to ``GLIBC_TUNABLES``. It does so
only where it helps: Linux with glibc >= 2.35 and the kernel's transparent huge pages in
``madvise`` mode (in ``always`` mode every large block gets them already; in ``never`` mode
none can). ``LDM_JAX_HUGE_PAGES=0`` turns it off. The processes a run starts inherit the
environment, so a launched job's processes get it too.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "LDM_JAX_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), if known."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def _glibc_version() -> tuple[int, ...] | None:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None


def huge_page_environment(
    environ: Mapping[str, str],
    *,
    system: str,
    glibc: tuple[int, ...] | None,
    thp_mode: str | None,
) -> dict[str, str] | None:
    """The environment to re-execute with for huge pages, or None when nothing is to be done.

    Nothing is to be done off Linux, under another C library or a glibc older than 2.35
    (which has no such tunable), unless the kernel gives huge pages on request only
    (``madvise`` mode), when the tunable is already set, or when ``LDM_JAX_HUGE_PAGES=0``.
    """
    if system != "Linux" or glibc is None or glibc < (2, 35) or thp_mode != "madvise":
        return None
    if environ.get(OPT_OUT, "1") == "0":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return None
    updated = dict(environ)
    updated["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return updated


def use_huge_pages() -> None:
    """Re-executes this process (same interpreter, same arguments) with the tunable set, when
    `huge_page_environment` says it helps; returns without doing anything otherwise.

    Call it first thing in a program's entry point: everything done before it is done twice.
    """
    environ = huge_page_environment(
        os.environ, system=platform.system(), glibc=_glibc_version(), thp_mode=_thp_mode()
    )
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, environ)
    except OSError as error:  # no exec (a frozen or sandboxed interpreter): run as it is
        print(f"ldm-jax: warning: running without huge pages ({error})", file=sys.stderr)
