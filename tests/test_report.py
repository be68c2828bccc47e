"""Layer 5: the timeline, the report, the trace and the profiler ranges."""
import gc
import json
import re
import time
import weakref

import pytest
import torch

from bench.gpt import make_batch
from offload import Action, EmulatedBackend, HybridCheckpointer, OffloadError, PeakMemory
from offload.observe.monitor import Monitor
from offload.observe.units import fmt_bytes
from offload.observe.timeline import ResolvedTimeline, Span, intersect, subtract, union

from .conftest import MIN_OFFLOAD, assert_bitwise, mixed, settle, tiny_gpt, train


def test_interval_algebra_exact():
    assert union([(0, 2), (1, 3), (5, 6), (6, 7)]) == [(0, 3), (5, 7)]
    assert intersect([(0, 3), (5, 7)], [(2, 6)]) == [(2, 3), (5, 6)]
    assert subtract([(0, 10)], [(2, 3), (5, 6)]) == [(0, 2), (3, 5), (6, 10)]


def test_overlap_and_stall_on_a_hand_made_timeline():
    tl = ResolvedTimeline([
        Span("compute", "forward", "a", 0.0, 4.0),
        Span("d2h", "copy", "x", 1.0, 3.0, 100),  # hidden
        Span("compute", "backward", "a", 6.0, 10.0),
        Span("h2d", "copy", "x", 5.0, 7.0, 100),  # half hidden: 5-6 exposed
        Span("compute", "stall", "x", 6.0, 7.0),  # compute waited 6-7: not hidden either
    ])
    assert tl.overlap_fraction() == pytest.approx(1 / 2)  # hidden: 1-3 of 4 seconds of transfer
    assert tl.stall_s() == pytest.approx(1.0)
    assert tl.busy_s("h2d") == pytest.approx(2.0)


def run(delay_bytes_per_s=None, steps=3, monitor=None):
    model = tiny_gpt()
    backend = EmulatedBackend(bytes_per_s=delay_bytes_per_s)
    hc = HybridCheckpointer(model, policy="offload", backend=backend, min_offload_bytes=MIN_OFFLOAD,
                            host_budget="256MiB", monitor=monitor or False)
    out = train(model, hc, steps=steps)
    return hc, out


