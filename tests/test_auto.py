"""Layer 6: policy="auto": profile, plan under the budgets, prefetch ahead of backward."""
import pytest

from offload import Action, EmulatedBackend, HybridCheckpointer, PeakMemory
from bench.gpt import make_batch

from .conftest import MIN_OFFLOAD, TINY, assert_bitwise, settle, tiny_gpt, train

BATCH = 8


def measured_peak(model, hc, batch=BATCH):
    idx, tgt = make_batch(TINY, batch, seed=99)
    with PeakMemory("cpu") as pm:
        with hc:
            _, loss = model(idx, tgt)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return pm.peak_bytes


@pytest.fixture(scope="module")
def keep_peak():
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="keep", host_budget="64MiB")
    train(model, hc, steps=1, batch=BATCH)
    return measured_peak(model, hc)


def auto(model, budget, **kw):
    kw.setdefault("backend", EmulatedBackend())
    return HybridCheckpointer(model, policy="auto", device_budget=budget, host_budget="256MiB",
                              min_offload_bytes=MIN_OFFLOAD, **kw)


@pytest.mark.slow
def test_half_the_keep_peak_is_respected_with_equal_gradients(keep_peak):
    budget = keep_peak // 2
    ref = train(tiny_gpt(), None, steps=4, batch=BATCH)
    model = tiny_gpt()
    hc = auto(model, budget)
    assert_bitwise(ref, train(model, hc, steps=4, batch=BATCH))  # 2 profiling steps, then the plan
    plan = hc.plan
    assert plan is not None and any(s.action is not Action.KEEP for s in plan.segments)
    assert plan.predicted_peak_bytes <= budget
    peak = measured_peak(model, hc)
    r = hc.report()
    assert r.saved_peak_bytes <= budget, (r.saved_peak_bytes, budget)
    # Stated tolerance: none. The budget bounds activation memory: the saved activations and
    # what backward allocates for them (here, with the profiler taken by PeakMemory, half the
    # largest segment's saved bytes are held back for that), not the parameters' gradients,
    # which every plan allocates alike.
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    assert peak - grads <= budget, (peak, grads, budget, keep_peak)
    assert r.predicted is not None and r.predicted["peak_bytes"] == plan.predicted_peak_bytes
    assert r.offloaded_bytes + r.recomputed_bytes > 0


def test_budget_above_keep_peak_moves_nothing(keep_peak):
    model = tiny_gpt()
    hc = auto(model, 2 * keep_peak)
    train(model, hc, steps=3, batch=BATCH)
    plan = hc.plan
    assert all(s.action is Action.KEEP for s in plan.segments) and not plan.offload_ids
    s = hc.stats
    assert (s.offloaded_bytes, s.recomputed_bytes, s.replays, s.d2h_bytes) == (0, 0, 0, 0)


