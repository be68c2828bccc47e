"""scheduler.pipeline: schedule orders, live micro-batches, the pipeline simulation and its plan.

Exact numbers on small synthetic profiles: each layer (one recomputable segment) forwards in
1 s, backwards in 2 s and saves one offloadable tensor of 100 bytes (its input: 10 bytes); the
link moves 100 bytes/s each way with no latency, so a micro-batch's copy of one layer takes 1 s.
"""
from __future__ import annotations

import io
import itertools

import pytest

from scheduler import Profile, SegmentRecord, TensorRecord, get_hardware, simulate
from scheduler.pipeline import (Schedule, live_microbatches, orders, plan_pipeline, simulate_pipeline,
                                split_stages, stage_order, uniform_costs, uniform_pipeline)
from scheduler.synth import transformer_profile
from scheduler.whatif import main as whatif

GPIPE, ONE_F_ONE_B = Schedule.GPIPE, Schedule.ONE_F_ONE_B


def chain(layers: int, *, nbytes: int = 100, bw: float = 100.0, embed: bool = False,
          head: bool = False) -> Profile:
    """`layers` layers (F 1 s, B 2 s, one 100-byte tensor, 10 input bytes), optionally between an
    embedding and a head (gaps: F 0.5 s, B 1 s, one 40-byte tensor each)."""
    segments, tensors = [], []

    def add(name, fwd, recomputable, size, inputs):
        i = len(segments)
        segments.append(SegmentRecord(i, name, fwd, 2 * fwd, recomputable, inputs))
        tensors.append(TensorRecord(len(tensors), i, size, True))

    if embed:
        add("embed", 0.5, False, 40, 0)
    for k in range(layers):
        add(f"layers.{k}", 1.0, True, nbytes, 10)
    if head:
        add("head", 0.5, False, 40, 0)
    return Profile(tuple(segments), tuple(tensors), bw_d2h=bw, bw_h2d=bw, transfer_latency_s=0.0)


def text(order) -> str:
    return " ".join(str(op) for op in order)


def costs(stages, label: str, m: int):
    return [[uniform_costs(p)[label]] * m for p in stages]


# -- the schedules ---------------------------------------------------------------------------------

def test_1f1b_order_per_stage_warm_up_steady_cool_down():
    """PyTorch's Schedule1F1B: stage i warms up with min(N - i, M) forwards, then alternates
    one backward and one forward, then runs the backwards left."""
    assert [text(o) for o in orders(ONE_F_ONE_B, 4, 6)] == [
        "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5",
        "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5",
        "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5",
        "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5",
    ]


def test_1f1b_with_fewer_micro_batches_than_stages_is_all_forwards_then_all_backwards_early():
    assert [text(o) for o in orders(ONE_F_ONE_B, 4, 2)] == [
        "F0 F1 B0 B1", "F0 F1 B0 B1", "F0 F1 B0 B1", "F0 B0 F1 B1"]


def test_gpipe_order_is_every_forward_then_every_backward_in_micro_batch_order():
    assert {text(o) for o in orders(GPIPE, 3, 4)} == {"F0 F1 F2 F3 B0 B1 B2 B3"}


@pytest.mark.parametrize("stages,micro", list(itertools.product(range(1, 6), range(1, 8))))
def test_live_micro_batches_per_stage(stages, micro):
    for i in range(stages):
        for schedule, live in ((ONE_F_ONE_B, min(stages - i, micro)), (GPIPE, micro)):
            order = stage_order(schedule, stages, micro, i)
            assert live_microbatches(order) == live
            # every micro-batch once each way, its backward after its forward
            assert sorted((op.microbatch, op.forward) for op in order) == \
                sorted((j, f) for j in range(micro) for f in (True, False))
            assert all(order.index(next(o for o in order if o.microbatch == j and not o.forward))
                       > order.index(next(o for o in order if o.microbatch == j and o.forward))
                       for j in range(micro))


