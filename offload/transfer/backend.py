"""The transfer backend contract: how bytes move between the device and pinned host memory.

Two backends implement it: `CudaBackend` (side streams and events, offload/transfer/cuda.py) and
`EmulatedBackend` (worker threads and futures on the CPU, offload/transfer/emulated.py). Everything above
this layer (host pool, handles, prefetch, recompute) is written once against it.

Rule 2 (stream discipline) lives in the backends; the handles only follow the protocol below:
  1. `d2h(src, dsts)` copies after all work queued so far on the compute stream; it returns the
     copy's event. The caller then hands `src` back with `release(src, after=event)`, which keeps
     the source from being reused before the copy finished and no longer: once the copy is done
     (CUDA: and the next `poll()` saw it) the source's memory goes back as soon as the user's
     tensor dies. Once `synchronize(event)` returns, the backend no longer holds that source.
  2. `h2d(srcs, nbytes, after=d2h_event)` allocates the destination on the compute stream, waits
     for the D2H event (a reload never reads a half-written block) and copies; it returns the
     destination and the reload's event.
  3. `wait(event)` makes the compute stream wait for that one event before the data is used.
  4. A host block is reused only after `query()` says its last copy finished; `claim(block)` is
     called when the pool hands a block out again (the emulation poisons it if a copy still
     touches it, so a premature reuse corrupts results visibly instead of silently).
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class CopyRecord:
    """One copy as the backend saw it, for the timeline."""

    direction: str  # "d2h" or "h2d"
    nbytes: int
    label: str
    issued_s: float = field(default_factory=time.perf_counter)  # host time the copy was queued


def copy_chunks(flat: torch.Tensor, chunks: Sequence[torch.Tensor], *, to_chunks: bool,
                non_blocking: bool = False) -> None:
    """Copy between one flat uint8 buffer and host blocks holding consecutive pieces of it:
    `flat` -> `chunks` (D2H) when `to_chunks`, else `chunks` -> `flat` (H2D)."""
    off = 0
    for c in chunks:
        n = c.numel()
        piece = flat[off:off + n]
        if to_chunks:
            c.copy_(piece, non_blocking=non_blocking)
        else:
            piece.copy_(c, non_blocking=non_blocking)
        off += n


class CopyEvent(abc.ABC):
    """Completion of one copy on a side stream."""

    record: CopyRecord


class TransferBackend(abc.ABC):
    """Moves flat uint8 buffers between the compute device and host memory."""

    name: str
    device: torch.device
    #: copies below this many bytes cost more in fixed overhead than they move
    default_min_offload_bytes: int = 512 * 1024

    @abc.abstractmethod
    def alloc_host(self, nbytes: int) -> torch.Tensor:
        """A uint8 host buffer of exactly `nbytes` (pinned on CUDA), allocated outside any step."""

    @abc.abstractmethod
    def d2h(self, src: torch.Tensor, dsts: Sequence[torch.Tensor], label: str = "") -> CopyEvent:
        """Copy flat uint8 `src` into the host blocks `dsts` (in order), after queued compute."""

    @abc.abstractmethod
    def h2d(self, srcs: Sequence[torch.Tensor], nbytes: int, after: CopyEvent,
            label: str = "") -> tuple[torch.Tensor, CopyEvent]:
        """Allocate `nbytes` on the device and copy the host blocks `srcs` into it after `after`."""

    @abc.abstractmethod
    def wait(self, event: CopyEvent, buf: torch.Tensor | None = None) -> object:
        """Make the compute stream wait for `event` before `buf` (the reloaded buffer) is used;
        return a mark of when compute reached the wait (the stall is max(0, copy end - mark))."""

    @abc.abstractmethod
    def query(self, event: CopyEvent) -> bool:
        """True once the copy has finished."""

    @abc.abstractmethod
    def synchronize(self, event: CopyEvent) -> None:
        """Block the calling thread until the copy has finished."""

    @abc.abstractmethod
    def release(self, buf: torch.Tensor, after: CopyEvent | None) -> None:
        """The runtime is done with `buf`; it may be reused once `after` has finished."""

    def claim(self, buf: torch.Tensor) -> None:
        """The host pool is handing `buf` out again (a hook for the emulation's poison check)."""

    def poll(self) -> None:
        """Finish deferred bookkeeping on the calling (compute) thread."""

    def new_step(self) -> None:
        """The runtime starts a new step: per-step bookkeeping (the issue order) starts over."""

    @abc.abstractmethod
    def mark(self) -> object:
        """A timestamp on the compute stream, now (a host time, or a CUDA event)."""

    @abc.abstractmethod
    def seconds(self, mark: object) -> float | None:
        """A mark as `time.perf_counter()` seconds, or None if it cannot be resolved yet."""

    @abc.abstractmethod
    def interval(self, event: CopyEvent) -> tuple[float, float] | None:
        """When a finished copy ran, in `time.perf_counter()` seconds; None if not finished."""

    def settle(self) -> None:
        """Wait until every queued copy and compute mark has completed (for reports, tests)."""

    def close(self) -> None:
        """Stop worker threads; the backend is unusable afterwards."""
