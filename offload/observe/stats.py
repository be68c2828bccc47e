"""Counters of one training step: what was kept, moved, dropped, and how long compute waited.

A step starts at the first `with hc:` forward after a backward once no forward is in flight
(Runtime.join_step) and ends where the next one starts; several forwards before one backward
are one step, and so are a pipeline schedule's micro-batches in flight together. Steps are numbered from 1. Unpack
hooks run on autograd's threads (Rule 8), so every update takes the lock.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..core.dtensor import storage
from .residency import Residency
from .timeline import Timeline
from ..transfer.backend import CopyEvent


@dataclass
class SegmentBytes:
    """Distinct storage bytes one segment handed to each action."""

    name: str
    kept: int = 0
    offloaded: int = 0
    recomputed: int = 0


@dataclass
class StepStats:
    """The runtime's own account of one step."""

    step: int = 1
    forwards: int = 0
    in_flight: int = 0  # the most of its forwards in flight at once (pipeline micro-batches)
    kept_bytes: int = 0
    offloaded_bytes: int = 0
    recomputed_bytes: int = 0
    fallback_count: int = 0  # offloads refused because the host pool was full
    fallback_bytes: int = 0
    budget_waits: int = 0  # Rule 10: lagging copies waited for (forward, prefetch) to hold the device budget
    budget_wait_s: float = 0.0
    skipped_param_bytes: int = 0  # parameter/buffer storages seen and never moved
    small_count: int = 0  # storages kept because they are below min_offload_bytes
    small_bytes: int = 0
    d2h_bytes: int = 0
    h2d_bytes: int = 0
    prefetch_hits: int = 0  # reloads issued ahead of backward
    prefetch_misses: int = 0  # reloads issued on demand at unpack
    replays: int = 0
    host_high_water: int = 0
    host_in_use: int = 0
    # saved-activation bytes on the device, measured (Residency): the peak, its kinds then, each
    # kind's own peak, and the curve (time.perf_counter(), bytes); filled in by Runtime.finish_step
    saved_peak_bytes: int = 0
    saved_peak_parts: dict[str, int] = field(default_factory=dict)
    saved_kind_peaks: dict[str, int] = field(default_factory=dict)
    saved_series: list[tuple[float, int]] = field(default_factory=list, repr=False, compare=False)
    segments: dict[int, SegmentBytes] = field(default_factory=dict)
    verify: object | None = None  # core.verify.VerifyLog in verify mode
    timeline: Timeline = field(default_factory=Timeline, repr=False, compare=False)
    residency: Residency | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_saved(self, segment: int, name: str, action: str, nbytes: int) -> None:
        with self._lock:
            seg = self.segments.get(segment)
            if seg is None:
                seg = self.segments[segment] = SegmentBytes(name)
            setattr(seg, action, getattr(seg, action) + nbytes)
            setattr(self, f"{action}_bytes", getattr(self, f"{action}_bytes") + nbytes)

    def add_budget_wait(self, copies: int, seconds: float) -> None:
        """The forward waited `seconds` for `copies` lagging copies (Rule 10)."""
        with self._lock:
            self.budget_waits += copies
            self.budget_wait_s += seconds

    def add_small(self, nbytes: int) -> None:
        """A storage kept because it is below min_offload_bytes."""
        with self._lock:
            self.small_count += 1
            self.small_bytes += nbytes

    def add_fallback(self, nbytes: int) -> None:
        with self._lock:
            self.fallback_count += 1
            self.fallback_bytes += nbytes

    def add_copy(self, event: CopyEvent) -> None:
        with self._lock:
            self.d2h_bytes += event.record.nbytes
        self.timeline.add_copy(event)

    def add_reload(self, event: CopyEvent, prefetch: bool, buf: torch.Tensor | None = None) -> None:
        """A reload was issued; `buf` (its device buffer) counts as resident until freed."""
        if buf is not None and self.residency is not None:
            self.residency.track(buf.untyped_storage(), "reloaded")
        with self._lock:
            self.h2d_bytes += event.record.nbytes
            if prefetch:
                self.prefetch_hits += 1
            else:
                self.prefetch_misses += 1
        self.timeline.add_copy(event)

    def add_wait(self, reached: object, event: CopyEvent) -> None:
        self.timeline.add_wait(reached, event)

    def add_replay(self, name: str, start: object, end: object, refilled: Sequence[torch.Tensor] = ()) -> None:
        """A region was replayed; the tensors it `refilled` count as resident until freed."""
        if self.residency is not None:
            for t in refilled:
                self.residency.track(storage(t), "recomputed")
        with self._lock:
            self.replays += 1
        self.timeline.add_compute("recompute", name, start, end)
