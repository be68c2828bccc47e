"""The planner: keep, offload or recompute each segment's activations under two budgets.

`plan` is a greedy on the cost model of DESIGN.md §5, checked and polished on the simulator:

1. If keeping everything fits the device budget, keep everything: nothing moves.
2. Free window: offload tensors, longest-lived (earliest segment) and largest first, while the
   step does not get longer, i.e. while D2H keeps up with forward and the reloads arrive in time.
3. Deficit: until the device budget is met, take the move that frees the most peak memory per
   second it adds to the step (`costmodel.freed_per_exposed_second`): offload the rest of a
   segment (exposed transfer), recompute it, or recompute it with its inputs offloaded.
4. Relax: from plans that move everything that may move (`low_memory_seeds`), undo moves where
   they buy the most step time per byte of peak, while the plan fits.
5. Refine: a local search over single-segment changes (and pairs of them on small profiles),
   seeded from each of the above, keeps any change that lowers (budget overrun, step time,
   bytes moved); the best result wins. Then offloaded tensors that are not needed go back on
   the device, one tensor at a time (per-tensor offload inside kept segments).

Rule 1 (resident tail). The last `keep_last` recomputable segments and the segments after them
stay KEEP: backward needs them at once, so offloading them is fully exposed (DESIGN.md §4,
rule 6). The rule is dropped, with a note, only when the budget cannot be met with it (or by
rule 5).

Rule 2 (budgets). Every plan is checked on the simulator: the peak device bytes must be at most
`device_budget` and the host bytes at most `host_budget`. When even the least-memory plan does
not fit, that plan is returned with a note saying so; nothing raises.

Rule 3 (lookahead). A plan's lookahead is the formula of `prefetch` capped by the device
headroom, raised to the largest d that still fits when that shortens the step.

Rule 4 (allowed actions). Actions that cannot fit in any plan are never tried
(`allowed_actions`): a replay holds a segment's bytes and its inputs at once, so recompute can
need more memory than offload; without this the search can stall on such a segment.

Rule 5 (baselines). The plan is never worse than full recompute or offload-all when they fit:
if one of them beats the search's plan (in budget overrun, then step time), it is returned,
rule 1 notwithstanding (DESIGN.md §7: never slower than full recompute at any budget).
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

from . import costmodel
from .hardware import Hardware
from .plan import Action, Plan, SegmentPlan
from .prefetch import formula_lookahead, max_fitting_lookahead
from .profile import Profile
from .simulate import KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD_INPUTS, Simulator, Timeline

log = logging.getLogger(__name__)

_ACTION = {KEEP: Action.KEEP, OFFLOAD: Action.OFFLOAD, RECOMPUTE: Action.RECOMPUTE,
           RECOMPUTE_OFFLOAD_INPUTS: Action.RECOMPUTE}
_REL_EPS = 1e-9  # relative step-time change below which two plans count as equally fast


def check_budgets(api: str, device_budget: int, host_budget: int | None) -> None:
    """`ValueError` naming the argument when a budget is not a non-negative int of bytes."""
    for name, value in (("device_budget", device_budget), ("host_budget", host_budget)):
        if value is None and name == "host_budget":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{api}: {name} must be a non-negative int of bytes, got {value!r}; "
                             "parse strings such as '12GiB' before calling the scheduler")


def evaluate(sim: Simulator, codes: tuple[int, ...], ids: frozenset[int],
             device_budget: int) -> tuple[Timeline, int]:
    """The simulated step of `codes` and `ids` with its lookahead (planner rule 3)."""
    if not sim.reloads(codes, ids):
        return sim.run(codes, ids, 1), 1
    d = formula_lookahead(sim, codes, ids)
    tl = sim.run(codes, ids, d)
    if tl.peak_device_bytes > device_budget:
        if d == 1:
            return tl, 1
        d = max_fitting_lookahead(sim, codes, ids, device_budget, 1, d - 1)
        return sim.run(codes, ids, d), d
    if tl.exposed_s <= 0 or d >= sim.n - 1:
        return tl, d
    d_max = max_fitting_lookahead(sim, codes, ids, device_budget, d)
    if d_max > d:
        tl_max = sim.run(codes, ids, d_max)
        if tl_max.step_s < tl.step_s * (1 - _REL_EPS):
            return tl_max, d_max
    return tl, d


def build_plan(sim: Simulator, codes: Sequence[int], ids: frozenset[int], lookahead: int,
               notes: tuple[str, ...] = ()) -> Plan:
    """The public `Plan` of internal codes, with the simulator's predictions filled in."""
    tl = sim.run(codes, ids, lookahead)
    return Plan(
        segments=tuple(SegmentPlan(_ACTION[c], offload_inputs=c == RECOMPUTE_OFFLOAD_INPUTS)
                       for c in codes),
        offload_ids=frozenset(ids), lookahead=lookahead, predicted_step_s=tl.step_s,
        predicted_peak_bytes=tl.peak_device_bytes, predicted_host_bytes=tl.peak_host_bytes,
        signature=sim.profile.signature, notes=notes)


