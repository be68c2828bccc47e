"""The pack hook: classify every tensor autograd saves during one forward, apply its action.

One `ForwardPass` per `with hc:` (Rule 8: per-forward state is keyed by the forward, never
global). The forward is cut into segments: each region call is one, and so is every stretch
between region calls. Each segment gets a plan from the policy when it starts.

Rule 6 (filters): never offload parameters, buffers or their views (their storages are
collected per forward and per region call, since FSDP unshards them late; and any view of a leaf
that requires grad counts as a parameter), tensors not on the compute device, tensor subclasses
(fake, functional, DTensor), or storages below the byte threshold.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from scheduler.plan import Action, SegmentPlan
from scheduler.profile import TensorRecord

from .errors import OffloadError
from .handles import HostCopy, KeepHandle, OffloadHandle
from .policy import RegionSite, TensorSite
from .recompute import RecomputeFrame, is_kv_cache
from .regions import compiled_model_error, in_compiled_module
from .selective import OpStore, SaveOps

if TYPE_CHECKING:
    from .regions import Region
    from .runtime import Runtime

log = logging.getLogger(__name__)

_PLAIN = (torch.Tensor, nn.Parameter)


@dataclass
class Segment:
    """One segment of this forward: a region call or a stretch between region calls."""

    index: int
    name: str
    plan: SegmentPlan
    site: RegionSite | None = None
    frame: RecomputeFrame | None = None
    copies: list = field(default_factory=list)  # weakrefs to HostCopy, in pack order
    mode: SaveOps | None = None  # selective recompute's dispatch mode while the region runs
    saved: dict = field(default_factory=dict)  # action -> distinct storage bytes, flushed at close
    forward_start: object = None  # backend marks (host times or CUDA events)
    forward_end: object = None


def storage_key(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


class ForwardPass:
    """Everything one `with hc:` forward owns; its hooks close over it."""

    def __init__(self, runtime: "Runtime", param_storages: set[int]):
        self.rt = runtime
        self.settings = runtime.settings
        self.backend = runtime.backend
        self.device = runtime.device
        self.stats = runtime.stats
        # StorageImpl addresses of the model's parameters and buffers. The model holds these
        # storages for the whole forward, so no activation can be allocated at one of these
        # addresses meanwhile; Rule 4's warning is about pointer keys that outlive their storage.
        self.param_storages = param_storages
        self.pack_index = 0
        self.region_calls = 0
        self.depth = 0  # region nesting: an inner region is part of the outer one
        self.segments: list[Segment] = []
        self._seen: dict[StorageWeakRef, list] = {}  # storage -> [id, segment, nbytes, offloadable, last]
        self._counted: set[StorageWeakRef] = set()
        self._calls_of: dict[int, int] = {}  # id(region module) -> calls so far
        self.records: list[TensorRecord] = []
        self.input_bytes: dict[int, int] = {}  # region segment -> bytes of its tensor inputs
        self.lookahead = 0  # segments ahead for prefetch, fixed when the forward closes
        self.compiled_gap = False  # a tensor was saved outside regions inside a compiled model

    def _current(self) -> Segment:
        """The open segment; the first one opens lazily, after the model's inputs are known."""
        if not self.segments:
            self._open_gap()
        return self.segments[-1]

    # -- segments ------------------------------------------------------------------------------------
    def _tail_from(self) -> int:
        """Region-call index from which calls count as the tail (kept resident)."""
        expected = self.rt.expected_calls or len(self.settings.regions)
        return expected - self.settings.keep_last

    def _open_gap(self) -> None:
        idx = len(self.segments)
        tail = bool(self.settings.regions) and self.region_calls > self._tail_from()
        plan = self.rt.policy.gap(idx, tail)
        name = f"(after {self.segments[-1].name})" if self.segments else "(before regions)"
        seg = Segment(idx, name, plan)
        seg.forward_start = self.backend.mark()
        if self.segments:
            self.segments[-1].forward_end = seg.forward_start
        self.segments.append(seg)

    def enter_region(self, region: "Region", args: tuple, kwargs: dict) -> None:
        if self.rt.replay_guard.depth:
            return
        self.depth += 1
        if self.depth > 1:
            return
        self._current()
        for p in region.module.parameters():  # FSDP materialises unsharded parameters here
            self.param_storages.add(p.untyped_storage()._cdata)
        for b in region.module.buffers():
            self.param_storages.add(b.untyped_storage()._cdata)
        call = self.region_calls
        site = RegionSite(region.name, call, region.module, tail=call >= self._tail_from())
        idx = len(self.segments)
        plan = self.rt.policy.region(site, idx)
        if plan.action is Action.RECOMPUTE and in_compiled_module(region.module):
            raise OffloadError(compiled_model_error(f"region {region.name} is to be recomputed inside "
                                                    f"a model compiled as a whole with torch.compile"))
        nth = self._calls_of.get(id(region.module), 0)
        self._calls_of[id(region.module)] = nth + 1
        seg = Segment(idx, region.name if nth == 0 else f"{region.name}#{nth}", plan, site)
        seg.forward_start = self.backend.mark()
        self.segments[-1].forward_end = seg.forward_start
        self.segments.append(seg)
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if not self.rt.warned_cache and any(is_kv_cache(x) for x in leaves):
            self.rt.warned_cache = True
            log.warning("HybridCheckpointer: %s was called with a KV cache during training "
                        "(Hugging Face use_cache=True): the cache keeps every layer's keys and values "
                        "alive until the step ends. Pass use_cache=False when training; recompute "
                        "replays the layer without the cache.", region.name)
        inputs = {x.untyped_storage()._cdata: x.untyped_storage().nbytes()
                  for x in leaves if isinstance(x, torch.Tensor)}
        self.input_bytes[idx] = sum(n for k, n in inputs.items() if k not in self.param_storages)
        if plan.action is Action.RECOMPUTE:
            seg.frame = RecomputeFrame(
                seg.name, region.module, args, kwargs, self.device,
                pack_input=lambda t, _s=seg: self._pack_input(t, _s), guard=self.rt.replay_guard,
                on_replay=self.stats.add_replay, mark=self.backend.mark, habits=self.rt.habits.of(region.module))
            if self.settings.op_policy is not None:
                seg.frame.store = OpStore()
                seg.mode = SaveOps(self.settings.op_policy, seg.frame.store,
                                   offload=lambda t, _s=seg: self._offload_output(t, _s),
                                   keep=lambda t, _s=seg: self._count(storage_key(t), t, _s, "kept"))
                seg.mode.__enter__()

    def exit_region(self, region: "Region", output) -> None:
        if self.rt.replay_guard.depth:
            return
        self.depth -= 1
        if self.depth > 0:
            return
        seg = self.segments[-1]
        if seg.mode is not None:
            seg.mode.__exit__(None, None, None)
            seg.mode = None
        frame, seg.frame = seg.frame, None  # the frame now lives as long as its slots
        if frame is not None and not frame.end_forward():  # it keeps what its forward saved
            seg.saved["kept"] = seg.saved.get("kept", 0) + seg.saved.pop("recomputed", 0)
        self.region_calls += 1
        if output is not None:
            from .regions import output_grad_fns
            for fn in output_grad_fns(output):
                fn.register_prehook(self._backward_hook(seg.index))
        self._open_gap()

    def close(self, failed: bool) -> None:
        """End of forward: keep what backward needs (segments), drop the per-forward maps.

        Rule 9: after a KeyboardInterrupt, nn.Module skips the always_call hooks, so a region's
        dispatch mode may still be on the stack: take it off here, innermost first."""
        for seg in reversed(self.segments):
            if seg.mode is not None:
                seg.mode.__exit__(None, None, None)
                seg.mode = None
        self.depth = 0
        self._current().forward_end = self.backend.mark()
        if not failed:  # a forward cut short must not shrink the next one's idea of the tail
            self.rt.expected_calls = self.region_calls
        self.lookahead = self.rt.lookahead_segments()  # Rule 8: this forward's, not the latest
        self.rt.settle_copies()
        self.records = [TensorRecord(*entry) for entry in self._seen.values()]
        self._seen.clear()
        self._counted.clear()
        for seg in self.segments:
            if seg.frame is not None:  # a region the forward never left
                seg.frame.abandon()
            seg.frame = None
            for action, nbytes in seg.saved.items():
                if action is None:
                    self.stats.skipped_param_bytes += nbytes
                else:
                    self.stats.add_saved(seg.index, seg.name, action, nbytes)
            seg.saved.clear()
            self.stats.timeline.add_compute("forward", seg.name, seg.forward_start, seg.forward_end)
        self.stats.timeline.tail_label = self.segments[-1].name

    # -- pack --------------------------------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        self.backend.poll()
        self.rt.settle_copies()
        k = self.pack_index
        self.pack_index += 1
        seg = self._current()
        if not self.depth and not self.compiled_gap:
            self.compiled_gap = in_compiled_module()
        key = storage_key(t)
        param = self._is_param(t, key)
        first = self._record(k, t, seg, key, param)
        if seg.frame is not None:
            if param:
                seg.frame.add_kept(t)
                self._count(key, t, seg, None)
                return KeepHandle(t, seg.name)
            self._count(key, t, seg, "recomputed")
            return seg.frame.add_slot(t)
        handle = self._already_moved(t, key, seg)
        if handle is not None:
            return handle
        if first and not param and self._wants_offload(k, t, seg):  # the first save decides
            handle = self._offload(t, seg, key)
            if handle is not None:
                return handle
        self._count(key, t, seg, None if param else "kept")
        return KeepHandle(t, seg.name)

    def unpack(self, handle) -> torch.Tensor:
        self.rt.note_backward(self.stats)
        self.rt.settle_copies()
        return handle.unpack()

    def _pack_input(self, t: torch.Tensor, seg: Segment):
        """A recomputed region's input: kept, or offloaded when the plan says so."""
        key = storage_key(t)
        param = self._is_param(t, key)
        handle = self._already_moved(t, key, seg)
        if handle is not None:
            return handle
        if seg.plan.offload_inputs and not param and self._offloadable(t):
            handle = self._offload(t, seg, key)
            if handle is not None:
                return handle
        self._count(key, t, seg, None if param else "kept")
        return KeepHandle(t, seg.name)

    def _offload_output(self, t: torch.Tensor, seg: Segment) -> OffloadHandle | None:
        """An op output the selective policy offloads (None: keep it, too small or pool full)."""
        key = storage_key(t)
        handle = self._already_moved(t, key, seg)
        if handle is not None:
            return handle
        if self._is_param(t, key) or not self._offloadable(t):
            return None
        return self._offload(t, seg, key)

    def _already_moved(self, t: torch.Tensor, key: StorageWeakRef, seg: Segment) -> OffloadHandle | None:
        """Rule 4: a storage already copied to the host is not also held on the device; the
        latest segment that saves it prefetches it too."""
        copies = self.rt.copies
        copy = copies.get((key, t._version)) if copies else None
        if copy is None:
            return None
        if not seg.copies or seg.copies[-1]() is not copy:
            seg.copies.append(weakref.ref(copy))
        return OffloadHandle(copy, t, seg.name)

    def _wants_offload(self, k: int, t: torch.Tensor, seg: Segment) -> bool:
        policy = self.rt.policy
        if seg.plan.action is not Action.OFFLOAD and not policy.per_tensor:
            return False
        if not self._offloadable(t):
            return False
        site = TensorSite(seg.site, k, tuple(t.shape), t.dtype, t.untyped_storage().nbytes())
        return policy.tensor(site, seg.plan) is Action.OFFLOAD

    def _offload(self, t: torch.Tensor, seg: Segment, key: StorageWeakRef) -> OffloadHandle | None:
        nbytes = t.untyped_storage().nbytes()
        blocks = self.rt.pool.alloc(nbytes)
        if blocks is None:  # Rule 3: the pool is full; keep it and say so
            self.stats.add_fallback(nbytes)
            return None
        try:
            src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
        except BaseException:  # Rule 9: the blocks go back (past this point HostCopy owns them)
            self.rt.pool.free(blocks, after=[])
            raise
        copy = HostCopy(self.rt.pool, self.backend, blocks, t, src, self.stats,
                        label=f"{seg.name}:{self.pack_index - 1}")
        del src
        self.rt.register_copy(key, t._version, copy)  # Rule 4: keyed on the storage, never a pointer
        seg.copies.append(weakref.ref(copy))
        self._count(key, t, seg, "offloaded")
        return OffloadHandle(copy, t, seg.name)

    # -- filters (Rule 6) --------------------------------------------------------------------------
    def _is_param(self, t: torch.Tensor, key: StorageWeakRef) -> bool:
        base = t._base if t._is_view() and t._base is not None else t
        if base.is_leaf and (base.requires_grad or isinstance(base, nn.Parameter)):
            return True  # frozen parameters too: moving them frees nothing
        return t.untyped_storage()._cdata in self.param_storages

    def _offloadable(self, t: torch.Tensor) -> bool:
        return (type(t) in _PLAIN and t.device == self.device and t.layout == torch.strided
                and not t.is_conj() and not t.is_neg()
                and t.untyped_storage().nbytes() >= self.settings.min_offload_bytes)

    # -- accounting --------------------------------------------------------------------------------
    def _record(self, k: int, t: torch.Tensor, seg: Segment, key: StorageWeakRef, param: bool) -> bool:
        """Note the save for the profile; True if this is the storage's first save in this forward."""
        entry = self._seen.get(key)
        if entry is None:
            self._seen[key] = [k, seg.index, t.untyped_storage().nbytes(), not param and self._offloadable(t), -1]
            return True
        if entry[1] != seg.index:
            entry[4] = seg.index
        return False

    def _count(self, key: StorageWeakRef, t: torch.Tensor, seg: Segment, action: str | None) -> None:
        """Count a storage's bytes once per forward, under the first action it got (None: a
        parameter or buffer, never moved)."""
        if key in self._counted:
            return
        self._counted.add(key)
        seg.saved[action] = seg.saved.get(action, 0) + t.untyped_storage().nbytes()

    # -- backward ----------------------------------------------------------------------------------
    def _backward_hook(self, seg_index: int):
        # The graph holds this forward's segments (not its handles) until backward is done with it.
        def hook(grad_outputs):
            self.backward_reached(seg_index)

        return hook

    def backward_reached(self, seg_index: int) -> None:
        """Backward is about to enter region segment `seg_index`: issue the reloads of every segment
        down to `seg_index - d` (d in segments; a region call and the gap after it are two), in
        reverse pack order. Rule 2: each reload still waits for its own D2H event."""
        self.rt.note_backward(self.stats)
        seg = self.segments[seg_index]
        self.stats.timeline.add_region_backward(seg.name, self.backend.mark())
        self.rt.settle_copies()
        d = self.lookahead
        if d <= 0:
            return
        for s in range(seg_index, max(0, seg_index - d) - 1, -1):
            for ref in reversed(self.segments[s].copies):
                copy = ref()
                if copy is not None:
                    copy.reload(prefetch=True)
