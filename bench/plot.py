"""The memory-vs-step-time frontier as a PNG (matplotlib, the optional `bench` extra)."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Sequence

from .contenders import AUTO
from .results import ContenderResult

log = logging.getLogger(__name__)

MARKERS = {"baseline": "s", "ours": "o", AUTO: "D"}


def matplotlib_available() -> bool:
    """True when matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_frontier(results: Sequence[ContenderResult], path: Path, title: str) -> bool:
    """Each contender a point (step time relative to plain, peak MiB; torch's anchors squares, our
    fixed policies circles); the auto budget sweep a connected line, labelled by budget.
    Returns False (and logs why) when matplotlib is missing."""
    if not matplotlib_available():
        log.info("matplotlib is not installed (pip install -e '.[plot]'): no PNG written")
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in results:
        if r.family == AUTO:
            continue
        ax.scatter(r.ratio_to_plain, r.peak_bytes / 2**20, marker=MARKERS.get(r.family, "o"),
                   s=50, label=r.name, zorder=3)
    auto = sorted((r for r in results if r.family == AUTO), key=lambda r: r.device_budget or 0)
    if auto:
        ax.plot([r.ratio_to_plain for r in auto], [r.peak_bytes / 2**20 for r in auto], marker=MARKERS[AUTO],
                color="black", label="auto (budget sweep)", zorder=4)
        for r in auto:
            ax.annotate(r.name.removeprefix("auto@"), (r.ratio_to_plain, r.peak_bytes / 2**20),
                        textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.set_xlabel("step time / plain's (median of per-round ratios; forward + backward)")
    ax.set_ylabel("peak device memory per step (MiB)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
