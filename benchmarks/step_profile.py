"""Where the benchmark train step's time goes: a `jax.profiler` trace summarised by XLA op.

  python benchmarks/step_profile.py [--batch=32] [--microbatches=1] [--profile_steps=3]

Compiles the step of benchmarks/train_step.py (same U-Net, weights, AdamW, flags), runs 2 steps,
traces `--profile_steps` more with `jax.profiler`, and reads the trace back: the time of each
XLA op kind (the op's name without its number: `ynn_fusion` is a convolution or matrix
product run by YNNPACK, `*_fusion` the elementwise and reduction fusions around them), summed
over XLA's worker threads, and how busy each thread was over the traced wall time. Tracing
slows the step somewhat. A measurement, never a test; prints a table and one JSON line.
"""

from __future__ import annotations

import collections
import glob
import json
import re
import tempfile

import jax
from absl import app, flags
from common import benchmark_inputs, benchmark_unets, compile_step, run_steps
from jax.profiler import ProfileData
from train_step import jax_step

_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 3, "Steps traced.")
_TOP = flags.DEFINE_integer("top", 15, "Op kinds listed.")
# The wrappers around the ops on XLA's CPU worker threads, not ops themselves.
_NOT_OPS = ("ThunkExecutor", "SlinkyThreadPool", "end: ")


def summarise(trace_dir: str) -> tuple[collections.Counter, collections.Counter, dict]:
    """(ns per op kind, calls per op kind, busy ns per XLA worker thread) from a trace."""
    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    durations, calls, busy = collections.Counter(), collections.Counter(), {}
    for plane in ProfileData.from_file(path).planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            busy[line.name] = 0
            for event in line.events:
                if event.name.startswith(_NOT_OPS):
                    continue
                kind = re.sub(r"\.\d+", "", event.name)  # ffi_call.166__onednn$convolution too
                durations[kind] += event.duration_ns
                calls[kind] += 1
                busy[line.name] += event.duration_ns
    return durations, calls, busy


def main(_):
    batch_size = flags.FLAGS.batch
    _, unet, params = benchmark_unets()
    inputs = benchmark_inputs(batch_size)
    step, state, args = jax_step(unet, params, inputs, flags.FLAGS.microbatches)
    compiled, _ = compile_step(step, state, args, count_flops=False)
    state, _ = run_steps(compiled, state, args, 2)
    steps = _PROFILE_STEPS.value
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        state, seconds = run_steps(compiled, state, args, steps)
        jax.profiler.stop_trace()
        durations, calls, busy = summarise(trace_dir)

    wall_ms = 1e3 * seconds / steps
    total = sum(durations.values())
    print(
        f"batch {batch_size}: {wall_ms:.0f} ms per traced step, {1e-6 * total / steps:.0f} ms of "
        f"ops per step summed over {len(busy)} XLA worker threads"
    )
    for thread, ns in sorted(busy.items()):
        print(f"  {thread}: busy {1e-6 * ns / steps / wall_ms:.0%} of the wall time")
    print(f"{'op kind':<28} {'ms/step':>8} {'share':>6} {'calls/step':>10}")
    record = {"batch": batch_size, "ms_per_step": round(wall_ms, 1), "ops": {}}
    for kind, ns in durations.most_common(_TOP.value):
        ms = 1e-6 * ns / steps
        print(f"{kind:<28} {ms:>8.1f} {ns / total:>6.1%} {calls[kind] // steps:>10}")
        record["ops"][kind] = round(ms, 1)
    record["thread_busy"] = [round(1e-6 * ns / steps / wall_ms, 3) for ns in busy.values()]
    print(json.dumps(record))


if __name__ == "__main__":
    app.run(main)
