"""Prefetch: reverse pack order, d segments ahead, and the lookahead formula."""
import pytest

from scheduler import Action, Plan, Profile, SegmentPlan, SegmentRecord, TensorRecord
from scheduler import issue_order, lookahead, simulate

K, O = Action.KEEP, Action.OFFLOAD


def profile(n, nbytes=100, bwd=2.0, tensors_per_segment=1, bw=100.0):
    segs = tuple(SegmentRecord(i, f"s{i}", 1.0, bwd, True, 10) for i in range(n))
    tens = tuple(TensorRecord(i * tensors_per_segment + k, i, nbytes, True)
                 for i in range(n) for k in range(tensors_per_segment))
    return Profile(segs, tens, bw_d2h=bw, bw_h2d=bw, transfer_latency_s=0.0)


def offload_all(p, d=1, keep=()):
    acts = tuple(SegmentPlan(K if i in keep else O) for i in range(len(p.segments)))
    ids = frozenset(t.id for t in p.tensors if t.segment not in keep)
    return Plan(acts, offload_ids=ids, lookahead=d)


@pytest.mark.parametrize("d, expected", [
    (1, ((), (0,), (1,), (2,), (3,), (5, 4))),
    (2, ((), (), (0,), (1,), (2,), (5, 4, 3))),
    (9, ((), (), (), (), (), (5, 4, 3, 2, 1, 0))),
])
def test_issue_order_is_reverse_pack_order_d_ahead(d, expected):
    p = profile(6)
    assert issue_order(p, offload_all(p, d)) == expected


def test_issue_order_skips_kept_segments():
    p = profile(6)
    order = issue_order(p, offload_all(p, 1, keep={1, 4}))
    assert order == ((), (0,), (), (2,), (3,), (5,))


def test_simulated_reloads_follow_issue_order():
    p = profile(5, tensors_per_segment=2)
    tl = simulate(p, offload_all(p, 2))
    # segments 4, 3, 2 at backward start, then 1 and 0; inside a segment, reverse id order
    assert [i.label for i in tl.stream("h2d")] == [
        "t9", "t8", "t7", "t6", "t5", "t4", "t3", "t2", "t1", "t0"]


@pytest.mark.parametrize("nbytes, bwd, expected", [
    (100, 2.0, 2),  # reload 1 s <= backward 2 s of the segment before: ceil(0.5) + 1
    (300, 2.0, 3),  # 3 s / 2 s -> ceil(1.5) + 1
    (400, 2.0, 3),  # 4 s / 2 s -> ceil(2) + 1
    (900, 2.0, 5),  # 9 s / 2 s -> ceil(4.5) + 1 = 6, capped at n - 1 = 5
])
def test_lookahead_formula(nbytes, bwd, expected):
    p = profile(6, nbytes=nbytes, bwd=bwd)
    assert lookahead(p, offload_all(p, 1, keep={5})) == expected


def test_lookahead_is_one_without_reloads_or_for_the_last_segment():
    p = profile(4, nbytes=10_000)
    assert lookahead(p, Plan(tuple(SegmentPlan(K) for _ in range(4)))) == 1
    last_only = Plan(tuple(SegmentPlan(O if i == 3 else K) for i in range(4)),
                     offload_ids=frozenset({3}))
    assert lookahead(p, last_only) == 1  # nothing runs before it in backward


def test_lookahead_counts_the_replay_of_the_segment_before():
    p = profile(4, nbytes=300)  # reload 3 s; backward of segment 1 is 2 s, plus 1 s replay
    acts = (SegmentPlan(O), SegmentPlan(Action.RECOMPUTE), SegmentPlan(K), SegmentPlan(K))
    assert lookahead(p, Plan(acts, offload_ids=frozenset({0}))) == 2  # ceil(3 / 3) + 1


def test_lookahead_capped_by_device_headroom():
    p = profile(6, nbytes=300)
    plan = offload_all(p, 1, keep={5})
    assert lookahead(p, plan) == 3
    peaks = {d: simulate(p, Plan(plan.segments, plan.offload_ids, lookahead=d)).peak_device_bytes
             for d in (1, 2, 3)}
    assert peaks[1] < peaks[2] < peaks[3]
    assert lookahead(p, plan, device_budget=peaks[3]) == 3
    assert lookahead(p, plan, device_budget=peaks[2]) == 2
    assert lookahead(p, plan, device_budget=peaks[1] - 1) == 1  # never below 1


def test_issue_order_follows_each_tensors_need():
    # Segment 0's second tensor is saved again by segment 3: with lookahead 1 it is issued
    # when backward reaches segment 4 (the start of backward), the first one at segment 1.
    segs = tuple(SegmentRecord(i, f"s{i}", 1.0, 2.0, True, 10) for i in range(5))
    tens = (TensorRecord(0, 0, 100, True), TensorRecord(1, 0, 100, True, last_segment=3))
    p = Profile(segs, tens, bw_d2h=100.0, bw_h2d=100.0, transfer_latency_s=0.0)
    plan = Plan((SegmentPlan(O),) + (SegmentPlan(K),) * 4, offload_ids=frozenset({0, 1}))
    assert issue_order(p, plan) == ((), (0,), (), (), (0,))
    tl = simulate(p, plan)
    assert [(i.label, i.start) for i in tl.stream("h2d")] == [("t1", 5.0), ("t0", 11.0)]
