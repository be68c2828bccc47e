"""policy="auto": measure a step, ask the scheduler for a plan, carry it out.

Per input-shape signature (the shapes and dtypes of the model's inputs, `inputs.py`):
  0. once two shapes of the signature's family (the same inputs but for batch and sequence)
     have been profiled, a new shape is planned from `scheduler.shapes.ShapeFit` with zero
     profiling steps, whenever the fit pins down every saved storage's bytes there;
  1. otherwise the first forwards run under the profiling plan the budget allows: every region
     kept when keep's peak measured at a shape of the family at least as large in batch and
     sequence fits the budget (saved bytes never shrink as batch or sequence grow); else every
     region recomputed (the least device memory: keep's peak is unknown at the first shape,
     and the default budget, free memory, may not hold it). The
     first of them warms up (allocator, kernels, page faults), the second is measured: every
     saved tensor and the segment times; the profile joins the family's fit;
  2. after its backward, the next forward builds the `Profile` (with the link measured on our
     own pool), plans under the device budget less a backward reserve (below) and the host
     budget, and runs the plan;
  3. a forward whose saved tensors differ from the profile (data-dependent shapes) still runs
     correctly (the plan only ever changes where bytes live), and its signature is profiled again.
     Under a plan from the fit, each step's saved bytes (counted exactly) join the fit; if they
     differ from the prediction, the next forward plans again from the corrected fit.

Pipeline stages (`hc.attach(stage_module)` under a `torch.distributed.pipelining` schedule): each
micro-batch's forward is a forward, several are in flight at once, and their backwards come in
the schedule's order. The profiled forward is timed on its own marks (`ForwardPass.timeline`),
not the step's, which interleaves every micro-batch; and the plan is made for the most forwards
seen in flight at once (`Runtime.max_in_flight`), so the device and host budgets cover every
live micro-batch (scheduler.inflight).

Op level: the warm-up forward also runs each region call under an `OpProbe` (opprofile.py), so
the profile carries every region's ops (bytes, time) and the planner may recompute a region
selectively; such a region call then gets a `StoreOps` op policy (storeops.py) that stores the
chosen ops' outputs through selective.py's mechanism. Not with a user's `op_policy` (it wins),
nor with granularity="block".

Under tensor parallelism every rank of the meshes the profiled forward saved DTensors on runs one
plan, made under the ranks' smallest budget: a region recomputed on one rank and not on another
would pair the collectives of its replay with other collectives (a hang or wrong gradients).
So once a profiled forward saved DTensors, every new shape is profiled under full recompute and
nothing is planned from the fit (both would rest on one rank's budget alone).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import replace
from typing import TYPE_CHECKING

from scheduler import Plan, backward_reserve as scheduler_reserve, plan_in_flight, plan_uniform
from scheduler.plan import Action, SegmentPlan
from scheduler.shapes import ShapeFit

from ..transfer.linkprobe import measure_link
from ..core.dtensor import first_rank_value, smallest_over
from ..core.errors import warn
from ..core.policy import Policy, RegionSite, TensorSite
from ..core.selective import OpPolicy
from ..observe.planview import PlanView, explain_note, plan_mix
from .inputs import InputShape, input_shape
from .opprofile import OpProbe, attach_ops, dispatch_overhead_s
from .profile import build_profile
from .storeops import StoreOps
from .workset import WorkingSetProbe

if TYPE_CHECKING:
    from ..core.hooks import ForwardPass
    from ..core.runtime import Runtime

log = logging.getLogger(__name__)

_RECOMPUTE, _KEEP = SegmentPlan(Action.RECOMPUTE), SegmentPlan(Action.KEEP)
WARMUP_FORWARDS = 1  # profiling forwards per signature that are not measured
MAX_SIGNATURES = 16  # plans kept; a shape the fit pins down is planned again without profiling
MAX_FAMILIES = 8  # shape fits kept (one per family of signatures)


def backward_reserve(profile, model, default_budget: bool) -> int:
    """Bytes the plan leaves free under the device budget for what backward allocates besides
    saved activations.

    With measured working sets (workset.py) the simulator counts each segment's own, so a budget
    the user gave is planned whole: it bounds activation memory, and the parameters' gradients
    are the model's, allocated alike under every plan (like the parameters and the optimizer
    state). The default budget is free device memory measured before backward allocates those
    gradients (from `zero_grad(set_to_none=True)` they accumulate across segments), so there
    they are held back. Without measured working sets (another profiler was running), the
    scheduler's flat estimate: half the largest segment's saved bytes."""
    if not profile.has_working_sets:
        return scheduler_reserve(profile)
    if model is None or not default_budget:
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
        self.limits: dict[str, int] = {}  # signature -> device bytes its plan holds to (Rule 10)
        self._pending: tuple | None = None  # (forward, signature) awaiting its backward
        self._warm: dict[str, int] = {}  # signature -> profiling forwards seen
        self._signature = ""
        self._plan: Plan | None = None  # the plan this forward runs; None while profiling
        self._decided = False
        self._link = None  # the host link, measured before the first forward
        self.worksets: dict[str, dict[str, int]] = {}  # signature -> segment name -> backward bytes
        self._probe: list | None = None  # [WorkingSetProbe, signature, its step's stats] over a warm-up step
        self._shape: InputShape | None = None  # this forward's inputs
        self._profiling = _RECOMPUTE  # the plan of a profiling forward
        self.fits: dict[str, ShapeFit] = {}  # family -> the fit of its profiles
        self.sources: dict[str, str] = {}  # signature -> "profile" or "fit": where its plan came from
        self.profiling_steps = 0  # steps that ran a profiling forward
        self.fitted_plans = 0  # plans made from a fit, with no profiling step
        self.fit_error: float | None = None  # last fitted step: measured / predicted saved bytes - 1
        self._profiled_step = 0  # the last step counted in profiling_steps
        self._tensor_parallel = False  # a profiled forward saved DTensors
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
        self._shape = None
        self._plan = None
        self._decided = False
        self._op_probes = {}

    def model_inputs(self, args: tuple, kwargs: dict) -> None:
        if not self._decided:
            self._shape = input_shape(args, kwargs)
            self._signature = self._shape.signature

    def _current(self) -> Plan | None:
        if not self._decided:
            self._decided = True
            self._plan = self.plans.get(self._signature) or self._plan_from_fit()
            if self._plan is None:
                self._profiling = self._profiling_plan()
                if not self._warm.get(self._signature) and self._probe is None \
                        and self._signature not in self.worksets:
                    self._start_probe()
        return self._plan

    # -- new shapes: from the fit, or profiled under the plan the budget allows -------------------
    def _plan_from_fit(self) -> Plan | None:
        """Step 0: the plan for a new shape from its family's fit (None: not pinned down)."""
        shape = self._shape
        fit = self.fits.get(shape.family) if shape is not None and not self._tensor_parallel else None
        if fit is None:
            return None
        profile = fit.predict(shape.batch, shape.seq, signature=shape.signature,
                              min_offload_bytes=self.runtime.settings.min_offload_bytes)
        if profile is None:
            return None
        self.fitted_plans += 1
        return self._adopt(profile, {}, "fit")

    def _profiling_plan(self) -> SegmentPlan:
        """Step 1: keep when keep's known peak fits, else recompute. Without a known peak keep
        is not tried, budget or none: a first step that runs out of device memory loses it."""
        rt = self.runtime
        shape = self._shape
        if shape is None or self._tensor_parallel:
            return _RECOMPUTE
        budget = rt.device_budget()
        for signature, profile in self.profiles.items():
            at = profile.meta.get("shape")
            if (self.sources.get(signature) == "profile" and at is not None and at.family == shape.family
                    and at.batch >= shape.batch and at.seq >= shape.seq):
                keep = plan_uniform(profile, Action.KEEP).predicted_peak_bytes
                if keep + self.reserves.get(signature, 0) <= budget:
                    return _KEEP
        return _RECOMPUTE

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
            if forward.stats is not None and forward.stats.step != self._profiled_step:
                self._profiled_step = forward.stats.step
                self.profiling_steps += 1
            seen = self._warm.get(self._signature, 0)
            if seen == 0 and probes:
                self.op_probes[self._signature] = probes
            self._warm[self._signature] = seen + 1
            if seen >= WARMUP_FORWARDS:
                self._pending = (forward, self._signature, self._shape)
            return
        profile = self.profiles[self._signature]
        seen = {(r.id, r.nbytes) for r in forward.records}
        same = len(forward.segments) == len(plan.segments) and seen == {(r.id, r.nbytes) for r in profile.tensors}
        if self.sources.get(self._signature) == "fit":
            measured = sum(r.nbytes for r in forward.records)
            self.fit_error = measured / profile.total_saved_bytes - 1 if profile.total_saved_bytes else None
            shape = self._shape
            fit = self.fits.get(shape.family) if shape is not None else None
            if fit is not None and fit.add(shape.batch, shape.seq, build_profile(forward, None, self._link),
                                           timed=False) and not same:
                log.info("auto: the step at %s saved %+.2f%% bytes against the fit's prediction; planning "
                         "it again from the corrected fit", self._signature, 100 * (self.fit_error or 0.0))
                self.plans.pop(self._signature, None)
                return
        if not same:
            log.info("auto: this forward saved other tensors than its profile (signature %s); "
                     "profiling it again", self._signature)
            self.plans.pop(self._signature, None)
            self._warm.pop(self._signature, None)

    def _finish_pending(self) -> None:
        if self._pending is None:
            return
        forward, signature, shape = self._pending
        timeline = forward.timeline  # its own marks: other micro-batches may run in between
        if not timeline.backward or any(end is None for _, end in timeline.backward):
            return  # its backward has not run yet
        self._pending = None
        rt = self.runtime
        rt.backend.settle()
        profile = build_profile(forward, timeline.resolve(rt.backend), self._link, signature,
                                self.worksets.get(signature, {}))
        probes = self.op_probes.pop(signature, {})
        profile = attach_ops(profile, probes, rt.backend.seconds,
                             dispatch_overhead_s(rt.device) if probes else 0.0)
        profile = replace(profile, meta={**profile.meta, "shape": shape})
        if forward.meshes:
            self._tensor_parallel = True
        elif shape is not None:
            fit = self.fits.pop(shape.family, None) or ShapeFit()
            self.fits[shape.family] = fit  # the latest family leaves last
            while len(self.fits) > MAX_FAMILIES:
                del self.fits[next(iter(self.fits))]
            fit.add(shape.batch, shape.seq, profile, timed=True)
        self._adopt(profile, forward.meshes, "profile")

    def _adopt(self, profile, meshes: dict, source: str) -> Plan:
        """Plan `profile` (from a profiling step, or the fit: `source`) and make it its
        signature's plan."""
        rt = self.runtime
        signature = profile.signature
        budget = rt.device_budget()
        if meshes:  # tensor parallelism: the ranks of a mesh plan alike (dtensor.py)
            budget = smallest_over(meshes, budget)
        reserve = min(backward_reserve(profile, rt.settings.model, rt.settings.device_budget is None),
                      budget // 2)
        live = max(1, rt.max_in_flight)  # pipeline micro-batches in flight at once
        plan = plan_in_flight(profile, budget - reserve, rt.settings.host_budget, live,
                              keep_last=rt.settings.keep_last)
        if meshes:
            plan = first_rank_value(meshes, plan)
        for note in plan.notes:
            if "infeasible" in note:
                warn(f"HybridCheckpointer(policy='auto'): infeasible: no plan fits the budgets for inputs "
                     f"{signature or '(none)'}: {explain_note(note)}")
            else:
                log.info("auto plan: %s", explain_note(note))
        if signature not in self.plans and len(self.plans) >= MAX_SIGNATURES:  # variable shapes: forget the oldest plan
            oldest = next(iter(self.plans))
            for table in (self.plans, self.profiles, self.reserves, self.limits, self._warm, self.sources,
                          self.worksets, self.op_probes):
                table.pop(oldest, None)
        self.plans.pop(signature, None)  # re-inserted last: the newest plan is forgotten last
        self.profiles[signature] = profile
        self.plans[signature] = plan
        self.sources[signature] = source
        rt.pool.reserve(plan.predicted_host_bytes)  # grow pinned slabs now, not mid-step
        self.reserves[signature] = reserve
        # The forward waits on lagging copies above this (Rule 10): the budget the plan was made
        # under, or an infeasible plan's own peak (it runs anyway; waiting would not bring it down).
        self.limits[signature] = max(budget - reserve, plan.predicted_peak_bytes)
        log.info("auto plan for %s (from the %s): %s; predicted step %.2f ms, peak %.1f MiB (budget "
                 "%.1f MiB, %.1f MiB of it reserved for backward; %d forward(s) in flight)",
                 signature or "(no inputs)", source, plan_mix(plan), plan.predicted_step_s * 1e3,
                 plan.predicted_peak_bytes / 2**20, budget / 2**20, reserve / 2**20, live)
        return plan

    # -- decisions -----------------------------------------------------------------------------
    def region(self, site: RegionSite, segment: int) -> SegmentPlan:
        plan = self._current()
        if plan is None:
            return self._profiling
        return plan.segments[segment] if segment < len(plan.segments) else SegmentPlan(Action.KEEP)

    def gap(self, segment: int, tail: bool) -> SegmentPlan:
        plan = self._current()
        if plan is None or segment >= len(plan.segments):
            return SegmentPlan(Action.KEEP)
        return plan.segments[segment]

    def tensor(self, site: TensorSite, segment: SegmentPlan) -> Action:
        plan = self._current()
        return Action.OFFLOAD if plan is not None and site.index in plan.offload_ids else Action.KEEP

    def op_policy(self, site: RegionSite, segment: int, plan: SegmentPlan) -> OpPolicy | None:
        """A selective segment's op policy: store the plan's ops, named as profiled (the replay
        need not ask it again: it hands back what the forward stored)."""
        if not plan.selective or self._plan is None:
            return None
        profile = self.profiles.get(self._plan.signature)
        ops = profile.segments[segment].ops if profile is not None and segment < len(profile.segments) else ()
        return OpPolicy(StoreOps({k: ops[k].name for k in plan.store_ops if k < len(ops)}), on_replay=False)

    def op_probe(self, site: RegionSite, segment: int) -> OpProbe | None:
        """On the warm-up forward of an input shape, an `OpProbe` per region call."""
        settings = self.runtime.settings
        if self._plan is not None or self._warm.get(self._signature) or settings.op_policy or not settings.op_level:
            return None
        probe = self._op_probes[segment] = OpProbe(self.runtime.backend.mark)
        return probe

    def lookahead(self) -> int:
        return self._plan.lookahead if self._plan is not None else 2

    def device_limit(self) -> int | None:
        plan = self._plan
        return None if plan is None else self.limits.get(plan.signature)

    def current_plan(self) -> PlanView | None:
        plan = self._plan
        if plan is None:
            return None
        return PlanView.of(plan, self.profiles.get(plan.signature), self.reserves.get(plan.signature, 0))

    def shapes(self) -> dict:
        """Profiling steps run, plans made from a fit, and where the current plan came from."""
        plan = self._plan
        source = self.sources.get(plan.signature) if plan is not None else None
        return dict(profiling_steps=self.profiling_steps, profiled_shapes=sum(
                        f.timed_shapes for f in self.fits.values()),
                    fitted_plans=self.fitted_plans,
                    plan_source=source, fit_error=self.fit_error if source == "fit" else None)

    def prediction(self) -> dict | None:
        """The plan's figures and per-segment rows (`planview.describe`); offloaded bytes count
        the inputs of recomputed regions that the plan offloads."""
        plan = self.current_plan()
        return None if plan is None else plan.describe()
