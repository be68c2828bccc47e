"""`--budget-use`: how much of its device budget `policy="auto"` uses, next to keep and recompute.

The budgets are fractions of keep's measured saved-activation peak (the report's "saved
activations, peak": kept + in flight + reloaded + recomputed bytes on the device), the quantity
`device_budget` bounds. Each auto contender first runs until its plan is in force; then every
contender is timed round-robin (bench/measure.py), and the last timed step's report gives its
measured saved peak. The plan's own peak ("planned") adds what each segment's backward allocates
while it runs (its measured working set: gradients of its activations, temporaries), which the
budget also covers; the measured saved peak can sit below the budget by that much.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .contenders import Attached, Hybrid, Plain
from .measure import step, time_interleaved
from .presets import Preset
from .results import BudgetUseRow, Skipped
from .suite import attach_auto, auto_contenders, runtime_settings

FRACTIONS = (0.9, 0.7, 0.5, 0.3)
KEEP_STEPS = 2  # keep's steps before its saved peak is read (the first warms up)


@dataclass(frozen=True)
class BudgetUseConfig:
    """How `--budget-use` runs."""

    preset: Preset
    device: torch.device
    fractions: tuple[float, ...]  # auto budgets, as fractions of keep's saved-activation peak
    warmup: int
    repeats: int
    progress: bool = True


def keep_saved_peak(att: Attached, batch) -> int:
    """Keep's measured saved-activation peak, after a warm-up step (bytes)."""
    for _ in range(KEEP_STEPS):
        step(att, batch)
    att.zero_grad()
    return int(att.report()["saved_peak_bytes"])


def run_budget_use(cfg: BudgetUseConfig) -> tuple[list[BudgetUseRow], list[Skipped], int]:
    """Plain, keep, recompute and auto at each fraction: (rows in that order, skipped autos,
    keep's saved peak in bytes)."""
    preset, device = cfg.preset, cfg.device
    base = preset.build(device)
    batch = preset.batch_for(device)
    settings = runtime_settings(preset)
    fixed = [Plain(), Hybrid("keep", settings), Hybrid("recompute", settings)]
    attached = {c.name: c.attach(copy.deepcopy(base), preset.blocks) for c in fixed}
    reference = keep_saved_peak(attached["keep"], batch)
    budgets: dict[str, int] = {}
    skipped: list[Skipped] = []
    for c in auto_contenders(cfg.fractions, reference, settings):
        att = attach_auto(c, copy.deepcopy(base), preset.blocks, batch)
        if isinstance(att, Skipped):
            skipped.append(att)
        else:
            attached[c.name], budgets[c.name] = att, c.device_budget
    timings = time_interleaved(attached, batch, device, cfg.warmup, cfg.repeats, cfg.progress)
    rows = []
    for name, att in attached.items():
        rep = att.report()
        predicted = rep.get("predicted") or {}
        rows.append(BudgetUseRow(
            name=name, device_budget=budgets.get(name), saved_peak_bytes=rep.get("saved_peak_bytes"),
            planned_peak_bytes=predicted.get("peak_bytes") if name in budgets else None,
            step_s=timings[name].median_s, ratio_to_plain=timings[name].ratio_to(timings["plain"])))
        att.close()
    return rows, skipped, reference
