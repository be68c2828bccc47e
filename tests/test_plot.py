"""Layer 5: the pictures: `Report.plot` (one step) and the bench's frontier plot read well.

Each figure is checked through its matplotlib artists (what is drawn, where, in which colour)
and once as a PNG file."""
import random

import pytest

from bench.contenders import AUTO, BASELINE, OURS
from bench.results import ContenderResult
from offload import EmulatedBackend, HybridCheckpointer

from .conftest import MIN_OFFLOAD, mixed, tiny_gpt, train

plt = pytest.importorskip("matplotlib.pyplot")


@pytest.fixture(scope="module")
def mixed_report():
    """A step with forward, backward, recompute, D2H and H2D, under a budget near its peak."""
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy=mixed, min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB",
                            device_budget="3MiB", backend=EmulatedBackend(d2h_delay_s=0.001))
    train(model, hc, steps=3)
    return hc.report()


def _axes(fig):
    streams, mem = fig.axes[:2]
    return streams, mem


def test_memory_panel_draws_the_runtimes_saved_bytes_and_the_budget_without_a_monitor(mixed_report):
    r = mixed_report
    assert r.monitor is None and r.saved_peak_bytes > 0
    fig = r.figure()
    try:
        _, mem = _axes(fig)
        lines = {line.get_label(): line for line in mem.get_lines()}
        saved = lines["saved activations on the device"]
        assert max(saved.get_ydata()) == pytest.approx(r.saved_peak_bytes / 2**20)
        budget = next(line for label, line in lines.items() if label.startswith("device budget"))
        assert set(budget.get_ydata()) == {r.device_budget / 2**20} and "3.0 MiB" in budget.get_label()
        assert any(label.startswith("measured peak") for label in lines)
        assert not [t for t in mem.texts if "Monitor" in t.get_text() or "no memory" in t.get_text()]
    finally:
        plt.close(fig)


def test_copies_have_two_colours_and_blocks_are_labelled():
    """On a hand-made step: each block's forward and backward bar carries its name, a bar too
    narrow for its name and the stretches between blocks carry none; D2H and H2D differ in colour."""
    from offload.observe.plot import step_figure
    from offload.observe.timeline import ResolvedTimeline, Span
    tl = ResolvedTimeline([
        Span("compute", "forward", "(before regions)", 0.00, 0.05),
        Span("compute", "forward", "transformer.h.0", 0.05, 0.15),
        Span("compute", "forward", "transformer.h.1", 0.15, 0.25),
        Span("d2h", "copy", "transformer.h.0:3", 0.06, 0.07, 1 << 20),
        Span("compute", "backward", "transformer.h.1", 0.30, 0.40),
        Span("h2d", "copy", "transformer.h.0:3", 0.35, 0.36, 1 << 20),
        Span("compute", "recompute", "transformer.h.0", 0.40, 0.401),  # far too narrow for a label
        Span("compute", "stall", "transformer.h.0:3", 0.401, 0.402),
        Span("compute", "backward", "transformer.h.0", 0.402, 0.50),
    ])
    fig = step_figure(tl, [], "t")
    try:
        streams, _ = _axes(fig)
        bars = {c.get_label(): c for c in streams.collections}
        assert set(bars) == {"forward", "backward", "recompute", "stall (waiting on a reload)",
                             "D2H copy (offload)", "H2D copy (reload)"}
        assert tuple(bars["D2H copy (offload)"].get_facecolor()[0]) != tuple(bars["H2D copy (reload)"].get_facecolor()[0])
        assert sorted(t.get_text() for t in streams.texts) == ["h.0", "h.0", "h.1", "h.1"]
    finally:
        plt.close(fig)


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legends_sit_off_the_bars_and_the_curve(mixed_report, tmp_path):
    fig = mixed_report.figure()
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert len(legends) == 2
        for leg in legends:
            box = leg.get_window_extent(renderer)
            for ax in fig.axes:
                assert not _overlaps(box, ax.get_window_extent(renderer)), leg.get_texts()[0].get_text()
            assert box.x1 <= fig.bbox.x1 + 1  # and inside the picture
    finally:
        plt.close(fig)
    path = tmp_path / "step.png"
    mixed_report.plot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


