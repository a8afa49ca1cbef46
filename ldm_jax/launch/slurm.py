"""``ldm-jax launch slurm``: an sbatch script running one ldm-jax process per GPU with srun.

The runtime recognises the SLURM step (job id, node list, task count and index) and joins
the tasks by itself; each task uses the GPU of its ``SLURM_LOCALID``, so the script asks for
``--gpus-per-node`` and one task per GPU, not for ``--gpus-per-task`` (which would hide the
other GPUs and leave every task with device 0).
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence

from ldm_jax.launch.external import File, Step, step

NAME = "slurm"
HELP = "A SLURM GPU cluster: an sbatch script, one process per GPU via srun."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job_name", default="ldm-jax", help="SLURM job name.")
    parser.add_argument("--nodes", type=int, required=True, help="Nodes.")
    parser.add_argument("--gpus_per_node", type=int, required=True, help="GPUs of each node.")
    parser.add_argument("--partition", default=None, help="SLURM partition.")
    parser.add_argument("--account", default=None, help="SLURM account.")
    parser.add_argument("--time", default=None, help="Time limit, e.g. 04:00:00.")
    parser.add_argument(
        "--output", default="%x-%j.out", help="Log file (SLURM patterns: %%x name, %%j job id)."
    )
    parser.add_argument(
        "--setup",
        default=None,
        help="Shell line run first on each node, e.g. `source venv/bin/activate`.",
    )
    parser.add_argument("--script", default=None, help="Where to write the script.")


def script(args: argparse.Namespace, command: Sequence[str]) -> str:
    """The sbatch script."""
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} must be at least 1")
    directives = {
        "job-name": args.job_name,
        "nodes": args.nodes,
        "ntasks-per-node": args.gpus_per_node,
        "gpus-per-node": args.gpus_per_node,
        "partition": args.partition,
        "account": args.account,
        "time": args.time,
        "output": args.output,
    }
    for key, value in directives.items():
        if value is not None and any(c.isspace() for c in str(value)):
            raise ValueError(f"--{key.replace('-', '_')}={value!r} must not contain spaces")
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH --{k}={v}" for k, v in directives.items() if v is not None]
    lines += ["set -euo pipefail"]
    if args.setup:
        lines.append(args.setup)
    # --kill-on-bad-exit: one failing task ends the step instead of leaving peers waiting.
    lines.append(f"srun --kill-on-bad-exit=1 ldm-jax {shlex.join(command)}")
    return "\n".join(lines) + "\n"


def plan(args: argparse.Namespace, command: Sequence[str]) -> tuple[list[File], list[Step]]:
    path = args.script or f"{args.job_name}.sbatch"
    files = [File(path, script(args, command))]
    return files, [step(f"submit {path}", ["sbatch", path])]
