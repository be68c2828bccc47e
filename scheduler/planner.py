"""The planner: keep, offload or recompute each segment's activations under two budgets.

`plan` is a greedy on the cost model of DESIGN.md §5, checked and polished on the simulator:

1. If keeping everything fits the device budget, keep everything: nothing moves.
2. Free window: offload tensors, longest-lived (earliest segment) and largest first, while the
   step does not get longer, i.e. while D2H keeps up with forward and the reloads arrive in time.
3. Deficit: until the device budget is met, take the move that frees the most peak memory per
   second it adds to the step (`costmodel.freed_per_exposed_second`): offload the rest of a
   segment (exposed transfer), recompute it, or recompute it with its inputs offloaded.
4. Refine: a local search over single-segment changes, seeded from the greedy, keeps any change
   that lowers (budget overrun, step time, bytes moved); then offloaded tensors that are not
   needed go back on the device, one tensor at a time (per-tensor offload inside kept segments).

Rule 1 (resident tail). The last `keep_last` recomputable segments and the segments after them
stay KEEP: backward needs them at once, so offloading them is fully exposed (DESIGN.md §4,
rule 6). The rule is dropped, with a note, only when the budget cannot be met with it.

Rule 2 (budgets). Every plan is checked on the simulator: the peak device bytes must be at most
`device_budget` and the host bytes at most `host_budget`. When even the least-memory plan does
not fit, that plan is returned with a note saying so; nothing raises.

Rule 3 (lookahead). A plan's lookahead is the formula of `prefetch` capped by the device
headroom, raised to the largest d that still fits when that shortens the step.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

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
    """The simulated step of `codes` and `ids` with its lookahead (rule 3)."""
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
    sim = Simulator(profile, hardware)
    n = sim.n
    ids: frozenset[int] = frozenset()
    if action is Action.KEEP:
        codes = (KEEP,) * n
    elif action is Action.OFFLOAD:
        ids = sim.offloadable_ids
        codes = tuple(OFFLOAD if any(x.offloadable for x in sim.tensors[s]) else KEEP
                      for s in range(n))
    elif action is Action.RECOMPUTE:
        codes = tuple(RECOMPUTE if sim.recomputable[s] else KEEP for s in range(n))
    else:
        raise ValueError(f"plan_uniform: action must be an Action, got {action!r}")
    d = formula_lookahead(sim, codes, ids)
    return build_plan(sim, codes, ids, d, notes=(f"uniform {action.name}",))


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


State = tuple[tuple[int, ...], frozenset[int]]  # action code per segment, offloaded tensor ids
Key = tuple[float, float, int]  # budget overrun (bytes), step (s), bytes moved

PAIR_LIMIT = 12  # refine tries pairs of changes on profiles of at most this many segments


class _Search:
    """All state of one `plan` call: budgets, the resident tail and a cache of evaluations."""

    def __init__(self, sim: Simulator, device_budget: int, host_budget: int | None,
                 resident: frozenset[int]) -> None:
        self.sim = sim
        self.device_budget = device_budget
        self.host_budget = math.inf if host_budget is None else host_budget
        self.resident = resident
        self.offloadable = [frozenset(x.id for x in sim.tensors[s] if x.offloadable)
                            for s in range(sim.n)]
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

    def options(self, state: State, s: int) -> list[State]:
        """`state` with segment s set to each other of KEEP, OFFLOAD (all its offloadable
        tensors), RECOMPUTE and RECOMPUTE with offloaded inputs."""
        codes, ids = state
        if s in self.resident:
            return []
        sim = self.sim
        own = self.offloadable[s]
        rest = ids - own
        targets = [(KEEP, rest)]
        if own:
            targets.append((OFFLOAD, rest | own))
        if sim.recomputable[s]:
            targets.append((RECOMPUTE, rest))
            if sim.input_bytes[s]:
                targets.append((RECOMPUTE_OFFLOAD_INPUTS, rest))
        out = []
        for c, new_ids in targets:
            if c != codes[s] or new_ids != ids:
                out.append((codes[:s] + (c,) + codes[s + 1:], new_ids))
        return out

    def least_memory(self) -> State:
        """Everything moved that may move: recompute (inputs offloaded) or offload."""
        sim = self.sim
        codes, ids = [], set()
        for s in range(sim.n):
            if s in self.resident:
                codes.append(KEEP)
            elif sim.recomputable[s]:
                codes.append(RECOMPUTE_OFFLOAD_INPUTS if sim.input_bytes[s] else RECOMPUTE)
            elif self.offloadable[s]:
                codes.append(OFFLOAD)
                ids |= self.offloadable[s]
            else:
                codes.append(KEEP)
        return tuple(codes), frozenset(ids)

    # -- the method ----------------------------------------------------------------------

    def solve(self) -> tuple[State, tuple[str, ...]]:
        """The best plan found and the notes that explain it."""
        n = self.sim.n
        keep: State = ((KEEP,) * n, frozenset())
        if self.overrun(self.eval(keep)[0]) == 0:
            return keep, ("keep-all fits the device budget: nothing moves",)
        notes: list[str] = []
        best = self.search(keep)
        if self.key(best)[0] > 0 and self.resident:
            notes.append("rule 1 dropped: the budget cannot be met with the last segments "
                         "resident")
            self.resident = frozenset()
            best = self.search(keep)
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
        """Steps 2-4 from keep-all, and the relaxation from the least-memory plan; the better."""
        forward = self.refine(self.cover_deficit(self.fill_free_window(keep)))
        backward = self.refine(self.relax(self.least_memory()))
        best = forward if not self.better(self.key(backward), self.key(forward)) else backward
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
            if codes[s] not in (KEEP, OFFLOAD):
                continue
            cand = (codes[:s] + (OFFLOAD,) + codes[s + 1:], ids | {x.id})
            tl, _ = self.eval(cand)
            if tl.peak_host_bytes <= self.host_budget and tl.step_s <= base * (1 + _REL_EPS):
                state = cand
                if tl.peak_device_bytes <= self.device_budget:
                    break
        return state

    def cover_deficit(self, state: State) -> State:
        """Step 3: the move freeing the most peak bytes per added second, until the plan fits."""
        sim = self.sim
        while True:
            tl, _ = self.eval(state)
            if self.overrun(tl) == 0:
                return state
            best, best_score = None, (0.0, 0)
            for s in range(sim.n):
                for cand in self.options(state, s):
                    new, _ = self.eval(cand)
                    if new.peak_host_bytes > self.host_budget:
                        continue
                    freed = tl.peak_device_bytes - new.peak_device_bytes
                    score = (costmodel.freed_per_exposed_second(freed, new.step_s - tl.step_s),
                             freed)
                    if freed > 0 and score > best_score:
                        best, best_score = cand, score
            if best is None:
                return state
            state = best

    def relax(self, state: State) -> State:
        """From a plan that fits, undo moves where they buy the most step time per byte of peak
        they give back, while the plan still fits."""
        sim = self.sim
        while True:
            tl, _ = self.eval(state)
            if self.overrun(tl) > 0:
                return state
            best, best_score = None, (0.0, 0.0)
            for s in range(sim.n):
                for cand in self.options(state, s):
                    if self.replay_bound(cand[0]) >= tl.step_s:
                        continue
                    new, _ = self.eval(cand)
                    gain = tl.step_s - new.step_s
                    if self.overrun(new) > 0 or gain <= _REL_EPS * tl.step_s:
                        continue
                    cost = new.peak_device_bytes - tl.peak_device_bytes
                    score = (math.inf if cost <= 0 else gain / cost, gain)
                    if score > best_score:
                        best, best_score = cand, score
            if best is None:
                return state
            state = best

    def _improvement(self, state: State, current: Key,
                     candidates: Sequence[State]) -> tuple[State, Key] | None:
        """The best candidate that improves on `current`, or None."""
        best = None
        for cand in candidates:
            if current[0] == 0 and self.replay_bound(cand[0]) >= current[1]:
                continue  # cannot be faster than a plan that already fits
            k = self.key(cand)
            if self.better(k, current) and (best is None or self.better(k, best[1])):
                best = (cand, k)
        return best

    def refine(self, state: State) -> State:
        """Step 4: best-improvement local search, single changes first, then pairs."""
        sim = self.sim
        current = self.key(state)
        while True:
            singles = [c for s in range(sim.n) for c in self.options(state, s)]
            found = self._improvement(state, current, singles)
            if found is None and sim.n <= PAIR_LIMIT:
                pairs = [c2 for s1 in range(sim.n) for c1 in self.options(state, s1)
                         for s2 in range(s1 + 1, sim.n) for c2 in self.options(c1, s2)]
                found = self._improvement(state, current, pairs)
            if found is None:
                return state
            state, current = found

    def trim(self, state: State) -> State:
        """Step 4, per tensor: give back offloads that neither the budget nor the step needs."""
        sim = self.sim
        current = self.key(state)
        for tid in sorted(state[1], key=lambda i: sim.segment_of[i], reverse=True):
            s = sim.segment_of[tid]
            codes, ids = state
            ids = ids - {tid}
            if not ids & self.offloadable[s]:
                codes = codes[:s] + (KEEP,) + codes[s + 1:]
            k = self.key((codes, ids))
            if k[0] <= current[0] and not self.better(current, k):
                state, current = (codes, ids), k
        return state
