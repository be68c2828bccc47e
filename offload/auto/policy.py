"""policy="auto": measure a step, ask the scheduler for a plan, carry it out.

Per input-shape signature (the shapes and dtypes of the model's inputs):
  1. the first forwards run under a safe plan (every region recomputed: the least device
     memory); the first of them warms up (allocator, kernels, page faults), the second is
     measured: every saved tensor and the segment times;
  2. after its backward, the next forward builds the `Profile` (with the link measured on our
     own pool), plans under the device budget less a backward reserve (below) and the host
     budget, and runs the plan;
  3. a forward whose saved tensors differ from the profile (data-dependent shapes) still runs
     correctly (the plan only ever changes where bytes live), and its signature is profiled again.

Op level: the warm-up forward also runs each region call under an `OpProbe` (opprofile.py), so
the profile carries every region's ops (bytes, time) and the planner may recompute a region
selectively; such a region call then gets a `StoreOps` op policy (storeops.py) that stores the
chosen ops' outputs through selective.py's mechanism. Not with a user's `op_policy` (it wins),
nor with granularity="block".

Under tensor parallelism every rank of the meshes the profiled forward saved DTensors on runs one
plan, made under the ranks' smallest budget: a region recomputed on one rank and not on another
would pair the collectives of its replay with other collectives (a hang or wrong gradients).
"""
from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING

import torch

from scheduler import Plan, backward_reserve as scheduler_reserve, plan as make_plan
from scheduler.plan import Action, SegmentPlan

from ..transfer.linkprobe import measure_link
from ..core.dtensor import first_rank_value, smallest_over
from ..core.errors import warn
from ..core.policy import Policy, RegionSite, TensorSite
from ..observe.planview import PlanView, explain_note, plan_mix
from .opprofile import OpProbe, attach_ops
from .profile import build_profile
from .storeops import StoreOps
from .workset import WorkingSetProbe

if TYPE_CHECKING:
    from ..core.hooks import ForwardPass
    from ..core.runtime import Runtime

log = logging.getLogger(__name__)

_PROFILING = SegmentPlan(Action.RECOMPUTE)
WARMUP_FORWARDS = 1  # profiling forwards per signature that are not measured
MAX_SIGNATURES = 16  # plans kept; each new input shape costs two profiling steps


def backward_reserve(profile, model) -> int:
    """Bytes the plan leaves free under the device budget for what backward allocates besides
    saved activations.

    With measured working sets (workset.py) the simulator counts each segment's own; what stays
    is the parameters' gradients, which accumulate across segments (allocated in backward when
    the step starts from `zero_grad(set_to_none=True)`). Without them (another profiler was
    running), the scheduler's flat estimate: half the largest segment's saved bytes."""
    if not profile.has_working_sets:
        return scheduler_reserve(profile)
    if model is None:
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


