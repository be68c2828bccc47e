"""Sizes and durations as a report prints them: binary units for bytes, milliseconds for time."""
from __future__ import annotations


def fmt_bytes(n: float | None) -> str:
    """`1536` -> "1.5 KiB"; None -> "n/a"."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def fmt_ms(s: float | None) -> str:
    """Seconds as "12.34 ms"; None -> "n/a"."""
    return "n/a" if s is None else f"{s * 1e3:.2f} ms"


def fmt_error(measured: float | None, predicted: float | None) -> str:
    """How far `measured` is from `predicted`, in percent of the prediction ("+12%", "-3%")."""
    if measured is None or not predicted:
        return "n/a"
    return f"{(measured / predicted - 1) * 100:+.0f}%"
