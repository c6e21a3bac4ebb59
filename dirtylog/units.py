"""Human units on the command line and in the API: sizes (``512M``, ``4G``) and durations (``100ms``, ``5s``)."""

from __future__ import annotations

import re

from dirtylog.errors import DirtylogError

PAGE_SIZE = 4096

_SIZE_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_DURATION_SUFFIX = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(us|ms|s|min|m|h)?\s*$", re.IGNORECASE)


class UnitError(DirtylogError, ValueError):
    """A size or duration that could not be understood."""


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: a plain number of bytes or a number with K, M, G or T (powers of 1024)."""
    if isinstance(text, int):
        if text < 0:
            raise UnitError(f"size {text} is negative; give a positive number of bytes")
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise UnitError(f"size {text!r} is not understood; write bytes or a number with K, M, G or T, e.g. 512M or 4G")
    number, suffix = match.groups()
    value = float(number) * _SIZE_SUFFIX[suffix.upper()]
    if value < 0:
        raise UnitError(f"size {text!r} is negative; give a positive size, e.g. 512M")
    if value != int(value):
        raise UnitError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def parse_duration(text: str | float) -> float:
    """Seconds in ``text``: a plain number of seconds or a number with us, ms, s, m or h."""
    if isinstance(text, int | float):
        if text < 0:
            raise UnitError(f"duration {text} is negative")
        return float(text)
    match = _DURATION_RE.match(text)
    if not match:
        raise UnitError(f"duration {text!r} is not understood; write e.g. 100ms, 5s or 2m")
    number, suffix = match.groups()
    seconds = float(number) * _DURATION_SUFFIX[(suffix or "s").lower()]
    if seconds < 0:
        raise UnitError(f"duration {text!r} is negative; give a positive duration, e.g. 100ms")
    return seconds


def parse_rate(text: str | int) -> int:
    """Bytes per second in ``text``: a size, optionally followed by ``/s`` (``1G``, ``500M/s``)."""
    if isinstance(text, str) and text.lower().endswith("/s"):
        text = text[:-2]
    return parse_size(text)


def format_size(nbytes: float) -> str:
    """``nbytes`` for people: 1.5 GiB, 12.0 MiB, 512 B."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``seconds`` for people: 850 us, 12.3 ms, 4.20 s."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"