def test_report_matches_counters_and_overlap_falls_with_slow_copies(tmp_path):
    hc, out = run()
    r = hc.report()
    s = hc.stats
    assert (r.kept_bytes, r.offloaded_bytes, r.d2h_bytes, r.h2d_bytes) == \
           (s.kept_bytes, s.offloaded_bytes, s.d2h_bytes, s.h2d_bytes)
    assert r.offloaded_bytes > 0 and r.step == 3 and r.forwards == 1
    assert sum(seg["offloaded"] for seg in r.segments) == r.offloaded_bytes
    # The overlap is the share of copy-stream time under compute (stalls excluded) that the trace shows.
    r.save_trace(str(tmp_path / "trace.json"))
    spans = [e for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"] if e.get("ph") == "X"]

    def busy(keep):
        return union((e["ts"], e["ts"] + e["dur"]) for e in spans if keep(e))

    copies = busy(lambda e: e["tid"] in (2, 3))
    compute = subtract(busy(lambda e: e["tid"] == 1 and e["cat"] != "stall"),
                       busy(lambda e: e["tid"] == 1 and e["cat"] == "stall"))
    hidden = sum(b - a for a, b in intersect(copies, compute))
    assert 0 < hidden and r.overlap_fraction == pytest.approx(hidden / sum(b - a for a, b in copies))
    assert r.step_s > 0 and r.forward_s > 0 and r.backward_s > 0
    json.loads(r.to_json())  # JSON-clean
    assert "overlap" in str(r)

    # A link so slow that copies outlast compute: more transfer time is exposed.
    slow, slow_out = run(delay_bytes_per_s=50e6)
    assert_bitwise(out, slow_out)
    rs = slow.report()
    assert rs.overlap_fraction < r.overlap_fraction
    assert rs.stall_s > r.stall_s
    assert rs.d2h_gbps < 0.06  # the emulated link speed shows in the achieved rate


def test_trace_is_valid_json_with_three_tracks(tmp_path):
    mon = Monitor(interval_s=0.005)
    with mon:
        hc, _ = run(monitor=mon, steps=1)
    path = tmp_path / "trace.json"
    r = hc.report()
    r.save_trace(str(path))
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    names = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert names == {"steps", "compute stream", "D2H stream", "H2D stream"}
    tids = {e["tid"] for e in events if e.get("ph") == "X"}
    assert tids == {0, 1, 2, 3}
    assert any(e["cat"] == "forward" for e in events if e.get("ph") == "X")
    assert any(e.get("ph") == "C" for e in events), "monitor samples become counters"
    assert r.monitor["nvml_available"] is False
    assert r.monitor["nvml_reason"].startswith("NVML unavailable")


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    hc, _ = run(steps=1)
    path = tmp_path / "step.png"
    hc.report().plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_our_operations_show_in_the_torch_profiler():
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy=mixed, min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train(model, hc, steps=1)
    names = {e.name for e in prof.events()}
    assert {"offload::d2h", "offload::h2d"} <= names
    assert any(n.startswith("offload::recompute transformer.h.") for n in names)


@pytest.mark.cuda
def test_nvml_pcie_bytes_agree_with_ours():
    from .conftest import cuda_or_skip
    from bench.gpt import GPTConfig
    from offload.observe.nvml import nvml_status
    dev = cuda_or_skip()
    cfg = GPTConfig(vocab_size=1024, block_size=512, n_layer=8, n_head=8, n_embd=1024, dropout=0.0)
    nvml_ok, reason = nvml_status()  # a Monitor's nvml_available is False until it starts
    if not nvml_ok:
        pytest.skip(reason)
    model = tiny_gpt(dev, cfg)
    mon = Monitor(dev, interval_s=0.01)
    hc = HybridCheckpointer(model, policy="offload", host_budget="8GiB", monitor=mon)
    with mon:
        train(model, hc, steps=2, batch=16)
        torch.cuda.synchronize(dev)
    r = hc.report()
    ours = r.d2h_bytes + r.h2d_bytes
    theirs = (r.monitor["pcie_tx_bytes"] or 0) + (r.monitor["pcie_rx_bytes"] or 0)
    assert abs(theirs - ours) <= 0.10 * ours, (theirs, ours)


# -- what a user asks first: steps, budget, measured peak, why nothing moved, the plan -------------

def test_steps_are_numbered_from_one():
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="keep", host_budget="64MiB")
    train(model, hc, steps=1)
    assert hc.stats.step == 1 and hc.report().step == 1
    train(model, hc, steps=2)
    assert hc.stats.step == 3 and hc.report().step == 3
    assert str(hc.report()).startswith("step") and "3 (1 forward(s))" in str(hc.report())


def test_keep_peak_is_every_kept_storage_and_the_budget_check_says_over():
    """Under "keep" every saved storage lives from its save to backward: the measured peak is
    exactly the kept bytes, and it returns to zero once backward has freed them."""
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="keep", host_budget="64MiB", device_budget="1MiB")
    train(model, hc, steps=3)
    r = hc.report()
    assert r.saved_peak_bytes == r.kept_bytes > 1 << 20
    assert r.saved_peak_parts == {"kept": r.kept_bytes, "in_flight": 0, "reloaded": 0, "recomputed": 0}
    assert r.device_budget == 1 << 20 and r.over_budget
    assert "over the device budget" in str(r) and "1.0 MiB" in str(r)
    settle(hc)
    assert hc._runtime.residency.total == 0  # nothing it counted is still held after backward

    roomy = HybridCheckpointer(tiny_gpt(), policy="keep", host_budget="64MiB", device_budget="1GiB")
    train(roomy.model, roomy, steps=1)
    r = roomy.report()
    assert not r.over_budget and "within the device budget" in str(r)


