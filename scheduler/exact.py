"""The exact reference: the fastest plan of a small profile over the full plan format.

Each segment keeps, offloads any subset of its offloadable tensors, recomputes, or recomputes
with its inputs offloaded; each full assignment runs with its best lookahead (the largest d whose
simulated peak fits: stall time does not grow with d and the peak does not shrink, `prefetch`).
The search is a depth-first branch and bound over the segments in forward order and, inside an
offloading segment, over its tensors in save order (keep or offload each), simulating the
forward of the assigned prefix exactly as `simulate` does (rules 1 and 2). A branch is cut when
one of these bounds, each a lower bound on every completion of the branch, already fails:

- Bound 1 (host). Host bytes only grow as tensors are added, and what is left of the host
  budget caps what the rest can still offload (bounds 2 and 3).
- Bound 2 (forward memory). The device bytes of the assigned prefix at each save are exact; at
  the end of forward the rest adds at least its saved bytes less what recompute could drop and
  what the D2H stream could still copy before then. Dropping bytes has a price: the cheapest
  set of replays (0/1 over the candidates), or reloads on the H2D stream (bound 4).
- Bound 3 (backward memory). While segment j's backward runs (after its replay) the device
  holds all of j (and its inputs when recomputed), its working set, the resident share of every
  segment before it, and the reloads of tensors that j or j - 1 need (issued at least one
  segment ahead). Segments not yet assigned count at their least; what they could still shed is
  priced as in bound 2, copies that end after j's backward would start costing that stall.
- Bound 4 (time). step >= forward + sum(B) + replays chosen so far; and the H2D stream, which
  starts no earlier than the end of forward and takes reloads in a fixed order (latest need
  first, then reverse pack order), must bring each assigned reload back (not before its D2H
  ended) before the backward that needs it, after which that backward and all before it run.

A branch is also cut when its time bound cannot beat the best plan found by more than a relative
1e-12 (float noise), so the result is optimal over this space to that precision; ties keep the
first found (the incumbent, then KEEP before OFFLOAD). An `incumbent` plan (any plan of the
profile, such as `scheduler.plan`'s) only speeds this up.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable

from .hardware import Hardware
from .plan import Plan
from .planner import build_plan, check_budgets, resident_tail
from .prefetch import best_lookahead, fastest_lookahead
from .profile import Profile
from .simulate import KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD_INPUTS, Simulator

MAX_SEGMENTS = 10
MAX_TENSORS = 64  # offloadable tensors in all; the tree doubles with each
REL_TOL = 1e-12  # steps closer than this (relative) are equal: float noise, not a better plan


class _GaveUp(Exception):
    """The search bounded `max_branches` branches without finishing."""


class _Search:
    """All state of one exact search (bounds, incumbent); used once."""

    def __init__(self, sim: Simulator, device_budget: int, host_budget: int | None,
                 resident: frozenset[int], max_branches: float = math.inf) -> None:
        self.sim = sim
        self.max_branches = max_branches
        self.budget = device_budget
        self.host_budget = math.inf if host_budget is None else host_budget
        n = sim.n
        self.T = sim.forward_end
        self.bw = sim.hardware.bw_d2h
        self.modes: list[tuple[int, ...]] = []
        self.branch: list[tuple[bool, ...]] = []  # per tensor of s (save order): may offload
        for s in range(n):
            tail = s in resident
            modes = [KEEP]
            if sim.recomputable[s]:
                modes.append(RECOMPUTE)
                if sim.input_bytes[s] and not tail:
                    modes.append(RECOMPUTE_OFFLOAD_INPUTS)
            self.modes.append(tuple(modes))
            self.branch.append(tuple(x.offloadable and not tail for x in sim.tensors[s]))
        saved, cross, inputs = sim.saved, sim.cross, sim.input_bytes
        # least bytes s holds through backward of later segments, and at the end of forward
        self.min_res = []
        self.recompute_shed = []
        self.offload_shed = []
        for s in range(n):
            o = sum(x.nbytes for x, b in zip(sim.tensors[s], self.branch[s]) if b)
            least = saved[s] - o
            rec = saved[s]
            if RECOMPUTE in self.modes[s]:
                rec = inputs[s] + cross[s]
            if RECOMPUTE_OFFLOAD_INPUTS in self.modes[s]:
                rec = cross[s]
            self.min_res.append(min(least, rec))
            self.recompute_shed.append(max(0, saved[s] - rec))
            self.offload_shed.append(o)
        best_shed = [max(r, o) for r, o in zip(self.recompute_shed, self.offload_shed)]
        self.suf_saved = _suffix(saved)  # sums over segments >= i
        self.suf_r = _suffix(self.recompute_shed)
        self.suf_o = _suffix(self.offload_shed)
        self.suf_best = _suffix(best_shed)
        # Bound 3. fp1[s][mode]: bytes s holds while segment s + 1's backward runs (its own
        # reloads issued, its replay not yet run); ahead[s]: for the segments m >= s + 2, the
        # most that sum(min_res[s+1:m-1]) + least fp1 of m - 1 + saved[m] + W[m] reaches.
        self.fp1 = [{m: (saved[s] if m == KEEP else inputs[s] + cross[s]) for m in self.modes[s]}
                    for s in range(n)]
        gain = [0] * (n + 1)  # gain[m]: least fp1 of m - 1 + saved[m] + W[m]
        for m in range(1, n):
            gain[m] = min(self.fp1[m - 1].values()) + saved[m] + sim.working[m]
        self.ahead = [-math.inf] * (n + 2)
        for s in range(n - 3, -1, -1):
            self.ahead[s] = max(gain[s + 2], self.min_res[s + 1] + self.ahead[s + 1])
        # by_cost[i]: (bytes shed, replay seconds) of recomputable segments >= i, cheapest first
        self.by_cost = [[] for _ in range(n + 1)]
        for i in range(n - 1, -1, -1):
            items = list(self.by_cost[i + 1])
            if self.recompute_shed[i] > 0:
                items.append((self.recompute_shed[i], sim.forward_s[i]))
                items.sort(key=lambda r: r[1] / r[0])
            self.by_cost[i] = items
        self.bw_h2d = sim.hardware.bw_h2d
        # For segment m's backward: prefix sums (over i < j) of saved bytes and of what
        # recompute, offload and the better of them shed from the resident share; what
        # recompute sheds from the bytes m - 1 holds then; the recompute covers of the
        # segments strictly between s and m (bound 3 with costs).
        self.pre_saved = _prefix(saved)
        self.pre_r = _prefix(self.recompute_shed)
        self.pre_o = _prefix(self.offload_shed)
        self.pre_best = _prefix(best_shed)
        self.fp1_shed = [max(0, saved[i] - inputs[i] - cross[i]) if RECOMPUTE in self.modes[i]
                         else 0 for i in range(n)]
        self.bwd_after = [sum(sim.backward_s[m + 1:]) for m in range(n)]
        self.items_bwd = []
        for s_ in range(n):
            row = {}
            for m in range(s_ + 2, n):
                items = [(self.recompute_shed[i], sim.forward_s[i]) for i in range(s_ + 1, m - 1)
                         if self.recompute_shed[i] > 0]
                if self.fp1_shed[m - 1] > 0:
                    items.append((self.fp1_shed[m - 1], sim.forward_s[m - 1]))
                row[m] = cover_table(items)
            self.items_bwd.append(row)
        self.by_cost = [cover_table(items) for items in self.by_cost]
        self.bsum = []
        acc = 0.0
        for b in sim.backward_s:
            acc += b
            self.bsum.append(acc)
        self.base_step = self.T + acc
        self.best_step = math.inf
        self.cutoff = math.inf  # best_step less float noise: bounds at or above it are cut
        self.best: tuple[tuple[int, ...], frozenset[int], int] | None = None
        self.leaves = 0
        self.nodes = 0  # branches bounded
        # the branch being built
        self.codes: list[int] = []
        self.ids: list[int] = []
        self.frees: list[tuple[float, int]] = []  # D2H frees of assigned copies, time order
        self.chain: list[tuple[int, float, float, float]] = []  # (need, key, D2H end, H2D s)
        self.res: list[int] = []  # resident bytes of each assigned segment
        self.replay: list[float] = []  # replay seconds prefix over assigned segments
        self.cross_off: list[tuple[int, int, int]] = []  # (segment, last, bytes) offloaded

    # -- bounds --------------------------------------------------------------------------

    def _chain_bound(self, s: int, load: float) -> float:
        """Bound 4 from the H2D stream: the assigned reloads in stream order, with `load`
        seconds of reloads of tensors not assigned yet (needed by segment s or later, so they
        come before any reload needed before segment s) ahead of them."""
        replay = self.replay[-1] if self.replay else 0.0
        rp, k, bsum = self.replay, len(self.replay), self.bsum
        h = self.T
        bound = 0.0
        pending = load
        for need, _, d2h_end, h2d_s in reversed(self.chain):
            if pending and need < s:
                h += pending
                pending = 0.0
            if d2h_end > h:
                h = d2h_end
            h += h2d_s
            tail = h + bsum[need] + (rp[need] if need < k else replay)
            if tail > bound:
                bound = tail
        if load:  # the later reloads themselves, needed by segment s at the earliest
            tail = self.T + load + bsum[s] + replay
            if tail > bound:
                bound = tail
        return bound

    @staticmethod
    def _recompute_seconds(cover: tuple[list[float], list[float]], nbytes: float) -> float:
        """The least replay seconds of a set of recomputes that drops at least `nbytes`
        (`cover_table` of the candidates); inf when none does."""
        if nbytes <= 0:
            return 0.0
        sheds, costs = cover
        i = bisect.bisect_left(sheds, nbytes)
        return costs[i] if i < len(costs) else math.inf

    def _split_cut(self, s: int, need: float, cap_r: float, cap_o: float, shed_best: float,
                   items: tuple[list[float], list[float]], base: float,
                   delay: Callable[[float], float] | None = None) -> bool:
        """Whether `need` bytes that the rest must shed (`cap_r` at most by recompute of
        `items`, `cap_o` at most by offload) rule out beating the best plan: for offloaded
        x in [a, b], the step is at least base + replay(need - b) + delay(a) (the stall it
        takes for a bytes of copies to end in time) and at least the H2D bound with a / bw_h2d
        seconds of extra reloads."""
        if need <= 0:
            return False
        if need > min(shed_best, cap_r + cap_o):
            return True
        best = self.cutoff
        lo, hi = max(0.0, need - cap_r), min(float(need), cap_o)
        parts = 6 if hi > lo else 1
        for i in range(parts):
            a = lo + (hi - lo) * i / parts
            b = lo + (hi - lo) * (i + 1) / parts
            wait = delay(a) if delay is not None else 0.0
            if base + self._recompute_seconds(items, need - b) + wait >= best:
                continue
            if self._chain_bound(s, a / self.bw_h2d) >= best:
                continue
            return False
        return True

    def _copyable(self, s: int, start: float, until: float, upto: int, rest: int) -> float:
        """The most offloadable bytes of segment s's unassigned tensors (`rest`, ready now)
        and of segments s + 1 .. upto - 1 (ready when each starts) that the D2H stream, free
        from `start`, can have copied by `until`: for every tau >= start, what is ready before
        tau plus (until - tau) x bw_d2h."""
        bw, sim = self.bw, self.sim
        best = (until - start) * bw if until > start else 0.0
        ready = rest
        for i in range(s + 1, upto):
            t = sim.start[i]
            if t > start:
                cap = ready + ((until - t) * bw if until > t else 0.0)
                if cap < best:
                    best = cap
            ready += self.offload_shed[i]
        return min(best, ready)

    def _copy_time(self, s: int, start: float, nbytes: float, upto: int, rest: int) -> float:
        """The earliest time the D2H stream (free from `start`) can have copied `nbytes` of the
        bytes `_copyable` counts (inf if there are not that many): the inverse of
        `_copyable(..., until, ...)` in `until`."""
        if nbytes <= 0:
            return -math.inf
        bw, sim = self.bw, self.sim
        latest = start + nbytes / bw
        ready = rest
        for i in range(s + 1, upto):
            t = sim.start[i]
            if t > start and nbytes > ready:
                end = t + (nbytes - ready) / bw
                if end > latest:
                    latest = end
            ready += self.offload_shed[i]
        return latest if nbytes <= ready else math.inf

    def _cut(self, s: int, mem: int, fp: int, now: float, d2h_free: float, rest: int,
             rest_offl: int, res_lb: int, host: int) -> bool:
        """Whether no completion of the branch can fit and beat the best plan (bounds 2-4).

        At the end of forward, and while each later segment m's backward runs, the device holds
        bytes the branch has fixed plus bytes of segments not assigned yet, less what those
        shed: by recompute (replay seconds) or by offload (every byte of it comes back on the
        H2D stream ahead of the assigned reloads; at the end of forward, at most what the D2H
        stream can copy by then; in backward, copies that end later stall m's backward until
        they do). Splitting each shortfall between the two bounds the step from below.
        `res_lb`: the least bytes segment s keeps through backward (its tensors not assigned
        yet that may be offloaded excluded); `host`: the host bytes assigned so far, which
        leave at most host_budget - host bytes for the rest to offload."""
        self.nodes += 1
        if self.nodes > self.max_branches:
            raise _GaveUp
        base = self.base_step + (self.replay[-1] if self.replay else 0.0)
        if base >= self.cutoff or self._chain_bound(s, 0.0) >= self.cutoff:
            return True
        frees, T = self.frees, self.T
        k, nf = fp, len(frees)
        while k < nf and frees[k][0] <= T:
            mem += frees[k][1]
            k += 1
        start = d2h_free if d2h_free > now else now
        host_left = self.host_budget - host
        cap_o = min(self._copyable(s, start, T, self.sim.n, rest_offl), host_left)
        if self._split_cut(s, mem + rest + self.suf_saved[s + 1] - self.budget,
                           self.suf_r[s + 1], cap_o, self.suf_best[s + 1] + rest_offl,
                           self.by_cost[s + 1], base):
            return True
        fixed = sum(self.res) + res_lb - self.budget
        saved, pre_r, pre_best = self.pre_saved, self.pre_r, self.pre_best
        for m in range(s + 2, self.sim.n):  # while m's backward runs
            need = (fixed + saved[m - 1] - saved[s + 1] + self.sim.saved[m - 1]
                    + self.sim.saved[m] + self.sim.working[m])
            if need <= 0:
                continue
            cap_o = min(self.pre_o[m - 1] - self.pre_o[s + 1] + rest_offl, host_left)
            due = T + self.bwd_after[m]  # m's backward starts no earlier

            def delay(x: float, m: int = m, due: float = due) -> float:
                return max(0.0, self._copy_time(s, start, x, m - 1, rest_offl) - due)
            shed = self.fp1_shed[m - 1]
            if self._split_cut(s, need, pre_r[m - 1] - pre_r[s + 1] + shed, cap_o,
                               pre_best[m - 1] - pre_best[s + 1] + shed + rest_offl,
                               self.items_bwd[s][m], base, delay):
                return True
        return False

    def _backward_fits(self, s: int, mode: int) -> bool:
        """Bound 3 for segment s under `mode` (segments before it are assigned)."""
        sim = self.sim
        own = sim.saved[s] + sim.working[s] + (sim.input_bytes[s] if mode >= RECOMPUTE else 0)
        if s == 0:
            return own <= self.budget
        prev = self.codes[s - 1]
        before = sum(self.res[:s - 1]) + self.fp1[s - 1][KEEP if prev == OFFLOAD else prev]
        extra = sum(b for seg, last, b in self.cross_off if seg < s - 1 and last >= s - 1)
        return before + extra + own <= self.budget

    def _future_fits(self, s: int, res_s: int) -> bool:
        """Bound 3 for the segments after s, s assigned (resident share `res_s`)."""
        sim = self.sim
        if s + 1 >= sim.n:
            return True
        before = sum(self.res)
        mode = self.codes[s]
        fp1 = self.fp1[s][KEEP if mode == OFFLOAD else mode]
        nxt = before + fp1 + sim.saved[s + 1] + sim.working[s + 1]
        return nxt <= self.budget and before + res_s + self.ahead[s] <= self.budget

    # -- the tree ------------------------------------------------------------------------

    def run(self) -> None:
        self._segment(0, 0, 0, 0.0, 0)

    def _segment(self, s: int, mem: int, fp: int, d2h_free: float, host: int) -> None:
        sim = self.sim
        if s == sim.n:
            self._leaf()
            return
        frees, budget = self.frees, self.budget
        ts, es = sim.start[s], sim.end[s]
        replay0 = self.replay[-1] if self.replay else 0.0
        for mode in self.modes[s]:
            if not self._backward_fits(s, mode):  # bound 3
                continue
            self.codes.append(mode)
            if mode == KEEP:  # KEEP or OFFLOAD, decided tensor by tensor
                self.replay.append(replay0)
                self._tensor(s, 0, mem, fp, d2h_free, host, 0)
                self.replay.pop()
                self.codes.pop()
                continue
            self.replay.append(replay0 + sim.forward_s[s])
            m, k, free, h = mem, fp, d2h_free, host
            ok = True
            pushed = 0
            ib = sim.input_bytes[s]
            events = [(ts, ib)] if ib else []
            events += [(x.save_t, x.nbytes) for x in sim.tensors[s] if x.last > s]
            for i, (t, b) in enumerate(events):
                while k < len(frees) and frees[k][0] <= t:
                    m += frees[k][1]
                    k += 1
                m += b
                if m > budget:  # bound 2
                    ok = False
                    break
                if i == 0 and ib and mode == RECOMPUTE_OFFLOAD_INPUTS:
                    st = free if free > ts else ts
                    free = st + sim.input_d2h_s[s]
                    h += ib
                    frees.append((free if free > es else es, -ib))
                    pushed = 1
                    bisect.insort(self.chain, (s, sim._input_key[s], free, sim.input_h2d_s[s]))
            res = sim.cross[s] + (ib if mode == RECOMPUTE else 0)
            if (ok and h <= self.host_budget and self._future_fits(s, res)
                    and not self._cut(s, m, k, es, free, 0, 0, res, h)):
                self.res.append(res)
                self._segment(s + 1, m, k, free, h)
                self.res.pop()
            if pushed:
                frees.pop()
                self.chain.remove((s, sim._input_key[s], free, sim.input_h2d_s[s]))
            self.replay.pop()
            self.codes.pop()

    def _tensor(self, s: int, i: int, mem: int, fp: int, d2h_free: float, host: int,
                kept: int) -> None:
        """Tensor i of segment s (save order), under KEEP/OFFLOAD; `kept`: its bytes so far."""
        sim = self.sim
        xs = sim.tensors[s]
        if i == len(xs):
            if self.ids and sim.segment_of[self.ids[-1]] == s:
                self.codes[-1] = OFFLOAD
            if self._future_fits(s, kept):
                self.res.append(kept)
                self._segment(s + 1, mem, fp, d2h_free, host)
                self.res.pop()
            self.codes[-1] = KEEP
            return
        x = xs[i]
        frees = self.frees
        while fp < len(frees) and frees[fp][0] <= x.save_t:
            mem += frees[fp][1]
            fp += 1
        mem += x.nbytes
        if mem > self.budget:  # bound 2
            return
        rest, rest_offl = self._rest[s][i + 1]
        es = sim.end[s]
        # keep x
        fixed = rest - rest_offl
        if not self._cut(s, mem, fp, x.save_t, d2h_free, rest, rest_offl,
                         kept + x.nbytes + fixed, host):
            self._tensor(s, i + 1, mem, fp, d2h_free, host, kept + x.nbytes)
        if not self.branch[s][i] or host + x.nbytes > self.host_budget:  # bound 1
            return
        # offload x
        st = d2h_free if d2h_free > x.save_t else x.save_t
        end = st + x.d2h_s
        frees.append((end if end > es else es, -x.nbytes))
        entry = (x.last, float(x.id), end, x.h2d_s)
        bisect.insort(self.chain, entry)
        self.ids.append(x.id)
        if x.last > s:
            self.cross_off.append((s, x.last, x.nbytes))
        if not self._cut(s, mem, fp, x.save_t, end, rest, rest_offl, kept + fixed,
                         host + x.nbytes):
            self._tensor(s, i + 1, mem, fp, end, host + x.nbytes, kept)
        if x.last > s:
            self.cross_off.pop()
        self.ids.pop()
        self.chain.remove(entry)
        frees.pop()

    def prepare(self) -> None:
        """Per segment and tensor index: bytes still to be saved after it, and how many of
        them may be offloaded."""
        self._rest = []
        for s, xs in enumerate(self.sim.tensors):
            rows = [(0, 0)] * (len(xs) + 1)
            for i in range(len(xs) - 1, -1, -1):
                b, o = rows[i + 1]
                rows[i] = (b + xs[i].nbytes, o + (xs[i].nbytes if self.branch[s][i] else 0))
            self._rest.append(rows)

    def _leaf(self) -> None:
        self.leaves += 1
        codes, ids = tuple(self.codes), frozenset(self.ids)
        self.consider(codes, ids)

    def consider(self, codes: tuple[int, ...], ids: frozenset[int]) -> None:
        """Simulate a full assignment at its best lookahead; keep it if it fits and is faster."""
        tl, d = fastest_lookahead(self.sim, codes, ids, self.budget)
        if tl.peak_device_bytes > self.budget or tl.peak_host_bytes > self.host_budget:
            return
        if tl.step_s < self.cutoff:
            self.best_step = tl.step_s
            self.cutoff = tl.step_s * (1 - REL_TOL)
            self.best = (codes, ids, d)


def _suffix(values: list[int]) -> list[int]:
    """out[i] = sum(values[i:]), for i in 0 .. len(values)."""
    out = [0] * (len(values) + 1)
    for i in range(len(values) - 1, -1, -1):
        out[i] = out[i + 1] + values[i]
    return out


def _prefix(values: list[int]) -> list[int]:
    """out[i] = sum(values[:i]), for i in 0 .. len(values)."""
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def cover_table(items: list[tuple[int, float]]) -> tuple[list[float], list[float]]:
    """For recompute candidates (bytes shed, replay seconds): every subset's bytes, ascending,
    and the least seconds of a subset shedding at least that many, so that a bisection answers
    "the cheapest set of recomputes dropping >= x bytes" (0/1, not fractional). Past 12
    candidates the fractional knapsack's breakpoints stand in (a weaker, still valid bound)."""
    if len(items) > 12:
        items = sorted(items, key=lambda r: r[1] / r[0])
        sheds, costs, b, c = [], [], 0.0, 0.0
        for shed, cost in items:
            b, c = b + shed, c + cost
            sheds.append(b)
            costs.append(c)
        # fractional: covering x <= sheds[i] costs at least the knapsack's value at x, which is
        # at least the previous breakpoint's cost
        return sheds, [0.0] + costs[:-1]
    subsets = [(0.0, 0.0)]
    for shed, cost in items:
        subsets += [(b + shed, c + cost) for b, c in subsets]
    subsets.sort()
    sheds = [b for b, _ in subsets]
    costs = [c for _, c in subsets]
    for i in range(len(costs) - 2, -1, -1):  # least cost among subsets shedding at least
        if costs[i + 1] < costs[i]:
            costs[i] = costs[i + 1]
    return sheds, costs


