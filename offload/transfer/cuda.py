"""The CUDA transfer backend: one D2H and one H2D side stream, one event per copy.

Rule 2 (stream discipline), line by line:
  - the compute stream is read at call time with `torch.cuda.current_stream()`, never cached and
    never read inside a side-stream context (backward runs on autograd's device threads, whose
    current stream is the one the forward op ran on);
  - D2H: the side stream waits for the compute stream's queued work, copies into pinned blocks,
    records its event; `release(src, after)` holds the source until that event has completed, and
    `poll()` (every saved tensor, every reload) lets go of the finished ones in copy order. Not
    `record_stream`: the allocator would then hold the block until every copy queued on the side
    stream by the time the source dies had run, not just its own; and the saved-bytes count
    (Residency) would lose sight of a source whose tensor died before its copy ran;
  - H2D: the destination is allocated on the compute stream; the side stream waits for that point
    and for the tensor's D2H event, copies, records its event; the destination is recorded on the
    side stream too, so dropping a prefetched tensor that was never used cannot free it under the
    copy; the compute stream waits on that tensor's event alone before using it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Sequence

import torch

from .backend import CopyEvent, CopyRecord, TransferBackend, copy_chunks

log = logging.getLogger(__name__)


class CudaEvent(CopyEvent):
    """A copy on a CUDA side stream: its end event, timing events, and the stream it ran on."""

    __slots__ = ("end", "start", "stream", "record", "compute")

    def __init__(self, stream: torch.cuda.Stream, start: torch.cuda.Event, end: torch.cuda.Event,
                 record: CopyRecord, compute: torch.cuda.Stream | None = None):
        self.stream = stream
        self.compute = compute  # the stream a reload's destination was allocated on
        self.start = start
        self.end = end
        self.record = record


class CudaBackend(TransferBackend):
    """Side streams and events on one CUDA device."""

    name = "cuda"

    def __init__(self, device: torch.device | str | int | None = None, *, d2h_delay_cycles: int = 0,
                 h2d_delay_cycles: int = 0):
        """`*_delay_cycles`: spin the side stream this many GPU cycles before each copy
        (`torch.cuda._sleep`), to open race windows in tests."""
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"CudaBackend(device={device!r}): not a CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self._d2h: torch.cuda.Stream | None = None
        self._h2d: torch.cuda.Stream | None = None
        self._origin: torch.cuda.Event | None = None
        self._origin_host = time.perf_counter()
        self.order: list[tuple[str, str]] = []
        self._delay_cycles = {"d2h": d2h_delay_cycles, "h2d": h2d_delay_cycles}
        self._held: deque[tuple[torch.Tensor, CudaEvent]] = deque()  # released sources, copy order
        self._lock = threading.Lock()  # polled from the forward's thread and autograd's

    def _side(self, direction: str) -> torch.cuda.Stream:
        if self._d2h is None:
            self._d2h = torch.cuda.Stream(self.device)
            self._h2d = torch.cuda.Stream(self.device)
            # One synchronize, once: aligns the device clock with the host clock for the trace.
            torch.cuda.synchronize(self.device)
            self._origin = torch.cuda.Event(enable_timing=True)
            self._origin.record(torch.cuda.current_stream(self.device))
            self._origin_host = time.perf_counter()
            self._origin.synchronize()
        return self._d2h if direction == "d2h" else self._h2d

    def alloc_host(self, nbytes: int) -> torch.Tensor:
        # The host caching allocator rounds to powers of two; the pool asks for powers of two only.
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def d2h(self, src: torch.Tensor, dsts: Sequence[torch.Tensor], label: str = "") -> CopyEvent:
        stream = self._side("d2h")
        compute = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream.wait_stream(compute)  # the source is complete on the compute stream
        with torch.cuda.stream(stream):
            start.record(stream)
            self._spin("d2h")
            copy_chunks(src, dsts, to_chunks=True, non_blocking=True)
            end.record(stream)
        self.order.append(("d2h", label))
        return CudaEvent(stream, start, end, CopyRecord("d2h", src.numel(), label))

    def h2d(self, srcs: Sequence[torch.Tensor], nbytes: int, after: CopyEvent,
            label: str = "") -> tuple[torch.Tensor, CopyEvent]:
        self.poll()  # sources whose copies ran go back before this reload allocates
        stream = self._side("h2d")
        compute = torch.cuda.current_stream(self.device)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=self.device)  # on the compute stream
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream.wait_stream(compute)  # the destination's allocation point
        stream.wait_event(after.end)  # never read a host block before its D2H finished
        with torch.cuda.stream(stream):
            start.record(stream)
            self._spin("h2d")
            copy_chunks(dst, srcs, to_chunks=False, non_blocking=True)
            end.record(stream)
        dst.record_stream(stream)
        self.order.append(("h2d", label))
        return dst, CudaEvent(stream, start, end, CopyRecord("h2d", nbytes, label), compute)

    def _spin(self, direction: str) -> None:
        if self._delay_cycles[direction]:
            torch.cuda._sleep(self._delay_cycles[direction])

    def wait(self, event: CopyEvent, buf: torch.Tensor | None = None) -> torch.cuda.Event:
        compute = torch.cuda.current_stream(self.device)
        reached = torch.cuda.Event(enable_timing=True)
        reached.record(compute)
        compute.wait_event(event.end)  # this tensor's reload only, not the whole H2D stream
        if buf is not None and event.compute is not None and compute != event.compute:
            buf.record_stream(compute)  # used on a stream other than the one it was allocated on
        self.poll()
        return reached

    def query(self, event: CopyEvent) -> bool:
        return event.end.query()

    def synchronize(self, event: CopyEvent) -> None:
        event.end.synchronize()
        self.poll()

    def release(self, buf: torch.Tensor, after: CopyEvent | None) -> None:
        if after is not None and buf.is_cuda and not after.end.query():
            with self._lock:
                self._held.append((buf, after))

    def poll(self) -> None:
        if not self._held:  # unlocked peek: a release appended meanwhile is seen next time
            return
        with self._lock:  # check and pop as one step: two pollers must not pop a running copy's source
            held, done = self._held, []
            while held and held[0][1].end.query():  # one D2H stream: its copies finish in order
                done.append(held.popleft())
        del done  # the sources go here, outside the lock

    def mark(self) -> torch.cuda.Event:
        self._side("d2h")  # makes sure the origin exists
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def seconds(self, mark: torch.cuda.Event) -> float | None:
        if self._origin is None or not mark.query():
            return None
        return self._origin_host + self._origin.elapsed_time(mark) / 1e3

    def interval(self, event: CopyEvent) -> tuple[float, float] | None:
        start, end = self.seconds(event.start), self.seconds(event.end)
        return None if start is None or end is None else (start, end)

    def settle(self) -> None:
        torch.cuda.synchronize(self.device)
        self.poll()

    def close(self) -> None:
        with self._lock:
            held, self._held = self._held, deque()
        if held:  # every copy that reads them is on the D2H stream
            self._d2h.synchronize()

    def new_step(self) -> None:
        self.order.clear()
