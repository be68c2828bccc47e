"""The simulator against timelines worked out by hand (scheduler/simulate.py, rules 1-7).

Units are chosen so the arithmetic is exact: bandwidth 100 bytes/s, no copy latency, so a copy
of 100 bytes takes 1 s each way.
"""
import pytest

from scheduler import Action, Plan, Profile, SegmentPlan, SegmentRecord, TensorRecord, simulate
from scheduler.hardware import Hardware

K, O, R = Action.KEEP, Action.OFFLOAD, Action.RECOMPUTE


def make_profile(fwd, bwd, nbytes, inputs=None, bw=100.0):
    inputs = inputs or [0] * len(fwd)
    segs = tuple(SegmentRecord(i, f"s{i}", f, b, inputs[i] > 0, inputs[i])
                 for i, (f, b) in enumerate(zip(fwd, bwd)))
    tens = tuple(TensorRecord(i, i, n, True) for i, n in enumerate(nbytes))
    return Profile(segs, tens, bw_d2h=bw, bw_h2d=bw, transfer_latency_s=0.0)


def make_plan(actions, ids=(), lookahead=1, offload_inputs=()):
    return Plan(tuple(SegmentPlan(a, offload_inputs=i in offload_inputs)
                      for i, a in enumerate(actions)), offload_ids=frozenset(ids),
                lookahead=lookahead)


# F = 1, 2, 1 s; B = 2, 4, 2 s; one tensor per segment of 100, 200, 300 bytes.
BASE = make_profile([1, 2, 1], [2, 4, 2], [100, 200, 300])


def spans(tl, stream):
    return [(i.label, i.start, i.end) for i in tl.stream(stream)]


def test_pure_compute():
    tl = simulate(BASE, make_plan([K, K, K]))
    assert (tl.step_s, tl.forward_s, tl.backward_s) == (12.0, 4.0, 8.0)
    assert (tl.exposed_s, tl.recompute_s, tl.d2h_busy_s, tl.h2d_busy_s) == (0, 0, 0, 0)
    assert tl.peak_device_bytes == 600 and tl.peak_host_bytes == 0 and tl.peak_time_s == 4
    # one tensor per segment, saved (allocated) when its forward ends; freed when its backward does
    assert tl.memory == ((1, 100), (3, 300), (4, 600), (6, 300), (10, 100), (12, 0))
    assert spans(tl, "compute") == [("fwd 0", 0, 1), ("fwd 1", 1, 3), ("fwd 2", 3, 4),
                                    ("bwd 2", 4, 6), ("bwd 1", 6, 10), ("bwd 0", 10, 12)]
    assert tl.stream("d2h") == () and tl.stream("h2d") == ()


def test_offload_that_hides():
    # t0 (100 B) goes out at 1-2 s, freed at 2; its reload is issued when backward reaches
    # segment 1 (lookahead 1) at 6 s and lands at 7 s, long before segment 0 needs it at 10 s.
    tl = simulate(BASE, make_plan([O, K, K], ids=[0]))
    assert tl.step_s == 12.0 and tl.exposed_s == 0.0
    assert spans(tl, "d2h") == [("t0", 1, 2)]
    assert spans(tl, "h2d") == [("t0", 6, 7)]
    assert tl.memory == ((1, 100), (2, 0), (3, 200), (4, 500), (6, 200), (6, 300),
                         (10, 100), (12, 0))
    assert tl.peak_device_bytes == 500  # 100 bytes less than keeping everything
    assert tl.peak_host_bytes == 100
    assert (tl.d2h_busy_s, tl.h2d_busy_s) == (1.0, 1.0)