@pytest.mark.parametrize("policy", ["offload", "recompute", mixed])
def test_measured_peak_counts_every_kind_and_stays_under_the_allocators_peak(policy):
    """Offloaded sources count while their copy runs (a slow link keeps them in flight),
    reloads and recomputed tensors while backward holds them; all of it is device memory the
    profiler saw allocated, so our peak is at most the profiler's peak of the same step."""
    ref = train(tiny_gpt(), None)
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy=policy, backend=EmulatedBackend(d2h_delay_s=0.002),
                            min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB")
    got = train(model, hc, steps=2)
    idx, tgt = make_batch(model.cfg, 4, seed=2)
    with PeakMemory("cpu") as pm:
        torch.manual_seed(1002)
        with hc:
            _, loss = model(idx, tgt)
        torch.manual_seed(7)
        loss.backward()
    got[0].append(loss.detach().clone())
    got[1].append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    assert_bitwise(ref, got)
    r = hc.report()
    parts = r.saved_peak_parts
    assert r.saved_peak_bytes == sum(parts.values()) <= pm.peak_bytes
    assert max(b for _, b in hc.stats.saved_series) == r.saved_peak_bytes
    if policy != "recompute":
        assert hc.stats.saved_kind_peaks["in_flight"] > 0
        assert hc.stats.saved_kind_peaks["reloaded"] > 0
    if policy != "offload":
        assert hc.stats.saved_kind_peaks["recomputed"] > 0
    # Still held: the batch, which the user holds and embedding and the loss saved.
    assert hc._runtime.residency.total == idx.untyped_storage().nbytes() + tgt.untyped_storage().nbytes()
    del idx, tgt
    settle(hc)
    assert hc._runtime.residency.total == 0


def test_small_model_says_why_nothing_was_offloaded():
    model = tiny_gpt()  # at batch 1, activations of 16-128 KiB: all under the default 512 KiB threshold
    hc = HybridCheckpointer(model, policy="offload", host_budget="64MiB")
    train(model, hc, steps=3, batch=1)
    r = hc.report()
    assert r.offloaded_bytes == 0 and r.min_offload_bytes == 512 * 1024
    assert r.small_count > 10 and r.small_bytes == r.kept_bytes
    text = str(r)
    line = next(x for x in text.splitlines() if x.startswith("below min_offload_bytes (512.0 KiB)"))
    assert f"{r.small_count} tensors, {fmt_bytes(r.small_bytes)} kept" in line

    big = HybridCheckpointer(tiny_gpt(), policy="offload", host_budget="64MiB", min_offload_bytes=0)
    train(big.model, big, steps=1)
    assert big.report().small_count == 0 and big.report().offloaded_bytes > 0


def _auto_after_planning(budget="1MiB"):
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="auto", device_budget=budget, host_budget="256MiB",
                            min_offload_bytes=MIN_OFFLOAD)
    out = train(model, hc, steps=3)
    assert hc.plan is not None
    return model, hc, out


def test_predicted_offload_counts_recomputed_regions_offloaded_inputs():
    """A plan that recomputes every block with its inputs offloaded moves exactly those inputs:
    the prediction says so (it said 0 B)."""
    from scheduler.plan import Plan, SegmentPlan
    model, hc, _ = _auto_after_planning()
    policy = hc._runtime.policy
    (sig, profile), = policy.profiles.items()
    forced = Plan(segments=tuple(SegmentPlan(Action.RECOMPUTE, offload_inputs=True) if s.recomputable
                                 else SegmentPlan(Action.KEEP) for s in profile.segments),
                  lookahead=2, signature=sig)
    policy.plans[sig] = forced
    ref = train(tiny_gpt(), None, steps=2)
    assert_bitwise(ref, train(model, hc, steps=2))
    r = hc.report()
    inputs = sum(s.input_bytes for s in profile.segments if s.recomputable)
    assert inputs > 0 and r.predicted["offloaded_bytes"] == inputs == r.offloaded_bytes
    rows = [row for row in r.predicted["segments"] if row["action"] == "recompute"]
    assert [row["inputs_offloaded_bytes"] for row in rows] == [s.input_bytes for s in profile.segments
                                                               if s.recomputable]


