"""One place owns path handling (``ldm_jax/storage.py``): local paths and bucket URLs alike."""

import ast
import pathlib

import pytest
from gcs_emulator import emulated_bucket

from ldm_jax import storage

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ldm_jax"
# Calls that take a path on a local disk only: on a workdir or data path in a bucket they would
# create local folders named "gs:" or fail.
LOCAL_ONLY_CALLS = {
    "open",
    "os.makedirs",
    "os.mkdir",
    "os.listdir",
    "os.walk",
    "os.remove",
    "os.path.exists",
    "os.path.isfile",
    "os.path.isdir",
    "os.path.getsize",
    "glob.glob",
    "shutil.copyfile",
    "shutil.copytree",
    "shutil.rmtree",
    "shutil.disk_usage",
    "shutil.move",
}
# The modules that may, and why: none of their paths is a workdir, data or weights path.
ALLOWED = {
    "storage.py": "the one place that tells disks from buckets",
    "host_memory.py": "reads the kernel's transparent huge page mode under /sys",
    "parallel/distributed.py": "looks for the TPU device files under /dev",
    "launch/external.py": "writes the manifest kubectl / xpk read beside the command it prints",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _local_only_calls(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        f"{path.relative_to(PACKAGE)}:{node.lineno}: {_dotted(node.func)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and _dotted(node.func) in LOCAL_ONLY_CALLS
    ]


def test_no_module_handles_paths_itself():
    found = [
        call
        for path in sorted(PACKAGE.rglob("*.py"))
        if str(path.relative_to(PACKAGE)) not in ALLOWED
        for call in _local_only_calls(path)
    ]
    assert not found, "use ldm_jax.storage (epath) instead:\n" + "\n".join(found)


def test_the_scan_finds_such_calls():
    probe = PACKAGE / "storage.py"  # the allowed module does make them
    assert _local_only_calls(probe)
    assert all(str(PACKAGE / p).endswith(".py") and (PACKAGE / p).exists() for p in ALLOWED)


def test_paths_on_a_disk_and_in_a_bucket(tmp_path, monkeypatch):
    assert storage.is_remote("gs://b/run") and storage.is_remote("s3://b/run")
    assert not storage.is_remote("runs/x")
    assert (
        storage.join("gs://b/run", "checkpoints", "diffusion") == "gs://b/run/checkpoints/diffusion"
    )
    monkeypatch.chdir(tmp_path)
    assert str(storage.as_path("runs/x")) == str(tmp_path / "runs" / "x")
    assert storage.free_bytes("gs://b/run") is None and storage.free_bytes(tmp_path) > 0
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=rf"--workdir={blocker}/run is not a writable directory"):
        storage.check_writable(f"{blocker}/run", "--workdir")


def test_appends_writes_and_local_copies_in_a_bucket(tmp_path):
    with emulated_bucket(tmp_path) as bucket:
        log = storage.open_for_append(f"{bucket}/run/metrics.jsonl")
        log.write(b"one\n")
        log.flush()
        assert storage.as_path(f"{bucket}/run/metrics.jsonl").read_bytes() == b"one\n"
        log.write(b"two\n")
        log.close()
        again = storage.open_for_append(f"{bucket}/run/metrics.jsonl")  # a resumed run
        again.write(b"three\n")
        again.close()
        assert storage.as_path(f"{bucket}/run/metrics.jsonl").read_text() == "one\ntwo\nthree\n"
        storage.write_text(f"{bucket}/run/folder/a.txt", "a")
        local = storage.local_copy(f"{bucket}/run/folder")
        assert (pathlib.Path(local) / "a.txt").read_text() == "a"
        storage.check_writable(f"{bucket}/run", "--workdir")
        with pytest.raises(OSError, match="--workdir=gs://no-such-bucket-here/run is not"):
            storage.check_writable("gs://no-such-bucket-here/run", "--workdir")


def test_an_s3_workdir_is_refused_before_anything_runs(tmp_path):
    """orbax 0.12 cannot checkpoint to s3:// (it makes the step folder "s3:/bucket/..."): the
    run says so in one line instead of failing at its first save."""
    from ldm_jax.checkpoint import Checkpointer
    from ldm_jax.train import run

    with pytest.raises(OSError, match=r"--workdir=s3://bucket/run: orbax cannot write"):
        run.check_workdir("s3://bucket/run", min_free_gib=0)
    with pytest.raises(OSError, match="orbax cannot write"):
        Checkpointer("s3://bucket/run/checkpoints/diffusion")
