"""Parsing user budgets ("12GiB", "512MB", "40%", ints) into bytes, once, at the boundary.

Plain Python, shared by the runtime (`HybridCheckpointer(device_budget=...)`) and the
scheduler's command lines (`whatif --host-budget 64GiB`), so both read a budget alike."""
from __future__ import annotations

import re
from typing import Callable, Union

Budget = Union[int, str, None]

_UNITS = {  # keys lower-cased; a unit written with a final lower-case "b" (bits) is refused first
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_FORMS = "an int of bytes or a string like '12GiB', '512MB' or '40%'"
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")


def parse_budget(field: str, value: Budget, available: Callable[[], int]) -> int | None:
    """Return `value` as a byte count, or None when `value` is None.

    `available()` gives the byte count a percentage refers to; it is called only for "N%".
    Units: B, kB/MB/GB/TB (powers of 10), KiB/MiB/GiB/TiB or K/M/G/T (powers of 2); the prefix
    may be in either case, but the "B" must be upper-case ("Gb" is gigabits). Raises ValueError
    naming `field` and `value` for anything else, and for a budget of 0 bytes.
    """
    if value is None:
        return None
    nbytes = _bytes(field, value, available)
    if nbytes == 0:
        raise ValueError(f"{field}={value!r}: a budget of 0 bytes leaves nothing to hold activations "
                         f"(every offload would fall back); give a positive size, or None for the default. "
                         f"To offload nothing, use policy='keep' or 'recompute'")
    return nbytes


def _bytes(field: str, value: Budget, available: Callable[[], int]) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{field}={value!r}: expected {_FORMS}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{field}={value!r}: a budget cannot be negative")
        return value
    if isinstance(value, float):
        raise ValueError(f"{field}={value!r}: give bytes as an int, or a string like '12GiB' or '40%'")
    if not isinstance(value, str):
        raise ValueError(f"{field}={value!r}: expected {_FORMS}, got {type(value).__name__}")
    m = _PERCENT.match(value)
    if m:
        pct = float(m.group(1))
        if pct > 100:
            raise ValueError(f"{field}={value!r}: a percentage must be between 0% and 100%")
        return int(available() * pct / 100)
    m = _SIZE.match(value)
    if m and m.group(2).endswith("b"):
        number, letter = m.group(1), m.group(2)[:1].upper()
        fix = (f"'{number}{letter}B' (powers of 10) or '{number}{letter}iB' (powers of 2)" if letter != "B"
               else f"'{number}B'")
        raise ValueError(f"{field}={value!r}: a lower-case 'b' means bits; write bytes with an upper-case "
                         f"'B', e.g. {fix}")
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{field}={value!r}: not a size; use {_FORMS}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