def plan_uniform(profile: Profile, action: Action, hardware: Hardware | None = None) -> Plan:
    """One action everywhere it applies, no budget: the baselines the planner is compared with.

    KEEP keeps everything; OFFLOAD offloads every offloadable tensor; RECOMPUTE recomputes every
    recomputable segment and keeps the others (full activation checkpointing). The lookahead
    is the `prefetch` formula, uncapped.
    """
    if not isinstance(action, Action):
        raise ValueError(f"plan_uniform: action must be an Action, got {action!r}")
    sim = Simulator(profile, hardware)
    codes, ids = uniform_state(sim, action)
    d = formula_lookahead(sim, codes, ids)
    return build_plan(sim, codes, ids, d, notes=(f"uniform {action.name}",))


def uniform_state(sim: Simulator, action: Action) -> tuple[tuple[int, ...], frozenset[int]]:
    """The codes and offloaded ids of `plan_uniform`."""
    n = sim.n
    if action is Action.OFFLOAD:
        return (tuple(OFFLOAD if any(x.offloadable for x in sim.tensors[s]) else KEEP
                      for s in range(n)), sim.offloadable_ids)
    if action is Action.RECOMPUTE:
        return tuple(RECOMPUTE if sim.recomputable[s] else KEEP for s in range(n)), frozenset()
    return (KEEP,) * n, frozenset()


def plan(profile: Profile, device_budget: int, host_budget: int | None,
         hardware: Hardware | None = None, *, keep_last: int = 1) -> Plan:
    """The planned actions for `profile` under `device_budget` and `host_budget` (bytes).

    `host_budget=None` means no host limit; `hardware=None` uses the link measured in the
    profile. Never raises for a budget that cannot be met: the returned plan then says so in
    `notes` (see the module docstring for the method and its rules).
    """
    check_budgets("plan", device_budget, host_budget)
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"plan: keep_last must be a non-negative int, got {keep_last!r}")
    sim = Simulator(profile, hardware)
    search = _Search(sim, device_budget, host_budget, _resident_tail(sim, keep_last))
    (codes, ids), notes = search.solve()
    _, d = search.eval((codes, ids))
    return build_plan(sim, codes, ids, d, notes)


def _resident_tail(sim: Simulator, keep_last: int) -> frozenset[int]:
    """Rule 1: the last `keep_last` recomputable segments and every segment after them."""
    if keep_last == 0 or sim.n == 0:
        return frozenset()
    regions = [s for s in range(sim.n) if sim.recomputable[s]]
    if not regions:
        return frozenset({sim.n - 1})
    return frozenset(range(regions[max(0, len(regions) - keep_last)], sim.n))


