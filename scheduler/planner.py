"""The planner: keep, offload or recompute each saved activation under two budgets.

`plan` searches the full plan format (per segment KEEP, OFFLOAD of any subset of its tensors,
RECOMPUTE with or without its inputs offloaded; one lookahead) on the simulator, with the
cost model of DESIGN.md §5 guiding the order of its moves:

1. If keeping everything fits the device budget, keep everything: nothing moves.
2. Families (`construct`): a few dozen simulations, whatever the profile's size, find the best
   of several one-parameter plans by bisection: the fewest longest-lived offloads that fit;
   the free copy window topped up with the cheapest recomputes; and a forward pass that
   offloads while the copies can end in forward, keeps while the rest can still fit, and
   recomputes otherwise. On repeated identical layers (Llama-3-70B: 80) this is the plan.
3. Free window: offload tensors, longest-lived (earliest segment) and largest first, while the
   step does not get longer (D2H keeps up with forward, the reloads arrive in time).
4. Deficit: until the budget is met, take the move that frees the most peak memory (up to the
   deficit) per second it adds to the step (`costmodel.freed_per_exposed_second`): offload one
   tensor, or the subset of a segment's tensors that covers the deficit with the fewest bytes
   (a knapsack under the segment's transfer window), recompute a segment, or recompute it
   with its inputs offloaded.
5. Relax: from plans that move everything that may move, undo moves where they buy the most
   step time per byte of peak, while the plan fits.
6. Refine: a local search over single changes (a segment's action, one tensor in or out of the
   offload set, a large offloaded tensor swapped for a smaller or longer-lived one) and, where
   a change alone does not pay, that change followed by steps 4 and 5 (recompute a segment,
   then give back the offloads it makes unneeded; when the change leaves the plan over a
   budget, also first mended with copies alone: tensors in or out, swaps, changes that replay
   nothing more), then pairs of segment changes. Last,
   offloads that neither the budget nor the step needs go back.
Steps 3-6 run from keep-all, from step 2's plan and from low-memory seeds, within a work
budget (`search.MAX_WORK` simulated events): small profiles get all of them, profiles of a
thousand tensors stop after step 2 (plans in tens of milliseconds).

Rule 1 (resident tail). The last `keep_last` recomputable segments and the segments after them
offload nothing (neither tensors nor a replay's inputs): backward needs them at once, so their
copies are exposed (DESIGN.md §4, rule 6). They may still be recomputed. The rule is dropped,
with a note, only when the budget cannot be met with it.

Rule 2 (budgets). Every plan is checked on the simulator: the peak device bytes (saved
activations and backward working sets) must be at most `device_budget` and the host bytes at
most `host_budget`. When even the least-memory plan does not fit, that plan is returned with a
note saying so; nothing raises.

Rule 3 (lookahead). The search judges a plan at its fastest lookahead that fits (the largest:
the step does not grow with d and the peak does not shrink, `prefetch`); the plan returned
carries the formula's d when that is as fast, else that largest d. When a faster plan holds
more bytes on the device (reloads issued earlier, fewer copies), it is taken: the budget is
there to be used.

Rule 4 (allowed actions). Actions that cannot fit in any plan are never tried
(`allowed_actions`): a replay holds a segment's bytes and its inputs at once, so recompute can
need more memory than offload; without this the search can stall on such a segment.

Rule 5 (baselines). The plan is never worse than full recompute or offload-all (rule 1's tail
kept) when they fit: if one of them beats the search's plan (in budget overrun, then step
time), it is returned (DESIGN.md §7: never slower than full recompute at any budget).

Rule 6 (op level). When the profile carries the ops of its regions (`SegmentRecord.ops`), the
plans above are made again with each recomputed region selective (storing the outputs of the
ops dearest to recompute per byte, `oplevel`) at several store caps, and the best plan of all
is returned: within budget first, then the fastest simulated step; a local search then gives
single recomputed segments another store set (or none), so full and selective recompute can mix.
Block-level plans stay the coarse case.

The budget and the backward working set. `device_budget` bounds saved activations plus, while
a segment's backward runs, its `backward_working_set_bytes`. A profile without measured working
sets models none; `backward_reserve` says how much of the budget the caller should then hold
back (and returns 0 for a profile that carries them).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from . import oplevel
from .construct import construct
from .hardware import Hardware
from .plan import Action, Plan, SegmentPlan
from .prefetch import best_lookahead, formula_lookahead
from .profile import Profile
from .search import Search
from .simulate import KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD_INPUTS, Simulator

log = logging.getLogger(__name__)

_ACTION = {KEEP: Action.KEEP, OFFLOAD: Action.OFFLOAD, RECOMPUTE: Action.RECOMPUTE,
           RECOMPUTE_OFFLOAD_INPUTS: Action.RECOMPUTE}
RESERVE_SHARE = 0.5  # backward_reserve without measured working sets: share of the largest segment


def check_budgets(api: str, device_budget: int, host_budget: int | None) -> None:
    """`ValueError` naming the argument when a budget is not a non-negative int of bytes."""
    for name, value in (("device_budget", device_budget), ("host_budget", host_budget)):
        if value is None and name == "host_budget":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{api}: {name} must be a non-negative int of bytes, got {value!r}; "
                             "parse strings such as '12GiB' before calling the scheduler")


def backward_reserve(profile: Profile, share: float = RESERVE_SHARE) -> int:
    """Bytes to hold back under the device budget for backward's working set (bytes).

    0 when the profile carries measured working sets (`SegmentRecord.backward_working_set_bytes`
    > 0 somewhere): the simulator and the planner then count them where they occur, so the
    whole budget can be planned. Otherwise `share` x the largest segment's saved bytes, the
    runtime's flat rule (gradient buffers measured 0.4-0.6 of a GPT block's saved bytes).
    """
    if not 0 <= share <= 1:
        raise ValueError(f"backward_reserve: share must be in [0, 1], got {share!r}")
    if profile.has_working_sets:
        return 0
    return int(share * max((profile.saved_bytes(s.index) for s in profile.segments), default=0))


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


def uniform_state(sim: Simulator, action: Action, resident: frozenset[int] = frozenset()
                  ) -> tuple[tuple[int, ...], frozenset[int]]:
    """The codes and offloaded ids of `plan_uniform`, the segments in `resident` offloading
    nothing."""
    n = sim.n
    if action is Action.OFFLOAD:
        moved = [[x.id for x in sim.tensors[s] if x.offloadable] if s not in resident else []
                 for s in range(n)]
        return (tuple(OFFLOAD if m else KEEP for m in moved),
                frozenset(i for m in moved for i in m))
    if action is Action.RECOMPUTE:
        return tuple(RECOMPUTE if sim.recomputable[s] else KEEP for s in range(n)), frozenset()
    return (KEEP,) * n, frozenset()


def resident_tail(sim: Simulator, keep_last: int) -> frozenset[int]:
    """Rule 1: the last `keep_last` recomputable segments and every segment after them."""
    if keep_last == 0 or sim.n == 0:
        return frozenset()
    regions = [s for s in range(sim.n) if sim.recomputable[s]]
    if not regions:
        return frozenset({sim.n - 1})
    return frozenset(range(regions[max(0, len(regions) - keep_last)], sim.n))


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

    def plan_blocks(p: Profile) -> Plan:
        return _plan_blocks(p, device_budget, host_budget, hardware, keep_last)

    def predict(p: Plan) -> Plan:  # a plan's figures on the simulator, its store sets costed
        tl = Simulator(oplevel.apply(profile, oplevel.stores_of(p)), hardware).timeline(p)
        return dataclasses.replace(p, predicted_step_s=tl.step_s, predicted_peak_bytes=tl.peak_device_bytes,
                                   predicted_host_bytes=tl.peak_host_bytes)

    best = plan_blocks(profile)
    moves = any(sp.action is not Action.KEEP for sp in best.segments)
    if moves and any(s.ops for s in profile.segments):  # rule 6
        best = oplevel.choose(profile, best, plan_blocks, predict, device_budget, host_budget)
    return best


def _plan_blocks(profile: Profile, device_budget: int, host_budget: int | None,
                 hardware: Hardware | None, keep_last: int) -> Plan:
    """Rules 1-5: the plan with whole segments recomputed (no op-level choice)."""
    sim = Simulator(profile, hardware)
    search = Search(sim, device_budget, host_budget, resident_tail(sim, keep_last))
    (codes, ids), notes = solve(search)
    _, d = best_lookahead(sim, codes, ids, device_budget)
    return build_plan(sim, codes, ids, d, notes)


def solve(search: Search) -> tuple[tuple[tuple[int, ...], frozenset[int]], tuple[str, ...]]:
    """Rules 1, 2 and 5 around `search`: the best state found and the notes that explain it."""
    sim = search.sim
    keep = ((KEEP,) * sim.n, frozenset())
    if search.fits(keep):
        return keep, ("keep-all fits the device budget: nothing moves",)
    notes: list[str] = []
    best = search.run(keep, construct(search, keep))
    if not search.fits(best) and search.resident:  # rule 1 gives way to rule 2
        notes.append("rule 1 dropped: the budget cannot be met with the last segments "
                     "resident")
        search.set_resident(frozenset())
        best = search.run(keep, construct(search, keep))
    for action in (Action.RECOMPUTE, Action.OFFLOAD):  # rule 5
        uniform = uniform_state(sim, action, search.resident)
        if search.better(search.key(uniform), search.key(best)):
            notes.append(f"rule 5: uniform {action.name} beats the search's plan")
            best = uniform
    tl, _ = search.eval(best)
    if search.overrun(tl) > 0:
        notes.append(
            f"infeasible: the least-memory plan found peaks at {tl.peak_device_bytes} device "
            f"bytes (budget {search.device_budget}) and {tl.peak_host_bytes} host bytes "
            f"(budget {search.host_budget}); returning it as best effort")
    log.debug("plan: step %.6fs peak %d host %d (%s)", tl.step_s, tl.peak_device_bytes,
              tl.peak_host_bytes, "; ".join(notes))
    return best, tuple(notes)
