"""CPU emulation of the CUDA transfer backend, for tests and machines without a GPU.

The "device" is the CPU. Each side stream is one worker thread (so copies on it run in order and
overlap the compute thread: torch copies release the GIL), an event is a future, and tests can
inject a delay (or a link speed) into every copy to open race windows.

On the CPU nothing is freed while a Python reference lives, so misuse that would corrupt data on
a GPU is made visible on purpose: a source released before its copy finished, or a host block
handed out again while a copy still touches it, is *poisoned* (filled with 0xFF bytes, NaN for
floating types). A test then fails exactly where a GPU would have produced wrong gradients.

A source released with `after=event` is held as CUDA's backend holds it: until that copy has
finished and the next `poll()` (every saved tensor, every copy issued or waited for) sees it, in
copy order. So its memory returns as soon as nothing reads it and the runtime looks, the same
moment on both backends; the free happens on the polling thread, the compute thread, where the
torch profiler (`PeakMemory` measures the emulated device with it) records it.
"""
from __future__ import annotations

import logging
import mmap
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from .backend import CopyEvent, CopyRecord, TransferBackend, copy_chunks

log = logging.getLogger(__name__)

Delay = Callable[[str, int], float]  # (direction, nbytes) -> seconds


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


class EmulatedEvent(CopyEvent):
    """A copy on an emulated side stream: a future plus its timestamps."""

    __slots__ = ("future", "record", "spans", "start_s", "end_s", "finished")

    def __init__(self, record: CopyRecord, spans: list[tuple[int, int]]):
        self.future: Future | None = None
        self.record = record
        self.spans = spans
        self.start_s: float | None = None
        self.end_s: float | None = None
        self.finished = False  # set by the copy's job, under the backend's lock