@pytest.mark.parametrize("call", [lambda: stage_order(ONE_F_ONE_B, 0, 4, 0), lambda: stage_order(GPIPE, 2, 0, 0),
                                  lambda: stage_order(GPIPE, 2, 2, 2), lambda: split_stages(chain(2), 3),
                                  lambda: plan_pipeline(split_stages(chain(2), 2), GPIPE, 2, -1),
                                  lambda: plan_pipeline(split_stages(chain(2), 2), GPIPE, 2, 100, 1.5)])
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


# -- cutting a profile into stages -----------------------------------------------------------------

def test_split_stages_deals_layers_evenly_and_keeps_embed_and_head_with_their_neighbours():
    profile = chain(7, embed=True, head=True)
    stages = split_stages(profile, 3)
    assert [[s.name for s in p.segments] for p in stages] == [
        ["embed", "layers.0", "layers.1", "layers.2"], ["layers.3", "layers.4"],
        ["layers.5", "layers.6", "head"]]
    assert [[s.index for s in p.segments] for p in stages] == [[0, 1, 2, 3], [0, 1], [0, 1, 2]]
    assert [t.id for p in stages for t in p.tensors] == [t.id for t in profile.tensors]
    assert sum(p.total_saved_bytes for p in stages) == profile.total_saved_bytes
    assert all(p.bw_d2h == profile.bw_d2h for p in stages)


def test_split_stages_cuts_a_tensor_saved_again_in_a_later_stage_at_its_stage_end():
    p = chain(4)
    p = Profile(p.segments, (TensorRecord(0, 0, 100, True, last_segment=3),) + p.tensors[1:],
                bw_d2h=100.0, bw_h2d=100.0)
    first, second = split_stages(p, 2)
    assert first.tensors[0].last == 1 and second.tensors[0].last == 0


# -- the simulation --------------------------------------------------------------------------------

def test_keep_all_timeline_of_two_stages_under_1f1b():
    """s0: F0 [0,1] F1 [1,2] B0 [4,6] B1 [7,9]; s1: F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7]."""
    stages = split_stages(chain(2), 2)
    tl = simulate_pipeline(stages, costs(stages, "K", 2), ONE_F_ONE_B)
    assert tl.step_s == 9.0
    assert [s.peak_device_bytes for s in tl.stages] == [200, 100]  # live: 2 and 1 micro-batches
    assert [s.lifetimes for s in tl.stages] == [(6.0, 8.0), (3.0, 3.0)]  # the oldest lives longest
    assert [s.busy_s for s in tl.stages] == [6.0, 6.0]
    assert all(s.stall_s == s.peak_host_bytes == 0 for s in tl.stages)


def test_keep_all_timeline_of_two_stages_under_gpipe():
    """s1: F0 [1,2] F1 [2,3] B0 [3,5] B1 [5,7]; s0 backwards [5,7] [7,9]: both hold both."""
    stages = split_stages(chain(2), 2)
    tl = simulate_pipeline(stages, costs(stages, "K", 2), GPIPE)
    assert tl.step_s == 9.0
    assert [s.peak_device_bytes for s in tl.stages] == [200, 200]
    assert [s.lifetimes for s in tl.stages] == [(7.0, 8.0), (4.0, 5.0)]


def test_recompute_holds_the_inputs_and_one_replayed_layer():
    """Each backward replays its layer (1 s) first: s1 B0 [2,5] F1 [5,6] B1 [6,9]; s0 B0 [5,8]
    B1 [9,12]. Stage 0 holds both inputs (10 + 10) and the layer being replayed (100)."""
    stages = split_stages(chain(2), 2)
    tl = simulate_pipeline(stages, costs(stages, "R", 2), ONE_F_ONE_B)
    assert tl.step_s == 12.0
    assert [s.peak_device_bytes for s in tl.stages] == [120, 110]
    assert [s.replay_s for s in tl.stages] == [2.0, 2.0]


def test_offload_on_the_last_1f1b_stage_is_exposed():
    """One stage, F0 B0 F1 B1: F0 [0,1], D2H [1,2], reload [2,3] (not before its D2H ended),
    B0 [3,5] after a 2 s stall; F1 [5,6], D2H [6,7], reload [7,8], B1 [8,10]."""
    stages = split_stages(chain(1), 1)
    tl = simulate_pipeline(stages, costs(stages, "O", 2), ONE_F_ONE_B)
    s = tl.stages[0]
    assert (tl.step_s, s.stall_s, s.peak_device_bytes, s.peak_host_bytes) == (10.0, 4.0, 100, 100)
    keep = simulate_pipeline(stages, costs(stages, "K", 2), ONE_F_ONE_B)
    assert keep.step_s == 6.0 and keep.stages[0].peak_device_bytes == 100