def test_plan_prints_as_a_table_and_stays_a_plan():
    from scheduler.plan import Plan
    _, hc, _ = _auto_after_planning()
    plan = hc.plan
    assert isinstance(plan, Plan) and plan.predicted_peak_bytes > 0  # still the scheduler's Plan
    from scheduler import simulate
    assert simulate(plan.profile, plan).peak_device_bytes == plan.predicted_peak_bytes
    assert hash(plan) == hash(hc.plan) and plan == hc.plan
    text = str(plan)
    lines = text.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("#"))
    for col in ("segment", "action", "offloaded", "inputs offloaded"):
        assert col in header, header
    body = [line for line in lines if line[5:].startswith("transformer.h.")]
    assert len(body) == 4 and all(f"transformer.h.{i}" in body[i] for i in range(4))
    assert len([line for line in lines if line[:4].strip().isdigit()]) == len(plan.segments)
    assert "MiB" in text or "KiB" in text
    assert "rule" not in text.lower() and "budget 1048576" not in text
    # The report prints the same table next to predicted-vs-measured with the error in percent.
    r = hc.report()
    report_text = str(r)
    assert header in report_text
    assert json.loads(r.to_json())["predicted"]["segments"] == r.predicted["segments"]
    assert r.predicted["step_error"] == pytest.approx(r.step_s / r.predicted["step_s"] - 1)
    assert r.predicted["peak_error"] == pytest.approx(r.saved_peak_bytes / r.predicted["peak_bytes"] - 1)
    assert "%" in next(line for line in report_text.splitlines() if line.startswith("plan: step"))


def test_planner_notes_read_in_the_users_words():
    from offload.observe.planview import explain_note
    raw = [
        "keep-all fits the device budget: nothing moves",
        "rule 1 dropped: the budget cannot be met with the last segments resident",
        "rule 5: uniform RECOMPUTE beats the search's plan",
        "infeasible: the least-memory plan found peaks at 15728640 device bytes (budget 1048576) and "
        "3145728 host bytes (budget None); returning it as best effort",
    ]
    out = [explain_note(n) for n in raw]
    for text in out:
        assert not re.search(r"\brule \d", text) and not re.search(r"\d{5,}", text), text
    assert "15.0 MiB" in out[3] and "1.0 MiB" in out[3] and "3.0 MiB" in out[3]
    assert "no host limit" in out[3] or "unlimited" in out[3]
    assert "recomputing every block" in out[2]
    # A note the translation does not know still reads: its byte counts are formatted.
    assert explain_note("new: 2097152 bytes left") == "new: 2.0 MiB left"


def test_the_real_planner_notes_are_translated_in_the_report():
    _, hc, _ = _auto_after_planning(budget=1)  # nothing fits: the planner says so
    r = hc.report()
    notes = r.predicted["notes"]
    assert notes and any("cannot be met" in n for n in notes), notes
    assert not any(re.search(r"\d{5,}", n) for n in notes), notes
    assert not any(re.search(r"\brule \d", n) for n in notes), notes


def test_repr_formats_budgets():
    hc = HybridCheckpointer(tiny_gpt(), policy="keep", host_budget="2GiB", device_budget=3 << 20)
    text = repr(hc)
    assert "host_budget=2.0 GiB" in text and "device_budget=3.0 MiB" in text
    auto_budget = HybridCheckpointer(tiny_gpt(), policy="keep", host_budget="64MiB")
    assert "device_budget=auto" in repr(auto_budget)


