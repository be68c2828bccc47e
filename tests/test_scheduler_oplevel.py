"""Op-level planning: store sets, their simulated costs, and the planner's choice of them."""
import dataclasses

import pytest

from scheduler import Action, OpRecord, Plan, SegmentPlan
from scheduler import plan, plan_uniform, simulate
from scheduler.oplevel import apply, store_set

from .test_scheduler_planner import llama_like

MB = 10**6


def block_ops():
    """A transformer-ish block of F = 10 ms saving 500 MB: two matmuls (dear per byte), a norm
    and an activation (cheap per byte)."""
    return (OpRecord(0, "aten.native_layer_norm.default", 100 * MB, 0.5e-3, 100 * MB),
            OpRecord(1, "aten.mm.default", 100 * MB, 4.0e-3, 100 * MB),
            OpRecord(2, "aten.gelu.default", 200 * MB, 1.0e-3, 200 * MB),
            OpRecord(3, "aten.mm.default", 100 * MB, 4.5e-3, 0))


def profile(n_layers=6, bw=1e9):
    """embed, n_layers equal blocks with their ops, head; a slow link (offload does not pay)."""
    return llama_like(n_layers, bw, ops=block_ops())


def test_store_set_takes_the_dearest_ops_per_byte_within_the_cap():
    seg = profile().segments[1]
    assert store_set(seg, 0) == ()
    assert store_set(seg, 100 * MB) == (3,)  # 45 ps/B beats 40 ps/B
    assert store_set(seg, 250 * MB) == (1, 3)  # the gelu (200 MB) does not fit; the norm would
    assert store_set(seg, 300 * MB) == (0, 1, 3)
    assert store_set(seg, 10**12) == (0, 1, 2, 3)


def test_apply_costs_a_selective_replay():
    p = profile()
    q = apply(p, {1: (1, 3)})
    seg, old = q.segments[1], p.segments[1]
    assert seg.held_bytes == 200 * MB and seg.input_bytes == old.input_bytes  # held to backward
    assert seg.replay_s == pytest.approx(old.forward_s - 8.5e-3)
    assert seg.replay_bytes == 500 * MB - 100 * MB  # op 1's output comes back as the stored one
    assert q.segments[2] == p.segments[2]
    with pytest.raises(ValueError, match="no op at positions"):
        apply(p, {1: (9,)})
    with pytest.raises(ValueError, match="not a recomputable"):
        apply(p, {0: (0,)})


def test_apply_charges_a_selective_segments_dispatch_overhead_per_op():
    p = dataclasses.replace(profile(), op_dispatch_s=20e-6)
    p = dataclasses.replace(p, segments=(p.segments[0], dataclasses.replace(p.segments[1], dispatched_ops=50))
                            + p.segments[2:])
    q = apply(p, {1: (1, 3), 2: (1,)})
    assert q.segments[1].forward_s == pytest.approx(10e-3 + 50 * 20e-6)  # SaveOps sees 50 ops
    assert q.segments[1].replay_s == pytest.approx(10e-3 - 8.5e-3 + 50 * 20e-6)  # so does the replay
    assert q.segments[2].forward_s == pytest.approx(10e-3 + 4 * 20e-6)  # not counted: its 4 ops
    assert q.segments[3] == p.segments[3]  # not selective: runs plain


def test_simulated_selective_segment_replays_less_and_holds_its_stored_bytes():
    p = profile(n_layers=2)
    full = Plan(tuple(SegmentPlan(Action.RECOMPUTE if s.recomputable else Action.KEEP)
                      for s in p.segments))
    sel = dataclasses.replace(full, segments=tuple(
        SegmentPlan(Action.RECOMPUTE, store_ops=(1, 3)) if s.recomputable else SegmentPlan(Action.KEEP)
        for s in p.segments))
    a, b = simulate(p, full), simulate(p, sel)
    assert a.recompute_s == pytest.approx(2 * 10e-3)
    assert b.recompute_s == pytest.approx(2 * 1.5e-3)
    assert b.step_s == pytest.approx(a.step_s - 2 * 8.5e-3)
    # At the end of forward: the two blocks' stored outputs on top of full recompute's bytes.
    assert b.peak_device_bytes == a.peak_device_bytes + 2 * 200 * MB
    with pytest.raises(ValueError, match="only RECOMPUTE stores"):
        simulate(p, dataclasses.replace(sel, segments=(SegmentPlan(Action.KEEP, store_ops=(1,)),)
                                        + sel.segments[1:]))