class EmulatedBackend(TransferBackend):
    """Worker threads stand in for CUDA side streams.

    `d2h_delay_s` / `h2d_delay_s` (seconds, or a callable `(direction, nbytes) -> seconds`) are
    slept before each copy; `bytes_per_s` adds nbytes / bytes_per_s to each copy to emulate a link.
    """

    name = "emulated"

    def __init__(self, *, d2h_delay_s: float | Delay = 0.0, h2d_delay_s: float | Delay = 0.0,
                 bytes_per_s: float | None = None):
        self.device = torch.device("cpu")
        self._delays = {"d2h": d2h_delay_s, "h2d": h2d_delay_s}
        self._bytes_per_s = bytes_per_s
        self._lock = threading.Lock()
        self._inflight: set[EmulatedEvent] = set()
        self._held: deque[tuple[torch.Tensor, EmulatedEvent]] = deque()  # released sources, copy order
        self._streams: dict[str, ThreadPoolExecutor] = {}
        self._mmaps: list[mmap.mmap] = []
        self.poisoned = 0  # buffers poisoned because they were released or reused too early
        self.order: list[tuple[str, str]] = []  # (direction, label) in issue order

    # -- host memory --------------------------------------------------------------------------
    def alloc_host(self, nbytes: int) -> torch.Tensor:
        # Anonymous mmap, not torch's CPU allocator: host blocks are a separate tier, invisible to
        # the profiler's memory events that stand in for device memory (DESIGN.md §6).
        buf = mmap.mmap(-1, max(nbytes, 1))
        self._mmaps.append(buf)
        return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)

    # -- copies ---------------------------------------------------------------------------------
    def d2h(self, src: torch.Tensor, dsts: Sequence[torch.Tensor], label: str = "") -> CopyEvent:
        self.poll()
        return self._submit("d2h", src, dsts, label, after=None)

    def h2d(self, srcs: Sequence[torch.Tensor], nbytes: int, after: CopyEvent,
            label: str = "") -> tuple[torch.Tensor, CopyEvent]:
        self.poll()
        dst = torch.empty(nbytes, dtype=torch.uint8)  # allocated on the compute thread
        return dst, self._submit("h2d", dst, srcs, label, after=after)

    def _submit(self, direction: str, flat: torch.Tensor, chunks: Sequence[torch.Tensor], label: str,
                after: CopyEvent | None) -> EmulatedEvent:
        """Queue a copy between `flat` (device side) and host `chunks` on the `direction` stream."""
        ev = EmulatedEvent(CopyRecord(direction, flat.numel(), label),
                           [_span(flat)] + [_span(c) for c in chunks])
        delay = self._delay(direction, flat.numel())
        # The job lets go of the buffers as soon as it has copied them: a source's lifetime is
        # the caller's and `release`'s business, not the stream's.
        box = [flat, list(chunks)]
        with self._lock:
            self._inflight.add(ev)
            self.order.append((direction, label))
        stream = self._stream(direction)

        def job() -> None:
            try:
                if after is not None:
                    after.future.result()  # Rule 2: a reload starts only after its D2H finished
                ev.start_s = time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                f, cs = box
                box.clear()
                copy_chunks(f, cs, to_chunks=direction == "d2h")
                del f, cs
                ev.end_s = time.perf_counter()
            finally:
                with self._lock:
                    self._inflight.discard(ev)
                    ev.finished = True

        ev.future = stream.submit(job)
        return ev

    def _delay(self, direction: str, nbytes: int) -> float:
        d = self._delays[direction]
        s = d(direction, nbytes) if callable(d) else float(d)
        if self._bytes_per_s:
            s += nbytes / self._bytes_per_s
        return s

    def _stream(self, direction: str) -> ThreadPoolExecutor:
        ex = self._streams.get(direction)
        if ex is None:
            ex = self._streams[direction] = ThreadPoolExecutor(1, thread_name_prefix=f"offload-{direction}")
        return ex

    # -- events ---------------------------------------------------------------------------------
    def wait(self, event: CopyEvent, buf: torch.Tensor | None = None) -> float:
        reached = time.perf_counter()
        event.future.result()  # the compute thread blocks: that is the emulated stall
        self.poll()
        return reached

    def query(self, event: CopyEvent) -> bool:
        return event.future.done()

    def synchronize(self, event: CopyEvent) -> None:
        event.future.result()
        self.poll()

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, mark: float) -> float:
        return mark

    def interval(self, event: CopyEvent) -> tuple[float, float] | None:
        if not event.future.done() or event.end_s is None:
            return None
        return event.start_s, event.end_s

    def settle(self) -> None:
        self.drain()

    def new_step(self) -> None:
        with self._lock:
            self.order.clear()

    # -- giving memory back ---------------------------------------------------------------------
    def release(self, buf: torch.Tensor, after: CopyEvent | None) -> None:
        with self._lock:
            running = after is not None and not after.finished
            if running:  # held until the copy is done and a poll sees it (Rule 2)
                self._held.append((buf, after))
        if not running:
            self._check_unused(buf, "released")

    def claim(self, buf: torch.Tensor) -> None:
        self._check_unused(buf, "reused")

    def poll(self) -> None:
        if not self._held:  # unlocked peek: a release appended meanwhile is seen next time
            return
        with self._lock:
            held, done = self._held, []
            while held and held[0][1].finished:  # one D2H stream: its copies finish in order
                done.append(held.popleft())
        del done  # the sources go here, on the polling thread

    def _check_unused(self, buf: torch.Tensor, what: str) -> None:
        lo, hi = _span(buf)
        with self._lock:
            busy = [e for e in self._inflight if any(a < hi and lo < b for a, b in e.spans)]
        if busy:
            self.poisoned += 1
            log.warning("emulated backend: buffer %s while a %s copy (%s) still used it; poisoning it",
                        what, busy[0].record.direction, busy[0].record.label)
            buf.view(torch.uint8).fill_(0xFF)

    def pending(self) -> int:
        """Copies submitted and not finished."""
        with self._lock:
            return len(self._inflight)

    def drain(self) -> None:
        """Wait for every queued copy, then let go of the sources it held (tests and shutdown)."""
        for ex in list(self._streams.values()):
            ex.submit(lambda: None).result()
        self.poll()

    def close(self) -> None:
        for ex in self._streams.values():
            ex.shutdown(wait=True)
        self._streams.clear()
        self.poll()