def plan_exact(profile: Profile, device_budget: int, host_budget: int | None,
               hardware: Hardware | None = None, *, keep_last: int = 0,
               incumbent: Plan | None = None, max_branches: int | None = None) -> Plan:
    """The fastest plan over the full plan format that meets both budgets in the simulator.

    Every subset of each segment's offloadable tensors, recompute with and without offloaded
    inputs, and every lookahead, by branch and bound (module docstring). `keep_last` applies
    the planner's rule 1 (`scheduler.plan`): the last `keep_last` recomputable segments and
    those after them offload nothing, unless no plan fits that way. `incumbent`, a plan of the
    same profile, is a starting point that only speeds the search up. With `max_branches`,
    the search stops after bounding that many branches and returns the best plan found with a
    note saying it "gave up" (not proven optimal; a few adversarial profiles take minutes).

    For profiles of at most 10 segments and 64 offloadable tensors (`ValueError` otherwise).
    When no plan fits, the plan that moves all it may is returned with a note saying so.
    """
    check_budgets("plan_exact", device_budget, host_budget)
    sim = Simulator(profile, hardware)
    if sim.n > MAX_SEGMENTS or len(sim.offloadable_ids) > MAX_TENSORS:
        raise ValueError(f"plan_exact: the profile has {sim.n} segments and "
                         f"{len(sim.offloadable_ids)} offloadable tensors; the exhaustive search "
                         f"takes at most {MAX_SEGMENTS} and {MAX_TENSORS}. Use scheduler.plan "
                         "for larger ones")
    start = None if incumbent is None else (sim.codes(incumbent), incumbent.offload_ids)
    tails = [resident_tail(sim, keep_last)] + ([frozenset()] if keep_last else [])
    notes: list[str] = []
    limit = math.inf if max_branches is None else max_branches
    gave_up = ()
    for tail in tails:
        search = _Search(sim, device_budget, host_budget, tail, limit)
        search.prepare()
        if start is not None and not any(c in (OFFLOAD, RECOMPUTE_OFFLOAD_INPUTS)
                                         for s, c in enumerate(start[0]) if s in tail):
            search.consider(*start)
        try:
            search.run()
        except _GaveUp:
            gave_up = (f"plan_exact: gave up after {max_branches} branches; the best plan "
                       "found, not proven optimal",)
        if search.best is not None:
            codes, ids, _ = search.best
            _, d = best_lookahead(sim, codes, ids, device_budget)
            if tail is not tails[0]:
                notes.append("rule 1 dropped: the budget cannot be met with the last segments "
                             "resident")
            notes.append(f"plan_exact: {search.nodes} branches bounded, {search.leaves} plans "
                         "simulated")
            return build_plan(sim, codes, ids, d, tuple(notes) + gave_up)
        if gave_up:
            break
    codes = tuple(RECOMPUTE_OFFLOAD_INPUTS if RECOMPUTE_OFFLOAD_INPUTS in _modes(sim, s)
                  else OFFLOAD if any(x.offloadable for x in sim.tensors[s]) else
                  (RECOMPUTE if sim.recomputable[s] else KEEP) for s in range(sim.n))
    ids = frozenset(x.id for s, c in enumerate(codes) if c == OFFLOAD for x in sim.tensors[s]
                    if x.offloadable)
    return build_plan(sim, codes, ids, 1, notes=(
        f"plan_exact: no plan meets device_budget={device_budget} and "
        f"host_budget={host_budget}; returning the plan that moves all it may",) + gave_up)


def _modes(sim: Simulator, s: int) -> tuple[int, ...]:
    if not sim.recomputable[s]:
        return (KEEP,)
    return (KEEP, RECOMPUTE, RECOMPUTE_OFFLOAD_INPUTS) if sim.input_bytes[s] else (KEEP, RECOMPUTE)