def test_offload_that_is_exposed():
    # F = 1, 1, 5; B = 1, 1, 1; t1 is 400 B, saved at 2 s: D2H 2-6 s. Backward starts at 7 s
    # and issues t1's reload at once (segment 1 + lookahead 1 = 2, the first backward
    # segment): H2D 7-11 s. Segment 1's backward is reached at 8 s and waits until 11 s.
    p = make_profile([1, 1, 5], [1, 1, 1], [100, 400, 100])
    tl = simulate(p, make_plan([K, O, K], ids=[1]))
    assert spans(tl, "d2h") == [("t1", 2, 6)]
    assert spans(tl, "h2d") == [("t1", 7, 11)]
    assert tl.exposed_s == 3.0
    assert (tl.forward_s, tl.step_s) == (7.0, 13.0)  # keep-all would take 10 s
    assert ("stall 1", 8, 11) in spans(tl, "compute")
    assert tl.memory == ((1, 100), (2, 500), (6, 100), (7, 200), (7, 600), (8, 500),
                         (12, 100), (13, 0))
    assert tl.peak_device_bytes == 600


def test_inflight_copy_still_counts():
    # Same as above, but segment 2's forward is short: t1's D2H (2-6 s) is still in flight
    # when backward issues its reload at 3 s, so both copies count: 100+400+100+400 bytes.
    p = make_profile([1, 1, 1], [1, 1, 1], [100, 400, 100])
    tl = simulate(p, make_plan([K, O, K], ids=[1]))
    assert spans(tl, "h2d") == [("t1", 6, 10)]  # H2D waits for its D2H
    assert tl.peak_device_bytes == 1000
    assert tl.exposed_s == 6.0 and tl.step_s == 12.0


def test_one_recompute():
    # Segment 1 (200 B, inputs 50 B) is recomputed: forward holds only its 50 input bytes from
    # its start; in backward its forward (2 s) is replayed at 6-8 s, re-allocating its 200 B.
    p = make_profile([1, 2, 1], [2, 4, 2], [100, 200, 300], inputs=[0, 50, 0])
    tl = simulate(p, make_plan([K, R, K]))
    assert (tl.step_s, tl.recompute_s, tl.exposed_s) == (14.0, 2.0, 0.0)
    assert tl.peak_device_bytes == 450
    assert tl.memory == ((1, 100), (1, 150), (4, 450), (6, 150), (6, 350), (12, 100), (14, 0))
    assert ("recompute 1", 6, 8) in spans(tl, "compute")


def test_recompute_with_offloaded_inputs():
    # The inputs (50 B) are saved when segment 1 starts (1 s): D2H 1-1.5 s, freed when its
    # forward ends (3 s); reloaded when backward starts (segment 1 + lookahead 1 = 2): 4-4.5 s.
    p = make_profile([1, 2, 1], [2, 4, 2], [100, 200, 300], inputs=[0, 50, 0])
    tl = simulate(p, make_plan([K, R, K], offload_inputs={1}))
    assert spans(tl, "d2h") == [("in 1", 1, 1.5)]
    assert spans(tl, "h2d") == [("in 1", 4, 4.5)]
    assert tl.step_s == 14.0 and tl.peak_host_bytes == 50
    assert tl.memory == ((1, 100), (1, 150), (3, 100), (4, 400), (4, 450), (6, 150), (6, 350),
                         (12, 100), (14, 0))


def test_d2h_starts_at_each_tensors_save():
    # One 2 s segment saves two 100 B tensors, at 1 s and 2 s (spread evenly): the first one's
    # copy starts at its save (1-2 s), not when the segment ends; a measured save offset
    # (0.25 s) moves it earlier still. Its device bytes go when both the copy and the
    # segment's forward are done (2 s).
    segs = (SegmentRecord(0, "s0", 2.0, 2.0, False), SegmentRecord(1, "s1", 1.0, 1.0, False))
    tens = (TensorRecord(0, 0, 100, True), TensorRecord(1, 0, 100, True),
            TensorRecord(2, 1, 100, True))
    p = Profile(segs, tens, bw_d2h=100.0, bw_h2d=100.0, transfer_latency_s=0.0)
    tl = simulate(p, make_plan([O, K], ids=[0]))
    assert spans(tl, "d2h") == [("t0", 1, 2)]
    assert tl.memory[:4] == ((1, 100), (2, 0), (2, 100), (3, 200))
    measured = Profile(segs, (TensorRecord(0, 0, 100, True, save_offset_s=0.25),) + tens[1:],
                       bw_d2h=100.0, bw_h2d=100.0, transfer_latency_s=0.0)
    assert spans(simulate(measured, make_plan([O, K], ids=[0])), "d2h") == [("t0", 0.25, 1.25)]
    both = simulate(p, make_plan([O, K], ids=[0, 1]))
    assert spans(both, "d2h") == [("t0", 1, 2), ("t1", 2, 3)]


