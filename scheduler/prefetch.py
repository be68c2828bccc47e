"""When reloads are issued in backward: the lookahead `d` and the issue order.

The formula (DESIGN.md §5). For a segment s whose bytes come back from the host, let R_s be the
seconds of its reloads (`costmodel.h2d_seconds` summed over them) and B the backward seconds of
the segment whose backward runs just before s needs them (segment need + 1, its replay included
when it is recomputed). Then

    d_s = ceil(R_s / B) + 1        d = max(1, max over s of d_s), at most n - 1

The ceiling is the number of segments whose backward it takes to hide the copy; the +1 is slack
for the reloads queued ahead of it on the same H2D stream. A larger d never adds stall time but
holds reloaded bytes longer, so with a device budget d is then lowered until the simulated peak
fits (the "capped by device headroom" of §5), never below 1.
"""
from __future__ import annotations

import math

from .hardware import Hardware
from .plan import Plan
from .profile import Profile
from .simulate import RECOMPUTE, Simulator, issue_schedule


def formula_lookahead(sim: Simulator, codes: tuple[int, ...], offload_ids: frozenset[int]) -> int:
    """d from the formula of the module docstring, before the headroom cap."""
    n = sim.n
    d = 1
    for need, reload_s in sim.reloads(codes, offload_ids).values():
        before = need + 1
        if before >= n:  # needed by the first backward segment: no compute to hide behind
            continue
        window = sim.backward_s[before]
        if codes[before] >= RECOMPUTE:  # its replay runs before its backward, on compute too
            window += sim.forward_s[before]
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

    The peak does not decrease as d grows (reloads are only issued earlier), so a binary
    search finds it; stall time does not increase with d, so this d has the least stall among
    those that fit.
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

    A segment's reloads are issued `lookahead` (default `plan.lookahead`) segments before the
    latest segment that needs them, or at the start of backward when that is past the end;
    those issued together come in reverse pack order (highest segment first), and inside one
    segment its tensors go in reverse id order. Index j of the result is segment j.
    """
    sim = Simulator(profile)
    codes = sim.codes(plan)
    d = plan.lookahead if lookahead is None else lookahead
    if d < 1:
        raise ValueError(f"issue_order: lookahead must be >= 1, got {d}")
    needs = {s: need for s, (need, _) in sim.reloads(codes, plan.offload_ids).items()}
    return issue_schedule(needs, sim.n, d)
