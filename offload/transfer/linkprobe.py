"""The host link as our own pool sees it: D2H and H2D bandwidth and the fixed cost of a copy.

Measured once per backend (pinned blocks from our pool, the same copy path the runtime uses),
each direction separately: on GH200-class links H2D runs ~2.4x faster than D2H.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from .hostpool import HostPool
from .backend import TransferBackend

log = logging.getLogger(__name__)

PROBE_BYTES = 8 << 20  # enough to reach full link speed; small next to any activation budget
SMALL_BYTES = 4 << 10


@dataclass(frozen=True)
class Link:
    """Measured bandwidth (bytes/s) per direction and per-copy fixed cost (seconds)."""

    d2h_bytes_per_s: float
    h2d_bytes_per_s: float
    latency_s: float

    def min_offload_bytes(self) -> int:
        """Below this a copy spends more time in fixed cost than moving bytes: twice the bytes
        the link moves in one latency, clamped to [64 KiB, 4 MiB]."""
        return int(min(4 << 20, max(64 << 10, 2 * self.latency_s * self.d2h_bytes_per_s)))


UNMEASURED = Link(d2h_bytes_per_s=1e9, h2d_bytes_per_s=1e9, latency_s=10e-6)  # placeholder, nothing moves


def measure_link(backend: TransferBackend, pool: HostPool, nbytes: int = PROBE_BYTES, repeats: int = 3,
                 device_budget: int | None = None) -> Link:
    """Time `repeats` copies of `nbytes` each way through `pool`; the best run of each counts.
    The probe holds two device buffers of `nbytes` at once, so it is capped at 1/16 of
    `device_budget`. Cached on the backend: later calls return the first measurement."""
    cached = getattr(backend, "measured_link", None)
    if cached is not None:
        return cached
    nbytes = min(nbytes, max(SMALL_BYTES, pool.budget // 2))
    if device_budget is not None:
        nbytes = max(SMALL_BYTES, min(nbytes, device_budget // 16))
    with torch.inference_mode(False):  # probe buffers the copies may write, whatever the caller's mode
        blocks = pool.alloc(nbytes)
        if blocks is None:  # a pool too small to probe cannot offload anything either
            log.info("host link not measured: the host pool (budget %d bytes) cannot hold a probe", pool.budget)
            return UNMEASURED
        events: list = []
        try:
            link = _probe(backend, [b.view for b in blocks], nbytes, repeats, events)
        finally:  # Rule 9: the blocks go back whatever failed; a failed copy has ended too
            for ev in events:
                with contextlib.suppress(Exception):
                    backend.synchronize(ev)
            pool.free(blocks, after=events)
    log.info("host link: D2H %.2f GB/s, H2D %.2f GB/s, %.1f us per copy",
             link.d2h_bytes_per_s / 1e9, link.h2d_bytes_per_s / 1e9, link.latency_s * 1e6)
    backend.measured_link = link
    return link


def _probe(backend: TransferBackend, views: list, nbytes: int, repeats: int, events: list) -> Link:
    src = torch.zeros(nbytes, dtype=torch.uint8, device=backend.device)
    d2h = _best(backend, lambda: backend.d2h(src, views, label="probe"), repeats, events)
    first = events[0]
    h2d = _best(backend, lambda: backend.h2d(views, nbytes, after=first, label="probe")[1], repeats, events)
    small = src[:SMALL_BYTES]
    lat = _best(backend, lambda: backend.d2h(small, [views[0][:SMALL_BYTES]], label="probe"), repeats, events)
    return Link(nbytes / d2h, nbytes / h2d, lat)


def _best(backend: TransferBackend, copy, repeats: int, events: list) -> float:
    best = float("inf")
    for _ in range(repeats):
        ev = copy()
        events.append(ev)
        backend.synchronize(ev)
        start, end = backend.interval(ev)
        best = min(best, max(end - start, 1e-9))
    return best
