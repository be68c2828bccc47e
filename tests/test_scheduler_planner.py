"""The planner: budgets, rule 1, and the greedy against the exhaustive search."""
import itertools
import math
import random

import pytest

from scheduler import Action, Profile, SegmentRecord, TensorRecord
from scheduler import plan, plan_exact, plan_uniform, simulate
from scheduler.check import BUDGET_LEVELS, cases, compare, random_case
from scheduler.simulate import KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD_INPUTS, Simulator

K, O, R = Action.KEEP, Action.OFFLOAD, Action.RECOMPUTE
MB = 10**6


def llama_like(n_layers=6, bw=20e9):
    """embed, n_layers equal blocks, head; each block 5 x 100 MB, F 10 ms, B 20 ms."""
    segs = [SegmentRecord(0, "embed", 1e-3, 2e-3, False, 0)]
    segs += [SegmentRecord(i, f"layer{i}", 10e-3, 20e-3, True, 50 * MB)
             for i in range(1, n_layers + 1)]
    segs.append(SegmentRecord(n_layers + 1, "head", 5e-3, 10e-3, False, 0))
    tens = [TensorRecord(0, 0, 1000, False)]
    for s in range(1, n_layers + 2):
        for _ in range(5):
            tens.append(TensorRecord(len(tens), s, 100 * MB, True))
    return Profile(tuple(segs), tuple(tens), bw_d2h=bw, bw_h2d=bw)


def test_budget_above_keep_all_keeps_everything():
    p = llama_like()
    keep = plan_uniform(p, K)
    result = plan(p, keep.predicted_peak_bytes + 1, None)
    assert all(sp.action is K for sp in result.segments)
    assert result.offload_ids == frozenset()
    assert result.predicted_step_s == keep.predicted_step_s
    assert result.predicted_peak_bytes == keep.predicted_peak_bytes


def test_predictions_match_the_simulator():
    p = llama_like()
    budget = plan_uniform(p, K).predicted_peak_bytes // 2
    result = plan(p, budget, None)
    tl = simulate(p, result)
    assert result.predicted_step_s == tl.step_s
    assert result.predicted_peak_bytes == tl.peak_device_bytes <= budget
    assert result.predicted_host_bytes == tl.peak_host_bytes


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.3])
def test_meets_budgets_and_keeps_the_tail(fraction):
    p = llama_like()
    budget = int(plan_uniform(p, K).predicted_peak_bytes * fraction)
    host = p.total_saved_bytes // 3
    result = plan(p, budget, host)
    assert simulate(p, result).fits(budget, host)
    assert result.action(len(p.segments) - 1) is K  # head
    assert result.action(len(p.segments) - 2) is K  # last block (keep_last=1)
    assert result.predicted_step_s <= plan_uniform(p, R).predicted_step_s


def test_tail_rule_dropped_only_when_needed():
    # At 20% the head's backward (500 MB) plus a resident last block (500 MB) cannot fit.
    p = llama_like()
    budget = int(plan_uniform(p, K).predicted_peak_bytes * 0.2)
    result = plan(p, budget, None)
    assert simulate(p, result).fits(budget)
    assert any("rule 1 dropped" in n for n in result.notes)
    assert result.predicted_step_s == plan_exact(p, budget, None).predicted_step_s


