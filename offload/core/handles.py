"""The packed objects autograd holds in place of saved tensors.

Rule 1 (lifetime lives in the handle): each handle owns what backward needs (a device
reference, a share of a host copy, or a recompute slot) and gives it back when autograd drops
it. Unpack is repeatable (retain_graph=True, a second read of `grad_fn._saved_*`); nothing is
freed on unpack. Handles that are never unpacked are freed with their graph. There is no global
tracker that must end empty.

Rule 5 (in-place safety): with saved-tensor hooks installed autograd skips its version-counter
check, so the handles do it: `tensor._version` is recorded at pack and compared at unpack.
"""
from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .errors import OffloadError
from ..observe.ranges import op_range

if TYPE_CHECKING:
    from ..transfer.hostpool import Block, HostPool
    from ..observe.stats import StepStats
    from ..transfer.backend import CopyEvent, TransferBackend


def _describe(t: torch.Tensor, where: str) -> str:
    return f"tensor of shape {tuple(t.shape)} and dtype {t.dtype} saved in {where}"


def check_version(t: torch.Tensor | None, saved_version: int, where: str) -> None:
    """Rule 5: raise if `t` was modified in place after it was saved."""
    if t is not None and t._version != saved_version:
        raise _modified(_describe(t, where), saved_version, t._version)


def _modified(what: str, saved_version: int, seen_version: int) -> OffloadError:
    return OffloadError(
        f"offload: a {what} was modified in place after it was saved for backward "
        f"(version {saved_version} at save, {seen_version} now). Backward would use the wrong "
        f"values. Clone it before modifying it (x = x.clone()), or use the out-of-place op.")


class KeepHandle:
    """The tensor stays on the device; the handle holds the reference autograd would hold."""

    __slots__ = ("tensor", "version", "where")

    def __init__(self, tensor: torch.Tensor, where: str):
        # Detached: same storage and version counter, but no reference to its grad_fn. A tensor
        # saved by the op that produced it would otherwise hold its own node through the handle,
        # a cycle through C++ that gc cannot see, and a graph never backpropagated would leak.
        self.tensor = tensor.detach()
        self.version = tensor._version
        self.where = where

    def unpack(self) -> torch.Tensor:
        check_version(self.tensor, self.version, self.where)
        return self.tensor


class HostCopy:
    """One device storage copied to pinned host blocks (Rule 4: one copy per storage).

    Shared by every handle that saved a view of the storage. Holds the D2H event, and once
    reloaded, the device copy and its H2D event. Returns its blocks to the pool when the last
    handle sharing it dies.

    Rule 5 across the copy: until the D2H has finished, a detached alias of the tensor (same
    version counter, no extra memory: the source cannot be reused before the copy anyway) tells
    whether an in-place op ran before the copy read the data; `settle()` records the version the
    copy saw and lets the alias go.
    """

    __slots__ = ("pool", "backend", "blocks", "nbytes", "d2h_event", "h2d_event", "device_bytes",
                 "copied_version", "stats", "label", "_alias", "_lock", "__weakref__")

    def __init__(self, pool: "HostPool", backend: "TransferBackend", blocks: list["Block"],
                 tensor: torch.Tensor, src: torch.Tensor, stats: "StepStats", label: str):
        # Set first: if anything below raises, __del__ still returns the blocks (Rule 9).
        self.pool = pool
        self.blocks = blocks
        self.d2h_event: CopyEvent | None = None
        self.h2d_event: CopyEvent | None = None
        self.backend = backend
        self.nbytes = src.numel()
        self.copied_version: int | None = None
        self.stats = stats
        self.label = label
        self._lock = threading.Lock()
        self.device_bytes: torch.Tensor | None = None
        self._alias: torch.Tensor | None = tensor.detach()
        with op_range("offload::d2h", src.is_cuda):
            self.d2h_event = backend.d2h(src, [b.view for b in blocks], label=label)
        stats.add_copy(self.d2h_event)
        backend.release(src, after=self.d2h_event)  # Rule 2: no reuse of the source before the copy

    def settle(self) -> bool:
        """True once the D2H has finished (recording the version it copied)."""
        with self._lock:
            if self._alias is None:
                return True
            if not self.backend.query(self.d2h_event):
                return False
            self.copied_version = self._alias._version
            self._alias = None
            return True

    def _seen_version(self, live: torch.Tensor | None) -> int | None:
        """The storage's version as far as we can still tell: the user's tensor if it lives, else
        the alias while the copy runs, else the version recorded when the copy was seen done."""
        if live is not None:
            return live._version
        with self._lock:
            return self._alias._version if self._alias is not None else self.copied_version

    def unchanged(self, live: torch.Tensor | None, version: int) -> bool:
        seen = self._seen_version(live)
        return seen is None or seen == version

    def check_unchanged(self, live: torch.Tensor | None, version: int, where: str) -> None:
        """Rule 5: raise if the storage was modified in place after it was saved (possibly
        before the copy to host read it)."""
        seen = self._seen_version(live)
        if seen is not None and seen != version:
            raise OffloadError(
                f"offload: a tensor saved in {where} was modified in place after it was saved for "
                f"backward (version {version} at save, {seen} later), possibly before its copy to host "
                f"read it. Backward would use the wrong values. Clone it before modifying it "
                f"(x = x.clone()), or use the out-of-place op.")

    def reload(self, prefetch: bool) -> tuple[torch.Tensor, "CopyEvent"]:
        """Issue the H2D copy unless it was issued already (idempotent, thread-safe)."""
        with self._lock:
            if self.device_bytes is None:
                with op_range("offload::h2d", self.backend.device.type == "cuda"):
                    self.device_bytes, self.h2d_event = self.backend.h2d(
                        [b.view for b in self.blocks], self.nbytes, after=self.d2h_event, label=self.label)
                self.stats.add_reload(self.h2d_event, prefetch=prefetch)
            return self.device_bytes, self.h2d_event

    def materialize(self) -> torch.Tensor:
        """The device copy, reloaded on demand if no prefetch asked for it; the compute stream
        waits only on this copy's event."""
        data, event = self.reload(prefetch=False)
        self.stats.add_wait(self.backend.wait(event, data), event)
        self.settle()  # the reload started after the D2H ended: the alias can go
        return data

    def __del__(self) -> None:
        try:
            self.pool.free(self.blocks, after=[self.d2h_event, self.h2d_event])
        except Exception:  # interpreter shutdown: the pool may be gone already
            pass


