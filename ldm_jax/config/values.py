"""Reading one config value with its type and range checked: the building blocks of
``checks.validate``.

Each reader takes the config and a dotted key (``"diffusion.train.batch_size"``) and returns the
value, or raises ``ConfigError`` in one line naming ``config.<key>``, the value and what is
allowed. A missing key (a sub-config replaced by hand or on the command line) is named the same
way.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

# Step counters are int32 on the device; a count beyond it overflows.
MAX_COUNT = 2**31 - 1
# Widths and image sides far beyond any published model: larger ones are typos.
MAX_WIDTH = 2**16
MAX_IMAGE_SIZE = 2**14
MAX_DEPTH = 256  # layers, blocks and levels
MAX_TIMESTEPS = 100_000


class ConfigError(ValueError):
    """A config value a user has to change; the message names the key and what is allowed."""


def lookup(config: Any, key: str) -> Any:
    """``config.<key>`` of a dotted key."""
    node = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):  # no such key, or not a sub-config
            raise ConfigError(
                f"config.{key} is missing; the keys and their defaults are those of "
                "ldm_jax/config/schema.py:base_config"
            ) from None
    return node


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters (a sub-config, a long list)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def interval(low: float, high: float | str | None, high_open: bool = False) -> str:
    """``">= 0"``, ``"in [0, 1)"``: the allowed range, as a message says it."""
    text = lambda x: f"{x:g}" if isinstance(x, float) else str(x)
    if high is None:
        return f">= {text(low)}"
    return f"in [{text(low)}, {text(high)}{')' if high_open else ']'}"


def integer(config: Any, key: str, low: int, high: int = MAX_COUNT) -> int:
    """``config.<key>``, an integer in ``[low, high]``."""
    value = lookup(config, key)
    top = "2**31 - 1" if high == MAX_COUNT else high
    if not is_integer(value):
        raise ConfigError(f"config.{key}={shown(value)} must be an integer {interval(low, top)}")
    if value < low:
        raise ConfigError(f"config.{key}={shown(value)} must be >= {low}")
    if value > high:
        raise ConfigError(f"config.{key}={shown(value)} must be <= {top}")
    return int(value)


def number(
    config: Any, key: str, low: float, high: float | None = None, high_open: bool = False
) -> float:
    """``config.<key>``, a finite number in ``[low, high]`` (or ``[low, high)``)."""
    value = lookup(config, key)
    allowed = interval(low, high, high_open)
    if not is_number(value) or not math.isfinite(value):
        raise ConfigError(f"config.{key}={shown(value)} must be a finite number {allowed}")
    too_high = high is not None and (value >= high if high_open else value > high)
    if value < low or too_high:
        raise ConfigError(f"config.{key}={shown(value)} must be {allowed}")
    return float(value)


def positive(config: Any, key: str) -> float:
    """``config.<key>``, a finite number > 0."""
    value = lookup(config, key)
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"config.{key}={shown(value)} must be a positive number")
    return float(value)


def boolean(config: Any, key: str) -> bool:
    value = lookup(config, key)
    if not isinstance(value, bool):
        raise ConfigError(f"config.{key}={shown(value)} must be True or False")
    return value


def text(config: Any, key: str) -> str:
    value = lookup(config, key)
    if not isinstance(value, str):
        raise ConfigError(f"config.{key}={shown(value)} must be a string (empty: unset)")
    return value


def choice(config: Any, key: str, allowed: Sequence[str]) -> str:
    value = lookup(config, key)
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(
            f"config.{key}={shown(value)} is not allowed; choose one of {tuple(allowed)}"
        )
    return value


def sequence(config: Any, key: str, what: str) -> tuple:
    value = lookup(config, key)
    if not isinstance(value, (tuple, list)):
        raise ConfigError(f"config.{key}={shown(value)} must be a tuple of {what}")
    return tuple(value)


def integers(config: Any, key: str, low: int, high: int, nonempty: bool = True) -> tuple:
    """``config.<key>``, a tuple of integers in ``[low, high]`` (at least one if ``nonempty``)."""
    what = f"{'one or more ' if nonempty else ''}integers in [{low}, {high}]"
    values = sequence(config, key, what)
    if (nonempty and not values) or not all(is_integer(v) and low <= v <= high for v in values):
        raise ConfigError(f"config.{key}={shown(values)} must be a tuple of {what}")
    return values


def level_flags(
    config: Any, key: str, channels_key: str, channels: tuple, optional: bool = False
) -> tuple:
    """``config.<key>``, one True/False per entry of ``config.<channels_key>`` (``channels``);
    ``optional``: or none at all."""
    values = sequence(config, key, "True/False values")
    good = all(isinstance(v, bool) or (is_integer(v) and v in (0, 1)) for v in values)
    if not good or (len(values) != len(channels) and not (optional and not values)):
        raise ConfigError(
            f"config.{key}={shown(values)} needs one True/False per entry of "
            f"config.{channels_key}={channels}{' (or none at all)' if optional else ''}"
        )
    return values
