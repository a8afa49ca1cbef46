"""`ldm-jax launch local`: prefixed output, fail-fast, signals forwarded to every child."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from conftest import ROOT

from ldm_jax.launch import local

# A stand-in for ldm-jax that reads its --process_id like the real one.
_CHILD = textwrap.dedent(
    """
    import signal, sys, time
    index = int(next(a for a in sys.argv if a.startswith("--process_id=")).split("=")[1])
    mode = sys.argv[1]
    if mode == "fail":
        if index == 1:
            print("giving up", flush=True)
            sys.exit(1)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a peer stuck in a collective
        time.sleep(600)
    if mode == "preempt":
        signal.signal(signal.SIGTERM, lambda *_: (print("checkpointed", flush=True), sys.exit(0)))
        print("ready", flush=True)
        time.sleep(600)
    """
)


def test_one_failing_child_stops_the_others(capsys):
    start = time.monotonic()
    code = local.launch_local(
        ["fail"],
        num_processes=2,
        grace_seconds=1.0,
        program=(sys.executable, "-c", _CHILD),
    )
    elapsed = time.monotonic() - start
    captured = capsys.readouterr()
    assert code == 1
    assert elapsed < 30  # the child that ignores SIGTERM was killed after the grace period
    assert "[1] giving up" in captured.out
    assert "process 1 exited with code 1; stopped the other processes" in captured.err


def test_sigterm_to_the_launcher_reaches_every_child():
    script = (
        "import sys; from ldm_jax.launch import local; "
        f"sys.exit(local.launch_local(['preempt'], num_processes=2, "
        f"program=(sys.executable, '-c', {_CHILD!r})))"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    ready = 0
    while ready < 2:
        ready += "ready" in launcher.stdout.readline()
    os.kill(launcher.pid, signal.SIGTERM)
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 0
    assert "[0] checkpointed" in out and "[1] checkpointed" in out


def test_dry_run_prints_every_process_command(capsys):
    code = local.launch_local(
        ["train", "--config=configs/quickstart.py:tiny", "--workdir=/tmp/a b"],
        num_processes=2,
        devices_per_process=4,
        dry_run=True,
    )
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and len(lines) == 3 and lines[-1] == "wait"
    for index, line in enumerate(lines[:2]):
        assert "-m ldm_jax train --config=configs/quickstart.py:tiny '--workdir=/tmp/a b'" in line
        assert "--coordinator_address=127.0.0.1:" in line
        assert f"--num_processes=2 --process_id={index} --devices_per_process=4 &" in line
