"""One pipeline stage's plan when several of its micro-batches are in flight at once.

The runtime carries out one plan per forward, and on a pipeline stage every micro-batch's
forward is a forward. `live` micro-batches hold their activations at once (1F1B: stage i of N
holds min(N - i, M); GPipe: all M; `pipeline.live_microbatches`), and the stage's device budget
covers all of them. While one micro-batch runs its forward or backward (its own peak, as
`planner.plan` simulates it) the other live - 1 hold what they keep from their forward to their
backward (`pipeline.cost_of(...).resident`: kept tensors and the kept inputs of recomputed
segments), so, in bytes:

    stage peak   = (live - 1) * resident + peak  <=  device_budget
    pinned bytes = (live - 1) * moved + host     <=  host_budget

`plan_in_flight` plans one micro-batch under a share of the budgets (the host budget split
evenly among the live micro-batches) and lowers the device share by the overrun until the stage
fits (by the overrun / live: a byte off the share comes off every live micro-batch); a lower share leaves fewer resident bytes (more offloaded or recomputed), so it converges,
and at a share of 0 it is the planner's least-memory plan. Full recompute and offload-all are
candidates too (the planner minimises one micro-batch's peak, not what the waiting ones hold):
of the candidates that fit both budgets the fastest (predicted step of one micro-batch) wins,
else the one with the least device bytes. The plan it returns predicts the
stage's peak and pinned bytes, not one micro-batch's. Every micro-batch gets the same plan: the
oldest-first per-micro-batch choice of `pipeline.plan_pipeline` needs the other stages' timings,
which one stage's runtime does not measure.
"""
from __future__ import annotations

import dataclasses

from .pipeline import cost_of
from .plan import Action, Plan
from .planner import check_budgets, plan as plan_one, plan_uniform
from .profile import Profile
from .simulate import simulate

MAX_ROUNDS = 16  # planner calls per stage plan (each lowers the device share)


def stage_peak(profile: Profile, plan: Plan, live: int) -> tuple[int, int]:
    """(device bytes, pinned host bytes) of a stage running `plan` for `live` micro-batches at
    once: one micro-batch's simulated peaks plus what each waiting one holds."""
    cost, one = cost_of(profile, plan, "P"), simulate(profile, plan)
    return ((live - 1) * cost.resident + one.peak_device_bytes,
            (live - 1) * cost.moved + one.peak_host_bytes)


def plan_in_flight(profile: Profile, device_budget: int, host_budget: int | None, live: int, *,
                   keep_last: int = 1) -> Plan:
    """The plan for each of `live` micro-batches in flight at once on one stage, under the
    stage's `device_budget` and `host_budget` (bytes, covering all of them); `live=1` is
    `planner.plan` itself. Never raises for a budget that cannot be met: a note says so."""
    check_budgets("plan_in_flight", device_budget, host_budget)
    if isinstance(live, bool) or not isinstance(live, int) or live < 1:
        raise ValueError(f"plan_in_flight: live must be an int >= 1 (micro-batches in flight), got {live!r}")
    if live == 1:
        return plan_one(profile, device_budget, host_budget, keep_last=keep_last)
    host_share = None if host_budget is None else host_budget // live
    candidates, share = [], device_budget
    for _ in range(MAX_ROUNDS):
        plan = plan_one(profile, share, host_share, keep_last=keep_last)
        candidates.append((plan, share))
        device, _ = stage_peak(profile, plan, live)
        if device <= device_budget or share == 0:
            break
        # Each byte off the share comes off the running micro-batch and every waiting one.
        share = max(0, share - max(1, -(-(device - device_budget) // live)))
    # The planner minimises one micro-batch's peak; what the other live - 1 hold is another
    # matter (recomputing the last block lowers no peak, but every waiting micro-batch's bytes).
    candidates += [(plan_uniform(profile, action), None) for action in (Action.RECOMPUTE, Action.OFFLOAD)]
    scored = []
    for plan, share in candidates:
        device, host = stage_peak(profile, plan, live)
        fits = device <= device_budget and (host_budget is None or host <= host_budget)
        scored.append(((not fits, plan.predicted_step_s if fits else device), plan, device, host, share))
    _, plan, device, host, share = min(scored, key=lambda c: c[0])
    notes = tuple(n for n in plan.notes if "infeasible" not in n)
    if device > device_budget:
        notes += (f"infeasible: {live} micro-batches in flight peak at {device} device bytes with the "
                  f"least-memory plan found, over the stage's budget of {device_budget}",)
    else:
        how = f"each planned under {share} device bytes" if share is not None else "a uniform plan"
        notes += (f"{live} micro-batches in flight: {how}; stage peak {device} of the stage's "
                  f"{device_budget} device bytes",)
    return dataclasses.replace(plan, predicted_peak_bytes=device, predicted_host_bytes=host, notes=notes)
