"""The exhaustive reference: the best per-segment plan of a small profile, by branch and bound.

Each segment takes one of KEEP, OFFLOAD (all its offloadable tensors), RECOMPUTE, or RECOMPUTE
with its inputs offloaded; each full assignment runs with the largest lookahead whose simulated
peak fits the device budget (the least stall among those that fit, `prefetch`). The search
walks segments in forward order and cuts a branch when one of these bounds, each a true lower
bound on every completion of the branch, already fails:

- Bound 1 (host). Host bytes only grow as segments are added.
- Bound 2 (forward memory). The forward of the assigned prefix is simulated exactly (allocations,
  D2H queue, frees); later segments add at least their smallest allocation and, from then on,
  their smallest resident share.
- Bound 3 (backward memory). While segment j's backward runs, the device holds all of j (its
  replay and inputs too when recomputed), the resident share of every segment before it, and the
  reloads of segment j - 1 (issued at least one segment ahead).
- Bound 4 (time). step >= forward + sum(B) + replays chosen so far; and the H2D stream, started
  at the end of forward in reverse pack order, must have brought back each assigned reload
  (not before its D2H ended) before the backward that needs it, after which the backward of
  that segment and all before it still has to run.

A branch is cut when its time bound cannot beat the best plan found, so the result is optimal
over this space (up to float rounding); ties keep the first found, KEEP-first.
"""
from __future__ import annotations

import math

from .hardware import Hardware
from .plan import Plan
from .planner import build_plan, check_budgets, evaluate
from .profile import Profile
from .simulate import KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD_INPUTS, Simulator

MAX_SEGMENTS = 10


