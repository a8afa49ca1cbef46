"""The huge-page set-up of the `ldm-jax` process (ldm_jax/host_memory.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ldm_jax import host_memory

LINUX = dict(system="Linux", glibc=(2, 36), thp_mode="madvise")


def test_the_tunable_is_added_where_huge_pages_come_on_request_only():
    assert host_memory.huge_page_environment({"A": "1"}, **LINUX) == {
        "A": "1",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
    }
    # A user's own tunables are kept.
    environ = host_memory.huge_page_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX
    )
    assert environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "environ, system, glibc, thp_mode",
    [
        ({}, "Darwin", None, None),
        ({}, "Linux", None, "madvise"),  # musl
        ({}, "Linux", (2, 31), "madvise"),  # no such tunable yet
        ({}, "Linux", (2, 36), "always"),  # huge pages already
        ({}, "Linux", (2, 36), "never"),
        ({}, "Linux", (2, 36), None),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "Linux", (2, 36), "madvise"),
        ({"LDM_JAX_HUGE_PAGES": "0"}, "Linux", (2, 36), "madvise"),
    ],
)
def test_nothing_is_done_where_it_cannot_help_or_is_refused(environ, system, glibc, thp_mode):
    assert (
        host_memory.huge_page_environment(environ, system=system, glibc=glibc, thp_mode=thp_mode)
        is None
    )


def test_the_thp_mode_is_read_from_the_kernel_file(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host_memory._thp_mode(str(path)) == "madvise"
    assert host_memory._thp_mode(str(tmp_path / "missing")) is None


def test_the_process_runs_again_with_the_tunable_and_its_arguments():
    # A program that calls use_huge_pages() first, as `ldm-jax` does: on this machine it ends
    # with the tunable set exactly when the decision says so, its arguments unchanged, and it
    # runs its body once.
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    expected = host_memory.huge_page_environment(
        env,
        system=host_memory.platform.system(),
        glibc=host_memory._glibc_version(),
        thp_mode=host_memory._thp_mode(),
    )
    program = (
        "import os, sys\n"
        "from ldm_jax import host_memory\n"
        "host_memory.use_huge_pages()\n"
        "print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, "a", "--b=c"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    tunables = "glibc.malloc.hugetlb=1" if expected is not None else ""
    assert result.stdout.splitlines() == [f"{tunables} ['a', '--b=c']"]


def test_ldm_jax_runs_through_the_huge_page_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "ldm_jax", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # (absl ends --help with exit code 1.)
    assert "ldm-jax train    --config=" in result.stdout  # the usage of ldm_jax/cli.py
