"""The steps of a launch on external tools (gcloud, kubectl, sbatch): run, or printed.

A launch is files to write (a manifest, a batch script) and steps, each one or more commands
run side by side. ``render`` prints exactly what ``execute`` would run, shell-quoted.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

_POLL_SECONDS = 30


@dataclasses.dataclass(frozen=True)
class File:
    """A file the launch writes before its steps."""

    path: str
    content: str


@dataclasses.dataclass(frozen=True)
class Step:
    """Commands run side by side and waited for.

    Attributes:
      description: What the step does, printed before it.
      commands: The argvs, started together.
      until: Repeat the (single) command until its output is this (a resource's state).
      always: Run even when an earlier step failed (collecting logs, deleting resources).
    """

    description: str
    commands: tuple[tuple[str, ...], ...]
    until: str | None = None
    always: bool = False


def step(description: str, *commands: Sequence[str], until: str | None = None, always=False):
    return Step(description, tuple(tuple(c) for c in commands), until=until, always=always)


def render(files: Sequence[File], steps: Sequence[Step]) -> str:
    """The launch as a shell script: the files' contents, then every step's commands."""
    lines = []
    for file in files:
        lines += [f"# write {file.path}:", *(f"#   {line}" for line in file.content.splitlines())]
    for s in steps:
        note = f" (repeated until it prints {s.until})" if s.until else ""
        note += " (even after a failure)" if s.always else ""
        lines.append(f"# {s.description}{note}")
        if len(s.commands) == 1:
            lines.append(shlex.join(s.commands[0]))
        else:
            lines += [f"{shlex.join(c)} &" for c in s.commands] + ["wait"]
    return "\n".join(lines) + "\n"


def check_tools(steps: Sequence[Step]) -> None:
    """Raises a one-line ValueError naming the first tool that is not on the PATH."""
    for tool in dict.fromkeys(c[0] for s in steps for c in s.commands):
        if shutil.which(tool) is None:
            raise ValueError(
                f"{tool} not found on the PATH: install it, or print the commands with --dry-run"
            )


def execute(files: Sequence[File], steps: Sequence[Step]) -> int:
    """Writes the files and runs the steps in order; after a failing step only ``always``
    steps run. Returns the first failing exit code, or 0."""
    check_tools(steps)
    for file in files:
        os.makedirs(os.path.dirname(os.path.abspath(file.path)), exist_ok=True)
        with open(file.path, "w", encoding="utf-8") as f:
            f.write(file.content)
    failure = 0
    for s in steps:
        if failure and not s.always:
            continue
        print(f"ldm-jax launch: {s.description}", file=sys.stderr, flush=True)
        code = _wait_until(s) if s.until else _run_together(s.commands)
        if code and not failure:
            print(
                f"ldm-jax launch: error: {s.description} failed with exit code {code}",
                file=sys.stderr,
            )
            failure = code
    return failure


def _run_together(commands: Sequence[Sequence[str]]) -> int:
    processes = [subprocess.Popen(list(c)) for c in commands]
    codes = [p.wait() for p in processes]
    return next((c for c in codes if c), 0)


def _wait_until(s: Step) -> int:
    while True:
        result = subprocess.run(list(s.commands[0]), capture_output=True, text=True)
        if result.returncode:
            sys.stderr.write(result.stderr)
            return result.returncode
        if result.stdout.strip() == s.until:
            return 0
        print(f"ldm-jax launch: state {result.stdout.strip()}; waiting", file=sys.stderr)
        time.sleep(_POLL_SECONDS)
