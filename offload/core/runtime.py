"""`Runtime`: the state one checkpointer's forwards and backwards share.

`HybridCheckpointer` (the façade) parses the user's arguments into `Settings` and builds one
`Runtime`; the rooms below it (the pack hooks, the auto policy, the report) are handed this object
and never the façade. Per-forward state lives in `ForwardPass`, per-step counters in `StepStats`;
what lives here outlives a forward: the transfer backend, the host pool, the policy, the registry
of host copies (Rule 4) and the replay guard.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..observe.hostmem import available_host_bytes
from ..observe.residency import Residency
from ..observe.stats import StepStats
from ..observe.timeline import Timeline
from ..transfer.backend import TransferBackend
from ..transfer.hostpool import HostPool
from .errors import warn
from .gate import BudgetGate
from .policy import Policy
from .recompute import ReplayGuard
from .regions import Region
from .selective import OpPolicy
from .state import HabitBook
from .verify import Verify, VerifyLog

log = logging.getLogger(__name__)

DEVICE_HEADROOM = 0.10  # default device budget: free device memory less this share


@dataclass
class Settings:
    """The user's arguments, parsed once at the façade: bytes, counts and objects, no mode strings."""

    model: nn.Module | None
    regions: list[Region]
    device_budget: int | None  # bytes saved activations may occupy on the device; None: free less headroom
    host_budget: int  # pinned host bytes
    min_offload_bytes: int  # storages below this are never offloaded (bytes)
    derive_threshold: bool  # min_offload_bytes follows the measured link (the user gave none)
    keep_last: int  # region calls at the end of forward kept resident under OFFLOAD
    lookahead: int | None  # regions ahead for reloads; None: the policy's choice
    op_policy: OpPolicy | None  # selective recompute inside recomputed regions, parsed
    policy_name: str  # what the report prints
    verify: Verify | None = None  # verify mode: compare what comes back with what was saved
    op_level: bool = True  # policy="auto" may recompute regions selectively (granularity="op")


class GraphToken:
    """One forward's liveness: every handle the forward packs holds it, the runtime only a weak
    reference, so it dies when the last of the forward's handles does (its graph was freed,
    backpropagated or not). It also says where the forward stands in its step: its place
    (`index`, from 0) and whether a backward has reached its graph."""

    __slots__ = ("__weakref__", "step", "index", "backpropagated")

    def __init__(self) -> None:
        self.step = 0  # the step it joined (0: none yet)
        self.index = -1  # its place among the step's forwards
        self.backpropagated = False


