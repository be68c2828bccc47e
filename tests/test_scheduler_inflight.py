"""scheduler.inflight: one stage's plan when several micro-batches are in flight at once.

The chain profile of test_scheduler_pipeline: an embedding and a head (40 bytes each) around 4
recomputable layers of one 100-byte tensor (10 input bytes); keeping everything peaks at 480
bytes for one micro-batch, and every waiting micro-batch holds those 480 bytes too.
"""
from __future__ import annotations

import pytest

from scheduler import Action, plan, plan_in_flight
from scheduler.inflight import stage_peak

from .test_scheduler_pipeline import chain

PROFILE = chain(4, embed=True, head=True)


def test_one_micro_batch_is_the_planner_itself():
    for budget in (2000, 300, 100):
        assert plan_in_flight(PROFILE, budget, None, 1) == plan(PROFILE, budget, None)


def test_the_budget_covers_every_live_micro_batch():
    """Planned for one micro-batch, 1000 bytes keep everything (480); four in flight then hold
    1920. Counted, the stage fits: the three waiting micro-batches offload their first
    segments, at no predicted step time."""
    alone = plan(PROFILE, 1000, None)
    assert all(s.action is Action.KEEP for s in alone.segments)
    assert stage_peak(PROFILE, alone, 4) == (1920, 0)
    got = plan_in_flight(PROFILE, 1000, None, 4)
    assert stage_peak(PROFILE, got, 4)[0] == got.predicted_peak_bytes == 960 <= 1000
    assert [s.action for s in got.segments][:3] == [Action.OFFLOAD] * 3
    assert got.predicted_step_s == pytest.approx(alone.predicted_step_s)
    assert "4 micro-batches in flight" in got.notes[-1]


@pytest.mark.parametrize("live, budget", [(2, 600), (2, 300), (4, 600), (4, 1000)])
def test_stage_peak_within_budget_when_a_plan_fits(live, budget):
    got = plan_in_flight(PROFILE, budget, None, live)
    assert got.predicted_peak_bytes == stage_peak(PROFILE, got, live)[0] <= budget
    assert not any("infeasible" in n for n in got.notes)


def test_host_budget_covers_every_live_micro_batch():
    got = plan_in_flight(PROFILE, 1000, 300, 4)
    device, host = stage_peak(PROFILE, got, 4)
    assert device <= 1000 and host == got.predicted_host_bytes <= 300


def test_infeasible_budget_says_so_and_returns_the_least_memory_plan_found():
    got = plan_in_flight(PROFILE, 300, None, 4)
    assert got.predicted_peak_bytes == 380 > 300  # offload-all: 4 x 40 bytes of the head, and one layer's
    assert "infeasible" in got.notes[-1] and "4 micro-batches" in got.notes[-1]


@pytest.mark.parametrize("live", [0, -1, 1.5, True])
def test_bad_live_count_raises(live):
    with pytest.raises(ValueError, match="live"):
        plan_in_flight(PROFILE, 1000, None, live)