class OffloadHandle:
    """A view of an offloaded storage: the shared host copy plus the view's geometry."""

    __slots__ = ("copy", "dtype", "offset", "size", "stride", "version", "ref", "where", "device")

    def __init__(self, copy: HostCopy, t: torch.Tensor, where: str):
        self.copy = copy
        self.dtype = t.dtype
        self.offset = t.storage_offset()
        self.size = t.size()
        self.stride = t.stride()
        self.version = t._version
        self.ref = weakref.ref(t)  # only to check the version if the tensor still lives
        self.where = where
        self.device = t.device

    def unpack(self) -> torch.Tensor:
        self.copy.check_unchanged(self.ref(), self.version, self.where)
        data = self.copy.materialize()
        out = torch.empty(0, dtype=self.dtype, device=self.device)
        return out.set_(data.untyped_storage(), self.offset, self.size, self.stride)


class SlotHandle:
    """A tensor dropped for recompute: filled by its region's replay on first unpack.

    Once unpacked, the handle keeps only a weak reference to the storage, so the recomputed
    tensor dies with the node that used it (as torch.utils.checkpoint frees it), not when
    autograd releases the node's saved variables. Unpack stays repeatable (Rule 1): while the
    storage lives the same data comes back; after it died (retain_graph=True, a later read of
    grad_fn._saved_*) the region is replayed again.

    Rule 5: the version the tensor had at save is checked at unpack, against the tensor while it
    lives, else against the version its region saw when its forward ended (`changed`).
    """

    __slots__ = ("frame", "index", "value", "version", "ref", "changed", "pinned", "_used", "__weakref__")

    def __init__(self, frame, index: int, t: torch.Tensor):
        self.frame = frame
        self.index = index
        self.value: torch.Tensor | None = None
        self.version = t._version
        self.ref = weakref.ref(t)  # only to check the version while the tensor lives
        self.changed: int | None = None  # a later version seen by the region, if any
        self.pinned = False  # the forward's tensor is kept: its region cannot be replayed
        self._used: tuple | None = None  # (storage weak ref, dtype, offset, size, stride, device)

    def pin(self, t: torch.Tensor) -> None:
        """Keep the forward's own tensor: this region call will not be replayed."""
        self.value = t
        self.pinned = True

    def current(self) -> torch.Tensor | None:
        """The recomputed tensor if its storage is still alive, else None."""
        if self.value is not None:
            return self.value
        if self._used is None:
            return None
        ref, dtype, offset, size, stride, device = self._used
        storage = torch.UntypedStorage._new_with_weak_ptr(ref.cdata)
        if storage is None:
            return None
        return torch.empty(0, dtype=dtype, device=device).set_(storage, offset, size, stride)

    def _check_version(self) -> None:
        live = self.ref()
        if live is None and self.pinned:
            live = self.value
        seen = live._version if live is not None else self.changed
        if seen is not None and seen != self.version:
            shape, dtype = self.frame.meta[self.index][:2]
            raise _modified(f"tensor of shape {tuple(shape)} and dtype {dtype} saved in {self.frame.name}",
                            self.version, seen)

    def unpack(self) -> torch.Tensor:
        self._check_version()
        if self.pinned:
            return self.value
        value = self.current()
        if value is None:
            self.frame.replay()
            value = self.value
        if value is None:
            raise OffloadError(f"offload: recompute of {self.frame.name} did not produce saved tensor "
                               f"#{self.index}; this is a bug in offload")
        # Autograd wraps what we return in a new tensor, so a weak reference to `value` itself
        # would die at once; the storage lives as long as the node's use of it.
        self._used = (StorageWeakRef(value.untyped_storage()), value.dtype, value.storage_offset(),
                      value.size(), value.stride(), value.device)
        self.value = None
        return value


def unpack_hook(handle) -> torch.Tensor:
    """The unpack side of the saved-tensor hooks: every handle knows how to give its tensor back."""
    return handle.unpack()
