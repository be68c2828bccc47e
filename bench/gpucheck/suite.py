"""The suite part: the bench's GPU preset for every contender (bench.suite.run_suite, few
repeats): step time against plain, peak memory, bytes moved, overlap, stall; gradients judged
against the plain-vs-plain noise floor (bench/gpucheck/noise.py) instead of bitwise."""
from __future__ import annotations

import dataclasses
import gc

import torch

from ..contenders import baselines, fixed_policies
from ..plot import plot_frontier
from ..presets import PRESETS
from ..results import ContenderResult
from ..suite import SuiteConfig, auto_contenders, run_suite, runtime_settings
from ..tables import format_table, main_table
from .config import CheckConfig
from .noise import ABOVE, NOISE_FACTOR, PLAIN_RUNS, NoiseFloor, measure_floor, times_floor, verdict
from .outcome import Finding

TITLE = "every contender on the bench's GPU preset, gradients vs the plain-vs-plain floor"


def suite_config(cfg: CheckConfig) -> SuiteConfig:
    """The bench's own suite settings for this check (few repeats, progress as log lines)."""
    return SuiteConfig(PRESETS[cfg.preset], torch.device(cfg.device), cfg.warmup, cfg.repeats, cfg.budgets,
                       progress=True)


def plan(cfg: CheckConfig) -> dict:
    sc = suite_config(cfg)
    settings = runtime_settings(sc.preset)
    names = [c.name for c in baselines() + fixed_policies(settings)]
    names += [c.name for c in auto_contenders(sc.budgets, 1, settings)]
    return dict(preset=sc.preset.name, description=sc.preset.description, device=str(sc.device),
                warmup=sc.warmup, repeats=sc.repeats, contenders=names, plain_runs_for_floor=PLAIN_RUNS,
                noise_factor=NOISE_FACTOR)


def _row(r: ContenderResult, floor: NoiseFloor) -> dict:
    d = dataclasses.asdict(r)
    d.pop("report")  # the per-contender runtime report is large; the figures below are what counts
    d.update(verdict=verdict(r.grads_match, r.grads_max_abs_diff, floor),
             times_floor=times_floor(r.grads_max_abs_diff, floor),
             d2h_bytes=r.report.get("d2h_bytes"), h2d_bytes=r.report.get("h2d_bytes"))
    return d


def run(cfg: CheckConfig, cap_s: float) -> Finding:
    sc = suite_config(cfg)
    floor = measure_floor(sc.preset, sc.device)
    gc.collect()
    if sc.device.type == "cuda":
        torch.cuda.empty_cache()
    results, skipped = run_suite(sc)
    rows = {name: _row(r, floor) for name, r in results.items()}
    problems = [f"{name}: gradients differ from plain by {row['grads_max_abs_diff']:.3g}, above "
                f"{NOISE_FACTOR:g}x the plain-vs-plain floor of {floor.max_abs_diff:.3g}"
                for name, row in rows.items() if row["verdict"] == ABOVE]
    problems += [f"{s.name} {s.reason}" for s in skipped if s.reason.startswith("failed")]
    png = cfg.out / "frontier.png"
    plotted = plot_frontier(list(results.values()), png, f"gpucheck: {sc.preset.name} on {sc.device}")
    worst = max((row["ratio_to_plain"] for row in rows.values()), default=0.0)
    summary = (f"{len(rows)} contenders on {sc.preset.name}; floor {floor.max_abs_diff:.3g} "
               f"({'bitwise' if floor.bitwise else 'plain not repeatable'}); "
               f"{sum(r['verdict'] != ABOVE for r in rows.values())}/{len(rows)} within it; slowest x{worst:.2f} plain")
    figures = dict(preset=sc.preset.name, description=sc.preset.description, warmup=sc.warmup, repeats=sc.repeats,
                   floor=dataclasses.asdict(floor), noise_factor=NOISE_FACTOR, contenders=rows,
                   skipped=[dataclasses.asdict(s) for s in skipped], frontier_png=png.name if plotted else None)
    return Finding(summary, figures, problems)


def markdown(figures: dict) -> str:
    rows = list(figures.get("contenders", {}).values())
    fields = {f.name for f in dataclasses.fields(ContenderResult)}
    results = [ContenderResult(**{k: v for k, v in r.items() if k in fields}) for r in rows]
    noise = [[r["name"], f"{r['grads_max_abs_diff']:.3g}",
              "-" if r["times_floor"] is None else f"{r['times_floor']:.2f}", r["verdict"]] for r in rows]
    floor = figures.get("floor", {})
    out = [f"{figures.get('preset')}: {figures.get('description')}; median of {figures.get('repeats')} "
           f"rounds after {figures.get('warmup')} warm-up", "```", main_table(results), "```",
           f"noise floor: plain vs plain over {floor.get('runs')} runs, max abs diff {floor.get('max_abs_diff')}; "
           f"'within noise' = at most {figures.get('noise_factor')}x that",
           "```", format_table(["contender", "max abs diff", "x floor", "verdict"], noise), "```"]
    out += [f"- skipped {s['name']}: {s['reason']}" for s in figures.get("skipped", [])]
    return "\n".join(out)