def test_offload_on_the_first_stage_hides_behind_the_round_trip_and_frees_the_peak():
    """Four stages, one micro-batch in flight per stage at a time on the first: stage 0's copy
    goes out while the later stages compute and comes back just in time (reload issued as late
    as it still arrives): no stall, the step of keep-all, and between forward and backward stage
    0 holds nothing of it."""
    stages = split_stages(chain(4), 4)
    both = [[uniform_costs(p)["O" if i == 0 else "K"]] * 4 for i, p in enumerate(stages)]
    keep = simulate_pipeline(stages, costs(stages, "K", 4), ONE_F_ONE_B)
    tl = simulate_pipeline(stages, both, ONE_F_ONE_B)
    assert tl.step_s == keep.step_s and tl.stages[0].stall_s == 0.0
    assert keep.stages[0].peak_device_bytes == 400
    assert tl.stages[0].peak_device_bytes == 200
    assert tl.stages[0].peak_host_bytes == 400


def test_one_stage_one_micro_batch_is_the_single_step_simulation():
    """With nothing to pipeline, keep and full recompute give `scheduler.simulate`'s step."""
    profile = chain(3, embed=True, head=True)
    (stage,) = split_stages(profile, 1)
    for label in ("K", "R"):
        option = uniform_costs(stage)[label]
        tl = simulate_pipeline([stage], [[option]], GPIPE)
        assert tl.step_s == pytest.approx(simulate(stage, option.plan).step_s, rel=1e-12)


# -- the plan --------------------------------------------------------------------------------------

def test_plan_keeps_everything_when_it_fits():
    stages = split_stages(chain(4), 4)
    p = plan_pipeline(stages, ONE_F_ONE_B, 4, 400)
    assert p.fits and p.mix() == "KKKK/KKKK/KKKK/KKKK" and p.timeline.moved_bytes == 0


def test_plan_offloads_where_the_link_hides_it_before_recomputing():
    """Budget 300: only stage 0 (F0-F3 at [0,4], B0-B3 at [10,12] [13,15] [16,18] [19,21]) is
    over, holding 4 x 100 bytes over [3, 12). Micro-batch 1's copy is out at 3 s and comes back
    at 12 s, when B0 has freed micro-batch 0: peak 300, no stall. Micro-batch 0's would come back
    at 9 s, among all three others (400); those of 2 and 3 end after the peak began. So the plan
    offloads micro-batch 1 and recomputes nothing; the step stays that of keep-all."""
    stages = split_stages(chain(4), 4)
    keep = uniform_pipeline(stages, ONE_F_ONE_B, 4, "K")
    assert keep.timeline.stages[0].lifetimes == (12.0, 14.0, 16.0, 18.0)
    p = plan_pipeline(stages, ONE_F_ONE_B, 4, 300)
    assert p.fits and p.mix() == "KOKK/KKKK/KKKK/KKKK"
    assert p.timeline.step_s == keep.timeline.step_s == 21.0
    assert [s.peak_device_bytes for s in p.timeline.stages] == [300, 300, 200, 100]
    assert p.timeline.stages[0].stall_s == 0.0 and p.timeline.stages[0].peak_host_bytes == 100


def test_plan_recomputes_where_the_link_cannot_hide_the_bytes():
    """A link ten times slower (10 bytes/s: 10 s per copy): offloads would stall, recompute
    costs 1 s per micro-batch, so the plan recomputes and is never slower than full recompute."""
    stages = split_stages(chain(4, bw=10.0), 4)
    p = plan_pipeline(stages, ONE_F_ONE_B, 4, 300)
    full = uniform_pipeline(stages, ONE_F_ONE_B, 4, "R")
    assert p.fits and "O" not in p.mix() and "R" in p.mix()
    assert p.timeline.step_s <= full.timeline.step_s
    assert all(s.stall_s == 0 for s in p.timeline.stages)


