"""Parsing and printing of the budgets users type: latencies ("40ms", "1.5s") and sizes ("2MB", "512KiB")."""

from __future__ import annotations

import re

from sti.errors import STIError

_TIME = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
_SIZE = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_latency(text: str | float) -> float:
    """'40ms' -> 0.04 (seconds). A bare number is milliseconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(us|µs|ms|s)?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise STIError(f"cannot read latency {text!r}", "write a positive time such as 40ms, 0.5s or 800us")
    return float(m.group(1)) * _TIME[m.group(2) or "ms"]


def parse_bytes(text: str | int) -> int:
    """'2MB' -> 2_000_000, '2MiB' -> 2_097_152. A bare number is bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b|b)?\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise STIError(f"cannot read size {text!r}", "write a positive size such as 2MB, 512KiB or 4500000")
    return int(round(float(m.group(1)) * _SIZE[m.group(2) or "b"]))


def fmt_bytes(n: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.2f} {unit}"
    return f"{int(n)} B"


def fmt_time(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 10 else f"{t:.1f} s"
