"""The planner's first plans: one-parameter families of plans, searched by bisection.

A few dozen simulations whatever the size of the profile, so that a profile of a thousand
tensors (Llama-3-70B: 82 segments) is planned in milliseconds; the local search of `search`
then improves on them as far as its work bound allows. Each family orders what may move:

- The window order: offloadable tensors, earliest segment first (the longest-lived, whose
  copies have the most forward and backward to hide behind), largest first inside a segment;
  `Families.state(k, ...)` offloads its first k tensors.
- The recompute order: segments by replay seconds per byte that recompute would drop beyond
  what the free window already offloads (cheapest first, later segments first on ties:
  repeated identical layers are recomputed from the end, offloaded from the start);
  `Families.state(k, order[:r], code)` recomputes the first r of them too.

The plans tried, in order (each bisection assumes its predicate monotone in the parameter,
which holds for budgets: more moved, less memory; and roughly for step time):

1. the fewest window offloads that fit, if that adds no step time: done;
2. the free window: the most window offloads that add no step time, `k_free`, cut back to the
   fewest of them that reach the same peak (past that knee the copies end after the peak);
3. on top of it, the fewest recomputes (with their inputs kept, then offloaded) that fit, then
   the fewest window offloads that still fit with them; and the same on top of every offload,
   recomputes by their own price alone (recompute the cheap, offload the dear: DESIGN.md §5);
4. the fewest window offloads that fit, step time added or not (exposed transfers);
5. `forward_greedy`: segment by segment, offload what may move while its copies can end within
   the forward, else keep while the rest can still fit, else recompute. When the link is slower
   than the forward, this fills the memory under the budget with copies in flight, lets the D2H
   stream catch up while kept or recomputed segments run, and drains it before forward ends;
6. the fastest of these rearranged, per group of identical segments (repeated layers): its
   leading offloads (one fewer to two more), then the fewest recomputes that fit, then keeps
   (`recompute_first`);
7. that plan, if it stalls on reloads, with kept segments recomputed too so that the memory
   they free lets the reloads be issued earlier (`trade_for_lookahead`).

The fastest of these (then fewest bytes moved) is the result; the keep-all state if none fits.
"Adds no step time" is judged at the largest lookahead, whatever its memory: the window is
what the links can hide; the budget is met by the other moves.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .search import REL_EPS, Search, State
from .simulate import KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD_INPUTS


def first_true(lo: int, hi: int, pred: Callable[[int], bool]) -> int:
    """The least k in [lo, hi] with pred(k), pred(hi) being true (bisection)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def last_true(lo: int, hi: int, pred: Callable[[int], bool]) -> int:
    """The largest k in [lo, hi] with pred(k), pred(lo) being true (bisection)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if pred(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


class Families:
    """The window and recompute orders of one search, and the states they span."""

    def __init__(self, search: Search) -> None:
        self.search = search
        sim = search.sim
        self.window = sorted((x for s in range(sim.n) for x in search.movable[s]),
                             key=lambda x: (x.segment, -x.nbytes))

    def state(self, k: int, recompute: Sequence[int] = (), code: int = RECOMPUTE) -> State:
        """The first k window tensors offloaded (but those of recomputed segments) and the
        segments in `recompute` recomputed with `code`; everything else kept."""
        n = self.search.sim.n
        codes = [KEEP] * n
        for s in recompute:
            codes[s] = code
        ids = []
        for x in self.window[:k]:
            if codes[x.segment] in (KEEP, OFFLOAD):
                codes[x.segment] = OFFLOAD
                ids.append(x.id)
        return tuple(codes), frozenset(ids)

    def recompute_order(self, code: int, k_free: int) -> list[int]:
        """Segments that may take `code`, by replay seconds per byte dropped beyond what the
        first `k_free` window offloads already drop (cheapest first, later first on ties)."""
        search, sim = self.search, self.search.sim
        offloaded = [0] * sim.n
        for x in self.window[:k_free]:
            offloaded[x.segment] += x.nbytes
        ranked = []
        for s in range(sim.n):
            if code not in search.actions[s]:
                continue
            kept = sim.cross[s] + (sim.input_bytes[s] if code == RECOMPUTE else 0)
            gain = sim.saved[s] - kept - offloaded[s]
            if gain > 0:
                ranked.append((sim.forward_s[s] / gain, -s))
        return [-s for _, s in sorted(ranked)]


def construct(search: Search, keep: State) -> State:
    """The best of the family plans of the module docstring (keep-all if none fits)."""
    fam = Families(search)
    fits = search.fits_some_lookahead
    base = search.eval(keep)[0].step_s

    def free(st: State) -> bool:  # no step time added, given the lookahead it wants
        tl = search.unbounded(st)
        return tl.step_s <= base * (1 + REL_EPS) and tl.peak_host_bytes <= search.host_budget

    n_win = len(fam.window)
    found: list[State] = []
    all_out = fam.state(n_win)
    if n_win and fits(all_out):  # 1 and 4
        k_fit = first_true(1, n_win, lambda k: fits(fam.state(k)))
        if free(fam.state(k_fit)):
            return fam.state(k_fit)
        found.append(fam.state(k_fit))
    k_free = last_true(0, n_win, lambda k: free(fam.state(k)))  # 2
    least = search.eval(fam.state(k_free))[0].peak_device_bytes  # past the knee, copies end
    k_free = first_true(0, k_free, lambda k: search.eval(fam.state(k))[0].peak_device_bytes
                        <= least)  # after the peak and free nothing there
    for code in (RECOMPUTE, RECOMPUTE_OFFLOAD_INPUTS):  # 3
        for window in (k_free, n_win):
            order = fam.recompute_order(code, k_free if window == k_free else 0)
            if not order or not fits(fam.state(window, order, code)):
                continue
            r = first_true(1, len(order), lambda r: fits(fam.state(window, order[:r], code)))
            chosen = order[:r]
            k = first_true(0, window, lambda k: fits(fam.state(k, chosen, code)))
            found.append(fam.state(k, chosen, code))
    found.append(forward_greedy(search))  # 5
    best = found[0]
    for st in found[1:]:
        if search.better(search.key(st), search.key(best)):
            best = st
    best = recompute_first(search, best)  # 6
    return trade_for_lookahead(search, best)  # 7


def classes(search: Search) -> list[list[int]]:
    """Groups of two or more identical segments (the repeated layers of a model): same times,
    bytes, allowed actions and tensors (sizes, offloadability, saves relative to its start and
    reuse relative to its index), in forward order."""
    sim = search.sim
    groups: dict[tuple, list[int]] = {}
    for s in range(sim.n):
        sig = (sim.forward_s[s], sim.backward_s[s], sim.input_bytes[s], sim.working[s],
               search.actions[s],
               tuple((x.nbytes, x.offloadable, x.last - s,
                      round((x.save_t - sim.start[s]) / (sim.forward_s[s] or 1.0), 9))
                     for x in sim.tensors[s]))
        groups.setdefault(sig, []).append(s)
    return [g for g in groups.values() if len(g) > 1]


def recompute_first(search: Search, state: State) -> State:
    """Family 6, per group of identical segments (repeated layers): the first `a` of them
    offload all they may, then come the fewest recomputes that fit (inputs offloaded where
    allowed, or kept), then keeps; `a` is the count `state` has, and up to two more or one
    fewer. Recomputes placed early let their inputs' copies end within the forward, and the
    bytes those free keep more layers. The best of these and `state`."""
    best, best_key = state, search.key(state)
    for group in classes(search):
        base = list(best[0])
        ids = best[1]
        lead = 0
        while lead < len(group) and base[group[lead]] == OFFLOAD:
            lead += 1
        acts = search.actions[group[0]]
        for a in sorted({lead, lead + 1, lead + 2, max(0, lead - 1)}):
            if a > len(group) or (a > lead and OFFLOAD not in acts):
                continue
            out_ids = set(ids) - {x.id for s in group for x in search.movable[s]}
            out_ids |= {x.id for s in group[:a] for x in search.movable[s]}
            members = group[a:]
            for code in (RECOMPUTE_OFFLOAD_INPUTS, RECOMPUTE):
                if code not in acts:
                    continue

                def first(r: int, a: int = a, code: int = code, out_ids: set = out_ids,
                          members: list[int] = members) -> State:
                    codes = list(base)
                    for s in group[:a]:
                        codes[s] = OFFLOAD
                    for i, s in enumerate(members):
                        codes[s] = code if i < r else KEEP
                    return tuple(codes), frozenset(out_ids)
                if not search.fits_some_lookahead(first(len(members))):
                    continue
                r = first_true(0, len(members), lambda r: search.fits_some_lookahead(first(r)))
                cand = first(r)
                k = search.key(cand)
                if search.better(k, best_key):
                    best, best_key = cand, k
    return best


def trade_for_lookahead(search: Search, state: State) -> State:
    """Family 7: a plan that fits but stalls on reloads (its lookahead held down by the
    budget) with its first j kept segments recomputed too (cheapest seconds per byte first,
    inputs offloaded where allowed), for j = 1, 2, 4, ... while that pays: the memory they
    free lets reloads be issued earlier. The fastest of these, or `state`."""
    tl = search.eval(state)[0]
    if tl.exposed_s <= 0 or not search.fits(state):
        return state
    sim = search.sim
    ranked = []
    for s, c in enumerate(state[0]):
        if c != KEEP:
            continue
        code = next((c for c in (RECOMPUTE_OFFLOAD_INPUTS, RECOMPUTE)
                     if c in search.actions[s]), None)
        if code is not None:
            kept = sim.cross[s] + (sim.input_bytes[s] if code == RECOMPUTE else 0)
            if sim.saved[s] > kept:
                ranked.append((sim.forward_s[s] / (sim.saved[s] - kept), -s, code))
    ranked.sort()
    best, best_key = state, search.key(state)
    j = 1
    while j <= len(ranked):
        codes = list(state[0])
        for _, neg_s, code in ranked[:j]:
            codes[-neg_s] = code
        cand = (tuple(codes), state[1])
        k = search.key(cand)
        if not search.better(k, best_key):
            break
        best, best_key = cand, k
        j *= 2
    return best


def forward_greedy(search: Search) -> State:
    """Family 5 of the module docstring: one pass over the forward, simulated as `simulate`
    does (rules 1 and 2). A segment takes the first of: OFFLOAD (all it may) if its copies end
    before the forward does; KEEP; RECOMPUTE with offloaded inputs; RECOMPUTE; OFFLOAD anyway,
    that keeps the device bytes of its forward under the budget, the host bytes under theirs,
    passes the end-of-forward bound of `exact` (what is still to be saved, less what
    recomputing or offloading it could drop, must fit), and lets the copies in flight end
    before the rest, at its least allocations, goes over the budget. When none does, it and the
    rest take their least-memory action; the plan is judged on the simulator like any other."""
    sim = search.sim
    n, budget, T, bw = sim.n, search.device_budget, sim.forward_end, sim.hardware.bw_d2h
    drop_r, drop_o = [], []
    for s in range(n):
        least = sim.saved[s]
        if RECOMPUTE in search.actions[s]:
            least = sim.input_bytes[s] + sim.cross[s]
        if RECOMPUTE_OFFLOAD_INPUTS in search.actions[s]:
            least = sim.cross[s]
        drop_r.append(max(0, sim.saved[s] - least))
        drop_o.append(sum(x.nbytes for x in search.movable[s]))
    suf = [(0, 0, 0, 0)] * (n + 1)  # saved, recompute drop, offload drop, better of the two
    for s in range(n - 1, -1, -1):
        a, b, c, d = suf[s + 1]
        suf[s] = (a + sim.saved[s], b + drop_r[s], c + drop_o[s], d + max(drop_r[s], drop_o[s]))
    end_budget = budget - sim.working[n - 1]
    least = []  # the allocations of each segment under its least-allocating action
    for s in range(n):
        if RECOMPUTE in search.actions[s]:
            ev = [(x.save_t, x.nbytes) for x in sim.tensors[s] if x.last > s]
            least.append(([(sim.start[s], sim.input_bytes[s])] if sim.input_bytes[s] else []) + ev)
        else:
            least.append([(x.save_t, x.nbytes) for x in sim.tensors[s]])

    def drains(s: int, m: int, k: int, frees: list[tuple[float, int]]) -> bool:
        """Whether the copies in flight after segment s end before the device, with every later
        segment at its least allocation, goes over the budget."""
        for j in range(s + 1, n):
            if k >= len(frees):
                return True
            for t, b in least[j]:
                while k < len(frees) and frees[k][0] <= t:
                    m += frees[k][1]
                    k += 1
                m += b
                if m > budget:
                    return False
        return True

    codes: list[int] = []
    ids: list[int] = []
    frees: list[tuple[float, int]] = []
    mem = fk = host = 0
    d2h_free = 0.0
    for s in range(n):
        options = [c for c in (OFFLOAD, KEEP, RECOMPUTE_OFFLOAD_INPUTS, RECOMPUTE, OFFLOAD)
                   if c in search.actions[s]]
        for i, c in enumerate(options):
            events: list[tuple[float, int, float]] = []  # save time, bytes, D2H s (0: kept)
            if c >= RECOMPUTE:
                if sim.input_bytes[s]:
                    events.append((sim.start[s], sim.input_bytes[s],
                                   sim.input_d2h_s[s] if c == RECOMPUTE_OFFLOAD_INPUTS else 0.0))
                events += [(x.save_t, x.nbytes, 0.0) for x in sim.tensors[s] if x.last > s]
            else:
                out = search.movable_ids[s] if c == OFFLOAD else frozenset()
                events = [(x.save_t, x.nbytes, x.d2h_s if x.id in out else 0.0)
                          for x in sim.tensors[s]]
            m, k, free, h, ok, n_frees = mem, fk, d2h_free, host, True, len(frees)
            es = sim.end[s]
            for t, nbytes, d2h_s in events:
                while k < len(frees) and frees[k][0] <= t:
                    m += frees[k][1]
                    k += 1
                m += nbytes
                ok = ok and m <= budget
                if d2h_s:
                    free = (free if free > t else t) + d2h_s
                    frees.append((free if free > es else es, -nbytes))
                    h += nbytes
            at_end = m + sum(b for t, b in frees[k:] if t <= T)
            idle = T - (free if free > es else es)
            saved_rest, r_rest, o_rest, best_rest = suf[s + 1]
            shed = min(best_rest, r_rest + min(o_rest, idle * bw if idle > 0 else 0.0))
            useful = i > 0 or c != OFFLOAD or free <= T  # its copies end within the forward
            fits_end = at_end + saved_rest - shed <= end_budget
            if (useful and ok and fits_end and h <= search.host_budget
                    and drains(s, m, k, frees)):
                break
            del frees[n_frees:]
        else:  # nothing passes: from here on, the least memory
            return _finish(search, codes, ids, s)
        codes.append(c)
        mem, fk, d2h_free, host = m, k, free, h
        if c == OFFLOAD:
            ids += [x.id for x in search.movable[s]]
    return _state(codes, ids)


def _finish(search: Search, codes: list[int], ids: list[int], s: int) -> State:
    """The greedy's plan when segment s cannot pass: it and every later segment take their
    least-memory action (recompute with offloaded inputs, recompute, or offload all)."""
    for j in range(s, search.sim.n):
        acts = search.actions[j]
        c = next((c for c in (RECOMPUTE_OFFLOAD_INPUTS, RECOMPUTE, OFFLOAD) if c in acts), KEEP)
        codes.append(c)
        if c == OFFLOAD:
            ids += [x.id for x in search.movable[j]]
    return _state(codes, ids)


def _state(codes: list[int], ids: list[int]) -> State:
    return tuple(codes), frozenset(ids)
