"""Units: parse the durations and sizes written in the config file.

Role: ``parse_duration("5m") -> 300.0`` seconds and ``parse_size("25MiB") -> 26214400``
bytes, raising ``ValueError`` with a sentence that the config loader puts in its error
line.  Also ``format_duration`` / ``format_size`` for summaries.
Not: knowing which config key a value came from (config.py adds the key path).
"""

from __future__ import annotations

import math
import re

DURATION_UNITS: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_SIZE_RE = re.compile(r"(\d+)\s*([kmg]ib|b)?", re.IGNORECASE)


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``2s``, ``5m``, ``1h``, ``5d`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30s, 5m, 1h or 5d, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match is None:
            raise ValueError("must be a duration such as 30s, 5m, 1h or 5d")
        number, unit = match.groups()
        seconds = float(number) * DURATION_UNITS[unit or "s"]
    else:
        raise ValueError("must be a duration such as 30s, 5m, 1h or 5d")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("must be a finite, non-negative duration")
    return seconds


def parse_size(value: str | int) -> int:
    """Bytes from ``512KiB``, ``25MiB``, ``1GiB`` or a bare integer of bytes."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as 512KiB, 25MiB or a number of bytes")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if match is None:
            raise ValueError("must be a size such as 512KiB, 25MiB, 1GiB or a number of bytes")
        number, unit = match.groups()
        size = int(number) * SIZE_UNITS[(unit or "").lower()]
    else:
        raise ValueError("must be a size such as 512KiB, 25MiB or a number of bytes")
    if size < 0:
        raise ValueError("must not be negative")
    return size


def format_duration(seconds: float) -> str:
    """Shortest unit form: 300.0 -> '5m', 90.0 -> '90s', 0.5 -> '0.5s' (to the millisecond)."""
    for unit in ("d", "h", "m"):
        scale = DURATION_UNITS[unit]
        if seconds >= scale and seconds % scale == 0:
            return f"{int(seconds // scale)}{unit}"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"  # millisecond precision is plenty


def format_size(size: int) -> str:
    """Shortest exact unit form: 26214400 -> '25MiB', 1000 -> '1000'."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)
