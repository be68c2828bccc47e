"""Pipeline parallelism at run time: `hc.attach(stage_module)` under `torch.distributed.pipelining`.

A schedule calls the stage's forward once per micro-batch, so each micro-batch's forward is a
forward of the runtime; several are in flight at once and their backwards come in the
schedule's order. First the step accounting on one process (forwards and backwards in a
schedule's order, by hand), then gloo on the CPU (tests/dist/pipeline.py): 2 stages under GPipe
and 1F1B, 4 stages under 1F1B, 4 micro-batches, 3 steps, every policy; gradients bitwise equal to
the same pipeline without the runtime, a report per stage that holds the whole schedule step.
"""
from __future__ import annotations

import pytest
import torch

from offload import HybridCheckpointer

from .dist.pipeline import LAYERS, M, MB, SEQ, STEPS, WIDTH, Stage
from .test_distributed import case, launch

X_BYTES = MB * M * SEQ * WIDTH * 4  # the first stage's input: its micro-batches are views of it
# The largest activation a block saves (its MLP's hidden layer). When copies lag (four ranks on two
# cores), Rule 10 holds the budget by waiting for them; the save that goes over is counted once
# its op has allocated it, so the measured peak may pass the budget by one such tensor.
ONE_TENSOR = MB * SEQ * 4 * WIDTH * 4


def live(schedule: str, stage: int, stages: int) -> int:
    """Micro-batches a stage holds at once: all under GPipe; min(N - i, M) under 1F1B."""
    return M if schedule == "gpipe" else min(stages - stage, M)


# -- the step accounting, on one process -------------------------------------------------------------
def small() -> tuple[Stage, torch.Tensor]:
    """A pipeline stage of the distributed tests and one micro-batch for it."""
    return Stage(0), torch.randn(MB, SEQ, WIDTH)


def run_order(order: str, steps: int = 2, policy: str = "keep", **kw):
    """Forwards ("F") and backwards ("B", oldest first) of a stage attached to a checkpointer
    in `order`, `steps` times; the report after each step's last backward, and the plan."""
    model, x = small()
    hc = HybridCheckpointer(model, policy=policy, min_offload_bytes=0, host_budget="64MiB", **kw)
    reports = []
    try:
        with hc.attach(model):
            for step in range(steps):
                losses = []
                for op in order.split():
                    if op == "F":
                        losses.append(model(x).sum())
                    else:
                        losses.pop(0).backward()
                reports.append(hc.report())
        return reports, hc.plan
    finally:
        hc.close()


@pytest.mark.parametrize("order, forwards, in_flight", [
    ("F F F F B B B B", 4, 4),  # GPipe
    ("F F B F B F B B", 4, 2),  # 1F1B, the first of two stages
    ("F F F B F B B B", 4, 3),  # 1F1B, the first of three stages
])
def test_micro_batches_in_flight_make_one_step(order, forwards, in_flight):
    reports, _ = run_order(order)
    for step, r in enumerate(reports, start=1):
        assert (r.step, r.forwards, r.in_flight) == (step, forwards, in_flight)


def test_forward_backward_pairs_are_a_step_each():
    """Gradient accumulation (and the last stage of 1F1B): nothing in flight when a forward
    starts, so each forward begins a step, as before pipelines."""
    reports, _ = run_order("F B F B")
    assert [(r.step, r.forwards, r.in_flight) for r in reports] == [(2, 1, 1), (4, 1, 1)]


def test_a_graph_never_backpropagated_does_not_hold_the_step_open():
    """An output kept with its graph and never backpropagated (evaluation with grad on) stops
    counting as in flight once a later forward's backward has run: the held forward and the
    first training one make step 1, each later forward a step of its own."""
    model, x = small()
    hc = HybridCheckpointer(model, policy="keep")
    try:
        with hc.attach(model):
            held = model(x).sum()  # noqa: F841  (alive to the end, never backpropagated)
            for _ in range(3):
                model(x).sum().backward()
            r = hc.report()
        assert (r.step, r.forwards, r.in_flight) == (3, 1, 1)
    finally:
        hc.close()


