"""Where compiled programs persist: one cache per user, shared by new workdirs."""

import os

from ldm_jax import compilation_cache


def test_one_process_uses_the_user_cache_so_a_new_workdir_is_warm(tmp_path):
    environ = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = compilation_cache.default_directory(str(tmp_path / "run_a"), 1, environ)
    second = compilation_cache.default_directory(str(tmp_path / "run_b"), 1, environ)
    assert first == second == str(tmp_path / "cache" / "ldm_jax" / "xla")


def test_without_xdg_cache_home_the_cache_is_under_the_home_directory(tmp_path):
    directory = compilation_cache.default_directory(str(tmp_path), 1, {})
    assert directory == os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "xla")


def test_several_processes_use_the_workdir_every_process_can_read(tmp_path):
    environ = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    directory = compilation_cache.default_directory(str(tmp_path / "run"), 2, environ)
    assert directory == str(tmp_path / "run" / "xla_cache")