# -- traces on torch.profiler's clock, and of several steps ------------------------------------------

def _spans(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e.get("ph") == "X"]


def test_trace_times_are_wall_clock_like_the_profilers(tmp_path):
    """Kineto writes ts = (CLOCK_REALTIME ns - baseTimeNanoseconds) / 1000; so do we."""
    before = time.time_ns()
    hc, _ = run(steps=1)
    after = time.time_ns()
    path = tmp_path / "trace.json"
    hc.report().save_trace(str(path))
    trace = json.loads(path.read_text())
    base = trace["baseTimeNanoseconds"]
    spans = _spans(trace)
    assert {e["cat"] for e in spans} >= {"forward", "backward", "copy", "step"}
    for e in spans:
        start, end = base + e["ts"] * 1e3, base + (e["ts"] + e["dur"]) * 1e3
        assert before <= start <= end <= after, e


def test_trace_clock_reads_the_profilers_clock(tmp_path):
    """A profiler range opened and closed between our clock readings lands between them once
    converted: the two clocks agree to within 20 us (they differ by hours when mixed up)."""
    from offload.observe.trace import TraceClock
    marks = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(20):
            a = time.perf_counter()
            with torch.profiler.record_function(f"mark{i}"):
                b = time.perf_counter()
                time.sleep(0.0005)
                c = time.perf_counter()
            marks.append((a, b, c, time.perf_counter()))
    path = tmp_path / "torch.json"
    prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    clock = TraceClock.measure(base_ns=trace["baseTimeNanoseconds"])
    ranges = {e["name"]: e for e in _spans(trace)}
    tol = 20.0
    for i, (a, b, c, d) in enumerate(marks):
        e = ranges[f"mark{i}"]
        assert clock.us(a) - tol <= e["ts"] <= clock.us(b) + tol, (i, e["ts"] - clock.us(a))
        assert clock.us(c) - tol <= e["ts"] + e["dur"] <= clock.us(d) + tol, i


