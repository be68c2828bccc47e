"""The results printer: every table the bench shows, written to one stream (stdout by default)."""
from __future__ import annotations

import sys
from typing import Iterable, Sequence, TextIO

from .results import BudgetUseRow, ContenderResult, FitResult, LossCurve, Skipped, SoakResult

MIB = 2**20


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to width; the first column left-aligned, the others right-aligned."""
    rows = [list(r) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:.1f}"


def main_table(results: Sequence[ContenderResult]) -> str:
    """Step time, memory, traffic and gradient check per contender."""
    rows = []
    for r in results:
        overlap = "-" if r.overlap_fraction is None else f"{r.overlap_fraction:.0%}"
        stall = "-" if r.stall_s is None else f"{r.stall_s * 1e3:.1f}"
        grads = "bitwise" if r.grads_match else f"diff {r.grads_max_abs_diff:.2e}"
        rows.append([r.name, f"{r.step_s * 1e3:.1f}", f"{r.step_s_min * 1e3:.1f}", f"{r.ratio_to_plain:.3f}", f"{r.tokens_per_s:,.0f}",
                     _mib(r.peak_bytes), _mib(r.offloaded_bytes), _mib(r.recomputed_bytes), overlap, stall,
                     grads])
    return format_table(["contender", "step ms", "min ms", "x plain", "tokens/s", "peak MiB", "offload MiB",
                         "recomp MiB", "overlap", "stall ms", "grads vs plain"], rows)


def budget_use_table(rows: Sequence[BudgetUseRow]) -> str:
    """Budget, measured saved peak and their ratio, the plan's peak, step time against plain."""
    def share(n: int | None, budget: int | None) -> str:
        return "-" if n is None or not budget else f"{n / budget:.2f}"

    body = [[r.name, _mib(r.device_budget), _mib(r.saved_peak_bytes), share(r.saved_peak_bytes, r.device_budget),
             share(r.planned_peak_bytes, r.device_budget), f"{r.step_s * 1e3:.1f}", f"{r.ratio_to_plain:.3f}"]
            for r in rows]
    return format_table(["contender", "budget MiB", "saved peak MiB", "peak / budget", "planned / budget",
                         "step ms", "x plain"], body)


def skipped_lines(skipped: Sequence[Skipped]) -> str:
    return "\n".join(f"skipped {s.name}: {s.reason}" for s in skipped)


def maxfit_table(results: Sequence[FitResult], dim: str) -> str:
    """Largest size under the cap, its peak and throughput, per contender."""
    rows = []
    for r in results:
        size = f"{r.size}{'+' if r.capped else ''}"
        tps = "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"
        rows.append([r.name, size, _mib(r.peak_bytes), tps, str(len(r.probes))])
    return format_table(["contender", f"max {dim}", "peak MiB", "tokens/s", "probes"], rows)


def loss_table(curves: Sequence[LossCurve]) -> str:
    """Final loss and largest deviation from plain's curve, per contender."""
    rows = [[c.name, str(len(c.losses)), f"{c.losses[-1]:.6f}" if c.losses else "-", f"{c.max_abs_diff:.3g}"]
            for c in curves]
    return format_table(["contender", "steps", "final loss", "max |loss - plain|"], rows)


def soak_table(results: Sequence[SoakResult]) -> str:
    """Growth between the early figures and the end, per contender."""
    rows = []
    for r in results:
        g = r.growth
        rows.append([r.name, str(r.steps), f"{g.pool_bytes:+d}", f"{g.tensors:+d}", f"{g.objects:+d}",
                     f"{g.blocks:+d}", f"{g.rss_bytes / MIB:+.1f}", f"{r.end.rss_bytes / MIB:.0f}"])
    return format_table(["contender", "steps", "pool bytes", "tensors", "objects", "py blocks", "RSS MiB",
                         "RSS end MiB"], rows)


class Printer:
    """Writes titled sections to `stream`: the bench's only output besides logging."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout

    def section(self, title: str, body: str) -> None:
        self.stream.write(f"\n== {title}\n{body}\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
