"""The step timeline: compute, D2H and H2D intervals, and the waits of compute on reloads.

Marks are recorded cheaply during the step (host times on the emulation, CUDA events on a GPU)
and resolved only when a report is asked for. All times are `time.perf_counter()` seconds, the
clock the `Monitor` samples on, so NVML samples line up with our own intervals; traces convert
them to torch.profiler's clock (trace.py).

    overlap fraction = |transfer busy ∩ compute busy| / |transfer busy|
    compute busy     = forward ∪ backward ∪ recompute, less the time compute waited on reloads
    stall            = Σ over waits of max(0, end of that reload - when compute reached the wait)
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable

from ..transfer.backend import CopyEvent, TransferBackend

Interval = tuple[float, float]


@dataclass(frozen=True)
class Span:
    """A resolved interval on one track."""

    track: str  # "compute", "d2h" or "h2d"
    kind: str  # "forward", "backward", "recompute", "stall", "copy"
    label: str
    start: float
    end: float
    nbytes: int = 0


class Timeline:
    """Raw marks of one step, appended from the forward thread and autograd's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.compute: list[tuple[str, str, object, object]] = []  # (kind, label, start mark, end mark)
        self.region_backward: list[tuple[str, object]] = []  # (segment name, mark at its backward start)
        self.backward: list[list] = []  # [start mark, end mark or None]
        self.waits: list[tuple[object, CopyEvent]] = []
        self.copies: list[CopyEvent] = []
        self.tail_label = "(after regions)"  # the last forward segment: backward starts in it

    def add_compute(self, kind: str, label: str, start: object, end: object) -> None:
        with self._lock:
            self.compute.append((kind, label, start, end))

    def add_region_backward(self, label: str, mark: object) -> None:
        with self._lock:
            self.region_backward.append((label, mark))

    def open_backward(self, mark: object) -> list:
        with self._lock:
            entry = [mark, None]
            self.backward.append(entry)
            return entry

    def add_wait(self, mark: object, event: CopyEvent) -> None:
        with self._lock:
            self.waits.append((mark, event))

    def add_copy(self, event: CopyEvent) -> None:
        with self._lock:
            self.copies.append(event)

    def resolve(self, backend: TransferBackend) -> "ResolvedTimeline":
        """Turn marks into spans; unfinished ones are left out (call backend.settle() first)."""
        sec = backend.seconds
        with self._lock:
            compute, region_bwd = list(self.compute), list(self.region_backward)
            backward, waits, copies = [list(b) for b in self.backward], list(self.waits), list(self.copies)
        spans: list[Span] = []
        for kind, label, a, b in compute:
            s, e = sec(a), sec(b)
            if s is not None and e is not None:
                spans.append(Span("compute", kind, label, s, e))
        bwd = [(sec(a), sec(b) if b is not None else None) for a, b in backward]
        bwd = [(s, e) for s, e in bwd if s is not None and e is not None]
        starts = sorted((t, label) for label, m in region_bwd if (t := sec(m)) is not None)
        for s, e in bwd:  # each region's backward runs until the next region's starts
            inside = [(t, label) for t, label in starts if s <= t <= e]
            cuts = [s] + [t for t, _ in inside] + [e]
            labels = [self.tail_label] + [label for _, label in inside]
            for (a, b), label in zip(zip(cuts, cuts[1:]), labels):
                if b > a:
                    spans.append(Span("compute", "backward", label, a, b))
        for mark, ev in waits:
            reached, iv = sec(mark), backend.interval(ev)
            if reached is not None and iv is not None and iv[1] > reached:
                spans.append(Span("compute", "stall", ev.record.label, reached, iv[1]))
        for ev in copies:
            iv = backend.interval(ev)
            if iv is not None:
                spans.append(Span(ev.record.direction, "copy", ev.record.label, iv[0], iv[1], ev.record.nbytes))
        return ResolvedTimeline(sorted(spans, key=lambda sp: sp.start), bwd)


@dataclass
class ResolvedTimeline:
    spans: list[Span]
    backward: list[Interval] = field(default_factory=list)

    def of(self, track: str, kind: str | None = None) -> list[Span]:
        return [s for s in self.spans if s.track == track and (kind is None or s.kind == kind)]

    @property
    def bounds(self) -> Interval | None:
        if not self.spans:
            return None
        return min(s.start for s in self.spans), max(s.end for s in self.spans)

    def compute_busy(self) -> list[Interval]:
        work = union((s.start, s.end) for s in self.of("compute") if s.kind != "stall")
        return subtract(work, union((s.start, s.end) for s in self.of("compute", "stall")))

    def transfer_busy(self) -> list[Interval]:
        return union((s.start, s.end) for s in self.spans if s.track in ("d2h", "h2d"))

    def overlap_fraction(self) -> float | None:
        """Share of transfer time hidden under compute; None when nothing was copied."""
        transfer = self.transfer_busy()
        total = length(transfer)
        if total <= 0:
            return None
        return length(intersect(transfer, self.compute_busy())) / total

    def stall_s(self) -> float:
        return length(union((s.start, s.end) for s in self.of("compute", "stall")))

    def busy_s(self, track: str) -> float:
        return length(union((s.start, s.end) for s in self.of(track)))

    def bytes(self, track: str) -> int:
        return sum(s.nbytes for s in self.of(track))


def union(intervals: Iterable[Interval]) -> list[Interval]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def intersect(xs: list[Interval], ys: list[Interval]) -> list[Interval]:
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if b > a:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(xs: list[Interval], ys: list[Interval]) -> list[Interval]:
    out = []
    for a, b in xs:
        cur = a
        for c, d in ys:
            if d <= cur or c >= b:
                continue
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
        if cur < b:
            out.append((cur, b))
    return out


def length(xs: Iterable[Interval]) -> float:
    return sum(b - a for a, b in xs)