def test_auto_plans_for_every_micro_batch_in_flight():
    """GPipe's order, 4 micro-batches: under half of keep's measured peak, auto's plan counts the
    4 in flight (the stage's predicted peak, not one micro-batch's) and the measured peak fits;
    the report compares the plan's per-forward predictions per forward."""
    keep = run_order("F F F F B B B B", steps=1)[0][-1]
    budget = keep.saved_peak_bytes // 2
    reports, plan = run_order("F F F F B B B B", steps=3, policy="auto", device_budget=budget)
    r = reports[-1]
    assert (r.forwards, r.in_flight) == (4, 4)
    assert any("4 micro-batches in flight" in note for note in plan.notes), plan.notes
    assert r.saved_peak_bytes <= budget < keep.saved_peak_bytes
    assert "per forward of 4" in str(r)


# -- torch.distributed.pipelining, gloo ----------------------------------------------------------------
@pytest.fixture(scope="module")
def two(two_ranks) -> list[dict]:
    """The pipeline cases on 2 ranks, of the one 2-rank launch (tests/conftest.py two_ranks)."""
    pytest.importorskip("torch.distributed.pipelining")
    return two_ranks


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> list[dict]:
    pytest.importorskip("torch.distributed.pipelining")
    return launch(tmp_path_factory.mktemp("pp4"), "pp-1f1b", world=4)


SETUPS = [("two", "gpipe", 2), ("two", "1f1b", 2), ("four", "1f1b", 4)]
POLICIES = ["keep", "offload", "recompute", "auto"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("fixture, schedule, stages", SETUPS, ids=[f"{s}x{n}" for _, s, n in SETUPS])
def test_stage_gradients_bitwise_equal_and_a_report_per_stage(request, fixture, schedule, stages, policy):
    ranks = request.getfixturevalue(fixture)
    for stage, res in enumerate(case(ranks, f"pp-{schedule}-{policy}")):
        assert res["bad"] == [], f"stage {stage}: {res['bad'][:10]}"
        r, n = res["report"], live(schedule, stage, stages)
        # The report's step is the whole schedule step while micro-batches overlap; on the last
        # stage of 1F1B each micro-batch's backward follows its forward: a step each.
        assert r["in_flight"] == n, (stage, r)
        assert r["forwards"] == (M if n > 1 else 1), (stage, r)
        assert res["attached_forwards"] >= STEPS * M
        if policy == "offload":
            assert r["offloaded_bytes"] == r["d2h_bytes"] == r["h2d_bytes"] > 0 and r["fallback_count"] == 0
        if policy == "recompute":
            assert r["replays"] == r["forwards"] * LAYERS
        if policy == "auto":  # under half of keep's measured peak on this stage
            assert r["saved_peak_bytes"] <= r["device_budget"] + ONE_TENSOR, (stage, r)
            assert set(res["plan"]) != {"keep"}
            if n > 1:
                assert any(f"{n} micro-batches in flight" in note for note in res["notes"]), res["notes"]


@pytest.mark.parametrize("fixture, schedule, stages", SETUPS, ids=[f"{s}x{n}" for _, s, n in SETUPS])
def test_measured_peak_holds_every_live_micro_batch(request, fixture, schedule, stages):
    """Under keep a stage's measured peak is exactly its live micro-batches' saved bytes (the
    first stage's micro-batches are views of one input, which is counted once); offload and
    recompute bring it down, recompute the most."""
    ranks = request.getfixturevalue(fixture)
    peaks = {p: [res["report"]["saved_peak_bytes"] for res in case(ranks, f"pp-{schedule}-{p}")]
             for p in ("keep", "offload", "recompute")}
    for stage, res in enumerate(case(ranks, f"pp-{schedule}-keep")):
        r, n = res["report"], live(schedule, stage, stages)
        shared = X_BYTES if stage == 0 else 0
        per_micro_batch = r["kept_bytes"] // r["forwards"] - shared
        assert r["saved_peak_bytes"] == n * per_micro_batch + shared, (stage, r)
        assert peaks["keep"][stage] > peaks["offload"][stage] > peaks["recompute"][stage] > 0