def test_no_step_goes_over_the_keep_peak_while_auto_measures_and_profiles(keep_peak):
    """Link probe, warm-up, profiling and the first planned step all stay under plain's peak."""
    model = tiny_gpt()
    hc = auto(model, keep_peak // 2)
    peaks = [measured_peak(model, hc) for _ in range(5)]
    assert max(peaks) <= keep_peak, peaks
    assert hc.plan is not None and peaks[-1] <= keep_peak // 2, peaks


def test_new_input_shape_profiles_and_plans_again(keep_peak):
    model = tiny_gpt()
    hc = auto(model, keep_peak // 2)
    train(model, hc, steps=3, batch=BATCH)
    train(model, hc, steps=3, batch=BATCH // 2)
    assert len(hc._runtime.policy.plans) == 2
    sizes = {p.predicted_peak_bytes for p in hc._runtime.policy.plans.values()}
    assert len(sizes) == 2


def test_no_device_budget_plans_for_free_memory():
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="auto", host_budget="64MiB", min_offload_bytes=MIN_OFFLOAD)
    train(model, hc, steps=3, batch=2)
    plan = hc.plan
    assert plan is not None and all(s.action is Action.KEEP for s in plan.segments)


def _region_of(label: str) -> int:
    return int(label.split(":")[0].rsplit(".", 1)[1]) if label.startswith("transformer.h.") else -1


@pytest.mark.parametrize("lookahead", [1, 2])
def test_prefetch_is_reverse_pack_order_and_d_regions_early(lookahead):
    model = tiny_gpt()
    backend = EmulatedBackend(d2h_delay_s=0.001)
    hc = HybridCheckpointer(model, policy="offload", backend=backend, lookahead=lookahead, keep_last=1,
                            min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB")
    train(model, hc, steps=1)
    d2h = [label for kind, label in backend.order if kind == "d2h"]
    h2d = [label for kind, label in backend.order if kind == "h2d"]
    assert h2d == list(reversed(d2h))  # reverse pack order, every offloaded storage once
    s = hc.stats
    assert s.prefetch_hits == len(h2d) and s.prefetch_misses == 0
    # Each reload was issued while backward was in the region `lookahead` blocks after its own
    # (the last block is kept: the first trigger issues the ones within reach at once).
    marks = sorted((m, _region_of(name + ":")) for name, m in s.timeline.region_backward)
    for ev in s.timeline.copies:
        if ev.record.direction != "h2d":
            continue
        trigger = max((m, r) for m, r in marks if m <= ev.record.issued_s)[1]
        own = _region_of(ev.record.label)
        assert trigger - own == lookahead or (trigger == 3 and own >= 3 - lookahead), (ev.record.label, trigger)


def test_slow_copies_give_stalls_not_wrong_results():
    ref = train(tiny_gpt(), None)
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="offload", backend=EmulatedBackend(d2h_delay_s=0.01, h2d_delay_s=0.01),
                            min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB")
    assert_bitwise(ref, train(model, hc))
    r = hc.report()
    assert r.stall_s > 0 and r.prefetch_hits > 0
    settle(hc)
    assert hc.host_pool.in_use == 0 and hc.backend.poisoned == 0


@pytest.mark.cuda
def test_prefetch_reduces_compute_waits_on_cuda():
    from bench.gpt import GPTConfig
    from .conftest import cuda_or_skip
    dev = cuda_or_skip()
    cfg = GPTConfig(vocab_size=1024, block_size=1024, n_layer=8, n_head=8, n_embd=1024, dropout=0.0)
    stalls = {}
    for d in (0, 1):
        model = tiny_gpt(dev, cfg)
        hc = HybridCheckpointer(model, policy="offload", lookahead=d, host_budget="16GiB")
        train(model, hc, steps=3, batch=8)
        stalls[d] = hc.report().stall_s
    assert stalls[1] < stalls[0], stalls


def saved_peak(model, hc, steps: int) -> int:
    """The report's measured saved-activation peak of the last of `steps` training steps."""
    train(model, hc, steps=steps, batch=BATCH)
    return hc.report().saved_peak_bytes


@pytest.mark.parametrize("fraction", [0.9, 0.7, 0.5, 0.3])
def test_auto_uses_its_budget(fraction):
    """At each fraction of keep's measured saved peak, the measured saved peak of the planned step
    is at most the budget and at least 85% of it. The budget also covers what each segment's
    backward allocates (its working set, measured): where the plan's peak falls in a block's
    backward, the saved peak sits below the budget by up to that much (at 30% on this model, the
    block's 1.3 MiB is 16% of the budget), so the 85% is asserted on the saved peak plus it."""
    keep = tiny_gpt()
    reference = saved_peak(keep, HybridCheckpointer(keep, policy="keep"), 2)
    budget = int(fraction * reference)
    model = tiny_gpt()
    hc = auto(model, budget)
    peak = saved_peak(model, hc, 4)  # 2 profiling steps, the plan, the measured step
    plan = hc.plan
    profile = hc._runtime.policy.profiles[plan.signature]
    assert not any("infeasible" in n for n in plan.notes), plan.notes
    assert plan.predicted_peak_bytes <= budget
    assert peak <= budget, (peak, budget)
    working = max(s.backward_working_set_bytes for s in profile.segments)
    assert working > 0
    assert peak + working >= 0.85 * budget, (peak, working, budget)
    if fraction >= 0.5:
        assert peak >= 0.85 * budget, (peak, budget)
