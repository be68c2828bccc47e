"""A progress bar: tqdm when it is installed (the `bench` extra) and stderr is a terminal, else a
log line every quarter."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # tqdm is optional
    _tqdm = None


class Progress:
    """`with Progress(total, "timing") as p: ... p.advance("plain")`."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total = max(total, 1)
        self.desc = desc
        self.done = 0
        self._bar = None
        if enabled and _tqdm is not None and sys.stderr.isatty():
            self._bar = _tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
        self._enabled = enabled
        self._next_log = 0.25

    def advance(self, label: str = "") -> None:
        """One unit of work finished (`label`: what it was)."""
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
        elif self._enabled and self.done / self.total >= self._next_log:
            log.info("%s: %d/%d %s", self.desc, self.done, self.total, label)
            while self._next_log <= self.done / self.total:
                self._next_log += 0.25

    def describe(self, label: str) -> None:
        """Show what is running now (the bar only; no log line)."""
        if self._bar is not None:
            self._bar.set_postfix_str(label)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