def allowed_actions(sim: Simulator, device_budget: int,
                    resident: frozenset[int]) -> list[tuple[int, ...]]:
    """Rule 4: the actions each segment may take. Rule 1's tail keeps; any other segment may
    keep, offload (if it has offloadable tensors), recompute and recompute with its inputs
    offloaded (if recomputable), except an action that cannot fit in any plan: while segment j's
    backward runs, the device holds j's own bytes under that action, segment j - 1's bytes
    (reloads are issued at least one segment ahead) and the resident bytes of every segment
    before it. With every other segment at its least, an action over budget is dropped; this
    repeats until nothing changes. A segment left with no action keeps them all."""
    n = sim.n
    actions = []
    for s in range(n):
        acts = [KEEP]
        if s not in resident:
            if any(x.offloadable for x in sim.tensors[s]):
                acts.append(OFFLOAD)
            if sim.recomputable[s]:
                acts.append(RECOMPUTE)
                if sim.input_bytes[s]:
                    acts.append(RECOMPUTE_OFFLOAD_INPUTS)
        actions.append(acts)
    changed = True
    while changed:
        changed = False
        least = [[min(sim.footprint(s, c)[k] for c in actions[s]) for s in range(n)]
                 for k in (0, 1)]  # resident, while the next segment's backward runs
        before = 0  # least resident bytes of segments 0 .. j-2
        for j in range(n):
            floor = before + (least[1][j - 1] if j > 0 else 0)
            fit = [c for c in actions[j] if floor + sim.footprint(j, c)[2] <= device_budget]
            if fit and len(fit) < len(actions[j]):
                actions[j], changed = fit, True
            if j > 0:
                before += least[0][j - 1]
    return [tuple(a) for a in actions]


State = tuple[tuple[int, ...], frozenset[int]]  # action code per segment, offloaded tensor ids
Move = tuple[int, int]  # (segment, action code); OFFLOAD moves all its offloadable tensors
Key = tuple[float, float, int]  # budget overrun (bytes), step (s), bytes moved
Score = Callable[[State, State], "tuple[float, ...] | None"]

PAIR_LIMIT = 12  # refine also tries pairs of changes on profiles of at most this many segments