def test_plan_drops_the_micro_batch_whose_backward_comes_last():
    """GPipe, 2 stages, budget 199 (keep-all: 200 on both). No copy can leave before both
    micro-batches are live, so something is recomputed: recomputing micro-batch 0 would replay
    its layer (100) while micro-batch 1 is still whole (210); recomputing micro-batch 1 holds
    at most 110."""
    stages = split_stages(chain(2), 2)
    p = plan_pipeline(stages, GPIPE, 2, 199)
    assert p.fits and p.mix() == "KR/KR"
    assert [s.peak_device_bytes for s in p.timeline.stages] == [110, 110]


@pytest.mark.parametrize("schedule", [GPIPE, ONE_F_ONE_B])
@pytest.mark.parametrize("n,m", [(1, 3), (2, 2), (2, 4), (3, 5)])
def test_plan_is_never_over_budget_when_the_least_memory_plan_fits(schedule, n, m):
    stages = split_stages(chain(2 * n, embed=True, head=True), n)
    least = uniform_pipeline(stages, schedule, m, "Ri")
    full = uniform_pipeline(stages, schedule, m, "R")
    floor = max(s.peak_device_bytes for s in least.timeline.stages)
    top = max(s.peak_device_bytes for s in uniform_pipeline(stages, schedule, m, "K").timeline.stages)
    for budget in sorted({floor, (floor + top) // 2, top - 1, top}):
        p = plan_pipeline(stages, schedule, m, budget)
        assert p.fits and all(s.peak_device_bytes <= budget for s in p.timeline.stages), (budget, p.mix())
        if all(s.peak_device_bytes <= budget for s in full.timeline.stages):
            assert p.timeline.step_s <= full.timeline.step_s + 1e-9
    p = plan_pipeline(stages, schedule, m, floor - 1)
    assert not p.fits and any("infeasible" in n for n in p.notes)


def test_plan_respects_the_host_budget():
    stages = split_stages(chain(4), 4)
    p = plan_pipeline(stages, ONE_F_ONE_B, 4, 300, host_budget=0)
    assert p.fits and all(s.peak_host_bytes == 0 for s in p.timeline.stages)
    assert "O" not in p.mix() and "r" not in p.mix()


# -- what-if -----------------------------------------------------------------------------------------

def test_whatif_prints_per_stage_peaks_for_every_contender():
    out = io.StringIO()
    assert whatif(["--model", "llama3-8b", "--seq", "1024", "--hardware", "h100-pcie", "--pp", "4",
                   "--microbatches", "4", "--schedule", "gpipe", "--budgets", "100,50"], out=out) == 0
    lines = out.getvalue().splitlines()
    assert "pipeline: 4 stages x 4 micro-batches, gpipe" in lines[1]
    assert sum("holds up to 4 micro-batches" in line for line in lines) == 4
    header = next(line for line in lines if line.startswith("budget"))
    assert all(f"s{i} GiB" in header for i in range(4))
    start = lines.index(header) + 1
    rows = lines[start:start + 8]
    assert [r.split()[2 if i % 4 == 0 else 0] for i, r in enumerate(rows)] == \
        ["keep-all", "full", "offload-all", "plan"] * 2
    assert all(len(row.split()[-1].split("/")) == 4 for row in rows)
    assert lines[start + 8:start + 9] in ([], [""])


def test_whatif_pipeline_keep_all_matches_the_model():
    """The keep-all peak of stage 0 under 1F1B is N micro-batches of its saved bytes."""
    hw = get_hardware("h100-pcie")
    stages = split_stages(transformer_profile("llama3-8b", hw, seq=1024), 4)
    keep = uniform_pipeline(stages, ONE_F_ONE_B, 8, "K")
    assert [s.live for s in keep.timeline.stages] == [4, 3, 2, 1]
    assert [s.peak_device_bytes for s in keep.timeline.stages] == \
        [k * p.total_saved_bytes for k, p in zip((4, 3, 2, 1), stages)]
