"""The memory-vs-step-time frontier as a PNG (matplotlib, the optional `bench` extra)."""
from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .contenders import AUTO, BASELINE, OURS
from .results import ContenderResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

MARKERS = {BASELINE: "s", OURS: "o", AUTO: "D"}
GROUPS = {BASELINE: "peers (PyTorch)", OURS: "ours, fixed policies"}
PEER_COLORS = ("#8C8C8C", "#937860", "#DA8BC3", "#CCB974", "#64B5CD")  # muted: the peers
OUR_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B2")
PLAIN = "plain"


def matplotlib_available() -> bool:
    """True when matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def _budget_order(r: ContenderResult) -> tuple[float, str]:
    return (r.device_budget if r.device_budget is not None else math.inf, r.name)


def frontier_figure(results: Sequence[ContenderResult], title: str) -> "Figure":
    """Each contender a point (step time relative to plain, peak MiB): the peers (PyTorch's own
    ways, plain among them) as muted squares, our fixed policies as circles, the auto budget
    sweep as a line through its points in budget order, each labelled by its budget. Plain, the
    reference, is a large star on top of everything, labelled. Legends to the right, one per
    group, each ordered left to right as on the plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    fig.subplots_adjust(left=0.09, right=0.7, top=0.9, bottom=0.12)
    legends = []
    for family, colors in ((BASELINE, PEER_COLORS), (OURS, OUR_COLORS)):
        handles = []
        members = sorted((r for r in results if r.family == family), key=lambda r: (r.name != PLAIN, r.ratio_to_plain))
        for r, color in zip(members, colors * (len(members) // len(colors) + 1)):
            if r.name == PLAIN:
                handles.append(ax.scatter(r.ratio_to_plain, r.peak_bytes / 2**20, marker="*", s=260, color="black",
                                          edgecolors="white", linewidths=0.8, zorder=10, label=r.name))
                ax.annotate(PLAIN, (r.ratio_to_plain, r.peak_bytes / 2**20), textcoords="offset points",
                            xytext=(9, 6), fontsize=9, fontweight="bold", zorder=10)
            else:
                handles.append(ax.scatter(r.ratio_to_plain, r.peak_bytes / 2**20, marker=MARKERS[family], s=55,
                                          color=color, edgecolors="black", linewidths=0.4, zorder=3, label=r.name))
        if handles:
            legends.append((handles, GROUPS[family]))
    auto = sorted((r for r in results if r.family == AUTO), key=_budget_order)
    if auto:
        line, = ax.plot([r.ratio_to_plain for r in auto], [r.peak_bytes / 2**20 for r in auto], marker=MARKERS[AUTO],
                        color="black", markersize=6, zorder=4, label="auto, by budget")
        for r in auto:
            ax.annotate(r.name.removeprefix("auto@"), (r.ratio_to_plain, r.peak_bytes / 2**20),
                        textcoords="offset points", xytext=(6, -12), fontsize=8)
        legends.append(([line], "ours, policy=\"auto\""))
    top = 1.0
    for handles, group in legends:
        leg = ax.legend(handles=handles, title=group, loc="upper left", bbox_to_anchor=(1.02, top), fontsize=8,
                        title_fontsize=8, frameon=False, alignment="left")
        ax.add_artist(leg)
        top -= 0.09 + 0.055 * len(handles)
    ax.set_xlabel("step time / plain's (median of per-round ratios; forward + backward)")
    ax.set_ylabel("peak device memory per step (MiB)")
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.08, y=0.1)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    return fig


def plot_frontier(results: Sequence[ContenderResult], path: Path, title: str) -> bool:
    """`frontier_figure` into the PNG at `path`. Returns False (and logs why) when matplotlib is missing."""
    if not matplotlib_available():
        log.info("matplotlib is not installed (pip install -e '.[plot]'): no PNG written")
        return False
    import matplotlib.pyplot as plt

    fig = frontier_figure(results, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