def test_planner_picks_selective_between_full_recompute_and_keep():
    p = profile()
    keep, rec = plan_uniform(p, Action.KEEP), plan_uniform(p, Action.RECOMPUTE)
    budget = (keep.predicted_peak_bytes + rec.predicted_peak_bytes) // 2
    blocks = plan(dataclasses.replace(p, segments=tuple(dataclasses.replace(s, ops=())
                                                        for s in p.segments)), budget, None)
    got = plan(p, budget, None)
    assert any(sp.selective for sp in got.segments)
    assert got.predicted_peak_bytes <= budget
    assert got.predicted_step_s < blocks.predicted_step_s  # faster than the best block plan
    tl = simulate(p, got)  # the public simulator costs the plan as the planner did
    assert (tl.step_s, tl.peak_device_bytes) == (got.predicted_step_s, got.predicted_peak_bytes)


def test_block_plans_stay_where_selective_does_not_pay():
    p = profile()
    keep = plan_uniform(p, Action.KEEP)
    assert not any(sp.selective for sp in plan(p, keep.predicted_peak_bytes, None).segments)
    rec = plan_uniform(p, Action.RECOMPUTE)  # at full recompute's floor nothing can be stored
    got = plan(p, rec.predicted_peak_bytes, None)
    assert not any(sp.selective for sp in got.segments)
    assert got.predicted_peak_bytes <= rec.predicted_peak_bytes


def test_refine_mixes_full_and_selective_recompute_where_only_some_blocks_can_store():
    p = profile()
    rec = plan_uniform(p, Action.RECOMPUTE)
    budget = rec.predicted_peak_bytes + 250 * MB  # room for one block's two matmul outputs
    got = plan(p, budget, None)
    kinds = ["S" if sp.selective else sp.action.name[0]
             for sp, s in zip(got.segments, p.segments) if s.recomputable]
    assert "S" in kinds and "R" in kinds, kinds
    assert got.predicted_peak_bytes <= budget < plan_uniform(p, Action.KEEP).predicted_peak_bytes
    assert got.predicted_step_s < rec.predicted_step_s
    tl = simulate(p, got)
    assert (tl.step_s, tl.peak_device_bytes) == (got.predicted_step_s, got.predicted_peak_bytes)


def test_a_waiting_micro_batch_holds_a_selective_segments_stored_outputs():
    """Pipeline stages: what a micro-batch keeps while it waits for its backward includes the op
    outputs its selective segments stored (uncounted, a 1F1B stage ran over its budget)."""
    from scheduler.pipeline import cost_of
    p = profile(n_layers=2)
    codes = [SegmentPlan(Action.RECOMPUTE) if s.recomputable else SegmentPlan(Action.KEEP) for s in p.segments]
    full = Plan(tuple(codes))
    codes[1] = SegmentPlan(Action.RECOMPUTE, store_ops=(1, 3))
    selective = Plan(tuple(codes))
    a, b = cost_of(p, full, "R"), cost_of(p, selective, "S")
    assert b.resident - a.resident == 200 * MB
    assert b.replay_s == pytest.approx(a.replay_s - 8.5e-3)


@pytest.mark.parametrize("op_dispatch_s, selective", [(0.0, True), (2e-3, False)])
def test_a_dear_dispatch_overhead_per_op_keeps_the_block_plan(op_dispatch_s, selective):
    """Each selective block pays 4 ops x the overhead in forward and again in its replay: at
    2 ms an op (16 ms a block) that outweighs the 8.5 ms its stored matmuls save."""
    p = dataclasses.replace(profile(), op_dispatch_s=op_dispatch_s)
    keep, rec = plan_uniform(p, Action.KEEP), plan_uniform(p, Action.RECOMPUTE)
    budget = (keep.predicted_peak_bytes + rec.predicted_peak_bytes) // 2
    blocks = plan(dataclasses.replace(p, segments=tuple(dataclasses.replace(s, ops=())
                                                        for s in p.segments)), budget, None)
    got = plan(p, budget, None)
    assert any(sp.selective for sp in got.segments) is selective
    assert got.predicted_peak_bytes <= budget
    assert got.predicted_step_s <= blocks.predicted_step_s
    if not selective:
        assert got.segments == blocks.segments
    tl = simulate(p, got)  # the public simulator charges the overhead as the planner did
    assert (tl.step_s, tl.peak_device_bytes) == (got.predicted_step_s, got.predicted_peak_bytes)
