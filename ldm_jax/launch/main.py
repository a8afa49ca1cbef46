"""``ldm-jax launch local|tpu|gke|slurm [--dry-run] [flags] -- <ldm-jax command>``.

Everything after ``--`` is the ldm-jax command every process runs, passed on untouched.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ldm_jax.launch import external, gke, local, slurm, tpu

_USAGE = "ldm-jax launch {local|tpu|gke|slurm} [--dry-run] [flags] -- <ldm-jax command>"


class _Parser(argparse.ArgumentParser):
    """Reports a bad flag as one line instead of argparse's usage block."""

    def error(self, message: str) -> None:
        print(f"ldm-jax launch: error: {message} (usage: {_USAGE})", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ldm-jax launch", usage=_USAGE)
    targets = parser.add_subparsers(dest="target", required=True, parser_class=_Parser)
    dry_run = _Parser(add_help=False)
    dry_run.add_argument(
        "--dry-run", "--dry_run", action="store_true", help="Print what would run; run nothing."
    )

    p = targets.add_parser("local", parents=[dry_run], help="Processes on this machine.")
    p.add_argument("--num_processes", type=int, required=True)
    p.add_argument("--devices_per_process", type=int, help="Simulated CPU devices per process.")
    p.add_argument(
        "--grace_seconds",
        type=float,
        default=10.0,
        help="After a child fails, how long the others get to stop before SIGKILL.",
    )
    for module in (tpu, gke, slurm):
        module.add_arguments(targets.add_parser(module.NAME, parents=[dry_run], help=module.HELP))
    return parser


def main(argv: Sequence[str]) -> int:
    """Parses the launcher's flags, then launches the command after ``--``."""
    argv = list(argv)
    launcher_flags = argv[: argv.index("--")] if "--" in argv else argv
    if "-h" in launcher_flags or "--help" in launcher_flags:
        _parser().parse_args(launcher_flags)  # prints the target's (or the launcher's) help
        return 0
    if "--" not in argv:
        print(
            f"ldm-jax launch: error: put the ldm-jax command after `--` (usage: {_USAGE})",
            file=sys.stderr,
        )
        return 2
    split = argv.index("--")
    args, command = _parser().parse_args(argv[:split]), argv[split + 1 :]
    try:
        if not command or command[0].startswith("-"):
            raise ValueError(f"after `--` comes an ldm-jax command such as `train`, got {command}")
        if args.target == "local":
            return local.launch_local(
                command,
                num_processes=args.num_processes,
                devices_per_process=args.devices_per_process,
                grace_seconds=args.grace_seconds,
                dry_run=args.dry_run,
            )
        plan = {"tpu": tpu.plan, "gke": gke.plan, "slurm": slurm.plan}[args.target]
        files, steps = plan(args, command)
        if args.dry_run:
            sys.stdout.write(external.render(files, steps))
            return 0
        return external.execute(files, steps)
    except ValueError as error:
        print(f"ldm-jax launch {args.target}: error: {error}", file=sys.stderr)
        return 2
