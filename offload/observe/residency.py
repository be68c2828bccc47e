"""`Residency`: the saved-activation bytes on the device the runtime answers for, measured.

Every storage the runtime takes on is followed until it is freed: a kept one (its handle holds
it), the source of an offload while the copy runs (the copy holds it until it has read it), a
reloaded buffer, a recomputed tensor. A weak reference with a callback on the storage fires when
the storage itself is freed (PyTorch keeps a storage's Python object alive exactly as long as
the storage), so the figure is what was resident, not what a plan said would be:

    resident = kept + in flight (D2H not done, or source still alive) + reloaded + recomputed

counted once per storage, from the moment the runtime takes it on. A step's count starts at the
step's first forward; storages of an earlier step still alive then (a graph the user kept) are no
longer counted. Frees run on whatever thread drops the last reference (autograd's, Rule 8), and a
free can run inside an update on the same thread (a garbage collection): updates take a
re-entrant lock and touch only plain integers.
"""
from __future__ import annotations

import threading
import time
import weakref

import torch

KINDS = ("kept", "in_flight", "reloaded", "recomputed")
MAX_POINTS = 1 << 16  # the curve of one step; past it, neighbouring points merge (the peak stays exact)


class _Entry(weakref.ref):
    """A weak reference to a counted storage that carries what its free must take off."""

    __slots__ = ("key", "nbytes", "kind")


class Residency:
    """Device bytes of saved activations per kind, their peak in the step, and their curve."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._live: dict[int, _Entry] = {}  # storage address -> its entry
        self._on_free = self._freed  # one bound method for every entry's callback
        self.bytes = dict.fromkeys(KINDS, 0)
        self.total = 0
        self.peak = 0
        self.peak_parts = dict(self.bytes)  # the kinds at the moment of the peak
        self.kind_peaks = dict(self.bytes)  # each kind's own peak
        self.series: list[tuple[float, int]] = []  # (time.perf_counter(), total) after each change

    def start_step(self) -> list[tuple[float, int]]:
        """Forget what earlier steps left alive; a new curve (returned) starts at zero."""
        with self._lock:
            self._live = {}  # the weak references go with it: their callbacks never fire
            self.bytes = dict.fromkeys(KINDS, 0)
            self.total = self.peak = 0
            self.peak_parts = dict(self.bytes)
            self.kind_peaks = dict(self.bytes)
            self.series = [(time.perf_counter(), 0)]
            return self.series

    def track(self, storage: torch.UntypedStorage, kind: str) -> None:
        """Count `storage` under `kind` until it is freed (a storage counts once)."""
        key = storage._cdata
        if key in self._live:  # unlocked peek: the common case, a storage saved again
            return
        with self._lock:
            if key in self._live:
                return
            entry = _Entry(storage, self._on_free)
            entry.key, entry.nbytes, entry.kind = key, storage.nbytes(), kind
            self._live[key] = entry
            self._change(kind, entry.nbytes)

    def _freed(self, entry: _Entry) -> None:
        with self._lock:
            if self._live.get(entry.key) is not entry:  # forgotten at a step start
                return
            del self._live[entry.key]
            self._change(entry.kind, -entry.nbytes)

    def _change(self, kind: str, delta: int) -> None:
        self.bytes[kind] += delta
        self.total += delta
        if self.bytes[kind] > self.kind_peaks[kind]:
            self.kind_peaks[kind] = self.bytes[kind]
        if self.total > self.peak:
            self.peak = self.total
            self.peak_parts = dict(self.bytes)
        series = self.series
        series.append((time.perf_counter(), self.total))
        if len(series) > MAX_POINTS:
            series[:] = _merge_pairs(series)


def _merge_pairs(points: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """Halve a curve: each pair of neighbours becomes its higher point."""
    out = [max(points[i], points[i + 1], key=lambda p: p[1]) for i in range(0, len(points) - 1, 2)]
    if len(points) % 2:
        out.append(points[-1])
    return out
