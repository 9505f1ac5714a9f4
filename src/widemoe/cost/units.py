"""Units of the cost calculator: the error type, parsing of amounts on the command line, and the
formatting of counts, bytes and FLOPs in the tables.

Context lengths use k = 1024 (128k = 131072, as model cards call 131072 "128K"); token and GPU-hour
counts are decimal (14.8T = 14.8e12). Printed sizes in bytes are decimal (GB = 1e9).
"""

from __future__ import annotations

import math
import re


class CostError(ValueError):
    """Invalid input to the calculator (model spec, context, layout); the message names it."""

    exit_status = 2  # the values of `widemoe cost`'s flags: a usage error (widemoe.commands.errors)


_BINARY = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_DECIMAL = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def _parse(text: str | int | float, units: dict[str, float], what: str) -> float:
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?)\s*([a-zA-Z]?)\s*", str(text))
        if not m or m.group(2).lower() not in units:
            raise CostError(f"{what}={text!r} is not a number with an optional suffix "
                            f"({'/'.join(u for u in units if u)})")
        value = float(m.group(1)) * units[m.group(2).lower()]
    if not math.isfinite(value) or value < 0:
        raise CostError(f"{what}={text!r} must be a non-negative number")
    return value


def parse_context(text: str | int, what: str = "context") -> int:
    """Token positions: '128k' = 131072, '1M' = 1048576 (k = 1024, as model cards use)."""
    value = _parse(text, _BINARY, what)
    if value != int(value):
        raise CostError(f"{what}={text!r} must be a whole number of tokens")
    return int(value)


def parse_amount(text: str | int | float, what: str = "amount") -> float:
    """Decimal amounts: '14.8T' tokens = 14.8e12, '2.788M' GPU-hours = 2.788e6, '37B' = 37e9."""
    return _parse(text, _DECIMAL, what)


def fmt_count(x: float) -> str:
    """A count with a decimal suffix: 671.026B, 1.04T, 37.55M."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3f}{unit}" if unit in "TB" else f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def fmt_bytes(x: float) -> str:
    """Bytes in decimal units: 1.34 TB, 9.21 GB."""
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} B"


def fmt_flops(x: float) -> str:
    """Per-token FLOPs in GFLOP; totals (>= 1e15) in scientific notation."""
    return f"{x / 1e9:.2f} GFLOP" if x < 1e15 else f"{x:.3e} FLOP"


__all__ = ["CostError", "fmt_bytes", "fmt_count", "fmt_flops", "parse_amount", "parse_context"]
