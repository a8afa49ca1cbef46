"""Time to the first train step of `ldm-jax train`, with a cold and a warm compilation cache.

  python benchmarks/startup.py [--config=configs/quickstart.py] [--rounds=2]

Each run is ``python -m ldm_jax train --config=CONFIG --workdir=FRESH_DIR
--config.train.log_every=1`` in a subprocess, with a fresh, empty workdir. Time to first
step: the ``time`` field of the first line of the workdir's ``metrics.jsonl`` (written once
the first step's metrics are on the host, so imports, data set-up, state creation, every
compilation and the step itself are inside) less the moment the subprocess was started.
The run is then stopped with SIGTERM (it checkpoints and exits), so only start-up is timed.

Variants, alternating in rounds:

- cold: ``JAX_COMPILATION_CACHE_DIR`` set to a new, empty directory;
- warm: the same directory again, filled by the cold run (a new workdir);
- default cold / default warm: no cache setting at all, the CLI's own default location
  (``XDG_CACHE_HOME`` pointed at a temporary directory so the user's cache is not touched),
  two fresh workdirs in a row: whether a new workdir finds what an earlier run compiled.

Prints seconds to the first step per variant, warm / cold (target <= 50%), the cache entries
written, and one JSON line. A measurement, never a test.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/quickstart.py", "Config of the run.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds the variants alternate in.")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "Extra --config.KEY=VALUE arguments of the runs (repeatable)."
)
_TIMEOUT = flags.DEFINE_float("timeout", 900, "Seconds a run may take to its first step.")
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # configs/ are relative


def _entries(directory: str) -> int:
    """Files in a compilation cache directory (one per cached program, at most two)."""
    return sum(len(files) for _, _, files in os.walk(directory)) if os.path.isdir(directory) else 0


def _wait_for_first_line(metrics: str, process, start: float, log_path: str) -> float:
    while True:
        if os.path.exists(metrics):
            with open(metrics, encoding="utf-8") as f:
                line = f.readline()
            if line.endswith("\n"):
                return json.loads(line)["time"] - start
        if process.poll() is not None:
            with open(log_path, encoding="utf-8") as f:
                raise RuntimeError(f"the run ended before its first step:\n{f.read()[-4000:]}")
        if time.time() - start > _TIMEOUT.value:
            raise TimeoutError(f"no first step within {_TIMEOUT.value} s (log: {log_path})")
        time.sleep(0.05)


def time_to_first_step(workdir: str, env: dict[str, str]) -> float:
    """Seconds from starting ``ldm-jax train`` to its first metrics line; then stops it."""
    command = [
        sys.executable,
        "-m",
        "ldm_jax",
        "train",
        f"--config={_CONFIG.value}",
        f"--workdir={workdir}",
        "--config.train.log_every=1",
        *_OVERRIDES.value,
    ]
    metrics = os.path.join(workdir, "metrics.jsonl")
    log_path = f"{workdir}.log"
    with open(log_path, "w", encoding="utf-8") as log:
        start = time.time()
        process = subprocess.Popen(
            command, cwd=_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log
        )
        try:
            first = _wait_for_first_line(metrics, process, start, log_path)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # checkpoints the step and exits
            process.wait(timeout=_TIMEOUT.value)
    return first


def main(_):
    base_env = {k: v for k, v in os.environ.items() if k != _CACHE_ENV}
    names = ("cold", "warm", "default cold", "default warm")
    seconds: dict[str, list[float]] = {name: [] for name in names}
    entries: dict[str, list[int]] = {name: [] for name in names}
    for _ in range(_ROUNDS.value):
        with tempfile.TemporaryDirectory() as tmp:
            explicit = {**base_env, _CACHE_ENV: os.path.join(tmp, "cache")}
            user_cache = os.path.join(tmp, "user_cache")
            default = {**base_env, "XDG_CACHE_HOME": user_cache}
            runs = [
                ("cold", explicit, explicit[_CACHE_ENV]),
                ("warm", explicit, explicit[_CACHE_ENV]),
                ("default cold", default, user_cache),
                ("default warm", default, user_cache),
            ]
            for index, (name, env, cache) in enumerate(runs):
                before = _entries(cache)
                workdir = os.path.join(tmp, f"workdir_{index}")
                seconds[name].append(time_to_first_step(workdir, env))
                entries[name].append(_entries(cache) - before)

    print(f"config {_CONFIG.value} {' '.join(_OVERRIDES.value)}; {_ROUNDS.value} rounds")
    print(f"{'variant':<14} {'first step s (per round)':<28} {'median':>7} {'new cache files':>16}")
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name in names:
        per_round = ", ".join(f"{s:.1f}" for s in seconds[name])
        written = ", ".join(str(n) for n in entries[name])
        print(f"{name:<14} {per_round:<28} {medians[name]:>7.1f} {written:>16}")
    ratio = medians["warm"] / medians["cold"]
    default_ratio = medians["default warm"] / medians["default cold"]
    print(
        f"warm / cold = {ratio:.1%}; default warm / default cold = {default_ratio:.1%} "
        "(target <= 50%)"
    )
    print(
        json.dumps(
            {
                "seconds_to_first_step": seconds,
                "median": {k: round(v, 2) for k, v in medians.items()},
                "new_cache_files": entries,
                "warm_over_cold": round(ratio, 4),
                "default_warm_over_cold": round(default_ratio, 4),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