class _Search:
    """All state of one `plan` call: budgets, the resident tail and a cache of evaluations."""

    def __init__(self, sim: Simulator, device_budget: int, host_budget: int | None,
                 resident: frozenset[int]) -> None:
        self.sim = sim
        self.device_budget = device_budget
        self.host_budget = math.inf if host_budget is None else host_budget
        self.offloadable = [frozenset(x.id for x in sim.tensors[s] if x.offloadable)
                            for s in range(sim.n)]
        self.set_resident(resident)
        self.base_step = sum(sim.forward_s) + sum(sim.backward_s)
        self._cache: dict[State, tuple[Timeline, int]] = {}

    # -- evaluation ----------------------------------------------------------------------

    def eval(self, state: State) -> tuple[Timeline, int]:
        """The simulated step of `state` and its lookahead (rule 3), cached."""
        hit = self._cache.get(state)
        if hit is None:
            hit = self._cache[state] = evaluate(self.sim, state[0], state[1], self.device_budget)
        return hit

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
        """Whether key `a` improves on key `b` (step times within _REL_EPS tie)."""
        if a[0] != b[0]:
            return a[0] < b[0]
        if abs(a[1] - b[1]) > _REL_EPS * max(a[1], b[1]):
            return a[1] < b[1]
        return a[2] < b[2]

    def replay_bound(self, codes: Sequence[int]) -> float:
        """A lower bound on the step of `codes`: forward, backward and the replays (seconds)."""
        return self.base_step + sum(self.sim.forward_s[s] for s, c in enumerate(codes)
                                    if c >= RECOMPUTE)

    # -- moves ---------------------------------------------------------------------------

    def apply(self, state: State, move: Move) -> State:
        """`state` with segment s set to code c (OFFLOAD takes all its offloadable tensors)."""
        s, c = move
        codes, ids = state
        own = self.offloadable[s]
        ids = (ids | own) if c == OFFLOAD else (ids - own)
        return codes[:s] + (c,) + codes[s + 1:], ids

    def set_resident(self, resident: frozenset[int]) -> None:
        """Fix the resident tail (rule 1) and the actions each segment may take (rule 4)."""
        self.resident = resident
        self.actions = allowed_actions(self.sim, self.device_budget, resident)

    def moves(self, state: State) -> list[Move]:
        """Every change of one segment to another of its allowed actions."""
        return [(s, c) for s in range(self.sim.n) for c in self.actions[s]
                if self.apply(state, (s, c)) != state]

    def low_memory_seeds(self) -> list[State]:
        """Plans that move all that may move, three ways: recomputable segments recompute with
        their inputs offloaded, or with them kept, the others offload; or full recompute with
        the others kept. Each segment takes the first of these its allowed actions include.
        None is always the least memory: offloading adds in-flight bytes while D2H lags, and a
        replay holds a segment's bytes and its inputs at once."""
        seeds = []
        for prefer in ((RECOMPUTE_OFFLOAD_INPUTS, RECOMPUTE, OFFLOAD),
                       (RECOMPUTE, RECOMPUTE_OFFLOAD_INPUTS, OFFLOAD),
                       (RECOMPUTE, RECOMPUTE_OFFLOAD_INPUTS, KEEP)):
            state: State = ((KEEP,) * self.sim.n, frozenset())
            for s in range(self.sim.n):
                c = next((c for c in prefer if c in self.actions[s]), self.actions[s][0])
                state = self.apply(state, (s, c))
            if state not in seeds:
                seeds.append(state)
        return seeds

    def sweep(self, state: State, score: Score,
              done: Callable[[State], bool] | None = None) -> State:
        """Rank every single move by `score` (None: not acceptable), apply them best first,
        each re-scored against the state it lands on, and repeat until no move is acceptable
        or `done` holds. Each accepted move strictly improves what `score` measures."""
        while True:
            ranked = []
            for move in self.moves(state):
                sc = score(state, self.apply(state, move))
                if sc is not None:
                    ranked.append((sc, move))
            if not ranked:
                return state
            ranked.sort(key=lambda r: r[0], reverse=True)
            for _, move in ranked:
                cand = self.apply(state, move)
                if cand != state and score(state, cand) is not None:
                    state = cand
                    if done is not None and done(state):
                        return state

    def fits(self, state: State) -> bool:
        return self.overrun(self.eval(state)[0]) == 0

    # -- the method ----------------------------------------------------------------------

    def solve(self) -> tuple[State, tuple[str, ...]]:
        """The best plan found and the notes that explain it."""
        n = self.sim.n
        keep: State = ((KEEP,) * n, frozenset())
        if self.fits(keep):
            return keep, ("keep-all fits the device budget: nothing moves",)
        notes: list[str] = []
        best = self.search(keep)
        if not self.fits(best) and self.resident:  # rule 1 gives way to rule 2
            notes.append("rule 1 dropped: the budget cannot be met with the last segments "
                         "resident")
            self.set_resident(frozenset())
            best = self.search(keep)
        for action in (Action.RECOMPUTE, Action.OFFLOAD):  # rule 5
            uniform = uniform_state(self.sim, action)
            if self.better(self.key(uniform), self.key(best)):
                notes.append(f"rule 5: uniform {action.name} beats the search's plan")
                best = uniform
        tl, _ = self.eval(best)
        if self.overrun(tl) > 0:
            notes.append(
                f"infeasible: the least-memory plan found peaks at {tl.peak_device_bytes} device "
                f"bytes (budget {self.device_budget}) and {tl.peak_host_bytes} host bytes "
                f"(budget {self.host_budget}); returning it as best effort")
        log.debug("plan: step %.6fs peak %d host %d (%s)", tl.step_s, tl.peak_device_bytes,
                  tl.peak_host_bytes, "; ".join(notes))
        return best, tuple(notes)

    def search(self, keep: State) -> State:
        """Steps 2, 3 and 5 from keep-all, steps 4 and 5 from each low-memory seed; the best."""
        best = self.refine(self.cover_deficit(self.fill_free_window(keep)))
        for seed in self.low_memory_seeds():
            cand = self.refine(self.relax(seed))
            if self.better(self.key(cand), self.key(best)):
                best = cand
        return self.trim(best)

    def fill_free_window(self, state: State) -> State:
        """Step 2: offload tensors that add no step time, earliest segment and largest first."""
        sim = self.sim
        base = self.eval(state)[0].step_s
        order = sorted((x for s in range(sim.n) if s not in self.resident
                        for x in sim.tensors[s] if x.offloadable),
                       key=lambda x: (sim.segment_of[x.id], -x.nbytes))
        for x in order:
            s = sim.segment_of[x.id]
            codes, ids = state
            if codes[s] not in (KEEP, OFFLOAD) or OFFLOAD not in self.actions[s]:
                continue
            cand = (codes[:s] + (OFFLOAD,) + codes[s + 1:], ids | {x.id})
            tl, _ = self.eval(cand)
            if tl.peak_host_bytes <= self.host_budget and tl.step_s <= base * (1 + _REL_EPS):
                state = cand
                if tl.peak_device_bytes <= self.device_budget:
                    break
        return state

    def cover_deficit(self, state: State) -> State:
        """Step 3: moves by peak bytes freed per second added, until the plan fits."""
        def score(cur: State, cand: State) -> tuple[float, float] | None:
            tl, new = self.eval(cur)[0], self.eval(cand)[0]
            freed = tl.peak_device_bytes - new.peak_device_bytes
            if freed <= 0 or new.peak_host_bytes > self.host_budget:
                return None
            return costmodel.freed_per_exposed_second(freed, new.step_s - tl.step_s), freed
        return state if self.fits(state) else self.sweep(state, score, self.fits)

    def relax(self, state: State) -> State:
        """Step 4: from a plan that fits, undo moves by step seconds saved per byte of peak
        given back, while the plan still fits."""
        def score(cur: State, cand: State) -> tuple[float, float] | None:
            tl = self.eval(cur)[0]
            if self.replay_bound(cand[0]) >= tl.step_s:
                return None
            new = self.eval(cand)[0]
            gain = tl.step_s - new.step_s
            if self.overrun(new) > 0 or gain <= _REL_EPS * tl.step_s:
                return None
            cost = new.peak_device_bytes - tl.peak_device_bytes
            return (math.inf if cost <= 0 else gain / cost), gain
        return self.sweep(state, score) if self.fits(state) else state

    def refine(self, state: State) -> State:
        """Step 5: local search over single changes, then (small profiles) pairs of changes."""
        def score(cur: State, cand: State) -> tuple[float, float, float] | None:
            now = self.key(cur)
            if now[0] == 0 and self.replay_bound(cand[0]) >= now[1]:
                return None  # cannot be faster than a plan that already fits
            k = self.key(cand)
            return (-k[0], -k[1], -k[2]) if self.better(k, now) else None
        while True:
            state = self.sweep(state, score)
            if self.sim.n > PAIR_LIMIT:
                return state
            pairs = [self.apply(self.apply(state, m1), m2) for m1 in self.moves(state)
                     for m2 in self.moves(self.apply(state, m1)) if m2[0] > m1[0]]
            ranked = [(sc, p) for p in pairs if (sc := score(state, p)) is not None]
            if not ranked:
                return state
            state = max(ranked, key=lambda r: r[0])[1]

    def trim(self, state: State) -> State:
        """Step 5, per tensor: give back offloads that neither the budget nor the step needs.

        Only tensors no larger than the device headroom are tried: keeping one of them on the
        device adds its bytes to the forward-end memory."""
        sim = self.sim
        current = self.key(state)
        for tid in sorted(state[1], key=lambda i: (-sim.segment_of[i], i)):
            x = next(t for t in sim.tensors[sim.segment_of[tid]] if t.id == tid)
            if x.nbytes > self.device_budget - self.eval(state)[0].peak_device_bytes:
                continue
            s = sim.segment_of[tid]
            codes, ids = state
            ids = ids - {tid}
            if not ids & self.offloadable[s]:
                codes = codes[:s] + (KEEP,) + codes[s + 1:]
            k = self.key((codes, ids))
            if k[0] <= current[0] and not self.better(current, k):
                state, current = (codes, ids), k
        return state
