"""``ldm-jax launch tpu``: a Cloud TPU VM slice (or several, through queued resources).

Creates the TPU VMs, copies this checkout to every worker, installs it, runs the ldm-jax
command on ``--worker=all`` (every host of a slice at once; the runtime finds its peers by
itself), collects every worker's log and deletes the TPUs, also after a failure.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence

from ldm_jax.launch.external import File, Step, step

NAME = "tpu"
HELP = "Cloud TPU VMs through gcloud (queued resources for --num_slices > 1)."
_INSTALL = "pip install -e . 'jax[tpu]>=0.10.2,<0.11'"
_LOG_DIR = "logs"  # on each worker, under --remote_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="TPU (or queued resource) name.")
    parser.add_argument("--project", required=True, help="Google Cloud project.")
    parser.add_argument("--zone", required=True, help="Zone, e.g. us-west4-a.")
    parser.add_argument(
        "--accelerator_type", required=True, help="Slice type, e.g. v5litepod-16 or v5p-64."
    )
    parser.add_argument(
        "--runtime_version", default="tpu-ubuntu2204-base", help="TPU VM software version."
    )
    parser.add_argument("--num_slices", type=int, default=1, help="Slices (multislice over DCN).")
    parser.add_argument(
        "--queued", action="store_true", help="Use queued resources for a single slice too."
    )
    parser.add_argument("--spot", action="store_true", help="Spot capacity (preemptible).")
    parser.add_argument("--code_dir", default=".", help="The checkout to copy to the workers.")
    parser.add_argument("--remote_dir", default="ldm_jax", help="Where it goes on each worker.")
    parser.add_argument("--install", default=_INSTALL, help="Install command run in remote_dir.")
    parser.add_argument("--logs_dir", default=None, help="Local folder for the workers' logs.")
    parser.add_argument("--keep", action="store_true", help="Do not delete the TPUs at the end.")


def plan(args: argparse.Namespace, command: Sequence[str]) -> tuple[list[File], list[Step]]:
    """The gcloud steps of the launch (no files to write)."""
    if args.num_slices < 1:
        raise ValueError(f"--num_slices={args.num_slices} must be at least 1")
    queued = args.queued or args.num_slices > 1
    where = [f"--project={args.project}", f"--zone={args.zone}"]
    tpus = ["gcloud", "compute", "tpus"]
    nodes = (
        [f"{args.name}-{i}" for i in range(args.num_slices)] if args.num_slices > 1 else [args.name]
    )
    spot = ["--spot"] if args.spot else []
    if queued:
        slices = (
            [f"--node-count={args.num_slices}", f"--node-prefix={args.name}"]
            if args.num_slices > 1
            else [f"--node-id={args.name}"]
        )
        resource = [*tpus, "queued-resources"]
        create = step(
            f"request {args.num_slices} x {args.accelerator_type} as queued resource {args.name}",
            [
                *resource,
                "create",
                args.name,
                *where,
                f"--accelerator-type={args.accelerator_type}",
                f"--runtime-version={args.runtime_version}",
                *slices,
                *spot,
            ],
        )
        wait = step(
            "wait until the queued resource is granted",
            [*resource, "describe", args.name, *where, "--format=value(state.state)"],
            until="ACTIVE",
        )
        created = [create, wait]
        delete = [*resource, "delete", args.name, *where, "--force", "--quiet"]
    else:
        created = [
            step(
                f"create TPU VM {args.name} ({args.accelerator_type})",
                [
                    *tpus,
                    "tpu-vm",
                    "create",
                    args.name,
                    *where,
                    f"--accelerator-type={args.accelerator_type}",
                    f"--version={args.runtime_version}",
                    *spot,
                ],
            )
        ]
        delete = [*tpus, "tpu-vm", "delete", args.name, *where, "--quiet"]

    remote = shlex.quote(args.remote_dir)
    log = f'{_LOG_DIR}/ldm-jax-"$(hostname)".log'
    # pipefail: the step fails when ldm-jax fails, not with tee's success.
    run = (
        f"cd {remote} && mkdir -p {_LOG_DIR} && set -o pipefail && "
        f"ldm-jax {shlex.join(command)} 2>&1 | tee {log}"
    )
    ssh = lambda node, line: [
        *tpus,
        "tpu-vm",
        "ssh",
        node,
        *where,
        "--worker=all",
        "--command",
        line,
    ]
    logs_dir = args.logs_dir or f"launch_logs/{args.name}"
    steps = [
        *created,
        step(
            f"copy {args.code_dir} to every worker",
            *(
                [
                    *tpus,
                    "tpu-vm",
                    "scp",
                    "--recurse",
                    args.code_dir,
                    f"{n}:{args.remote_dir}",
                    *where,
                    "--worker=all",
                ]
                for n in nodes
            ),
        ),
        step("install", *(ssh(n, f"cd {remote} && {args.install}") for n in nodes)),
        step(f"run ldm-jax {command[0]} on every worker", *(ssh(n, run) for n in nodes)),
        step(f"make {logs_dir}", ["mkdir", "-p", logs_dir], always=True),
        step(
            f"collect every worker's log into {logs_dir}",
            *(
                [
                    *tpus,
                    "tpu-vm",
                    "scp",
                    "--recurse",
                    f"{n}:{args.remote_dir}/{_LOG_DIR}",
                    f"{logs_dir}/{n}",
                    *where,
                    "--worker=all",
                ]
                for n in nodes
            ),
            always=True,
        ),
    ]
    if not args.keep:
        steps.append(step(f"delete {args.name}", delete, always=True))
    return [], steps