class _Search:
    """All state of one exact search (bounds, incumbent); used once."""

    def __init__(self, sim: Simulator, device_budget: int, host_budget: int | None) -> None:
        self.sim = sim
        self.device_budget = device_budget
        self.host_budget = math.inf if host_budget is None else host_budget
        n = sim.n
        self.choices: list[tuple[int, ...]] = []
        self.moved: list[frozenset[int]] = []
        for s in range(n):
            ids = frozenset(x.id for x in sim.tensors[s] if x.offloadable)
            self.moved.append(ids)
            ch = [KEEP]
            if ids:
                ch.append(OFFLOAD)
            if sim.recomputable[s]:
                ch.append(RECOMPUTE)
                if sim.input_bytes[s]:
                    ch.append(RECOMPUTE_OFFLOAD_INPUTS)
            self.choices.append(tuple(ch))
        # bytes each choice keeps on the device from its forward to its backward
        self.resident = [{c: sim.footprint(s, c)[0] for c in self.choices[s]} for s in range(n)]
        self.min_resident = [min(r.values()) for r in self.resident]
        self.min_alloc = [min(sim.saved[s] if c < RECOMPUTE else sim.input_bytes[s] + sim.cross[s]
                              for c in self.choices[s]) for s in range(n)]
        self.forward_total = sum(sim.forward_s)
        self.base_step = self.forward_total + sum(sim.backward_s)
        self.starts = [sum(sim.forward_s[:s]) for s in range(n)]
        self.best_step = math.inf
        self.best: tuple[tuple[int, ...], int] | None = None
        self.leaves = 0

    def run(self) -> None:
        self._dfs(0, [], 0.0, [], 0, 0, 0.0, [])

    def _dfs(self, s: int, codes: list[int], d2h_free: float, inflight: list[tuple[float, int]],
             host: int, resident: int, replay_s: float, copies: list[tuple[int, float, float, int]]
             ) -> None:
        """Assign segment s. `inflight`: (D2H end, bytes) of copies still counted on the device;
        `resident`: bytes the assigned segments hold through forward; `copies`: (segment,
        D2H end, H2D seconds, need) of every assigned reload, in pack order."""
        sim = self.sim
        n = sim.n
        if s == n:
            self._leaf(codes, replay_s, copies)
            return
        t = self.starts[s]
        end = t + sim.forward_s[s]
        live = [(e, b) for e, b in inflight if e > t]  # copies done by now freed their bytes
        live_bytes = sum(b for _, b in live)
        for c in self.choices[s]:
            alloc = sim.saved[s] if c < RECOMPUTE else sim.input_bytes[s] + sim.cross[s]
            if resident + live_bytes + alloc > self.device_budget:  # bound 2
                continue
            new = self._copies(s, c)
            c_host = host + sum(cp[0] for cp in new)
            if c_host > self.host_budget:  # bound 1
                continue
            c_resident = resident + self.resident[s][c]
            c_replay = replay_s + (sim.forward_s[s] if c >= RECOMPUTE else 0.0)
            if self.base_step + c_replay >= self.best_step:  # bound 4, first half
                continue
            if not self._backward_fits(s, c, codes, resident):  # bound 3
                continue
            free = d2h_free
            c_inflight = list(live)
            c_copies = list(copies)
            for nbytes, d2h_s, h2d_s, need in new:
                free = max(free, end) + d2h_s
                c_inflight.append((free, nbytes))
                c_copies.append((s, free, h2d_s, need))
            if not self._future_fits(s, c_resident, c_inflight):  # bound 2, later segments
                continue
            codes.append(c)
            if self._time_bound(codes, c_replay, c_copies) < self.best_step:  # bound 4
                self._dfs(s + 1, codes, free, c_inflight, c_host, c_resident, c_replay, c_copies)
            codes.pop()

    def _copies(self, s: int, c: int) -> list[tuple[int, float, float, int]]:
        """(bytes, D2H seconds, H2D seconds, need) of the copies segment s makes under c."""
        sim = self.sim
        if c == OFFLOAD:
            return [(x.nbytes, x.d2h_s, x.h2d_s, x.last) for x in sim.tensors[s] if x.offloadable]
        if c == RECOMPUTE_OFFLOAD_INPUTS:
            return [(sim.input_bytes[s], sim.input_d2h_s[s], sim.input_h2d_s[s], s)]
        return []

    def _backward_fits(self, s: int, c: int, codes: list[int], resident_before: int) -> bool:
        """Bound 3 for segment s under choice c (`resident_before`: segments 0 .. s-1)."""
        sim = self.sim
        held = resident_before + sim.footprint(s, c)[2]
        if s > 0:  # segment s - 1 with its reloads issued, instead of its resident share
            p = codes[s - 1]
            held += sim.footprint(s - 1, p)[1] - sim.footprint(s - 1, p)[0]
        return held <= self.device_budget

    def _future_fits(self, s: int, resident: int, inflight: list[tuple[float, int]]) -> bool:
        sim = self.sim
        budget = self.device_budget
        extra = 0
        for m in range(s + 1, sim.n):
            tm = self.starts[m]
            live = sum(b for e, b in inflight if e > tm)
            if resident + extra + live + self.min_alloc[m] > budget:
                return False
            if resident + extra + sim.saved[m] > budget:  # bound 3 for segment m
                return False
            extra += self.min_resident[m]
        return True

    def _time_bound(self, codes: list[int], replay_s: float,
                    copies: list[tuple[int, float, float, int]]) -> float:
        sim = self.sim
        bound = self.base_step + replay_s
        if not copies:
            return bound
        # compute still to run from the backward start of segment j to the end of the step
        k = len(codes)
        tail = [0.0] * (sim.n + 1)
        acc = 0.0
        for j in range(sim.n):
            replay = j < k and codes[j] >= RECOMPUTE
            acc += sim.backward_s[j] + (sim.forward_s[j] if replay else 0.0)
            tail[j] = acc
        h2d = self.forward_total
        for _, d2h_end, h2d_s, need in reversed(copies):
            h2d = max(h2d, d2h_end) + h2d_s
            bound = max(bound, h2d + tail[need])
        return bound

    def _leaf(self, codes: list[int], replay_s: float,
              copies: list[tuple[int, float, float, int]]) -> None:
        self.leaves += 1
        ids = frozenset().union(*(self.moved[s] for s, c in enumerate(codes) if c == OFFLOAD))
        tl, d = evaluate(self.sim, tuple(codes), ids, self.device_budget)
        if tl.peak_device_bytes > self.device_budget or tl.peak_host_bytes > self.host_budget:
            return
        if tl.step_s < self.best_step:
            self.best_step = tl.step_s
            self.best = (tuple(codes), d)


def plan_exact(profile: Profile, device_budget: int, host_budget: int | None,
               hardware: Hardware | None = None) -> Plan:
    """The fastest plan over per-segment {KEEP, OFFLOAD all, RECOMPUTE, RECOMPUTE + offload
    inputs} that meets both budgets in the simulator, by branch and bound.

    For profiles of at most 10 segments (`ValueError` otherwise). When no assignment fits, the
    plan that moves all it may (recompute with offloaded inputs where allowed, offload
    elsewhere) is returned with a note saying so.
    """
    check_budgets("plan_exact", device_budget, host_budget)
    sim = Simulator(profile, hardware)
    if sim.n > MAX_SEGMENTS:
        raise ValueError(f"plan_exact: the profile has {sim.n} segments; the exhaustive search "
                         f"takes at most {MAX_SEGMENTS}. Use scheduler.plan for larger ones")
    search = _Search(sim, device_budget, host_budget)
    search.run()
    if search.best is None:
        codes = tuple(search.choices[s][-1] for s in range(sim.n))
        ids = frozenset().union(*(search.moved[s] for s, c in enumerate(codes) if c == OFFLOAD))
        return build_plan(sim, codes, ids, 1, notes=(
            f"plan_exact: no plan meets device_budget={device_budget} and "
            f"host_budget={host_budget}; returning the plan that moves all it may",))
    codes, d = search.best
    ids = frozenset().union(*(search.moved[s] for s, c in enumerate(codes) if c == OFFLOAD))
    return build_plan(sim, codes, ids, d, notes=(f"plan_exact: {search.leaves} plans simulated",))