def test_reloads_are_issued_per_tensor_at_their_own_need():
    # Segment 0 saves a (id 0, 100 B) and b (id 1, 100 B), which segment 2 saves again; both go
    # to the host. With lookahead 1, b (needed by segment 2) is issued when backward reaches
    # segment 3, at 4 s; a (needed by segment 0 only) when it reaches segment 1, at 6 s. Issuing
    # the segment's reloads together at the earliest need would hold a 2 s longer: peak 500.
    segs = tuple(SegmentRecord(i, f"s{i}", 1.0, 1.0, False) for i in range(4))
    tens = (TensorRecord(0, 0, 100, True), TensorRecord(1, 0, 100, True, last_segment=2),
            TensorRecord(2, 1, 100, True), TensorRecord(3, 2, 100, True),
            TensorRecord(4, 3, 100, True))
    p = Profile(segs, tens, bw_d2h=100.0, bw_h2d=100.0, transfer_latency_s=0.0)
    tl = simulate(p, make_plan([O, K, K, K], ids=[0, 1]))
    assert spans(tl, "d2h") == [("t0", 0.5, 1.5), ("t1", 1.5, 2.5)]
    assert spans(tl, "h2d") == [("t1", 4, 5), ("t0", 6, 7)]
    assert tl.peak_device_bytes == 400 and tl.exposed_s == 0 and tl.step_s == 8


def test_backward_working_set_counts_while_its_backward_runs():
    # BASE with a 50 B working set on segment 2, the first backward: 600 + 50 at 4-6 s.
    segs = BASE.segments[:2] + (SegmentRecord(2, "s2", 1, 2, False, 0, 50),)
    tl = simulate(Profile(segs, BASE.tensors, bw_d2h=100.0, bw_h2d=100.0,
                          transfer_latency_s=0.0), make_plan([K, K, K]))
    assert tl.peak_device_bytes == 650 and tl.peak_time_s == 4
    assert tl.memory[:5] == ((1, 100), (3, 300), (4, 600), (4, 650), (6, 300))
    # A recomputed segment's working set comes after its replay: 150 + 200 re-materialised at
    # 6 s, + 500 at 8 s when its backward starts, all freed at 12 s.
    p = make_profile([1, 2, 1], [2, 4, 2], [100, 200, 300], inputs=[0, 50, 0])
    segs = (p.segments[0], SegmentRecord(1, "s1", 2, 4, True, 50, 500), p.segments[2])
    tl = simulate(Profile(segs, p.tensors, bw_d2h=100.0, bw_h2d=100.0, transfer_latency_s=0.0),
                  make_plan([K, R, K]))
    assert tl.memory[3:8] == ((6, 150), (6, 350), (8, 850), (12, 100), (14, 0))
    assert tl.peak_device_bytes == 850


def test_hardware_replaces_the_measured_link():
    fast = Hardware("fast", bw_d2h=1000.0, bw_h2d=1000.0, transfer_latency_s=0.0)
    p = make_profile([1, 1, 5], [1, 1, 1], [100, 400, 100])
    tl = simulate(p, make_plan([K, O, K], ids=[1]), fast)
    assert spans(tl, "d2h") == [("t1", 2, pytest.approx(2.4))]
    assert tl.exposed_s == 0.0


@pytest.mark.parametrize("plan, message", [
    (make_plan([K, K]), "2 segments"),
    (make_plan([K, R, K]), "not recomputable"),
    (make_plan([K, K, K], ids=[1]), "not OFFLOAD"),
    (make_plan([K, K, K], ids=[9]), "no tensor with id 9"),
    (make_plan([K, K, K], lookahead=0), "lookahead"),
])
def test_bad_plans_are_refused(plan, message):
    with pytest.raises(ValueError, match=message):
        simulate(BASE, plan)
