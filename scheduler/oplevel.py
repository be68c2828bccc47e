"""Op-level granularity: selective recompute chosen from the op profile.

Inside a recomputed region the choice goes down to single ops (DESIGN.md §5): store the outputs
of the ops that are dear to recompute per byte they hold (matmuls, attention) and replay only
the cheap ones (norms, activations, casts). A segment whose profile carries its ops
(`SegmentRecord.ops`) gets, besides KEEP / OFFLOAD / RECOMPUTE, selective recompute: a
RECOMPUTE whose `SegmentPlan.store_ops` names the ops whose outputs are stored.

The cost of a store set S of segment s, as the simulator weighs it (`apply`), in bytes and
seconds:
- held on the device from its forward to the end of its backward: the stored bytes
  sum(b_k, k in S) (`held_bytes`), besides its inputs (kept or offloaded as before);
- its replay runs F_s - sum(f_k, k in S) + n_s * d seconds (f_k: the op's share of F_s;
  n_s: the ops the segment dispatches, `SegmentRecord.op_count`; d: the seconds a dispatch mode
  adds per op, `Profile.op_dispatch_s`), and its forward F_s + n_s * d: a selective segment
  runs both under a Python dispatch mode that sees every op (selective.py), which plain
  recompute does not. On a small CPU model (ops of tens of microseconds) that overhead can
  outweigh what the stored ops save; measured, not assumed (opprofile.py);
- its replay re-materialises what full recompute would, less the stored outputs that autograd
  saves anyway (`OpRecord.saved_bytes`): those come back as the stored tensors.

Choosing S (`store_set`) is a knapsack: ops by recompute seconds saved per byte held, best
first, while their bytes fit a cap (a greedy fill that skips what does not fit). The planner
(`choose`) tries caps at several shares of the segment's saved bytes, the same share in every
segment (repeated blocks have the same ops), plans each with the block-level search, and keeps
whichever plan is best: within budget first, then the shortest simulated step. The block
plan (S empty everywhere) is always among them: block-level plans stay the coarse case. Last,
a local search (`refine`, from the block plan, from full recompute and from the best) gives
each recomputed segment, one at a time, the store set of another share (or none: full
recompute) where the simulated plan gets better, so a plan may mix full and selective
recompute (a budget that stores the matmuls of some blocks only).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Mapping, Sequence

from .plan import Action, Plan, SegmentPlan
from .profile import Profile, SegmentRecord

log = logging.getLogger(__name__)

# Caps tried for the store set, as shares of a segment's saved bytes (full keep).
SHARES = (0.125, 0.25, 0.375, 0.5, 0.75, 1.0)


def store_set(seg: SegmentRecord, cap_bytes: int) -> tuple[int, ...]:
    """The op positions to store in `seg` within `cap_bytes` held: ops by forward seconds per
    byte held, largest first, each taken while it still fits (a greedy knapsack). Ops that
    cost no time are never stored."""
    ranked = sorted((op for op in seg.ops if op.forward_s > 0),
                    key=lambda op: (-op.forward_s / max(1, op.nbytes), op.index))
    chosen, held = [], 0
    for op in ranked:
        if held + op.nbytes <= cap_bytes:
            chosen.append(op.index)
            held += op.nbytes
    return tuple(sorted(chosen))


def apply(profile: Profile, stores: Mapping[int, Sequence[int]]) -> Profile:
    """`profile` as the simulator sees it when segment s (a key of `stores`) is recomputed
    storing the outputs of ops `stores[s]` (the module docstring's costs). Segments not in
    `stores`, or with an empty set, are unchanged. `ValueError` for an unknown segment or op."""
    if not any(stores.values()):
        return profile
    dropped: dict[int, int] = {}  # segment -> bytes a full replay re-materialises
    for t in profile.tensors:
        if t.last <= t.segment:
            dropped[t.segment] = dropped.get(t.segment, 0) + t.nbytes
    segments = list(profile.segments)
    for s, positions in stores.items():
        if not positions:
            continue
        if not 0 <= s < len(segments) or not segments[s].recomputable:
            raise ValueError(f"store_ops: segment {s} is not a recomputable segment of the profile")
        seg = segments[s]
        ops = {op.index: op for op in seg.ops}
        missing = [k for k in positions if k not in ops]
        if missing:
            raise ValueError(f"store_ops: segment {s} ({seg.name}) has no op at positions {missing}")
        picked = [ops[k] for k in dict.fromkeys(positions)]
        replay_s = seg.forward_s if seg.replay_s is None else seg.replay_s
        dispatch_s = seg.op_count * profile.op_dispatch_s  # n_s * d (module docstring), seconds
        segments[s] = dataclasses.replace(
            seg, held_bytes=seg.held_bytes + sum(op.nbytes for op in picked),
            forward_s=seg.forward_s + dispatch_s,
            replay_s=max(0.0, replay_s - sum(op.forward_s for op in picked)) + dispatch_s,
            replay_bytes=max(0, dropped.get(s, 0) - sum(op.saved_bytes for op in picked)))
    return dataclasses.replace(profile, segments=tuple(segments))


def store_sets(profile: Profile, share: float) -> dict[int, tuple[int, ...]]:
    """Per recomputable segment with ops, its store set under a cap of `share` x its saved
    bytes (`store_set`)."""
    out = {}
    for seg in profile.segments:
        if seg.recomputable and seg.ops:
            chosen = store_set(seg, int(share * profile.saved_bytes(seg.index)))
            if chosen:
                out[seg.index] = chosen
    return out


def with_stores(plan: Plan, stores: Mapping[int, tuple[int, ...]]) -> Plan:
    """`plan` with the store sets on its RECOMPUTE segments (the others stay as they are)."""
    segments = tuple(dataclasses.replace(sp, store_ops=stores.get(i, ()))
                     if sp.action is Action.RECOMPUTE else sp for i, sp in enumerate(plan.segments))
    return dataclasses.replace(plan, segments=segments)


def stores_of(plan: Plan) -> dict[int, tuple[int, ...]]:
    """The store sets of `plan`'s selective segments."""
    return {i: sp.store_ops for i, sp in enumerate(plan.segments) if sp.selective}


def choose(profile: Profile, block_plan: Plan, plan_blocks: Callable[[Profile], Plan],
           predict: Callable[[Plan], Plan], device_budget: int, host_budget: int | None) -> Plan:
    """The best of `block_plan` and the plans `plan_blocks` makes with every segment's
    RECOMPUTE selective at each share of `SHARES`, then `refine`d (module docstring). Plans
    are ranked by budget overrun (bytes), then simulated step time, then device peak;
    `predict` fills in a plan's simulated figures."""
    def key(p: Plan) -> tuple[int, float, int]:
        over = max(0, p.predicted_peak_bytes - device_budget)
        if host_budget is not None:
            over += max(0, p.predicted_host_bytes - host_budget)
        return over, p.predicted_step_s, p.predicted_peak_bytes

    best, tried = block_plan, set()
    for share in SHARES:
        stores = store_sets(profile, share)
        frozen = tuple(sorted(stores.items()))
        if not stores or frozen in tried:
            continue
        tried.add(frozen)
        candidate = plan_blocks(apply(profile, stores))
        # re-costed with the store sets its RECOMPUTE segments got: `apply(profile, stores)`
        # charged every segment with ops a selective forward, a kept one included
        candidate = predict(with_stores(candidate, stores))
        candidate = dataclasses.replace(candidate, notes=candidate.notes + (
            f"op level: selective recompute storing ops up to {share:g} of each block's saved bytes",))
        if not any(sp.selective for sp in candidate.segments):
            continue
        if key(candidate) < key(best):
            best = candidate
    full = predict(dataclasses.replace(block_plan, offload_ids=frozenset(), notes=(), segments=tuple(
        SegmentPlan(Action.RECOMPUTE if s.recomputable else Action.KEEP) for s in profile.segments)))
    starts = [block_plan, full] + ([best] if best is not block_plan else [])
    best = min((refine(profile, p, predict, key) for p in starts), key=key)
    log.debug("op level: %s", "selective" if best is not block_plan else "block plan kept")
    return best


def refine(profile: Profile, plan: Plan, predict: Callable[[Plan], Plan],
           key: Callable[[Plan], tuple], passes: int = 2) -> Plan:
    """Local search over the store sets of `plan`'s RECOMPUTE segments: each in turn takes the
    store set (of any share in `SHARES`, or none) that makes `key` least, the other segments'
    actions fixed; up to `passes` rounds while one improves."""
    options: dict[int, list[tuple[int, ...]]] = {}
    for i, sp in enumerate(plan.segments):
        seg = profile.segments[i]
        if sp.action is Action.RECOMPUTE and seg.ops:
            sets = dict.fromkeys([()] + [store_set(seg, int(share * profile.saved_bytes(i)))
                                         for share in SHARES])
            options[i] = list(sets)
    best, best_key = plan, key(plan)
    for _ in range(passes):
        improved = False
        for i, sets in options.items():
            for chosen in sets:
                if chosen == best.segments[i].store_ops:
                    continue
                segments = list(best.segments)
                segments[i] = dataclasses.replace(segments[i], store_ops=chosen)
                trial = predict(dataclasses.replace(best, segments=tuple(segments)))
                if key(trial) < best_key:
                    best, best_key, improved = trial, key(trial), True
        if not improved:
            break
    return best
