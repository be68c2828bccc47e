"""`Report.plot`: stream activity and memory over one step, as a PNG (matplotlib, optional)."""
from __future__ import annotations

from typing import Sequence

from ..core.errors import OffloadError
from .timeline import ResolvedTimeline

_COLORS = {"forward": "#4C72B0", "backward": "#55A868", "recompute": "#C44E52", "stall": "#000000",
           "copy": "#8172B2"}


def plot_step(tl: ResolvedTimeline, samples: Sequence, path: str, title: str = "") -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise OffloadError("Report.plot needs matplotlib: pip install 'hybrid-offload[plot]' "
                           "(or pip install matplotlib)") from exc
    t0 = tl.bounds[0] if tl.bounds else 0.0
    fig, (ax, mem) = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True, gridspec_kw={"height_ratios": [2, 1.4]})
    tracks = ["compute", "d2h", "h2d"]
    for row, track in enumerate(tracks):
        for kind, color in _COLORS.items():
            bars = [((s.start - t0) * 1e3, (s.end - s.start) * 1e3) for s in tl.of(track, kind)]
            if bars:
                ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=color, label=f"{track}: {kind}")
    ax.set_yticks(range(len(tracks)), ["compute", "D2H", "H2D"])
    ax.invert_yaxis()
    ax.legend(loc="upper right", fontsize=7, ncol=3)
    ax.set_title(title)
    used = [((x.time_s - t0) * 1e3, x.nvml.memory_used_bytes / 2**20) for x in samples
            if x.nvml is not None and x.nvml.memory_used_bytes is not None]
    rss = [((x.time_s - t0) * 1e3, x.rss_bytes / 2**20) for x in samples if x.rss_bytes is not None]
    if used:
        mem.plot(*zip(*used), label="device used (NVML)")
    if rss:
        mem.plot(*zip(*rss), label="host RSS")
    if not used and not rss:
        mem.text(0.5, 0.5, "no memory samples (attach an offload.Monitor)", ha="center",
                 transform=mem.transAxes)
    mem.set_ylabel("MiB")
    mem.set_xlabel("ms since step start")
    if used or rss:
        mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
