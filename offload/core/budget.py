"""Parsing user budgets ("12GiB", "512MB", "40%", ints) into bytes, once, at the boundary."""
from __future__ import annotations

import os
import re
from typing import Callable, Union

Budget = Union[int, str, None]

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")


def parse_budget(field: str, value: Budget, available: Callable[[], int]) -> int | None:
    """Return `value` as a byte count, or None when `value` is None.

    `available()` gives the byte count a percentage refers to; it is called only for "N%".
    Raises ValueError naming `field` and `value` for anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{field}={value!r}: expected bytes as an int or a string like '12GiB', '512MB' or '40%'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{field}={value!r}: a budget cannot be negative")
        return value
    if isinstance(value, float):
        raise ValueError(f"{field}={value!r}: give bytes as an int, or a string like '12GiB' or '40%'")
    if not isinstance(value, str):
        raise ValueError(f"{field}={value!r}: expected an int or a string like '12GiB', '512MB' or '40%', "
                         f"got {type(value).__name__}")
    m = _PERCENT.match(value)
    if m:
        pct = float(m.group(1))
        if pct > 100:
            raise ValueError(f"{field}={value!r}: a percentage must be between 0% and 100%")
        return int(available() * pct / 100)
    m = _SIZE.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{field}={value!r}: not a size; use an int of bytes or a string like "
                         f"'12GiB', '512MB', '40%'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def local_world_size() -> int:
    """Ranks sharing this host (torchrun sets LOCAL_WORLD_SIZE); 1 outside a launcher."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1