@pytest.mark.parametrize("given", ["profile", "path"])
def test_trace_merges_with_the_profilers_and_our_spans_enclose_its_ranges(tmp_path, given):
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy=mixed, min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB",
                            backend=EmulatedBackend(d2h_delay_s=0.001))
    train(model, hc, steps=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train(model, hc, steps=1)
    path = tmp_path / "merged.json"
    if given == "profile":
        hc.report().save_trace(str(path), profiler=prof)
        with pytest.raises(OffloadError, match="pass the path"):  # torch exports a trace once
            hc.report().save_trace(str(tmp_path / "again.json"), profiler=prof)
    else:
        theirs_path = tmp_path / "torch.json"
        prof.export_chrome_trace(str(theirs_path))
        hc.report().save_trace(str(path), profiler=str(theirs_path))
    merged = json.loads(path.read_text())
    assert merged["baseTimeNanoseconds"] > 0
    ours_pid = {e["pid"] for e in merged["traceEvents"] if e.get("name") == "process_name"
                and e["args"]["name"] == "offload runtime"}
    assert len(ours_pid) == 1
    ours_pid, = ours_pid
    ours = [e for e in _spans(merged) if e["pid"] == ours_pid]
    theirs = [e for e in _spans(merged) if e["pid"] != ours_pid]
    assert theirs and ours_pid not in {e["pid"] for e in theirs}
    if given == "path":  # the profiler's events are all there, untouched
        torch_only = json.loads(theirs_path.read_text())
        assert merged["baseTimeNanoseconds"] == torch_only["baseTimeNanoseconds"]
        assert theirs == _spans(torch_only)
    # Our recompute span of a block encloses the profiler's range of that replay (same clock;
    # 50 us for the two clocks' readings, against offsets of seconds when they differ).
    tol = 50.0
    replays = {e["name"].removeprefix("offload::"): e for e in theirs if e["name"].startswith("offload::recompute")}
    mine = {e["name"]: e for e in ours if e["cat"] == "recompute"}
    assert set(mine) == set(replays) == {"recompute transformer.h.0", "recompute transformer.h.2"}
    for name, t in replays.items():
        o = mine[name]
        assert o["ts"] - tol <= t["ts"] and t["ts"] + t["dur"] <= o["ts"] + o["dur"] + tol, (o, t)
    # Each D2H copy starts after the profiler saw it issued, and the step's spans lie inside
    # the profiler's window.
    issued = sorted(e["ts"] for e in theirs if e["name"] == "offload::d2h")
    copies = sorted(e["ts"] for e in ours if e["cat"] == "copy" and e["tid"] == 2)
    assert len(issued) == len(copies) > 0
    assert all(c >= i - tol for i, c in zip(issued, copies))
    lo, hi = min(e["ts"] for e in theirs), max(e["ts"] + e["dur"] for e in theirs)
    assert all(lo - tol <= e["ts"] and e["ts"] + e["dur"] <= hi + tol for e in ours if e["cat"] != "step")


def test_trace_recorder_keeps_the_last_steps_in_one_trace(tmp_path):
    from offload import TraceRecorder
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="offload", min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB")
    with pytest.raises(ValueError, match="steps"):
        TraceRecorder(hc, steps=0)
    rec = TraceRecorder(hc, steps=3)
    stats = []
    for _ in range(5):
        train(model, hc, steps=1)
        stats.append(weakref.ref(hc._runtime.stats))
    path = tmp_path / "steps.json"
    rec.save(str(path))
    trace = json.loads(path.read_text())
    steps = [e for e in _spans(trace) if e["cat"] == "step"]
    assert [e["name"] for e in steps] == ["step 3", "step 4", "step 5"]
    for a, b in zip(steps, steps[1:]):
        assert a["ts"] + a["dur"] <= b["ts"]
    forwards = [e for e in _spans(trace) if e["cat"] == "forward"]
    assert sorted({e["args"]["step"] for e in forwards}) == [3, 4, 5]
    assert len(forwards) == 3 * 9  # 4 blocks and the 5 stretches around them, per step
    counters = {e["name"] for e in trace["traceEvents"] if e.get("ph") == "C"}
    assert "saved activations (MiB)" in counters
    # Bounded: only the steps it may still write are held.
    gc.collect()
    assert [r() is not None for r in stats] == [False, True, True, True, True]
    # Closed, it records no more steps but still writes the ones it has; dropped, it holds nothing.
    rec.close()
    train(model, hc, steps=2)
    rec.save(str(path))
    assert [e["name"] for e in _spans(json.loads(path.read_text())) if e["cat"] == "step"] == \
           ["step 3", "step 4", "step 5"]
    del rec
    gc.collect()
    assert all(r() is None for r in stats) and not hc._runtime.step_listeners


def _cuda_gpt():
    from bench.gpt import GPTConfig
    from .conftest import cuda_or_skip
    dev = cuda_or_skip()
    cfg = GPTConfig(vocab_size=1024, block_size=512, n_layer=4, n_head=8, n_embd=512, dropout=0.0)
    return dev, cfg, tiny_gpt(dev, cfg)


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["keep", "offload", "recompute"])
def test_cuda_measured_peak_is_at_most_the_allocators(policy):
    """On a GPU, what the runtime counts resident is allocator memory of the same step:
    exactly the kept bytes under "keep", never above max_memory_allocated."""
    dev, cfg, model = _cuda_gpt()
    hc = HybridCheckpointer(model, policy=policy, host_budget="4GiB")
    train(model, hc, steps=2, batch=8)
    idx, tgt = make_batch(cfg, 8, seed=9, device=dev)
    with PeakMemory(dev) as pm:
        with hc:
            _, loss = model(idx, tgt)
        loss.backward()
    model.zero_grad(set_to_none=True)
    r = hc.report()
    print(f"{policy}: saved peak {r.saved_peak_bytes} {r.saved_peak_parts}, allocator peak {pm.peak_bytes}")
    assert 0 < r.saved_peak_bytes <= pm.peak_bytes
    if policy == "keep":
        assert r.saved_peak_bytes == r.kept_bytes
    if policy == "offload":
        assert hc.stats.saved_kind_peaks["reloaded"] > 0
    del idx, tgt, loss
    settle(hc)
    assert hc._runtime.residency.total == 0


