"""The pack hook: classify every tensor autograd saves during one forward, apply its action.

One `ForwardPass` per `with hc:` (Rule 8: per-forward state is keyed by the forward, never
global). The forward is cut into segments: each region call is one, and so is every stretch
between region calls. Each segment gets a plan from the policy when it starts.

Rule 6 (filters): never offload parameters, buffers or their views (their storages are
collected per forward and per region call, since FSDP unshards them late; and any view of a leaf
that requires grad counts as a parameter), tensors not on the compute device, tensor subclasses
(fake, functional), tensors that (storage, offset, sizes, strides, math bits) cannot
rebuild (sparse, nested, zero tensors), or storages below the byte threshold. Every save of a
storage passes the same filters, the first one and those that find it already copied. A DTensor
is judged, keyed, counted and moved by its local shard (dtensor.py).

Tensors without a storage (sparse, mkldnn) are kept as autograd keeps them. A forward run with
grad off (no_grad, inference_mode) saves nothing: its region calls run plain, and a forward that
never saved a tensor nor ran a region with grad on leaves no trace (no step, counter, timeline
entry or policy state).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from scheduler.plan import Action, SegmentPlan
from scheduler.profile import TensorRecord

from ..observe.timeline import Timeline
from .dtensor import data_of, spec_of
from .errors import OffloadError
from .handles import HostCopy, KeepHandle, OffloadHandle
from .policy import RegionSite, TensorSite
from .recompute import RecomputeFrame, is_kv_cache, plain_call
from .regions import compiled_model_error, in_compiled_module
from .runtime import GraphToken
from .selective import OpStore, SaveOps
from .verify import Verifier

if TYPE_CHECKING:
    from ..observe.stats import StepStats
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
    mode: TorchDispatchMode | None = None  # selective recompute's (or op profiling's) mode while the region runs
    saved: dict = field(default_factory=dict)  # action -> distinct storage bytes, flushed at close
    forward_start: object = None  # backend marks (host times or CUDA events)
    forward_end: object = None


def storage_of(t: torch.Tensor) -> torch.UntypedStorage | None:
    """`t`'s storage (a DTensor's: its local shard's), or None for a tensor without one (sparse,
    mkldnn, some wrapper subclasses)."""
    return _storage_or_none(data_of(t))


def _storage_or_none(x: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return x.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return None


def rebuildable(t: torch.Tensor) -> bool:
    """A plain dense tensor: its storage, offset, sizes, strides and math bits give it back."""
    t = data_of(t)
    return (type(t) in _PLAIN and t.layout == torch.strided and not t.is_nested
            and not t._is_zerotensor())


def param_storage_ids(module: nn.Module) -> set[int]:
    """StorageImpl addresses of `module`'s parameters and buffers (Rule 6); sparse ones have none.
    Walks the submodules' own dicts, without `named_modules`' name strings: this runs at every
    region call."""
    ids: set[int] = set()
    seen: set[int] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        for tensors in (m._parameters, m._buffers):
            for t in tensors.values():
                if t is not None and (s := storage_of(t)) is not None:
                    ids.add(s._cdata)
        todo.extend(c for c in m._modules.values() if c is not None)
    return ids


def flat_leaves(args: tuple, kwargs: dict) -> list:
    """The leaves of a call's arguments; the common call (positional tensors only) without pytree."""
    if plain_call(args, kwargs):
        return list(args)
    return torch.utils._pytree.tree_leaves((args, kwargs))


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
        self.stats: "StepStats | None" = None  # the step's, once the forward saves something
        # Alive while any handle of this forward is (each holds it); the runtime holds it weakly.
        self.token: GraphToken | None = GraphToken()
        self._token = weakref.ref(self.token)  # after close, alive only while a handle is
        # This forward's own marks (its forward, the backward passes through its graph, its
        # replays); the step's timeline holds every forward's: auto profiles one forward of many.
        self.timeline = Timeline()
        self.pack_index = 0
        self.region_calls = 0
        self.depth = 0  # region nesting: an inner region is part of the outer one
        self._opened: list[bool] = []  # per open region call: did it open a segment
        self.segments: list[Segment] = []
        # storage -> [id, segment, nbytes, offloadable, last, is a parameter or buffer]
        self._seen: dict[StorageWeakRef, list] = {}
        self._counted: set[StorageWeakRef] = set()
        self._calls_of: dict[int, int] = {}  # id(region module) -> calls so far
        self.records: list[TensorRecord] = []
        self.input_bytes: dict[int, int] = {}  # region segment -> bytes of its tensor inputs
        self.lookahead = 0  # segments ahead for prefetch, fixed when the forward closes
        self.verifier: Verifier | None = None  # verify mode: references taken at pack
        self.meshes: dict = {}  # device meshes of the DTensors saved, in first-save order
        self.compiled_gap = False  # a tensor was saved outside regions inside a compiled model
        self._limit: int | None | bool = False  # Rule 10's limit, from this forward's first copy (False: none yet)

    @property
    def started(self) -> bool:
        """Whether this forward saved anything or ran a region with grad on."""
        return self.stats is not None

    def _start(self) -> None:
        """The forward does autograd work: join (or begin) the step. A forward that never gets
        here (no_grad, inference_mode) touches no step, counter or timeline."""
        if self.stats is None:
            self.stats = self.rt.join_step(self.token)

    def _current(self) -> Segment:
        """The open segment; the first one opens lazily, after the model's inputs are known."""
        self._start()
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
        # An inner region is part of the outer one; a call with grad off saves nothing: plain.
        opens = self.depth == 1 and torch.is_grad_enabled()
        self._opened.append(opens)
        if not opens:
            return
        self._current()
        self.param_storages |= param_storage_ids(region.module)  # FSDP materialises unsharded parameters here
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
        leaves = flat_leaves(args, kwargs)
        if "cache" not in self.rt.warned and any(is_kv_cache(x) for x in leaves):
            self.rt.warn_once("cache", f"HybridCheckpointer: {region.name} was called with a KV cache during "
                              f"training (Hugging Face use_cache=True): the cache keeps every layer's keys and "
                              f"values alive until the step ends. Pass use_cache=False to the model's forward "
                              f"when training; recompute replays the layer without the cache.")
        inputs = {s._cdata: s.nbytes() for x in leaves
                  if isinstance(x, torch.Tensor) and (s := storage_of(x)) is not None}
        self.input_bytes[idx] = sum(n for k, n in inputs.items() if k not in self.param_storages)
        if plan.action is Action.RECOMPUTE:
            seg.frame = RecomputeFrame(
                seg.name, region.module, args, kwargs, self.device,
                pack_input=lambda t, _s=seg: self._pack_input(t, _s), guard=self.rt.replay_guard,
                on_replay=self._replayed, mark=self.backend.mark, habits=self.rt.habits.of(region.module))
            # the user's op policy, or the policy's own for this call (auto's selective segments)
            op_policy = self.settings.op_policy or self.rt.policy.op_policy(site, idx, plan)
            if op_policy is not None:
                seg.frame.store = OpStore(op_policy)
                seg.mode = SaveOps(seg.frame.store,
                                   offload=lambda t, _s=seg: self._offload_output(t, _s),
                                   keep=lambda t, _s=seg: self._keep_output(t, _s),
                                   replaying=lambda: self.rt.replay_guard.depth > 0)
            else:
                seg.mode = self.rt.policy.op_probe(site, idx)  # auto's op profile
            if seg.mode is not None:
                seg.mode.__enter__()

    def exit_region(self, region: "Region", output) -> None:
        if self.rt.replay_guard.depth:
            return
        self.depth -= 1
        if not (self._opened and self._opened.pop()):  # (empty: `with hc:` began inside this call)
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

    def close(self, failed: bool) -> bool:
        """End of forward: keep what backward needs (segments), drop the per-forward maps.
        False if the forward never started (it ran with grad off): nothing to account.

        Rule 9: after a KeyboardInterrupt, nn.Module skips the always_call hooks, so a region's
        dispatch mode may still be on the stack: take it off here, innermost first."""
        for seg in reversed(self.segments):
            if seg.mode is not None:
                seg.mode.__exit__(None, None, None)
                seg.mode = None
        self.depth = 0
        self._opened.clear()
        self.token = None  # from now on only this forward's handles keep it alive
        if not self.started:
            return False
        self.backend.poll()
        self._current().forward_end = self.backend.mark()
        if not failed:  # a forward cut short must not shrink the next one's idea of the tail
            self.rt.expected_calls = self.region_calls
        self.lookahead = self.rt.lookahead_segments()  # Rule 8: this forward's, not the latest
        # The profile holds activations only: a parameter or buffer autograd saves (a matmul's
        # weight) lives on the device under every plan, and the measured saved peak leaves it out.
        self.records = [TensorRecord(*entry[:5]) for entry in self._seen.values() if not entry[5]]
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
            for timeline in (self.stats.timeline, self.timeline):
                timeline.add_compute("forward", seg.name, seg.forward_start, seg.forward_end)
        self.stats.timeline.tail_label = self.timeline.tail_label = self.segments[-1].name
        return True

    # -- pack --------------------------------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        handle = self._pack(t)
        if self.rt.gate.running:  # Rule 10: whatever this save added, copies lag behind
            self._hold_budget()
        if self.verifier is not None and not isinstance(handle, KeepHandle):
            seg = self.segments[-1]
            action = "recomputed" if seg.frame is not None else "offloaded"
            handle = self.verifier.wrap(handle, t, self.stats.verify, seg.name, self.pack_index - 1, action)
        return handle

    def _pack(self, t: torch.Tensor):
        self.backend.poll()
        k = self.pack_index
        self.pack_index += 1
        seg = self._current()
        if not self.depth and not self.compiled_gap:
            self.compiled_gap = in_compiled_module()
        # The storage is looked up once per save and handed down: this runs for every saved tensor.
        x = data_of(t)
        st = _storage_or_none(x)
        if st is None:  # no storage to key on, count or move: kept as autograd keeps it
            if seg.frame is not None:
                seg.frame.add_kept(t)
            return KeepHandle(t, seg.name, self.token)
        key = StorageWeakRef(st)
        param = self._is_param(t, st)
        movable = not param and self._offloadable(x, st)
        first = self._record(k, t, seg, key, st, param, movable)
        if seg.frame is not None:
            if param or not rebuildable(x):
                seg.frame.add_kept(t)
                self._count(key, st, seg, None if param else "kept")
                return KeepHandle(t, seg.name, self.token)
            self._count(key, st, seg, "recomputed")
            return seg.frame.add_slot(t)
        if movable:
            handle = self._already_moved(t, key, seg)
            if handle is not None:
                return handle.give_back_as(t)
            if first and self._wants_offload(k, t, seg, st):  # the first save decides
                handle = self._offload(t, seg, key, st)
                if handle is not None:
                    return handle.give_back_as(t)
        self._count(key, st, seg, None if param else "kept")
        return KeepHandle(t, seg.name, self.token)

    def unpack(self, handle) -> torch.Tensor:
        if not self.depth:  # else a backward inside a region's forward: not the step's backward
            self._note_backward()
        return handle.unpack()

    def _pack_input(self, t: torch.Tensor, seg: Segment):
        """A recomputed region's input: kept, or offloaded when the plan says so."""
        x = data_of(t)
        st = _storage_or_none(x)
        if st is None:
            return KeepHandle(t, seg.name, self.token)
        key = StorageWeakRef(st)
        param = self._is_param(t, st)
        if not param and self._offloadable(x, st):
            handle = self._already_moved(t, key, seg)
            if handle is not None:
                return handle.give_back_as(t)
            if seg.plan.offload_inputs:
                handle = self._offload(t, seg, key, st)
                if handle is not None:
                    return handle.give_back_as(t)
        self._count(key, st, seg, None if param else "kept")
        return KeepHandle(t, seg.name, self.token)

    def _offload_output(self, t: torch.Tensor, seg: Segment) -> OffloadHandle | None:
        """An op output the selective policy offloads (None: keep it, too small or pool full)."""
        x = data_of(t)
        st = _storage_or_none(x)
        if st is None or self._is_param(t, st) or not self._offloadable(x, st):
            return None
        key = StorageWeakRef(st)
        return self._already_moved(t, key, seg) or self._offload(t, seg, key, st)

    def _keep_output(self, t: torch.Tensor, seg: Segment) -> None:
        """An op output the selective policy stores on the device: counted as kept."""
        st = storage_of(t)
        if st is not None:
            self._count(StorageWeakRef(st), st, seg, "kept")

    def _already_moved(self, t: torch.Tensor, key: StorageWeakRef, seg: Segment) -> OffloadHandle | None:
        """Rule 4: a storage already copied to the host is not also held on the device; the
        latest segment that saves it prefetches it too. Rule 6 holds for this save as for the
        first: callers ask only for saves the filters let through (a parameter view, a subclass
        is kept instead)."""
        copies = self.rt.copies
        copy = copies.get((key, t._version)) if copies else None
        if copy is None:
            return None
        if not seg.copies or seg.copies[-1]() is not copy:
            seg.copies.append(weakref.ref(copy))
        return OffloadHandle(copy, t, seg.name, self.token)

    def _wants_offload(self, k: int, t: torch.Tensor, seg: Segment, st: torch.UntypedStorage) -> bool:
        policy = self.rt.policy
        if seg.plan.action is not Action.OFFLOAD and not policy.per_tensor:
            return False
        site = TensorSite(seg.site, k, tuple(t.shape), t.dtype, st.nbytes())
        return policy.tensor(site, seg.plan) is Action.OFFLOAD

    def _offload(self, t: torch.Tensor, seg: Segment, key: StorageWeakRef,
                 st: torch.UntypedStorage) -> OffloadHandle | None:
        nbytes = st.nbytes()
        blocks = self.rt.pool.alloc(nbytes)
        if blocks is None:  # Rule 3: the pool is full; keep it and say so
            self.stats.add_fallback(nbytes)
            self.rt.note_fallback(nbytes, seg.name)
            return None
        try:
            src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(st)
        except BaseException:  # Rule 9: the blocks go back (past this point HostCopy owns them)
            self.rt.pool.free(blocks, after=[])
            raise
        copy = HostCopy(self.rt.pool, self.backend, blocks, src, self.stats,
                        label=f"{seg.name}:{self.pack_index - 1}")
        del src  # the backend holds the source until its copy is done, and no longer
        self.rt.copies[(key, t._version)] = copy  # Rule 4: keyed on the storage, never a pointer
        seg.copies.append(weakref.ref(copy))
        self._count(key, st, seg, "offloaded")
        self.rt.gate.issued(copy.d2h_event)
        if self._limit is False:  # at this forward's first copy: auto's plan for it is chosen by then
            self._limit = self.rt.device_limit()
        return OffloadHandle(copy, t, seg.name, self.token)

    def _hold_budget(self, extra: int = 0) -> None:
        """Rule 10: wait for lagging copies while the saved bytes on the device, plus `extra`
        about to be allocated (a prefetch), exceed the limit; not when what copies hold could
        not bring them under it (the forward would then run in lockstep with its copies for
        nothing; backward's reloads may pass a fixed policy's budget by design: not warned)."""
        rt, limit = self.rt, self._limit
        if limit is False:  # set at this forward's first copy; before, asked while copies run
            limit = rt.device_limit()
            if limit is not None:  # auto's is known once its plan for this forward is chosen
                self._limit = limit
        if limit is None:
            return
        res = rt.residency
        if res.total + extra <= limit:
            return
        floor = res.total - res.bytes["in_flight"]
        if floor + extra > limit:
            if not extra:
                rt.note_unholdable(floor, limit)
            return
        waits, seconds = rt.gate.hold(lambda: res.total, limit, extra)
        if waits:
            self.stats.add_budget_wait(waits, seconds)

    # -- filters (Rule 6) --------------------------------------------------------------------------
    def _is_param(self, t: torch.Tensor, st: torch.UntypedStorage) -> bool:
        base = t._base if t._is_view() and t._base is not None else t
        if base.is_leaf and (base.requires_grad or isinstance(base, nn.Parameter)):
            return True  # frozen parameters too: moving them frees nothing
        return st._cdata in self.param_storages

    def _offloadable(self, x: torch.Tensor, st: torch.UntypedStorage) -> bool:
        """`x` (a tensor's data, `data_of`) may be moved: rebuildable, on the device, big enough."""
        return (rebuildable(x) and x.device == self.device
                and st.nbytes() >= self.settings.min_offload_bytes)

    # -- accounting --------------------------------------------------------------------------------
    def _record(self, k: int, t: torch.Tensor, seg: Segment, key: StorageWeakRef,
                st: torch.UntypedStorage, param: bool, movable: bool) -> bool:
        """Note the save for the profile; True if this is the storage's first save in this forward."""
        entry = self._seen.get(key)
        if entry is None:
            self._seen[key] = [k, seg.index, st.nbytes(), movable, -1, param]
            spec = spec_of(t)
            if spec is not None:
                self.meshes[spec.mesh] = None
            return True
        if entry[1] != seg.index:
            entry[4] = seg.index
        return False

    def _count(self, key: StorageWeakRef, st: torch.UntypedStorage, seg: Segment, action: str | None) -> None:
        """Count a storage's bytes once per forward, under the first action it got (None: a
        parameter or buffer, never moved); what stays on the device counts as resident."""
        if action in ("kept", "offloaded"):  # on the device until freed: kept, or the source of a D2H
            self.rt.residency.track(st, "kept" if action == "kept" else "in_flight")
        if key in self._counted:
            return
        self._counted.add(key)
        nbytes = st.nbytes()
        seg.saved[action] = seg.saved.get(action, 0) + nbytes
        if action == "kept" and nbytes < self.settings.min_offload_bytes:
            self.stats.add_small(nbytes)

    # -- backward ----------------------------------------------------------------------------------
    def _note_backward(self) -> None:
        self.rt.note_backward(self.stats, self._token(), self.timeline)

    def _replayed(self, name: str, start: object, end: object, refilled: list) -> None:
        self.stats.add_replay(name, start, end, refilled)
        self.timeline.add_compute("recompute", name, start, end)

    def _backward_hook(self, seg_index: int):
        # The graph holds this forward's segments (not its handles) until backward is done with it.
        def hook(grad_outputs):
            self.backward_reached(seg_index)

        return hook

    def backward_reached(self, seg_index: int) -> None:
        """Backward is about to enter region segment `seg_index`: issue the reloads of every segment
        down to `seg_index - d` (d in segments; a region call and the gap after it are two), in
        reverse pack order. Rule 2: each reload still waits for its own D2H event. A backward inside
        a region's forward (`torch.autograd.grad` in a block) or inside a replay is not the step's
        backward: nothing to time or prefetch for it."""
        if self.depth or self.rt.replay_guard.depth:
            return
        self._note_backward()
        seg = self.segments[seg_index]
        mark = self.backend.mark()
        self.stats.timeline.add_region_backward(seg.name, mark)
        self.timeline.add_region_backward(seg.name, mark)
        if self.rt.backward_marker is not None:
            self.rt.backward_marker(seg.name)
        d = self.lookahead
        if d <= 0:
            return
        for s in range(seg_index, max(0, seg_index - d) - 1, -1):
            for ref in reversed(self.segments[s].copies):
                copy = ref()
                if copy is not None:
                    if copy.device_bytes is None:  # its bytes come on top of lagging copies' (Rule 10)
                        self._hold_budget(copy.nbytes)
                    copy.reload(prefetch=True)
