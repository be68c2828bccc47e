"""The packed objects autograd holds in place of saved tensors.

Rule 1 (lifetime lives in the handle): each handle owns what backward needs (a device
reference, a share of a host copy, or a recompute slot) and gives it back when autograd drops
it. Unpack is repeatable (retain_graph=True, a second read of `grad_fn._saved_*`); nothing is
freed on unpack. Handles that are never unpacked are freed with their graph. There is no global
tracker that must end empty.

Rule 5 (in-place safety): with saved-tensor hooks installed autograd skips its version-counter
check, so the handles do it: `tensor._version` is recorded at pack and compared at unpack, on
a tensor that shares the saved one's version counter (itself, or a storage-less witness).

Every handle also holds its forward's graph token (`owner`): the runtime holds the tokens
weakly, so a forward whose handles all died (a graph never backpropagated) is known to be over.

Identity: plain PyTorch gives a saved tensor that needs no grad back as the very object saved
(`ctx.saved_tensors[0] is mask`); for one that needs grad, autograd wraps whatever a hook returns
in a new tensor, so identity is not observable there. Each handle gives the same object back
wherever it honestly can: kept, always (it holds it); offloaded, while that object still lives
(its memory is on the device anyway) and else a tensor rebuilt from the host copy, the same one
again on a second read while the first lives; recomputed, the forward's object while it lives (a
region input the frame holds, a mask the caller holds) and else the replay's, likewise.
"""
from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .dtensor import data_of, local_shard, rebuild, spec_of, storage
from .errors import OffloadError
from ..observe.ranges import op_range

if TYPE_CHECKING:
    from ..transfer.hostpool import Block, HostPool
    from ..observe.stats import StepStats
    from ..transfer.backend import CopyEvent, TransferBackend


def _modified(what: str, where: str, saved: int, now: int) -> OffloadError:
    return OffloadError(
        f"offload: a {what} saved in {where} was modified in place after it was saved for backward "
        f"(version {saved} at save, {now} now). Backward would use the wrong values. Clone it "
        f"before modifying it (x = x.clone()), or use the out-of-place op.")


def check_version(t: torch.Tensor | None, saved_version: int, where: str) -> None:
    """Rule 5: raise if `t` was modified in place after it was saved."""
    if t is not None and t._version != saved_version:
        raise _modified(f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}", where, saved_version, t._version)


def version_witness(t: torch.Tensor) -> torch.Tensor:
    """A tensor that shares `t`'s version counter and none of its storage.

    Rule 5 for as long as the storage lives: every view of a storage's base (and every detach()
    of one) bumps one shared counter, so this sees each in-place change PyTorch's own check
    would see, after the copy finished and after the saved view object died, while holding no
    device memory (a detached alias would hold the whole storage)."""
    w = t.detach()
    if local_shard(w) is not None:  # a DTensor: its own counter, an empty shard
        w._local_tensor = w._local_tensor.new_empty(0)
        return w
    version = w._version
    w.set_()  # an in-place op: it bumps the shared counter, which is put back at once
    torch._C._autograd._unsafe_set_version_counter((w,), (version,))
    return w


class ViewMeta:
    """Where a tensor sits on its storage, with its math bits (conj, neg): what rebuilds the same
    tensor on another copy of that storage. A DTensor: its local shard's, plus its spec."""

    __slots__ = ("dtype", "offset", "size", "stride", "conj", "neg", "device", "spec")

    def __init__(self, t: torch.Tensor):
        shard = data_of(t)
        self.dtype = shard.dtype
        self.offset = shard.storage_offset()
        self.size = shard.size()
        self.stride = shard.stride()
        self.conj = shard.is_conj()
        self.neg = shard.is_neg()
        self.device = shard.device
        self.spec = spec_of(t)

    def on(self, storage: torch.UntypedStorage) -> torch.Tensor:
        out = torch.empty(0, dtype=self.dtype, device=self.device).set_(storage, self.offset, self.size, self.stride)
        if self.conj:
            torch._C._set_conj(out, True)
        if self.neg:
            torch._C._set_neg(out, True)
        return rebuild(out, self.spec)

    def describe(self) -> str:
        return f"tensor of shape {tuple(self.size)} and dtype {self.dtype}"