@pytest.mark.cuda
def test_cuda_trace_copies_line_up_with_the_profilers_memcpys(tmp_path):
    """Our D2H and H2D spans (CUDA events) enclose the memcpys CUPTI saw for them, on one clock."""
    dev, cfg, model = _cuda_gpt()
    hc = HybridCheckpointer(model, policy="offload", host_budget="4GiB")
    train(model, hc, steps=2, batch=8)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        train(model, hc, steps=1, batch=8)
        torch.cuda.synchronize(dev)
    path = tmp_path / "merged.json"
    hc.report().save_trace(str(path), profiler=prof)
    hc.report().plot(str(tmp_path / "step.png"))
    trace = json.loads(path.read_text())
    ours_pid, = {e["pid"] for e in trace["traceEvents"] if e.get("name") == "process_name"
                 and e["args"]["name"] == "offload runtime"}
    spans = _spans(trace)
    for tid, kind in ((2, "DtoH"), (3, "HtoD")):
        ours = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans if e["pid"] == ours_pid and e["tid"] == tid)
        copies = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans if e["pid"] != ours_pid
                        and e.get("cat") == "gpu_memcpy" and kind in e["name"] and "Pinned" in e["name"])
        assert ours and copies, (kind, len(ours), len(copies))
        # The distance from each memcpy to the nearest span of ours that encloses it (0 inside).
        gaps = [min(max(0.0, o0 - c0, c1 - o1) for o0, o1 in ours) for c0, c1 in copies]
        print(f"{kind}: {len(copies)} memcpys, {len(ours)} spans; worst gap {max(gaps):.1f} us, "
              f"median {sorted(gaps)[len(gaps) // 2]:.1f} us")
        assert max(gaps) <= 50.0, kind


# -- the measured peak, adversarially: identity, lifetimes, threads, failures, bounds -------------

def test_a_storage_saved_thrice_through_views_counts_once():
    """Rule 4's storage identity holds for the count too: x, x.t() and x[:128] are one storage."""
    w = torch.randn(256, 256, requires_grad=True)
    hc = HybridCheckpointer(policy="keep", regions=None, host_budget="64MiB")
    with hc:
        x = w * 2
        loss = ((x * w) + (x.t() * w) + (x[:128] * w[:128]).sum()).sum()
    res = hc._runtime.residency
    assert res.total == res.peak == x.untyped_storage().nbytes() == 256 * 256 * 4
    assert hc.report().kept_bytes == 256 * 256 * 4
    loss.backward()
    del x, loss
    gc.collect()
    assert res.total == 0


