"""Rule 10 (the device budget holds when copies lag): the forward waits for the oldest copies.

An offloaded tensor's device memory goes back once its D2H copy has run and the forward has let
go of it. A plan counts on the copies keeping pace at the link speed it measured; when the link
is slower (a PCIe link shared with other ranks, NCCL or another process; an emulated link on
loaded cores), sources pile up on the device and the saved bytes run past the budget the plan
was made under. So after each offload, while the measured saved bytes on the device
(`Residency`) exceed the limit and copies are still running, the forward waits for the oldest
one: time is traded for memory, and the report counts the waits. Backward does the same before
each reload it issues, whose bytes come on top of what lagging copies still hold.

Waiting frees only what finished copies free: a tensor the model still holds, or bytes kept on
the device, stay. The gate stops when no copy is running, so it never waits on nothing; and when
what the forward keeps exceeds the limit by itself, its caller (`ForwardPass._hold_budget`) does
not wait at all, and says so once.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from ..transfer.backend import CopyEvent, TransferBackend


class BudgetGate:
    """The D2H copies issued and not known to be finished, in issue order (one D2H stream).
    Asked from the forward's thread and from autograd's (reloads): the queue takes a lock."""

    def __init__(self, backend: TransferBackend):
        self.backend = backend
        self._running: deque[CopyEvent] = deque()
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        """Copies issued that were not yet seen to finish (a cheap test, no device query)."""
        return bool(self._running)

    def issued(self, event: CopyEvent) -> None:
        with self._lock:
            self._forget_finished()  # bounded by the copies still running
            self._running.append(event)

    def hold(self, resident: Callable[[], int], limit: int, extra: int = 0) -> tuple[int, float]:
        """Wait for the oldest copies while `resident()` bytes plus `extra` (about to be
        allocated) exceed `limit`; return how many copies were waited for and the seconds."""
        self.backend.poll()  # sources whose copies ran but were not yet let go
        start = time.perf_counter()
        waits = 0
        while resident() + extra > limit:
            oldest = self._oldest_running()
            if oldest is None:
                break
            self.backend.synchronize(oldest)  # returns with its source let go (backend contract)
            waits += 1
        return waits, (time.perf_counter() - start if waits else 0.0)

    def _oldest_running(self) -> CopyEvent | None:
        with self._lock:
            self._forget_finished()
            return self._running.popleft() if self._running else None

    def _forget_finished(self) -> None:
        running, query = self._running, self.backend.query
        while running and query(running[0]):  # one D2H stream: its copies finish in order
            running.popleft()