class Runtime:
    """Backend, host pool, policy and the registries that outlive one forward."""

    def __init__(self, settings: Settings, backend: TransferBackend, pool: HostPool):
        self.settings = settings
        self.backend = backend
        self.device: torch.device = backend.device
        self.pool = pool
        self.policy: Policy | None = None  # set by the façade (the auto policy needs this runtime)
        self.replay_guard = ReplayGuard()
        self.habits = HabitBook()  # what each region's forward modifies in place (Rule 7)
        # Rule 4: one host copy per (storage, version), keyed on the storage object, weakly held.
        self.copies: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.expected_calls = 0  # region calls the last complete forward made
        self.residency = Residency()  # saved-activation bytes on the device, measured
        self.gate = BudgetGate(backend)  # Rule 10: D2H copies running, for the forward to wait on
        self.step_listeners: list[weakref.WeakMethod] = []  # called with each finished step
        self.stats = self._new_stats(1)
        self.backward_seen = False
        self.step_graphs: list[weakref.ref] = []  # GraphTokens of this step's live forwards
        self.step_forwards = 0  # forwards that joined this step
        self.last_backpropagated = -1  # the latest (by index) of this step's forwards backward reached
        self.max_in_flight = 0  # the most forwards in flight at once seen in any step
        self.warned: set[str] = set()  # what `warn_once` has warned about
        self.backward_marker: Callable[[str | None], None] | None = None  # told each segment's backward start

    # -- steps ---------------------------------------------------------------------------------
    def join_step(self, token: GraphToken) -> StepStats:
        """A forward starts saving tensors: the step it belongs to (Rule 9: every per-step
        structure lives in one `StepStats`, so nothing outlives the step).

        A step is the forwards whose graphs overlap: a new one begins when a backward has run
        and no forward of the step is still in flight, and after forwards whose graphs all died
        unused (evaluation with grad on): those will never see a backward. A forward is in flight
        while its graph lives, no backward has reached it, and none has reached a later forward
        of the step either (a graph held and never backpropagated does not hold the step open).
        So gradient accumulation (forward, backward, forward ...) gives a step per forward, and
        a pipeline schedule that runs micro-batches' forwards ahead of their backwards (GPipe,
        1F1B on all but the last stage) one step per schedule step."""
        self.step_graphs = [g for g in self.step_graphs if g() is not None]  # bounded by live graphs
        in_flight = self.in_flight()
        if (self.backward_seen and not in_flight) or (self.step_forwards and not self.step_graphs):
            self.begin_step()
            in_flight = 0
        token.step, token.index = self.stats.step, self.step_forwards
        self.step_forwards += 1
        self.step_graphs.append(weakref.ref(token))
        live = in_flight + 1
        self.stats.in_flight = max(self.stats.in_flight, live)
        self.max_in_flight = max(self.max_in_flight, live)
        return self.stats

    def in_flight(self) -> int:
        """This step's forwards in flight now (see `join_step`)."""
        return sum(1 for g in self.step_graphs if (t := g()) is not None and not t.backpropagated
                   and t.index > self.last_backpropagated)

    def begin_step(self) -> None:
        """A forward after a backward starts a new step (steps are numbered from 1)."""
        done = self.finish_step()
        for ref in list(self.step_listeners):
            listener = ref()
            if listener is None:
                self.step_listeners.remove(ref)
            else:
                listener(done)
        self.stats = self._new_stats(done.step + 1)
        self.pool.reset_high_water()
        self.backend.poll()  # sources of copies finished since the last look go before the step
        self.backend.new_step()
        self.backward_seen = False
        self.step_graphs.clear()
        self.step_forwards = 0
        self.last_backpropagated = -1

    def _new_stats(self, step: int) -> StepStats:
        stats = StepStats(step=step, saved_series=self.residency.start_step(), residency=self.residency)
        if self.settings.verify is not None:
            stats.verify = VerifyLog(mode="strict" if self.settings.verify.strict else "on")
        return stats

    def finish_step(self) -> StepStats:
        """The current step's counters, with the pool's and the residency's figures brought up to date."""
        s, res = self.stats, self.residency
        s.host_in_use = self.pool.in_use
        s.host_high_water = max(s.host_high_water, self.pool.high_water)
        s.saved_peak_bytes, s.saved_peak_parts = res.peak, dict(res.peak_parts)
        s.saved_kind_peaks = dict(res.kind_peaks)
        return s

    def note_backward(self, stats: StepStats, token: GraphToken | None = None,
                      own: Timeline | None = None) -> None:
        """A backward touched the graph of the forward `token` stands for: time it, once per
        backward pass, on the step's timeline and on the forward's `own` one."""
        self.backward_seen = True
        if token is not None and not token.backpropagated:
            token.backpropagated = True
            if token.step == stats.step == self.stats.step:
                self.last_backpropagated = max(self.last_backpropagated, token.index)
        self._time_backward(stats.timeline, self.backward_marker)
        if own is not None:
            self._time_backward(own, None)

    def _time_backward(self, timeline: Timeline, marker: Callable[[str | None], None] | None) -> None:
        """Open a backward entry on `timeline` unless one is open; the end of the pass closes it."""
        if timeline.backward and timeline.backward[-1][1] is None:
            return
        entry = timeline.open_backward(self.backend.mark())
        if marker is not None:
            marker(timeline.tail_label)

        def close() -> None:
            entry[1] = self.backend.mark()
            if marker is not None:
                marker(None)

        try:
            torch.autograd.Variable._execution_engine.queue_callback(close)
        except RuntimeError:  # not inside a backward pass (e.g. a read of grad_fn._saved_*)
            timeline.backward.remove(entry)

    def warn_once(self, what: str, message: str) -> None:
        """Warn about `what` the first time only (a condition that holds for every later tensor)."""
        if what not in self.warned:
            self.warned.add(what)
            warn(message)

    def note_fallback(self, nbytes: int, segment: str) -> None:
        """Rule 3: an offload the full host pool refused stays on the device; say so, once."""
        self.warn_once("fallback", f"HybridCheckpointer: the host pool is full ({self.pool.in_use} bytes in use under "
             f"host_budget={self.settings.host_budget}); a {nbytes}-byte tensor of {segment}, and every "
             f"offload refused after it, stays on the device instead (the report counts them as "
             f"fallbacks; this warning is not repeated). Raise host_budget, or offload less.")

    # -- budgets ---------------------------------------------------------------------------------
    def lookahead_segments(self) -> int:
        """Segments ahead of backward at which reloads are issued."""
        if self.settings.lookahead is not None:
            return 2 * self.settings.lookahead  # regions -> segments (a call and the gap after it)
        return self.policy.lookahead()

    def device_limit(self) -> int | None:
        """Rule 10: the saved bytes the forward waits on lagging copies to stay under: what
        policy="auto" planned its current plan under, else the device budget the user gave;
        None: no limit."""
        planned = self.policy.device_limit()
        return planned if planned is not None else self.settings.device_budget

    def note_unholdable(self, floor: int, limit: int) -> None:
        """Rule 10: what the forward keeps on the device exceeds the limit; say so, once."""
        self.warn_once("unholdable", f"HybridCheckpointer: the saved activations the forward keeps on the device "
                       f"besides running copies ({floor} bytes) exceed the limit the runtime holds ({limit} bytes: "
                       f"the device budget, or what policy='auto' planned under) by themselves, so waiting for "
                       f"copies cannot hold it; from there the forward stops waiting (this warning is not "
                       f"repeated). Raise device_budget, or offload or recompute more.")

    def device_budget(self) -> int:
        """The device budget in force: the user's, or free device memory less headroom."""
        if self.settings.device_budget is not None:
            return self.settings.device_budget
        return int(device_available(self.device) * (1 - DEVICE_HEADROOM))


def device_available(device: torch.device) -> int:
    """Free device memory (CUDA), or available host memory when the device is the CPU (bytes)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return available_host_bytes()
