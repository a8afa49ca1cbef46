"""The ``--sweep`` flag: ``"key=v1,v2 key=v1,..."`` into the list of points it spans.

Parsed by hand, never evaluated: space-separated ``key=v1,v2,...`` terms over a fixed set
of keys, each value converted to its key's type and checked, one line naming the bad key or
value otherwise. The points are the cartesian product of the values, in the order given
(the last key varies fastest).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

from ldm_jax.diffusion import SAMPLERS

LATEST = "latest"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be at least 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # also refuses nan
        raise ValueError("must be a number at least 0")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be in [0, 1]")
    return value


def _sampler(text: str) -> str:
    if text not in SAMPLERS:
        raise ValueError(f"must be one of {', '.join(SAMPLERS)}")
    return text


def _checkpoint(text: str) -> str | int:
    return LATEST if text == LATEST else _non_negative_int(text)


@dataclasses.dataclass(frozen=True)
class SweepKey:
    """A key of the sweep: how its values are read and what they mean."""

    parse: Callable[[str], object]
    meaning: str


# The sampling options a point sets (the rest come from the workdir's config.sample).
SWEEP_KEYS: dict[str, SweepKey] = {
    "sampler": SweepKey(_sampler, f"the sampler ({', '.join(SAMPLERS)})"),
    "steps": SweepKey(_positive_int, "sampling steps (an integer >= 1)"),
    "guidance": SweepKey(_non_negative_float, "the classifier-free guidance scale (>= 0)"),
    "guidance_rescale": SweepKey(_unit_float, "the guidance rescale factor, in [0, 1]"),
    "eta": SweepKey(_non_negative_float, "DDIM's eta (>= 0)"),
    "seed": SweepKey(_non_negative_int, "the sampling seed (an integer >= 0)"),
    "checkpoint": SweepKey(_checkpoint, "a stage-2 checkpoint step, or 'latest'"),
}

Point = dict[str, object]


def parse_sweep(spec: str) -> list[Point]:
    """The points of a ``--sweep`` spec, each ``{key: typed value}`` in the spec's key order.

    Args:
      spec: e.g. ``"sampler=ddim,dpmpp_2m steps=10,25,50 guidance=1,3,5"``.

    Raises:
      ValueError: one line naming the flag and the bad term, key or value.
    """
    terms = spec.split()
    if not terms:
        raise ValueError('--sweep is empty: give terms like --sweep="steps=10,25 guidance=1,3"')
    values: dict[str, list] = {}
    for term in terms:
        key, equals, listed = term.partition("=")
        if not equals or not key or not listed:
            raise ValueError(f"--sweep term {term!r} is not key=v1,v2,...")
        if key not in SWEEP_KEYS:
            raise ValueError(f"--sweep key {key!r} is unknown; allowed: {', '.join(SWEEP_KEYS)}")
        if key in values:
            raise ValueError(f"--sweep key {key!r} is given twice; list its values once")
        parsed = []
        for text in listed.split(","):
            try:
                parsed.append(SWEEP_KEYS[key].parse(text))
            except ValueError as error:
                message = str(error)
                detail = message if "must" in message else f"must be {SWEEP_KEYS[key].meaning}"
                raise ValueError(f"--sweep {key}={text!r}: {detail}") from None
        if len(set(parsed)) != len(parsed):
            raise ValueError(f"--sweep {key}={listed}: a value is listed twice")
        values[key] = parsed
    return [dict(zip(values, c, strict=True)) for c in itertools.product(*values.values())]


def sweep_name(points: list[Point]) -> str:
    """The sweep's folder name: its keys, e.g. ``sampler-steps-guidance``."""
    return "-".join(points[0]) if points else "empty"