class KeepHandle:
    """The tensor stays on the device; the handle holds the reference autograd would hold."""

    __slots__ = ("tensor", "version", "where", "owner")

    def __init__(self, tensor: torch.Tensor, where: str, owner: object):
        # Detached when it needs grad: same storage and version counter, but no reference to its
        # grad_fn. A tensor saved by the op that produced it would otherwise hold its own node
        # through the handle, a cycle through C++ that gc cannot see, and a graph never
        # backpropagated would leak. One that needs no grad has no grad_fn to hold, and is held
        # as itself, as autograd holds it (identity, module docstring).
        self.tensor = tensor.detach() if tensor.requires_grad else tensor
        self.version = tensor._version
        self.where = where
        self.owner = owner  # the forward's graph token: alive while any of its handles is

    def unpack(self) -> torch.Tensor:
        check_version(self.tensor, self.version, self.where)
        return self.tensor


class HostCopy:
    """One device storage copied to pinned host blocks (Rule 4: one copy per storage).

    Shared by every handle that saved a view of the storage. Holds the D2H event, and once
    reloaded, the device copy and its H2D event. Returns its blocks to the pool when the last
    handle sharing it dies, after the D2H and any reload that reads them (Rule 2).

    It holds no reference to the source: the backend keeps the source alive until the D2H
    finished (`release`) and lets it go then, so an offloaded tensor the forward dropped frees
    its device memory as soon as it has been copied. Rule 5 lives in each handle's witness.
    """

    __slots__ = ("pool", "backend", "blocks", "nbytes", "d2h_event", "h2d_event", "device_bytes",
                 "stats", "label", "_lock", "__weakref__")

    def __init__(self, pool: "HostPool", backend: "TransferBackend", blocks: list["Block"],
                 src: torch.Tensor, stats: "StepStats", label: str):
        # Set first: if anything below raises, __del__ still returns the blocks (Rule 9).
        self.pool = pool
        self.blocks = blocks
        self.d2h_event: CopyEvent | None = None
        self.h2d_event: CopyEvent | None = None
        self.backend = backend
        self.nbytes = src.numel()
        self.stats = stats
        self.label = label
        self._lock = threading.Lock()
        self.device_bytes: torch.Tensor | None = None
        with op_range("offload::d2h", src.is_cuda):
            self.d2h_event = backend.d2h(src, [b.view for b in blocks], label=label)
        stats.add_copy(self.d2h_event)
        backend.release(src, after=self.d2h_event)  # Rule 2: no reuse of the source before the copy

    @staticmethod
    def unchanged(live: torch.Tensor | None, version: int) -> bool:
        """Whether a handle's witness (`live`) still has the version recorded at save."""
        return live is None or live._version == version

    def reload(self, prefetch: bool) -> tuple[torch.Tensor, "CopyEvent"]:
        """Issue the H2D copy unless it was issued already (idempotent, thread-safe)."""
        with self._lock:
            if self.device_bytes is None:
                with op_range("offload::h2d", self.backend.device.type == "cuda"):
                    self.device_bytes, self.h2d_event = self.backend.h2d(
                        [b.view for b in self.blocks], self.nbytes, after=self.d2h_event, label=self.label)
                self.stats.add_reload(self.h2d_event, prefetch=prefetch, buf=self.device_bytes)
            return self.device_bytes, self.h2d_event

    def materialize(self) -> torch.Tensor:
        """The device copy, reloaded on demand if no prefetch asked for it; the compute stream
        waits only on this copy's event."""
        data, event = self.reload(prefetch=False)
        self.stats.add_wait(self.backend.wait(event, data), event)
        return data

    def __del__(self) -> None:
        try:
            self.pool.free(self.blocks, after=[self.d2h_event, self.h2d_event])
        except Exception:  # interpreter shutdown: the pool may be gone already
            pass