def test_dropped_graphs_failed_forwards_and_other_threads_leave_nothing_counted():
    import threading
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy=mixed, min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB",
                            backend=EmulatedBackend(d2h_delay_s=0.002))
    res = hc._runtime.residency
    idx, tgt = make_batch(model.cfg, 4, seed=0)
    held = idx.untyped_storage().nbytes() + tgt.untyped_storage().nbytes()
    with hc:  # a graph never backpropagated
        logits, loss = model(idx, tgt)
    assert res.total > held
    del logits, loss
    settle(hc)
    assert res.total == held

    class Boom(Exception):
        pass

    def explode(mod, args, out):
        raise Boom

    handle = model.transformer.h[2].register_forward_hook(explode)
    with pytest.raises(Boom):
        with hc:
            model(idx, tgt)
    handle.remove()
    settle(hc)
    # The first forward's graph died unused, so the failed one began a step of its own, whose
    # count starts empty: it took on the token ids (the embedding saved them) and failed before
    # the loss saved the targets.
    assert res.total == idx.untyped_storage().nbytes()

    with hc:  # backward on another thread: frees run there
        logits, loss = model(idx, tgt)
    worker = threading.Thread(target=loss.backward)
    worker.start()
    worker.join()
    del logits, loss
    settle(hc)
    assert res.total == held and hc.stats.saved_kind_peaks["recomputed"] > 0


def test_two_forwards_before_one_backward_are_one_step_and_one_peak():
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="keep", host_budget="64MiB")
    losses = []
    for s in range(2):
        idx, tgt = make_batch(model.cfg, 4, seed=s)
        with hc:
            losses.append(model(idx, tgt)[1])
    one = hc._runtime.residency.total
    sum(losses).backward()
    r = hc.report()
    assert r.step == 1 and r.forwards == 2 and r.saved_peak_bytes == one == r.kept_bytes
    del losses
    train(model, hc, steps=1)
    assert hc.report().step == 2


def test_retain_graph_replays_are_counted_and_freed():
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="recompute", host_budget="64MiB")
    idx, tgt = make_batch(model.cfg, 4, seed=0)
    with hc:
        logits, loss = model(idx, tgt)
    loss.backward(retain_graph=True)
    first = hc.stats.saved_kind_peaks["recomputed"]
    loss.backward()
    assert first > 0 and hc.stats.replays == 8  # every block replayed again by the second backward
    del logits, loss
    settle(hc)
    assert hc._runtime.residency.total == idx.untyped_storage().nbytes() + tgt.untyped_storage().nbytes()


def test_residency_curve_is_bounded_and_forgets_earlier_steps():
    from offload.observe.residency import MAX_POINTS, Residency
    res = Residency()
    series = res.start_step()
    kept = [torch.empty(1) for _ in range(MAX_POINTS)]
    for t in kept:
        res.track(t.untyped_storage(), "kept")
    peak = res.peak
    del kept, t  # each free is a point too: 2 * MAX_POINTS changes
    assert res.total == 0 and peak == MAX_POINTS * 4
    assert len(series) <= MAX_POINTS + 1 and max(b for _, b in series) == peak
    t = torch.empty(1000)
    res.track(t.untyped_storage(), "kept")
    res.start_step()  # a storage of an earlier step freed now does not count against this one
    del t
    assert res.total == 0 and res.peak == 0


def test_trace_of_nothing_is_valid_and_bad_profilers_are_named(tmp_path):
    import gzip
    from offload import TraceRecorder
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="keep", host_budget="64MiB")
    rec = TraceRecorder(hc, steps=2)
    rec.save(str(tmp_path / "empty.json"))  # nothing ran yet
    trace = json.loads((tmp_path / "empty.json").read_text())
    assert _spans(trace) == [] and trace["baseTimeNanoseconds"] > 0
    with pytest.raises(TypeError, match="torch.profiler.profile or the path"):
        rec.save(str(tmp_path / "x.json"), profiler=42)
    # A profiler trace saved gzipped (tensorboard_trace_handler's habit) merges too.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train(model, hc, steps=1)
    plain = tmp_path / "torch.json"
    prof.export_chrome_trace(str(plain))
    packed = tmp_path / "torch.json.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    rec.save(str(tmp_path / "merged.json"), profiler=str(packed))
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["baseTimeNanoseconds"] == json.loads(plain.read_text())["baseTimeNanoseconds"]
    assert [e["name"] for e in _spans(merged) if e["cat"] == "step"] == ["step 1"]