def test_keep_last():
    # The last block is big and cheap to replay, the link slow: keep_last=0 recomputes it,
    # keep_last=1 keeps it and recomputes more of the others instead.
    p = llama_like(bw=1e9)
    segs = list(p.segments)
    segs[-2] = SegmentRecord(segs[-2].index, "layer6", 1e-3, 2e-3, True, 50 * MB)
    tens = list(p.tensors) + [TensorRecord(len(p.tensors), len(segs) - 2, 1000 * MB, True)]
    p = Profile(tuple(segs), tuple(tens), bw_d2h=p.bw_d2h, bw_h2d=p.bw_h2d)
    budget = plan_uniform(p, K).predicted_peak_bytes - 1400 * MB
    free, tail = plan(p, budget, None, keep_last=0), plan(p, budget, None, keep_last=1)
    assert free.action(6) is R
    assert tail.action(6) is K and tail.action(7) is K
    assert free.predicted_step_s < tail.predicted_step_s
    p = llama_like(bw=1e9)
    kept = plan(p, plan_uniform(p, K).predicted_peak_bytes * 8 // 10, None, keep_last=3)
    assert kept.notes == ()
    assert [kept.action(s) for s in (4, 5, 6, 7)] == [K, K, K, K]
    assert {kept.action(s) for s in (1, 2, 3)} != {K}


def test_per_tensor_offload_inside_a_segment():
    # Only 100 MB too much: the plan offloads single tensors, not whole segments.
    p = llama_like(bw=200e9)
    budget = plan_uniform(p, K).predicted_peak_bytes - 100 * MB
    result = plan(p, budget, None)
    assert result.predicted_peak_bytes <= budget
    assert result.predicted_step_s == plan_uniform(p, K).predicted_step_s
    offloaded = [sum(1 for t in p.tensors if t.segment == s and t.id in result.offload_ids)
                 for s in range(len(p.segments))]
    assert 0 < sum(offloaded) < 5


def test_infeasible_budget_returns_best_effort_with_a_note():
    p = llama_like()
    result = plan(p, 10 * MB, None)
    assert any("infeasible" in n for n in result.notes)
    assert result.predicted_peak_bytes > 10 * MB


@pytest.mark.parametrize("kwargs, message", [
    (dict(device_budget=-1, host_budget=None), "device_budget"),
    (dict(device_budget="12GiB", host_budget=None), "device_budget"),
    (dict(device_budget=10, host_budget=1.5), "host_budget"),
])
def test_bad_budgets_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(llama_like(), **kwargs)


def test_plan_exact_refuses_large_profiles():
    with pytest.raises(ValueError, match="at most 10"):
        plan_exact(llama_like(n_layers=10), 10**12, None)


def test_plan_uniform():
    p = llama_like()
    off = plan_uniform(p, O)
    assert off.offload_ids == frozenset(t.id for t in p.tensors if t.offloadable)
    rec = plan_uniform(p, R)
    assert [sp.action for sp in rec.segments] == [K] + [R] * 6 + [K]


def brute_force(case):
    """Best simulated step over every per-segment choice and every lookahead (inf if none fits),
    written independently of scheduler.exact."""
    sim = Simulator(case.profile)
    choices, moved = [], []
    for seg in case.profile.segments:
        own = frozenset(t.id for t in case.profile.tensors
                        if t.segment == seg.index and t.offloadable)
        options = [KEEP] + ([OFFLOAD] if own else [])
        if seg.recomputable:
            options += [RECOMPUTE] + ([RECOMPUTE_OFFLOAD_INPUTS] if seg.input_bytes else [])
        choices.append(options)
        moved.append(own)
    best = math.inf
    for codes in itertools.product(*choices):
        ids = frozenset().union(*(moved[s] for s, c in enumerate(codes) if c == OFFLOAD))
        for d in range(1, max(2, sim.n)):
            tl = sim.run(codes, ids, d)
            if tl.fits(case.device_budget, case.host_budget):
                best = min(best, tl.step_s)
    return best


def test_exact_search_matches_brute_force():
    rng = random.Random(7)
    for i in range(60):
        case = random_case(rng, BUDGET_LEVELS[i % len(BUDGET_LEVELS)], max_segments=6)
        exact = plan_exact(case.profile, case.device_budget, case.host_budget)
        best = brute_force(case)
        if math.isinf(best):
            assert not simulate(case.profile, exact).fits(case.device_budget, case.host_budget)
        else:
            assert exact.predicted_step_s == pytest.approx(best, rel=1e-12)


def test_greedy_against_exact_on_random_profiles():
    problems = cases(150, seed=0)
    outcomes = [compare(c) for c in problems]
    feasible = [o for o in outcomes if o.exact_fits]
    assert len(feasible) >= 90  # the budget levels leave most cases solvable
    for case, o in zip(problems, outcomes):
        # every greedy plan meets both budgets, or says it cannot and the optimum cannot either
        if not o.greedy_fits:
            assert not o.exact_fits
            assert any("infeasible" in n for n in o.greedy.notes)
        # never slower than full recompute where that fits (planner rule 5)
        rec = plan_uniform(case.profile, R)
        if o.greedy_fits and simulate(case.profile, rec).fits(case.device_budget, case.host_budget):
            assert o.greedy.predicted_step_s <= rec.predicted_step_s * (1 + 1e-9)
    within = sum(1 for o in feasible if o.greedy_fits and o.ratio <= 1.02)
    assert within >= 0.95 * len(feasible)