class OffloadHandle:
    """A view of an offloaded storage: the shared host copy plus the view's own metadata.

    Rule 5: `witness` shares the saved tensor's version counter (and no memory), so an in-place
    change is seen whenever it happened: before the D2H read the storage, after it, or after
    the saved view object itself died while another view of its base lives on."""

    __slots__ = ("copy", "view", "version", "witness", "where", "owner", "same")

    def __init__(self, copy: HostCopy, t: torch.Tensor, where: str, owner: object):
        self.copy = copy
        self.view = ViewMeta(t)
        self.version = t._version
        self.witness = version_witness(t)
        self.where = where
        self.owner = owner  # the forward's graph token: alive while any of its handles is
        self.same: weakref.ref | None = None  # the object to give back while it lives (identity)

    def give_back_as(self, t: torch.Tensor) -> "OffloadHandle":
        """Give back `t` itself while it lives, as autograd gives back a saved tensor that needs
        no grad (the pack hook's saves only: below autograd, in a dispatch mode, every tensor
        looks as if it needed none, and a selective store must hand out fresh aliases)."""
        if not t.requires_grad:
            self.same = weakref.ref(t)
        return self

    def ref(self) -> torch.Tensor:
        """The witness: a tensor whose `_version` is the saved tensor's."""
        return self.witness

    def unpack(self) -> torch.Tensor:
        now = self.witness._version
        if now != self.version:
            raise _modified(self.view.describe(), self.where, self.version, now)
        if self.same is not None and (same := self.same()) is not None:
            return same  # its memory is on the device anyway: no reload to wait for
        out = self.view.on(self.copy.materialize().untyped_storage())
        if self.same is not None:  # a second read while this one lives gets it again
            self.same = weakref.ref(out)
        return out


class SlotHandle:
    """A tensor dropped for recompute: filled by its region's replay on first unpack.

    Once unpacked, the handle keeps only a weak reference to the storage, so the recomputed
    tensor dies with the node that used it (as torch.utils.checkpoint frees it), not when
    autograd releases the node's saved variables. Unpack stays repeatable (Rule 1): while the
    storage lives the same data comes back; after it died (retain_graph=True, a later read of
    grad_fn._saved_*) the region is replayed again.

    Rule 5: the version the tensor had at save is checked at unpack, against the tensor while it
    lives, else against the version its region saw when its forward ended (`changed`).

    While the region's forward still runs (a backward inside it: `torch.autograd.grad` in a
    block), the frame holds the forward's tensors, and the slot gives those back: what plain
    PyTorch reads, with no replay. A tensor that needs no grad comes back as the very object
    while it lives (identity, module docstring), else as the replay's.
    """

    __slots__ = ("frame", "index", "value", "version", "ref", "needs_grad", "changed", "pinned", "_used",
                 "__weakref__")

    def __init__(self, frame, index: int, t: torch.Tensor):
        self.frame = frame
        self.index = index
        self.value: torch.Tensor | None = None
        self.version = t._version
        self.ref = weakref.ref(t)  # to check the version, and give it back, while the tensor lives
        self.needs_grad = t.requires_grad
        self.changed: int | None = None  # a later version seen by the region, if any
        self.pinned = False  # the forward's tensor is kept: its region cannot be replayed
        # (the object given back, if it needs no grad; the storage; where the tensor sits on it)
        self._used: tuple[weakref.ref | None, StorageWeakRef, ViewMeta] | None = None

    def pin(self, t: torch.Tensor) -> None:
        """Keep the forward's own tensor: this region call will not be replayed."""
        self.value = t
        self.pinned = True

    def current(self) -> torch.Tensor | None:
        """The tensor this slot stands for if it exists without a replay, else None: the forward's
        own while the region's forward runs, or while it lives and needs no grad; else the last
        one given back while it (one that needs no grad) or its storage lives."""
        if self.value is not None:
            return self.value
        live = self.ref()
        if live is not None and (not self.needs_grad or self.frame.in_forward):
            return live.detach() if self.needs_grad else live
        if self._used is None:
            return None
        obj, ref, view = self._used
        if obj is not None and (same := obj()) is not None:
            return same
        storage = torch.UntypedStorage._new_with_weak_ptr(ref.cdata)
        return None if storage is None else view.on(storage)

    def _check_version(self) -> None:
        live = self.ref()
        if live is None and self.pinned:
            live = self.value
        seen = live._version if live is not None else self.changed
        if seen is not None and seen != self.version:
            shape, dtype = self.frame.meta[self.index][:2]
            raise _modified(f"tensor of shape {tuple(shape)} and dtype {dtype}", self.frame.name,
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
        # Autograd wraps what we return in a new tensor when it needs grad, so a weak reference to
        # `value` itself would die at once; the storage (a DTensor's shard's) lives as long as the
        # node's use of it. One that needs no grad is handed out as itself, and found again so.
        self._used = (None if self.needs_grad else weakref.ref(value), StorageWeakRef(storage(value)),
                      ViewMeta(value))
        self.value = None
        return value


def unpack_hook(handle) -> torch.Tensor:
    """The unpack side of the saved-tensor hooks: every handle knows how to give its tensor back."""
    return handle.unpack()
