"""Byte sizes and durations: parsing user strings and formatting for humans. Bytes are always `int`."""

from __future__ import annotations

import math
import re

KiB = 1024
MiB = 1024**2
GiB = 1024**3

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """'1.5GiB' -> 1610612736; '800MB' -> 800000000; an int is bytes. Raises ValueError naming the units."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if not isinstance(text, str):
        raise ValueError(f"expected a size like '1.5GiB', '800MB' or a number of bytes, got {text!r}")
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"expected a size like '1.5GiB', '800MB' or '800MiB', got {text!r}")
    value = float(match.group(1)) * _SIZE_UNITS[unit]
    if not math.isfinite(value):
        # A few hundred digits overflow float to inf, and int(inf) raises OverflowError, not ValueError.
        raise ValueError(f"size {text!r} is too large; give one like '80GiB'")
    return int(value)


def fmt_bytes(n: int) -> str:
    """Binary units with two decimals above 1 GiB, as the plan table prints them."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= GiB:
        return f"{sign}{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{sign}{n / MiB:.1f} MiB"
    if n >= KiB:
        return f"{sign}{n / KiB:.1f} KiB"
    return f"{sign}{n} B"


def gib(n: int) -> float:
    return n / GiB


_DURATION_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | int | float) -> float:
    """'5m' -> 300.0 seconds; -1 (or '-1') means forever, returned as -1.0."""
    if isinstance(text, bool) or not isinstance(text, int | float | str):
        raise ValueError(f"expected a duration like '5m', '30s' or -1, got {text!r}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = _DURATION_RE.match(text)
        if match is None:
            raise ValueError(f"expected a duration like '5m', '30s', '1h' or -1, got {text!r}")
        value = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(value):
        # TOML's inf and nan (or hundreds of digits, which overflow to inf) pass the range check below, nan since
        # it compares false; strict JSON (/admin/ps) cannot hold either, and "never" is spelled -1.
        raise ValueError(f"a duration must be a finite number like '5m' or 300, or -1 for 'never unload'; got {text!r}")
    if value < 0 and value != -1:
        raise ValueError(f"a duration must be >= 0, or -1 for 'never unload'; got {text!r}")
    return value
