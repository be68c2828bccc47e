"""When reloads are issued in backward: the lookahead `d` and the issue order.

The formula (DESIGN.md §5). For each segment m that needs reloaded bytes in backward, let R_m be
the seconds of the reloads it is the latest user of (`costmodel.h2d_seconds` summed over them)
and B the backward seconds of segment m + 1, whose backward runs just before (its replay
included when it is recomputed). Then

    d_m = ceil(R_m / B) + 1        d = max(1, max over m of d_m), at most n - 1

The ceiling is the number of segments whose backward it takes to hide the copy; the +1 is slack
for the reloads queued ahead of it on the same H2D stream. A larger d never adds stall time but
holds reloaded bytes longer, so with a device budget d is then lowered until the simulated peak
fits (the "capped by device headroom" of §5), never below 1. The planner judges plans at their
fastest d that fits (`fastest_lookahead`) and hands out the formula's d when it is as fast
(`best_lookahead`).
"""
from __future__ import annotations

import math

from .hardware import Hardware
from .plan import Plan
from .profile import Profile
from .simulate import (OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD_INPUTS, Simulator, Timeline,
                       issue_schedule)


def formula_lookahead(sim: Simulator, codes: tuple[int, ...], offload_ids: frozenset[int]) -> int:
    """d from the formula of the module docstring, before the headroom cap."""
    n = sim.n
    d = 1
    for need, reload_s in sim.reloads(codes, offload_ids).items():
        before = need + 1
        if before >= n:  # needed by the first backward segment: no compute to hide behind
            continue
        window = sim.backward_s[before]
        if codes[before] >= RECOMPUTE:  # its replay runs before its backward, on compute too
            window += sim.replay_s[before]
        d_s = n - 1 if window <= 0 else math.ceil(reload_s / window) + 1
        d = max(d, d_s)
    return max(1, min(d, n - 1))


def capped_lookahead(sim: Simulator, codes: tuple[int, ...], offload_ids: frozenset[int],
                     d: int, device_budget: int) -> int:
    """The largest lookahead <= d whose simulated peak fits `device_budget` (1 if none does)."""
    while d > 1 and sim.run(codes, offload_ids, d).peak_device_bytes > device_budget:
        d -= 1
    return d


def max_fitting_lookahead(sim: Simulator, codes: tuple[int, ...], offload_ids: frozenset[int],
                          device_budget: int, lo: int = 1, hi: int | None = None) -> int:
    """The largest lookahead in [lo, hi] (hi defaults to n - 1) whose simulated peak fits
    `device_budget`; `lo` when none above it does (the caller knows whether `lo` fits).

    The peak does not decrease as d grows: the H2D stream's order does not depend on d
    (`simulate`, rule 3), so every reload is only allocated earlier in the order of events, and
    a faster backward only moves D2H frees later in it; a binary search finds the largest d
    that fits. Stall time does not increase with d (every reload is issued no later, on a
    stream of fixed order), so this d has the least stall among those that fit.
    """
    hi = max(lo, sim.n - 1) if hi is None else hi
    if sim.run(codes, offload_ids, hi).peak_device_bytes <= device_budget:
        return hi
    while hi - lo > 1:  # invariant: hi does not fit; lo fits or is the floor
        mid = (lo + hi) // 2
        if sim.run(codes, offload_ids, mid).peak_device_bytes <= device_budget:
            lo = mid
        else:
            hi = mid
    return lo


def lookahead(profile: Profile, plan: Plan, hardware: Hardware | None = None, *,
              device_budget: int | None = None) -> int:
    """The prefetch lookahead d for `plan` (formula in the module docstring).

    With `device_budget` (bytes), d is capped so the simulated peak fits, never below 1.
    """
    sim = Simulator(profile, hardware)
    codes = sim.codes(plan)
    d = formula_lookahead(sim, codes, plan.offload_ids)
    if device_budget is not None:
        d = capped_lookahead(sim, codes, plan.offload_ids, d, device_budget)
    return d


def issue_order(profile: Profile, plan: Plan,
                lookahead: int | None = None) -> tuple[tuple[int, ...], ...]:
    """For each segment j, the segments whose reloads are issued when backward reaches j.

    Each reload is issued `lookahead` (default `plan.lookahead`) segments before the latest
    segment that needs it, or at the start of backward when that is past the end; a segment
    whose tensors have different needs (saved again later) appears at each of their points.
    At one point segments come highest first, and inside one segment its tensors go in reverse
    id order (`simulate`, rule 3). Index j of the result is segment j.
    """
    sim = Simulator(profile)
    codes = sim.codes(plan)
    d = plan.lookahead if lookahead is None else lookahead
    if d < 1:
        raise ValueError(f"issue_order: lookahead must be >= 1, got {d}")
    needs: dict[int, set[int]] = {}
    for s, c in enumerate(codes):
        if c == RECOMPUTE_OFFLOAD_INPUTS and sim.input_bytes[s]:
            needs.setdefault(s, set()).add(s)
        elif c == OFFLOAD:
            for x in sim.tensors[s]:
                if x.id in plan.offload_ids:
                    needs.setdefault(s, set()).add(x.last)
    return issue_schedule(needs, sim.n, d)


_REL_EPS = 1e-9  # relative step-time change below which two lookaheads tie


def fastest_lookahead(sim: Simulator, codes: tuple[int, ...], ids: frozenset[int],
                      device_budget: int) -> tuple[Timeline, int]:
    """The fastest simulated step of `codes` and `ids` over every lookahead whose peak fits
    `device_budget`, and that d (the largest that fits); d = 1 and its step when none fits
    (the least peak). One simulation when d = n - 1 fits, a binary search otherwise
    (`max_fitting_lookahead` says why that is exact)."""
    n = sim.n
    fw = sim.forward(codes, ids)
    if n < 2 or not fw.copies:
        return sim.backward(fw, codes, 1), 1
    hi = n - 1
    tl = sim.backward(fw, codes, hi)
    if tl.peak_device_bytes <= device_budget:
        return tl, hi
    lo, best = 1, sim.backward(fw, codes, 1)
    if best.peak_device_bytes > device_budget:
        return best, 1
    while hi - lo > 1:  # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        tl = sim.backward(fw, codes, mid)
        if tl.peak_device_bytes <= device_budget:
            lo, best = mid, tl
        else:
            hi = mid
    return best, lo


def best_lookahead(sim: Simulator, codes: tuple[int, ...], ids: frozenset[int],
                   device_budget: int) -> tuple[Timeline, int]:
    """The lookahead a plan gets (planner rule 3) and its simulated step: the formula's d,
    capped by the headroom, when its step ties the fastest that fits; otherwise the fastest
    (`fastest_lookahead`). Either way the step is the least over every d that fits."""
    fast, d_fast = fastest_lookahead(sim, codes, ids, device_budget)
    if not sim.reloads(codes, ids):
        return fast, d_fast
    d = min(formula_lookahead(sim, codes, ids), d_fast)
    if d == d_fast:
        return fast, d
    tl = sim.run(codes, ids, d)
    if tl.step_s <= fast.step_s * (1 + _REL_EPS):
        return tl, d
    return fast, d_fast
