"""Pinned host memory: slabs allocated once, sub-allocated in blocks, counted in exact bytes.

Rule 3 (exact host budget): one `pin_memory=True` allocation per tensor costs milliseconds,
synchronizes, and PyTorch's host cache rounds it up to a power of two (up to 2x over budget).
So the pool grows in power-of-two slabs (exact in that cache) while their sum stays within the
budget, and carves blocks out of them itself. A tensor larger than any free range is split over
several blocks. When the budget is spent, `alloc` returns None: the caller keeps or recomputes
the tensor instead and counts the fallback; nothing is lost and nothing goes over budget.

A freed block is reused only after the events of its last copies have completed (Rule 2).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from .backend import CopyEvent, TransferBackend

log = logging.getLogger(__name__)

ALIGN = 512  # bytes; every block starts and ends on this boundary
MIN_SLAB = 1 << 20


@dataclass(eq=False)
class Block:
    """A sub-range of one slab."""

    slab: int
    start: int
    nbytes: int  # aligned size, the bytes charged to the budget
    view: torch.Tensor  # uint8 view of the used bytes


class HostPool:
    """A budgeted pool of host memory for one backend.

    `budget` bytes at most are ever allocated from the system (the sum of slab sizes);
    `in_use` counts aligned bytes handed out; `high_water` is the most ever in use at once.
    """

    def __init__(self, backend: TransferBackend, budget: int, slab_bytes: int = 64 << 20):
        if budget < 0:
            raise ValueError(f"HostPool(budget={budget!r}): cannot be negative")
        if slab_bytes < MIN_SLAB or slab_bytes & (slab_bytes - 1):
            raise ValueError(f"HostPool(slab_bytes={slab_bytes!r}): must be a power of two >= {MIN_SLAB}")
        self.backend = backend
        self.budget = budget
        self.slab_bytes = slab_bytes
        self._slabs: list[torch.Tensor] = []
        self._free: list[list[tuple[int, int]]] = []  # per slab: sorted (start, size) free ranges
        self._pending: list[tuple[list[Block], list[CopyEvent]]] = []
        self._lock = threading.RLock()
        self.in_use = 0
        self.high_water = 0

    @property
    def reserved(self) -> int:
        """Bytes of host memory the pool holds from the system (its slabs)."""
        return sum(s.numel() for s in self._slabs)

    def reset_high_water(self) -> None:
        with self._lock:
            self.high_water = self.in_use

    def reserve(self, nbytes: int) -> None:
        """Grow slabs ahead of time (outside a step) until `nbytes` are reserved or the budget ends."""
        with self._lock:
            while self.reserved < min(nbytes, self.budget) and self._grow():
                pass

    def alloc(self, nbytes: int) -> list[Block] | None:
        """Blocks that together hold `nbytes`, or None if the budget cannot cover them."""
        need = _aligned(nbytes)
        with self._lock:
            self._reclaim()
            short = self._free_bytes() + self._growable() < need
            if short and self._free_bytes() + self._growable() + self._pending_bytes() >= need:
                self._wait_for(need)  # only when waiting for running copies can cover it
            if self._free_bytes() + self._growable() < need:
                return None
            while self._free_bytes() < need:
                if not self._grow():
                    return None  # this is a bug in offload: growable said otherwise
            blocks = self._take(need, nbytes)
            self.in_use += need
            self.high_water = max(self.high_water, self.in_use)
        for b in blocks:
            self.backend.claim(b.view)
        return blocks

    def free(self, blocks: Sequence[Block], after: Sequence[CopyEvent]) -> None:
        """Return `blocks`; they become reusable once every event in `after` has completed."""
        with self._lock:
            self.in_use -= sum(b.nbytes for b in blocks)
            self._pending.append((list(blocks), [e for e in after if e is not None]))

    # -- internals (hold the lock) ------------------------------------------------------------
    def _pending_bytes(self) -> int:
        return sum(b.nbytes for blocks, _ in self._pending for b in blocks)

    def _wait_for(self, need: int) -> None:
        """Wait for the oldest running copies, one freed allocation at a time, until `need` fits."""
        while self._pending and self._free_bytes() + self._growable() < need:
            blocks, events = self._pending.pop(0)
            for e in events:
                self.backend.synchronize(e)
            for b in blocks:
                self._insert_free(b.slab, b.start, b.nbytes)

    def _reclaim(self) -> None:
        """Blocks whose copies have all finished become free."""
        keep = []
        pending, self._pending = self._pending, []  # a free() from a finalizer may append meanwhile
        for blocks, events in pending:
            if all(self.backend.query(e) for e in events):
                for b in blocks:
                    self._insert_free(b.slab, b.start, b.nbytes)
            else:
                keep.append((blocks, events))
        self._pending.extend(keep)

    def _free_bytes(self) -> int:
        return sum(size for ranges in self._free for _, size in ranges)

    def _growable(self) -> int:
        """Bytes `_grow` can still add: power-of-two slabs that fit in the remaining budget."""
        room, total, size = self.budget - self.reserved, 0, self.slab_bytes
        while True:
            while size > room:
                size //= 2
            if size < MIN_SLAB:
                return total
            total += size
            room -= size

    def _grow(self) -> bool:
        room = self.budget - self.reserved
        size = self.slab_bytes
        while size > room:
            size //= 2
        if size < MIN_SLAB:
            return False
        with torch.inference_mode(False):  # Rule 9: a slab grown under inference_mode takes copies later
            self._slabs.append(self.backend.alloc_host(size))
        self._free.append([(0, size)])
        log.debug("host pool: new slab of %d bytes (%d reserved of %d)", size, self.reserved, self.budget)
        return True

    def _take(self, need: int, nbytes: int) -> list[Block]:
        """First fit over free ranges in address order; split across ranges if needed."""
        blocks: list[Block] = []
        remaining_need, remaining_bytes = need, nbytes
        # prefer a single range that fits whole, to keep most tensors in one block
        for slab, ranges in enumerate(self._free):
            for i, (start, size) in enumerate(ranges):
                if size >= need:
                    self._cut(slab, i, need)
                    return [Block(slab, start, need, self._slabs[slab][start:start + nbytes])]
        for slab, ranges in enumerate(self._free):
            while ranges and remaining_need > 0:
                start, size = ranges[0]
                take = min(size, remaining_need)
                self._cut(slab, 0, take)
                used = min(take, remaining_bytes)
                blocks.append(Block(slab, start, take, self._slabs[slab][start:start + used]))
                remaining_need -= take
                remaining_bytes -= used
            if remaining_need <= 0:
                break
        return blocks

    def _cut(self, slab: int, i: int, take: int) -> None:
        start, size = self._free[slab][i]
        if take == size:
            del self._free[slab][i]
        else:
            self._free[slab][i] = (start + take, size - take)

    def _insert_free(self, slab: int, start: int, size: int) -> None:
        ranges = self._free[slab]
        ranges.append((start, size))
        ranges.sort()
        merged: list[tuple[int, int]] = []
        for s, n in ranges:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self._free[slab] = merged


def _aligned(nbytes: int) -> int:
    return max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