class AutoPolicy(Policy):
    """The scheduler's plan, one per input-shape signature."""

    def __init__(self, runtime: "Runtime"):
        # A proxy: the runtime owns this policy, and a strong reference back would make a cycle
        # that keeps the user's model (and its device memory) alive after `del model, hc` until
        # the garbage collector happens to run.
        self.runtime = weakref.proxy(runtime)
        self.plans: dict[str, Plan] = {}
        self.profiles: dict = {}
        self.reserves: dict[str, int] = {}
        self._pending: tuple | None = None  # (forward, stats, signature) awaiting its backward
        self._warm: dict[str, int] = {}  # signature -> profiling forwards seen
        self._signature = ""
        self._plan: Plan | None = None  # the plan this forward runs; None while profiling
        self._decided = False
        self._link = None  # the host link, measured before the first forward
        self.worksets: dict[str, dict[str, int]] = {}  # signature -> segment name -> backward bytes
        self._probe: list | None = None  # [WorkingSetProbe, signature, its step's stats] over a warm-up step
        self.op_probes: dict[str, dict[int, OpProbe]] = {}  # signature -> segment -> its warm-up ops
        self._op_probes: dict[int, OpProbe] = {}  # this forward's, while it is a warm-up forward

    # -- per forward ---------------------------------------------------------------------------
    def begin_forward(self, forward: "ForwardPass") -> None:
        rt = self.runtime
        if self._link is None:  # before the first profile, so its filters use the final threshold
            self._link = measure_link(rt.backend, rt.pool, device_budget=rt.settings.device_budget)
            if rt.settings.derive_threshold:  # Rule 6: the byte threshold comes from the measured link
                rt.settings.min_offload_bytes = self._link.min_offload_bytes()
        self._stop_probe()
        self._finish_pending()
        self._signature = ""
        self._plan = None
        self._decided = False
        self._op_probes = {}

    def model_inputs(self, args: tuple, kwargs: dict) -> None:
        if not self._decided:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            self._signature = ";".join(f"{tuple(t.shape)}:{t.dtype}" for t in leaves if isinstance(t, torch.Tensor))

    def _current(self) -> Plan | None:
        if not self._decided:
            self._decided = True
            self._plan = self.plans.get(self._signature)
            if self._plan is None and not self._warm.get(self._signature) and self._probe is None \
                    and self._signature not in self.worksets:
                self._start_probe()
        return self._plan

    # -- backward's working set (measured on the warm-up step, never on a timed one) -------------
    def _start_probe(self) -> None:
        probe = WorkingSetProbe(self.runtime.device)
        if probe.start():
            self.runtime.backward_marker = probe.mark
            # Stopped at the next forward or at close(); if the user does neither, when the
            # checkpointer is collected. Not at the end of backward: the autograd engine restores
            # the thread's profiler state after its final callbacks, so a stop there would not hold.
            self._probe = [probe, self._signature, None, weakref.finalize(self, probe.stop)]

    def _stop_probe(self, force: bool = False) -> None:
        """Stop the probe once its step's backward has run (or at `close()`): each segment's
        working set is its backward's peak less the bytes its own replay re-created."""
        if self._probe is None:
            return
        probe, signature, stats, finalizer = self._probe
        backward = stats.timeline.backward if stats is not None else []
        if not force and (not backward or any(end is None for _, end in backward)):
            return  # several forwards before one backward: keep recording
        self._probe = None
        self.runtime.backward_marker = None
        finalizer.detach()
        peaks = probe.stop()
        if peaks and stats is not None:
            self.worksets[signature] = {seg.name: max(0, peaks.get(seg.name, 0) - seg.recomputed)
                                        for seg in stats.segments.values()}

    def close(self) -> None:
        self._stop_probe(force=True)

    def end_forward(self, forward: "ForwardPass", failed: bool) -> None:
        if self._probe is not None and self._probe[2] is None:
            self._probe[2] = forward.stats
        plan = self._plan if self._decided else None
        probes, self._op_probes = self._op_probes, {}
        if failed:
            return
        if plan is None:
            seen = self._warm.get(self._signature, 0)
            if seen == 0 and probes:
                self.op_probes[self._signature] = probes
            self._warm[self._signature] = seen + 1
            if seen >= WARMUP_FORWARDS:
                self._pending = (forward, forward.stats, self._signature)
            return
        profile = self.profiles[self._signature]
        seen = {(r.id, r.nbytes) for r in forward.records}
        if len(forward.segments) != len(plan.segments) or seen != {(r.id, r.nbytes) for r in profile.tensors}:
            log.info("auto: this forward saved other tensors than its profile (signature %s); "
                     "profiling it again", self._signature)
            self.plans.pop(self._signature, None)
            self._warm.pop(self._signature, None)

    def _finish_pending(self) -> None:
        if self._pending is None:
            return
        forward, stats, signature = self._pending
        timeline = stats.timeline
        if not timeline.backward or any(end is None for _, end in timeline.backward):
            return  # its backward has not run yet
        self._pending = None
        rt = self.runtime
        rt.backend.settle()
        profile = build_profile(forward, timeline.resolve(rt.backend), self._link, signature,
                                self.worksets.get(signature, {}))
        profile = attach_ops(profile, self.op_probes.pop(signature, {}), rt.backend.seconds)
        budget = rt.device_budget()
        if forward.meshes:  # tensor parallelism: the ranks of a mesh plan alike (dtensor.py)
            budget = smallest_over(forward.meshes, budget)
        reserve = min(backward_reserve(profile, rt.settings.model), budget // 2)
        plan = make_plan(profile, budget - reserve, rt.settings.host_budget, keep_last=rt.settings.keep_last)
        if forward.meshes:
            plan = first_rank_value(forward.meshes, plan)
        for note in plan.notes:
            if "infeasible" in note:
                warn(f"HybridCheckpointer(policy='auto'): infeasible: no plan fits the budgets for inputs "
                     f"{signature or '(none)'}: {explain_note(note)}")
            else:
                log.info("auto plan: %s", explain_note(note))
        if len(self.plans) >= MAX_SIGNATURES:  # variable shapes: forget the oldest plan
            oldest = next(iter(self.plans))
            for table in (self.plans, self.profiles, self.reserves, self._warm, self.op_probes):
                table.pop(oldest, None)
        self.profiles[signature] = profile
        self.plans[signature] = plan
        rt.pool.reserve(plan.predicted_host_bytes)  # grow pinned slabs now, not mid-step
        self.reserves[signature] = reserve
        log.info("auto plan for %s: %s; predicted step %.2f ms, peak %.1f MiB (budget %.1f MiB, "
                 "%.1f MiB of it reserved for backward)", signature or "(no inputs)", plan_mix(plan),
                 plan.predicted_step_s * 1e3, plan.predicted_peak_bytes / 2**20, budget / 2**20,
                 reserve / 2**20)

    # -- decisions -----------------------------------------------------------------------------
    def region(self, site: RegionSite, segment: int) -> SegmentPlan:
        plan = self._current()
        if plan is None:
            return _PROFILING
        return plan.segments[segment] if segment < len(plan.segments) else SegmentPlan(Action.KEEP)

    def gap(self, segment: int, tail: bool) -> SegmentPlan:
        plan = self._current()
        if plan is None or segment >= len(plan.segments):
            return SegmentPlan(Action.KEEP)
        return plan.segments[segment]

    def tensor(self, site: TensorSite, segment: SegmentPlan) -> Action:
        plan = self._current()
        return Action.OFFLOAD if plan is not None and site.index in plan.offload_ids else Action.KEEP

    def op_policy(self, site: RegionSite, segment: int, plan: SegmentPlan) -> StoreOps | None:
        """A selective segment's op policy: store the plan's ops, named as profiled."""
        if not plan.selective or self._plan is None:
            return None
        profile = self.profiles.get(self._plan.signature)
        ops = profile.segments[segment].ops if profile is not None and segment < len(profile.segments) else ()
        return StoreOps({k: ops[k].name for k in plan.store_ops if k < len(ops)})

    def op_probe(self, site: RegionSite, segment: int) -> OpProbe | None:
        """On the warm-up forward of an input shape, an `OpProbe` per region call."""
        settings = self.runtime.settings
        if self._plan is not None or self._warm.get(self._signature) or settings.op_policy or not settings.op_level:
            return None
        probe = self._op_probes[segment] = OpProbe(self.runtime.backend.mark)
        return probe

    def lookahead(self) -> int:
        return self._plan.lookahead if self._plan is not None else 2

    def current_plan(self) -> PlanView | None:
        plan = self._plan
        if plan is None:
            return None
        return PlanView.of(plan, self.profiles.get(plan.signature), self.reserves.get(plan.signature, 0))

    def prediction(self) -> dict | None:
        """The plan's figures and per-segment rows (`planview.describe`); offloaded bytes count
        the inputs of recomputed regions that the plan offloads."""
        plan = self.current_plan()
        return None if plan is None else plan.describe()
