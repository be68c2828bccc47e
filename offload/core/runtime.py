"""`Runtime`: the state one checkpointer's forwards and backwards share.

`HybridCheckpointer` (the façade) parses the user's arguments into `Settings` and builds one
`Runtime`; the rooms below it (the pack hooks, the auto policy, the report) are handed this object
and never the façade. Per-forward state lives in `ForwardPass`, per-step counters in `StepStats`;
what lives here outlives a forward: the transfer backend, the host pool, the policy, the registry
of host copies (Rule 4) and the replay guard.
"""
from __future__ import annotations

import collections
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..observe.hostmem import available_host_bytes
from ..observe.stats import StepStats
from ..transfer.backend import TransferBackend
from ..transfer.hostpool import HostPool
from .policy import Policy
from .recompute import ReplayGuard
from .regions import Region
from .state import HabitBook

if TYPE_CHECKING:
    from .handles import HostCopy

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
    op_policy: Callable | None  # selective recompute inside recomputed regions
    policy_name: str  # what the report prints


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
        self.unsettled: collections.deque = collections.deque()  # weakrefs to HostCopy, D2H order
        self.expected_calls = 0  # region calls the last complete forward made
        self.stats = StepStats(step=0)
        self.backward_seen = False
        self.warned_cache = False

    # -- steps ---------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """A forward after a backward starts a new step."""
        self.stats = StepStats(step=self.stats.step + 1)
        self.pool.reset_high_water()
        self.backward_seen = False

    def finish_step(self) -> StepStats:
        """The current step's counters, with the pool's figures brought up to date."""
        self.stats.host_in_use = self.pool.in_use
        self.stats.host_high_water = max(self.stats.host_high_water, self.pool.high_water)
        return self.stats

    def note_backward(self, stats: StepStats) -> None:
        """A backward touched this runtime's graph: time it, once per backward pass."""
        self.backward_seen = True
        timeline = stats.timeline
        if timeline.backward and timeline.backward[-1][1] is None:
            return
        entry = timeline.open_backward(self.backend.mark())

        def close() -> None:
            entry[1] = self.backend.mark()

        try:
            torch.autograd.Variable._execution_engine.queue_callback(close)
        except RuntimeError:  # not inside a backward pass (e.g. a read of grad_fn._saved_*)
            timeline.backward.remove(entry)

    # -- copies ----------------------------------------------------------------------------------
    def register_copy(self, key, version: int, copy: "HostCopy") -> None:
        """Rule 4: later saves of this storage at this version share `copy`."""
        self.copies[(key, version)] = copy
        self.unsettled.append(weakref.ref(copy))

    def settle_copies(self) -> None:
        """Let host copies whose D2H finished drop their version alias (D2H completes in order)."""
        queue = self.unsettled
        while queue:
            try:
                ref = queue[0]
            except IndexError:  # emptied by another thread
                return
            copy = ref()
            if copy is not None and not copy.settle():
                return
            try:
                queue.remove(ref)
            except ValueError:
                pass

    # -- budgets ---------------------------------------------------------------------------------
    def lookahead_segments(self) -> int:
        """Segments ahead of backward at which reloads are issued."""
        if self.settings.lookahead is not None:
            return 2 * self.settings.lookahead  # regions -> segments (a call and the gap after it)
        return self.policy.lookahead()

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
