"""Layer 5: the timeline, the report, the trace and the profiler ranges."""
import json

import pytest
import torch

from offload import EmulatedBackend, HybridCheckpointer
from offload.observe.monitor import Monitor
from offload.observe.timeline import ResolvedTimeline, Span, intersect, subtract, union

from .conftest import MIN_OFFLOAD, assert_bitwise, mixed, tiny_gpt, train


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
    assert r.offloaded_bytes > 0 and r.step == 2 and r.forwards == 1
    assert sum(seg["offloaded"] for seg in r.segments) == r.offloaded_bytes
    assert 0.0 <= r.overlap_fraction <= 1.0
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
    assert names == {"compute stream", "D2H stream", "H2D stream"}
    tids = {e["tid"] for e in events if e.get("ph") == "X"}
    assert tids == {1, 2, 3}
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
