"""The search behind `scheduler.plan`: plan states, the moves between them, and the phases.

A state is the scheduler's internal plan: one action code per segment (`simulate.KEEP`, ...)
and the frozenset of offloaded tensor ids; every state is judged on the simulator at its
fastest lookahead that fits (`prefetch.fastest_lookahead`) by its key: (bytes over the budgets,
step seconds, bytes moved), lowest first. A move sets segments to actions and puts tensors in
or out of the offload set; the phases (steps 3-6 of the `planner` docstring) differ in which
moves they try and how they rank them. All of it is bounded by a work budget in simulated
events, so that a profile of a thousand tensors stops after `construct`'s plans.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable, Iterator

from . import costmodel
from .prefetch import fastest_lookahead
from .simulate import KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD_INPUTS, Simulator, Timeline

State = tuple[tuple[int, ...], frozenset[int]]  # action code per segment, offloaded tensor ids
Key = tuple[float, float, int]  # budget overrun (bytes), step (s), bytes moved
Score = Callable[[State, State], "tuple[float, ...] | None"]
# A move: segments set to codes, tensor ids that enter the offload set, ids that leave it.
Move = tuple[tuple[tuple[int, int], ...], frozenset[int], frozenset[int]]
_NONE: frozenset[int] = frozenset()

REL_EPS = 1e-9  # relative step-time change below which two plans count as equally fast
PAIR_LIMIT = 12  # refine also tries pairs of segment changes on profiles this small
COMPOUND_TRIES = 4  # segment changes refine follows with a re-cover and relax, per round
COMPOUND_DROPS = 2  # largest offloaded tensors refine keeps instead, then re-covers, per round
MAX_WORK = 60_000  # simulated events (segments + tensors per state) one plan may spend
SMALL_WORK = 240_000  # the same for small profiles (at most SMALL events per state)
SMALL = 100


def allowed_actions(sim: Simulator, device_budget: int,
                    resident: frozenset[int]) -> list[tuple[int, ...]]:
    """Rule 4: the action codes each segment may take.

    Any segment may keep; offload if it has offloadable tensors and is not in rule 1's tail;
    recompute if recomputable, with its inputs offloaded too outside the tail. An action is
    dropped when it cannot fit in any plan: while segment j's backward runs, the device holds
    j's bytes under that action (its inputs too when recomputed) and its working set, segment
    j - 1's bytes with its reloads issued, and the least resident bytes of every segment
    before. This repeats until nothing changes; a segment left with no action keeps them all.
    """
    n = sim.n
    actions = []
    for s in range(n):
        acts = [KEEP]
        if s not in resident and any(x.offloadable for x in sim.tensors[s]):
            acts.append(OFFLOAD)
        if sim.recomputable[s]:
            acts.append(RECOMPUTE)
            if sim.input_bytes[s] and s not in resident:
                acts.append(RECOMPUTE_OFFLOAD_INPUTS)
        actions.append(acts)

    movable = [sum(x.nbytes for x in sim.tensors[s] if x.offloadable) for s in range(n)]

    def resident_bytes(s: int, c: int) -> int:  # from forward to backward, copies done
        if c == OFFLOAD:
            return sim.saved[s] - movable[s]
        if c == RECOMPUTE:
            return sim.input_bytes[s] + sim.cross[s]
        return sim.cross[s] if c == RECOMPUTE_OFFLOAD_INPUTS else sim.saved[s]

    def before_next(s: int, c: int) -> int:  # while segment s + 1's backward runs
        return sim.saved[s] if c in (KEEP, OFFLOAD) else sim.input_bytes[s] + sim.cross[s]

    def own(s: int, c: int) -> int:  # during its own backward
        extra = sim.input_bytes[s] if c >= RECOMPUTE else 0
        return sim.saved[s] + extra + sim.working[s]

    changed = True
    while changed:
        changed = False
        before = 0  # least resident bytes of segments 0 .. j-2
        for j in range(n):
            floor = before + (min(before_next(j - 1, c) for c in actions[j - 1]) if j else 0)
            fit = [c for c in actions[j] if floor + own(j, c) <= device_budget]
            if fit and len(fit) < len(actions[j]):
                actions[j], changed = fit, True
            if j > 0:
                before += min(resident_bytes(j - 1, c) for c in actions[j - 1])
    return [tuple(a) for a in actions]


class Search:
    """All state of one `plan` call: budgets, rule 1's tail, the moves, a cache of evaluations.

    `work` counts the events simulated so far (a state costs its segments plus its tensors);
    the phases start a scan only when it fits in what is left of `max_work` (`MAX_WORK`, or
    `SMALL_WORK` for profiles of at most `SMALL` segments and tensors, whose simulations take
    microseconds), and otherwise keep the best plan found.
    """

    def __init__(self, sim: Simulator, device_budget: int, host_budget: int | None,
                 resident: frozenset[int], max_work: int | None = None) -> None:
        self.sim = sim
        self.device_budget = device_budget
        self.host_budget = math.inf if host_budget is None else host_budget
        self.base_step = sum(sim.forward_s) + sum(sim.backward_s)
        self.work = 0
        self.eval_cost = sim.n + len(sim.by_id)  # events of one simulation, about
        if max_work is None:
            max_work = SMALL_WORK if self.eval_cost <= SMALL else MAX_WORK
        self.max_work = max_work
        self._cache: dict[State, tuple[Timeline, int]] = {}
        self._fit_cache: dict[State, bool] = {}
        self._loose_cache: dict[State, Timeline] = {}
        self.set_resident(resident)

    def set_resident(self, resident: frozenset[int]) -> None:
        """Fix the resident tail (rule 1) and the actions each segment may take (rule 4); the
        work budget starts afresh (the search that follows is a new one)."""
        sim = self.sim
        self.resident = resident
        self.work = 0
        self.actions = allowed_actions(sim, self.device_budget, resident)
        self.movable = tuple(tuple(x for x in sim.tensors[s] if x.offloadable)
                             if OFFLOAD in self.actions[s] else () for s in range(sim.n))
        self.movable_ids = tuple(frozenset(x.id for x in m) for m in self.movable)

    # -- evaluation ----------------------------------------------------------------------

    def eval(self, state: State) -> tuple[Timeline, int]:
        """The simulated step of `state` and its lookahead (planner rule 3), cached."""
        hit = self._cache.get(state)
        if hit is None:
            self.work += self.eval_cost
            hit = self._cache[state] = fastest_lookahead(self.sim, state[0], state[1],
                                                         self.device_budget)
        return hit

    @property
    def spent(self) -> bool:
        """True once the search has simulated `max_work` events."""
        return self.work >= self.max_work

    def affordable(self, evals: int) -> bool:
        """Whether `evals` more simulated states fit in what is left of `max_work`."""
        return self.work + evals * self.eval_cost <= self.max_work

    def listed(self, moves: Iterable[Move]) -> list[Move] | None:
        """`moves` as a list, or None when simulating them all would not fit in the work left
        (they are not all listed then)."""
        room = max(0, (self.max_work - self.work) // self.eval_cost)
        out = list(itertools.islice(moves, room + 1))
        return None if len(out) > room else out

    def overrun(self, tl: Timeline) -> float:
        """Bytes over the budgets (0 when the plan fits); host bytes count as device bytes."""
        return (max(0, tl.peak_device_bytes - self.device_budget)
                + max(0.0, tl.peak_host_bytes - self.host_budget))

    def key(self, state: State) -> Key:
        """What the search lowers, in order: budget overrun, step seconds, bytes moved."""
        tl, _ = self.eval(state)
        return self.overrun(tl), tl.step_s, tl.offloaded_bytes

    @staticmethod
    def better(a: Key, b: Key) -> bool:
        """Whether key `a` improves on key `b` (step times within REL_EPS tie)."""
        if a[0] != b[0]:
            return a[0] < b[0]
        if abs(a[1] - b[1]) > REL_EPS * max(a[1], b[1]):
            return a[1] < b[1]
        return a[2] < b[2]

    def fits(self, state: State) -> bool:
        """Whether `state` meets both budgets (at its fastest lookahead that fits)."""
        return self.overrun(self.eval(state)[0]) == 0

    def fits_some_lookahead(self, state: State) -> bool:
        """Whether `state` fits at some lookahead: at d = 1, its least peak (one simulation,
        cached apart from `eval`, which finds the fastest d)."""
        hit = self._cache.get(state)
        if hit is not None:
            return self.overrun(hit[0]) == 0
        fit = self._fit_cache.get(state)
        if fit is None:
            self.work += self.eval_cost
            tl = self.sim.run(state[0], state[1], 1)
            fit = self._fit_cache[state] = self.overrun(tl) == 0
        return fit

    def unbounded(self, state: State) -> Timeline:
        """The step of `state` at the largest lookahead, its peak whatever it is (cached)."""
        hit = self._cache.get(state)
        if hit is not None and hit[1] == max(1, self.sim.n - 1):
            return hit[0]
        tl = self._loose_cache.get(state)
        if tl is None:
            self.work += self.eval_cost
            tl = self._loose_cache[state] = self.sim.run(state[0], state[1],
                                                         max(1, self.sim.n - 1))
        return tl

    def replay_bound(self, codes: tuple[int, ...]) -> float:
        """A lower bound on the step of `codes`: forward, backward and the replays (seconds)."""
        return self.base_step + sum(self.sim.replay_s[s] for s, c in enumerate(codes)
                                    if c >= RECOMPUTE)

    # -- moves ---------------------------------------------------------------------------

    def apply(self, state: State, move: Move) -> State:
        """`state` with `move` applied: its segments take their codes (a segment leaving
        OFFLOAD keeps its tensors), then its tensors leave and enter the offload set (only
        where their segment keeps or offloads); a keeping segment with offloaded tensors
        becomes OFFLOAD and an offloading one without becomes KEEP."""
        segs, add, drop = move
        codes, ids = list(state[0]), state[1]
        touched = set()
        for s, c in segs:
            codes[s] = c
            touched.add(s)
            if c != OFFLOAD and ids & self.movable_ids[s]:
                ids = ids - self.movable_ids[s]
        if drop:
            ids = ids - drop
            touched.update(self.sim.segment_of[i] for i in drop)
        if add:
            seg_of = self.sim.segment_of
            ok = frozenset(i for i in add if codes[seg_of[i]] in (KEEP, OFFLOAD)
                           and i in self.movable_ids[seg_of[i]])
            ids = ids | ok
            touched.update(seg_of[i] for i in ok)
        for s in touched:
            if codes[s] in (KEEP, OFFLOAD):
                codes[s] = OFFLOAD if ids & self.movable_ids[s] else KEEP
        return tuple(codes), ids

    def segment_moves(self, state: State) -> Iterator[Move]:
        """Every change of one segment to another of its allowed actions (OFFLOAD: all it may;
        and, from a recompute, also the fewest bytes of it that drop as much as the replay
        did: a knapsack swap of the replay for copies)."""
        codes, ids = state
        sim = self.sim
        for s in range(sim.n):
            own = self.movable_ids[s]
            for c in self.actions[s]:
                if c == OFFLOAD:
                    if not own <= ids:
                        yield ((s, OFFLOAD),), own, _NONE
                    if codes[s] >= RECOMPUTE and len(own) > 1:
                        dropped = sim.saved[s] - sim.cross[s] - (
                            sim.input_bytes[s] if codes[s] == RECOMPUTE else 0)
                        pick = frozenset(x.id for x in cover(list(self.movable[s]), dropped))
                        if pick != own:
                            yield ((s, OFFLOAD),), pick, _NONE
                elif c != codes[s]:
                    yield ((s, c),), _NONE, _NONE

    def tensor_moves(self, state: State) -> Iterator[Move]:
        """Every single tensor put in or taken out of the offload set."""
        codes, ids = state
        for s in range(self.sim.n):
            if codes[s] in (KEEP, OFFLOAD):
                for x in self.movable[s]:
                    one = frozenset((x.id,))
                    yield ((), _NONE, one) if x.id in ids else ((), one, _NONE)

    def swap_moves(self, state: State) -> Iterator[Move]:
        """An offloaded tensor kept and, in its place, a smaller or longer-lived one offloaded
        (swap a large tensor for a smaller one, or move a copy earlier in forward)."""
        codes, ids = state
        sim = self.sim
        out = [sim.by_id[i] for i in sorted(ids)]
        kept = [x for s in range(sim.n) if codes[s] in (KEEP, OFFLOAD)
                for x in self.movable[s] if x.id not in ids]
        for x in out:
            for y in kept:
                if y.nbytes < x.nbytes or y.segment < x.segment:
                    yield (), frozenset((y.id,)), frozenset((x.id,))

    def cover_moves(self, state: State, deficit: int) -> Iterator[Move]:
        """Per keeping or offloading segment, the fewest bytes among its kept tensors that
        cover `deficit` (or all of them when none do): the segment's knapsack."""
        codes, ids = state
        for s in range(self.sim.n):
            if codes[s] not in (KEEP, OFFLOAD):
                continue
            rest = [x for x in self.movable[s] if x.id not in ids]
            if len(rest) < 2:
                continue
            pick = cover(rest, deficit)
            if len(pick) > 1:
                yield (), frozenset(x.id for x in pick), _NONE

    def all_moves(self, state: State) -> Iterator[Move]:
        """`segment_moves`, then `tensor_moves`."""
        yield from self.segment_moves(state)
        yield from self.tensor_moves(state)

    # -- the phases ----------------------------------------------------------------------

    def sweep(self, state: State, moves: Callable[[State], Iterable[Move]], score: Score,
              done: Callable[[State], bool] | None = None, greedy: bool = False) -> State:
        """Rank every move by `score` (None: not acceptable), apply them best first, each
        re-scored against the state it lands on, and repeat until no move is acceptable, `done`
        holds or the work is spent. Each accepted move strictly improves what `score` measures.
        `greedy`: re-rank after every move whose score is finite (moves that cost nothing,
        score inf, are taken in one pass).
        """
        while True:
            ranked = []
            listed = self.listed(moves(state))
            if listed is None:
                return state
            for move in listed:
                cand = self.apply(state, move)
                if cand != state:
                    sc = score(state, cand)
                    if sc is not None:
                        ranked.append((sc, move))
            if not ranked:
                return state
            ranked.sort(key=lambda r: r[0], reverse=True)
            moved = False
            for sc, move in ranked:
                cand = self.apply(state, move)
                if cand != state and score(state, cand) is not None:
                    state, moved = cand, True
                    if done is not None and done(state):
                        return state
                    if greedy and not math.isinf(sc[0]):
                        break
            if not moved or self.spent:
                return state

    def run(self, keep: State, start: State) -> State:
        """Step 6 from `start` (the `construct` plan), steps 3-6 from keep-all, steps 5-6 from
        each low-memory seed, as far as the work bound allows; the best plan found, trimmed."""
        best = self.refine(start)
        seeds = [lambda: self.cover_deficit(self.fill_free_window(keep)),
                 lambda: self.cover_deficit(keep),
                 lambda: self.cover_deficit(keep, big_first=True)]
        seeds += [lambda seed=seed: self.relax(seed) if self.fits(seed) else seed
                  for seed in self.low_memory_seeds()]
        for seed in seeds:
            if self.listed(self.all_moves(keep)) is None:
                break
            cand = self.refine(seed())
            if self.better(self.key(cand), self.key(best)):
                best = cand
        return self.trim(best)

    def fill_free_window(self, state: State) -> State:
        """Step 3: offload tensors that add no step time, earliest segment and largest first."""
        sim = self.sim
        base = self.eval(state)[0].step_s
        order = sorted((x for s in range(sim.n) for x in self.movable[s]),
                       key=lambda x: (x.segment, -x.nbytes))
        if not self.affordable(len(order)):
            return state
        for x in order:
            cand = self.apply(state, ((), frozenset((x.id,)), _NONE))
            if x.id not in cand[1] or cand == state:
                continue
            tl, _ = self.eval(cand)
            if tl.peak_host_bytes <= self.host_budget and tl.step_s <= base * (1 + REL_EPS):
                state = cand
                if tl.peak_device_bytes <= self.device_budget or self.spent:
                    break
        return state

    def cover_deficit(self, state: State, greedy: bool = True,
                      tabu: frozenset[int] = _NONE, big_first: bool = False) -> State:
        """Step 4: moves by peak bytes freed (up to the deficit) per second added, until the
        plan fits; `greedy` re-ranks after every costly move (else one ranking per pass);
        tensors in `tabu` are not offloaded again. Among equally priced moves (those that add
        no time, above all) the fewest bytes moved go first, or with `big_first` the most bytes
        of the deficit covered. When that ends over budget (the cheap moves taken first left
        the peak where only dear ones reach it), the most bytes freed first, whatever they
        cost; the better of the two."""
        def freed(cur: State, cand: State) -> tuple[Timeline, Timeline, int] | None:
            tl, new = self.eval(cur)[0], self.eval(cand)[0]
            out = tl.peak_device_bytes - new.peak_device_bytes
            if out <= 0 or new.peak_host_bytes > self.host_budget:
                return None
            return tl, new, out

        def score(cur: State, cand: State) -> tuple[float, float] | None:
            got = freed(cur, cand)
            if got is None:
                return None
            tl, new, out = got
            useful = min(out, max(1, tl.peak_device_bytes - self.device_budget))
            ratio = costmodel.freed_per_exposed_second(useful, new.step_s - tl.step_s)
            return (ratio, useful, -out) if big_first else (ratio, -out)

        def most(cur: State, cand: State) -> tuple[float, float] | None:
            got = freed(cur, cand)
            return None if got is None else (got[2], got[0].step_s - got[1].step_s)

        def moves(cur: State) -> Iterator[Move]:
            deficit = self.eval(cur)[0].peak_device_bytes - self.device_budget
            for segs, add, drop in itertools.chain(self.all_moves(cur),
                                                   self.cover_moves(cur, deficit)):
                yield segs, (add - tabu if tabu else add), drop
        if self.fits(state):
            return state
        cheap = self.sweep(state, moves, score, self.fits, greedy=greedy)
        if self.fits(cheap):
            return cheap
        big = self.sweep(state, moves, most, self.fits, greedy=True)
        return big if self.better(self.key(big), self.key(cheap)) else cheap

    def relax(self, state: State) -> State:
        """Step 5: from a plan that fits, undo moves by step seconds saved per byte of peak
        given back, while the plan still fits."""
        def score(cur: State, cand: State) -> tuple[float, float] | None:
            tl = self.eval(cur)[0]
            if self.replay_bound(cand[0]) >= tl.step_s:
                return None
            new = self.eval(cand)[0]
            gain = tl.step_s - new.step_s
            if self.overrun(new) > 0 or gain <= REL_EPS * tl.step_s:
                return None
            cost = new.peak_device_bytes - tl.peak_device_bytes
            return (math.inf if cost <= 0 else gain / cost), gain
        return self.sweep(state, self.all_moves, score) if self.fits(state) else state

    def improves(self, cur: State, cand: State) -> tuple[float, float, float] | None:
        """The refine score: the candidate's negated key if it improves on `cur`."""
        now = self.key(cur)
        if now[0] == 0 and self.replay_bound(cand[0]) >= now[1] * (1 - REL_EPS):
            return None  # cannot be faster than a plan that already fits
        k = self.key(cand)
        return (-k[0], -k[1], -k[2]) if self.better(k, now) else None

    def refine(self, state: State) -> State:
        """Step 6: local search over single changes and swaps, then changes followed by a
        re-cover and relax, then (small profiles) pairs of segment changes."""
        while not self.spent:
            state = self.sweep(state, self.all_moves, self.improves)
            state = self.sweep(state, self.swap_moves, self.improves)
            nxt = self.compound(state)
            if nxt is None and self.sim.n <= PAIR_LIMIT:
                nxt = self.pairs(state)
            if nxt is None:
                return state
            state = nxt
        return state

    def compound(self, state: State) -> State | None:
        """The `COMPOUND_TRIES` most promising segment changes that do not pay alone (least
        replay time, then budget overrun, then step) and the `COMPOUND_DROPS` largest offloaded
        tensors kept instead, each followed by steps 4 and 5 (a large copy traded for smaller
        ones and recomputes), and where it lands over a budget also by `repair` and then steps
        4 and 5: the best result that improves on `state`, or None."""
        best, best_key = None, self.key(state)
        ranked = []
        listed = self.listed(self.segment_moves(state))
        if listed is None or not self.affordable(3 * len(listed)):  # ranking and the tries
            return None
        for move in listed:
            cand = self.apply(state, move)
            k = self.key(cand)
            if k[0] == 0 and self.replay_bound(cand[0]) >= best_key[1]:
                continue
            ranked.append(((self.replay_bound(cand[0]), k[0], k[1]), cand))
        ranked.sort(key=lambda r: r[0])
        tries = [(cand, _NONE) for _, cand in ranked[:COMPOUND_TRIES]]
        largest = sorted(state[1], key=lambda i: -self.sim.by_id[i].nbytes)[:COMPOUND_DROPS]
        tries += [(self.apply(state, ((), _NONE, frozenset((i,)))), frozenset((i,)))
                  for i in largest]  # a dropped tensor stays dropped while it re-covers
        for cand, tabu in tries:
            if self.spent:
                break
            starts = [cand]
            over, step, _ = self.key(cand)
            if over > 0 and step < best_key[1]:  # faster but over a budget: also mend it by copies
                starts.append(self.repair(cand, tabu))
            for start in starts:
                done = self.relax(self.cover_deficit(start, greedy=False, tabu=tabu))  # steps 4, 5
                k = self.key(done)
                if self.better(k, best_key):
                    best, best_key = done, k
        return best

    def repair(self, state: State, tabu: frozenset[int] = _NONE) -> State:
        """`state` (over a budget) brought down by moves that replay nothing more: tensors in or
        out of the offload set, swaps, and segment changes that do not raise the replay time
        (offload instead of keep, inputs kept instead of offloaded), each taken while it lowers
        the key. Unlike step 4, which takes the cheapest recompute when copies alone fall
        short, this trades copies for copies (keep a late tensor whose copy is still in flight
        at the peak, offload an earlier one; give back host bytes)."""
        def moves(cur: State) -> Iterator[Move]:
            bound = self.replay_bound(cur[0])
            for segs, add, drop in itertools.chain(self.segment_moves(cur), self.tensor_moves(cur)):
                if segs and self.replay_bound(self.apply(cur, (segs, _NONE, _NONE))[0]) > bound:
                    continue
                yield segs, (add - tabu if tabu else add), drop
        return self.sweep(state, moves, self.improves, lambda cur: self.key(cur)[0] == 0)

    def pairs(self, state: State) -> State | None:
        """The best pair of changes that improves on `state`, or None: pairs of segment
        changes, and while `state` is over budget, of any changes (a segment and a tensor:
        recompute one segment and offload a tensor elsewhere)."""
        moves = self.all_moves if self.key(state)[0] > 0 else self.segment_moves
        firsts = self.listed(moves(state))
        if firsts is None or not self.affordable(len(firsts) ** 2 // 2):
            return None
        ranked = []
        for i, m1 in enumerate(firsts):
            first = self.apply(state, m1)
            for m2 in firsts[i + 1:]:
                cand = self.apply(first, m2)
                if cand in (first, state) or self.spent:
                    continue
                sc = self.improves(state, cand)
                if sc is not None:
                    ranked.append((sc, cand))
        return max(ranked, key=lambda r: r[0])[1] if ranked else None

    def low_memory_seeds(self) -> list[State]:
        """Plans that move all that may move, three ways: recomputable segments recompute with
        their inputs offloaded, or with them kept, the others offload; or full recompute with
        the others kept. Each segment takes the first of these its allowed actions include."""
        seeds = []
        for prefer in ((RECOMPUTE_OFFLOAD_INPUTS, RECOMPUTE, OFFLOAD),
                       (RECOMPUTE, RECOMPUTE_OFFLOAD_INPUTS, OFFLOAD),
                       (RECOMPUTE, RECOMPUTE_OFFLOAD_INPUTS, KEEP),
                       (OFFLOAD, RECOMPUTE_OFFLOAD_INPUTS, RECOMPUTE)):
            state: State = ((KEEP,) * self.sim.n, frozenset())
            for s in range(self.sim.n):
                c = next((c for c in prefer if c in self.actions[s]), self.actions[s][0])
                add = self.movable_ids[s] if c == OFFLOAD else _NONE
                state = self.apply(state, (((s, c),), add, _NONE))
            if state not in seeds:
                seeds.append(state)
        return seeds

    def trim(self, state: State) -> State:
        """Give back offloads that neither the budget nor the step needs, latest first."""
        current = self.key(state)
        if not self.affordable(len(state[1])):
            return state
        for tid in sorted(state[1], key=lambda i: (-self.sim.segment_of[i], i)):
            cand = self.apply(state, ((), _NONE, frozenset((tid,))))
            k = self.key(cand)
            if k[0] <= current[0] and not self.better(current, k):
                state, current = cand, k
        return state


def cover(tensors: list, deficit: int) -> list:
    """The subset of `tensors` with the fewest bytes that is at least `deficit` bytes (all of
    them when even that falls short): exhaustive up to 10 tensors, else the smallest single
    tensor that covers it, else largest first."""
    total = sum(x.nbytes for x in tensors)
    if total <= deficit:
        return list(tensors)
    if len(tensors) <= 10:
        best, best_bytes = list(tensors), total
        m = len(tensors)
        for mask in range(1, 1 << m):
            b = sum(tensors[i].nbytes for i in range(m) if mask >> i & 1)
            if deficit <= b < best_bytes:
                best_bytes = b
                best = [tensors[i] for i in range(m) if mask >> i & 1]
        return best
    single = [x for x in tensors if x.nbytes >= deficit]
    if single:
        return [min(single, key=lambda x: x.nbytes)]
    pick, got = [], 0
    for x in sorted(tensors, key=lambda x: -x.nbytes):
        if got >= deficit:
            break
        pick.append(x)
        got += x.nbytes
    return pick
