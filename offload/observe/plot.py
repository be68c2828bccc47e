"""`Report.plot`: one step as a PNG (matplotlib, optional).

Top: the compute stream (forward, backward, recompute, stalls; each block's spans labelled) and
the D2H and H2D streams, one colour each. Bottom: the saved-activation bytes on the device that
the runtime counted over the step against the device budget, and, with a Monitor, NVML's device
memory and the host RSS on a second axis. Legends sit to the right, off the bars. Times are
milliseconds from the step's first span; the saved-bytes curve is in host time (on CUDA the host
runs ahead of the streams).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..core.errors import OffloadError
from .timeline import ResolvedTimeline
from .units import fmt_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLORS = {("compute", "forward"): "#4C72B0", ("compute", "backward"): "#55A868",
          ("compute", "recompute"): "#C44E52", ("compute", "stall"): "#222222",
          ("d2h", "copy"): "#8172B2", ("h2d", "copy"): "#DD8452"}
LEGEND = {("compute", "forward"): "forward", ("compute", "backward"): "backward",
          ("compute", "recompute"): "recompute", ("compute", "stall"): "stall (waiting on a reload)",
          ("d2h", "copy"): "D2H copy (offload)", ("h2d", "copy"): "H2D copy (reload)"}
TRACKS = ("compute", "d2h", "h2d")
LABEL_PT = 7  # font size of the block labels on the bars
MIN_COPY_PT = 1.0  # copy bars are drawn at least this wide (points)
BUDGET_OFF_SCALE = 3.0  # a budget above this many times the peak is written, not drawn


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise OffloadError("Report.plot needs matplotlib: pip install 'hybrid-offload[plot]' "
                           "(or pip install matplotlib)") from exc
    return plt


def short_name(segment: str) -> str | None:
    """A block's label on its bar ("transformer.h.3" -> "h.3"); None for the stretches between blocks."""
    if segment.startswith("("):
        return None
    return ".".join(segment.split(".")[-2:])


def step_figure(tl: ResolvedTimeline, samples: Sequence, title: str = "",
                saved_series: Sequence[tuple[float, int]] = (), device_budget: int | None = None) -> "Figure":
    """The step's figure (see the module docstring); the caller saves or closes it."""
    plt = _pyplot()
    starts = [s.start for s in tl.spans] + [t for t, _ in saved_series]
    t0 = min(starts) if starts else 0.0
    fig, (ax, mem) = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True, gridspec_kw={"height_ratios": [2, 1.5]})
    fig.subplots_adjust(left=0.08, right=0.72, top=0.93, bottom=0.1, hspace=0.12)  # legends to the right
    _draw_streams(ax, tl, t0, ax.get_position().width * fig.get_figwidth())
    ax.set_title(title)
    _draw_memory(mem, samples, t0, saved_series, device_budget)
    mem.set_xlabel("ms since the step's first span")
    return fig


def _draw_streams(ax, tl: ResolvedTimeline, t0: float, width_in: float) -> None:
    bounds = tl.bounds
    step_ms = (bounds[1] - bounds[0]) * 1e3 if bounds else 0.0
    ms_per_pt = step_ms / (width_in * 72) if width_in > 0 else 0.0
    min_copy_ms = MIN_COPY_PT * ms_per_pt  # a copy of a few microseconds still shows
    for row, track in enumerate(TRACKS):
        for (trk, kind), color in COLORS.items():
            if trk != track:
                continue
            spans = tl.of(track, kind)
            if not spans:
                continue
            bars = [((s.start - t0) * 1e3, (s.end - s.start) * 1e3) for s in spans]
            if kind == "copy":
                bars = [(x, max(w, min_copy_ms)) for x, w in bars]
            ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=color, label=LEGEND[(trk, kind)],
                           edgecolors="white" if track == "compute" else "none", linewidths=0.3)
            if track != "compute" or kind == "stall":
                continue
            for s, (x, w) in zip(spans, bars):
                name = short_name(s.label)
                if name and w >= (0.65 * len(name) + 1) * LABEL_PT * ms_per_pt:  # the label fits its bar
                    ax.text(x + w / 2, row, name, ha="center", va="center", fontsize=LABEL_PT, color="white",
                            clip_on=True)
    ax.set_yticks(range(len(TRACKS)), ["compute", "D2H", "H2D"])
    ax.set_ylim(len(TRACKS) - 0.5, -0.5)
    ax.grid(True, axis="x", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _draw_memory(mem, samples: Sequence, t0: float, saved_series: Sequence[tuple[float, int]],
                 device_budget: int | None) -> None:
    peak = max((b for _, b in saved_series), default=0)
    if saved_series:
        xs = [(t - t0) * 1e3 for t, _ in saved_series]
        ys = [b / 2**20 for _, b in saved_series]
        mem.fill_between(xs, ys, step="post", color="#4C72B0", alpha=0.25, linewidth=0)
        mem.step(xs, ys, where="post", color="#4C72B0", linewidth=1.2, label="saved activations on the device")
        top = max(range(len(ys)), key=ys.__getitem__)
        mem.plot([xs[top]], [ys[top]], marker="v", color="#4C72B0", linestyle="none",
                 label=f"measured peak {fmt_bytes(peak)}")
    if device_budget is not None and saved_series:
        if device_budget <= BUDGET_OFF_SCALE * max(peak, 1):
            mem.axhline(device_budget / 2**20, color="#C44E52", linestyle="--", linewidth=1.2,
                        label=f"device budget {fmt_bytes(device_budget)}")
        else:
            mem.text(0.99, 0.95, f"device budget {fmt_bytes(device_budget)} (off this scale)", ha="right",
                     va="top", fontsize=8, color="#C44E52", transform=mem.transAxes)
    mem.set_ylim(bottom=0)
    mem.set_ylabel("saved activations (MiB)")
    mem.grid(True, alpha=0.3)
    handles, labels = mem.get_legend_handles_labels()
    used = [((x.time_s - t0) * 1e3, x.nvml.memory_used_bytes / 2**20) for x in samples
            if x.nvml is not None and x.nvml.memory_used_bytes is not None]
    rss = [((x.time_s - t0) * 1e3, x.rss_bytes / 2**20) for x in samples if x.rss_bytes is not None]
    if used or rss:
        other = mem.twinx()
        if used:
            other.plot(*zip(*used), color="#937860", linewidth=1, label="device used (NVML)")
        if rss:
            other.plot(*zip(*rss), color="#8C8C8C", linewidth=1, linestyle=":", label="host RSS")
        other.set_ylabel("MiB (Monitor)")
        more = other.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if not handles:
        mem.text(0.5, 0.5, "nothing saved on the device in this step", ha="center", transform=mem.transAxes)
        return
    mem.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01 if not (used or rss) else 1.1, 1.0),
               fontsize=8, frameon=False)


def plot_step(tl: ResolvedTimeline, samples: Sequence, path: str, title: str = "",
              saved_series: Sequence[tuple[float, int]] = (), device_budget: int | None = None) -> None:
    """Draw the step (`step_figure`) into the PNG at `path`."""
    plt = _pyplot()
    fig = step_figure(tl, samples, title, saved_series, device_budget)
    fig.savefig(path, dpi=100)
    plt.close(fig)