def test_a_budget_far_above_the_curve_is_written_not_drawn():
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="keep", host_budget="64MiB", device_budget="1GiB")
    train(model, hc, steps=1)
    fig = hc.report().figure()
    try:
        _, mem = _axes(fig)
        assert not [line for line in mem.get_lines() if line.get_label().startswith("device budget")]
        assert [t for t in mem.texts if t.get_text() == "device budget 1.0 GiB (off this scale)"]
    finally:
        plt.close(fig)


# -- the bench's frontier --------------------------------------------------------------------------

def _result(name, family, ratio, peak_mib, budget=None):
    return ContenderResult(name=name, family=family, step_s=ratio * 0.1, step_s_all=[], step_s_min=ratio * 0.1,
                           ratio_to_plain=ratio, tokens_per_s=1.0, peak_bytes=int(peak_mib * 2**20), loss=0.0,
                           grads_match=True, grads_max_abs_diff=0.0, device_budget=budget)


def _bench_results():
    keep = 73.8 * 2**20
    rows = [_result("plain", BASELINE, 1.0, 73.8), _result("checkpoint", BASELINE, 1.358, 30.1),
            _result("selective", BASELINE, 1.249, 43.6), _result("save_on_cpu", BASELINE, 1.025, 73.8),
            _result("keep", OURS, 1.010, 73.8), _result("offload", OURS, 1.071, 41.7),
            _result("recompute", OURS, 1.395, 30.1)]
    rows += [_result(f"auto@{p}%", AUTO, ratio, peak, int(keep * p / 100))
             for p, ratio, peak in ((70, 1.105, 41.7), (50, 1.281, 30.1), (30, 1.379, 30.1), (100, 1.0, 73.8))]
    random.Random(3).shuffle(rows)
    return rows


def _legends(ax):
    return {leg.get_title().get_text(): [t.get_text() for t in leg.get_texts()]
            for leg in ax.artists if hasattr(leg, "get_title")}


def test_frontier_has_a_legend_for_peers_and_for_ours():
    from bench.plot import frontier_figure
    fig = frontier_figure(_bench_results(), "t")
    try:
        ax = fig.axes[0]
        groups = _legends(ax)
        assert groups == {"peers (PyTorch)": ["plain", "save_on_cpu", "selective", "checkpoint"],
                          "ours, fixed policies": ["keep", "offload", "recompute"],
                          'ours, policy="auto"': ["auto, by budget"]}
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for leg in ax.artists:
            assert not _overlaps(leg.get_window_extent(renderer), ax.get_window_extent(renderer))
    finally:
        plt.close(fig)


def test_frontier_draws_auto_in_budget_order_and_plain_on_top_inside_the_axes():
    from bench.plot import frontier_figure
    results = _bench_results()
    fig = frontier_figure(results, "t")
    try:
        ax = fig.axes[0]
        line, = [line for line in ax.get_lines() if line.get_label() == "auto, by budget"]
        auto = sorted((r for r in results if r.family == AUTO), key=lambda r: r.device_budget)
        assert list(line.get_xdata()) == [r.ratio_to_plain for r in auto]
        assert [t.get_text() for t in ax.texts if t.get_text().endswith("%")] == ["30%", "50%", "70%", "100%"]
        plain = next(c for c in ax.collections if c.get_label() == "plain")
        assert plain.get_zorder() > max(c.get_zorder() for c in ax.collections + ax.lines if c is not plain)
        (x, y), = plain.get_offsets()
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        assert x0 + 0.02 * (x1 - x0) < x < x1 and y0 < y < y1 - 0.02 * (y1 - y0)  # not on an edge
        assert [t for t in ax.texts if t.get_text() == "plain"]
    finally:
        plt.close(fig)
