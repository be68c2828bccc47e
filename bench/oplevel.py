"""`python -m bench.oplevel`: op-level against block-level plans on one measured profile.

The main bench runs "auto@N%" and "auto-block@N%" side by side, but each profiles the model on
its own (on a shared, noisy machine two profiles differ by more than the plans do). Here one
policy="auto" runtime profiles the model per budget (ops included) and the scheduler plans that
same profile twice, at op level (the runtime's own plan) and with whole blocks only, next to
keep-all and full recompute: the simulated step and device peak of each, so the difference is
the planner's alone. Units: milliseconds and MiB; "+x%" is over keep-all's simulated step.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

import torch

import scheduler
from scheduler import Action, Plan, Profile

from .cli import DEFAULT_BUDGETS, _device, _fractions
from .contenders import Hybrid, HybridAuto
from .measure import check_pass
from .presets import PRESETS
from .results import Skipped
from .suite import attach_auto, runtime_settings

log = logging.getLogger(__name__)


def block_profile(profile: Profile) -> Profile:
    """`profile` without its op records: what granularity="block" plans from."""
    return dataclasses.replace(profile, segments=tuple(dataclasses.replace(s, ops=())
                                                       for s in profile.segments))


def letters(p: Plan) -> str:
    """The plan's segments in letters: K keep, O offload, R recompute, S selective."""
    return "".join("S" if sp.selective else sp.action.name[0] for sp in p.segments)


@dataclass(frozen=True)
class Comparison:
    """The plans of one measured profile at one budget (bytes the planner had)."""

    fraction: float  # the device budget as a fraction of keep's measured peak
    planned_bytes: int  # the budget less what auto keeps for backward
    plans: dict[str, Plan]  # "keep-all", "recompute", "block", "op level"
    op_dispatch_s: float = 0.0  # the profile's dispatch overhead per op, seconds
    block_ops: int = 0  # ops a block dispatches (the largest), each paying it


def compare(preset_name: str, device: torch.device, fractions: Sequence[float],
            host_budget: str | None) -> tuple[int, list[Comparison]]:
    """keep's measured peak (bytes) and, per budget fraction of it, the four plans."""
    preset = PRESETS[preset_name]
    if host_budget is not None:
        preset = dataclasses.replace(preset, host_budget=host_budget)
    base = preset.build(device)
    batch = preset.batch_for(device)
    settings = runtime_settings(preset)
    keep = Hybrid("keep", settings).attach(copy.deepcopy(base), preset.blocks)
    keep_peak = check_pass(keep, batch, device).peak_bytes
    keep.close()
    out = []
    for f in fractions:
        att = attach_auto(HybridAuto(int(f * keep_peak), f"{f:.0%}", settings), copy.deepcopy(base),
                          preset.blocks, batch)
        if isinstance(att, Skipped):
            log.warning("budget %.0f%%: auto did not run (%s)", 100 * f, att.reason)
            continue
        rt = att.runtime._runtime
        sig = att.runtime.plan.signature
        profile, budget = rt.policy.profiles[sig], rt.device_budget() - rt.policy.reserves[sig]
        out.append(Comparison(f, budget, {
            "keep-all": scheduler.plan_uniform(profile, Action.KEEP),
            "recompute": scheduler.plan_uniform(profile, Action.RECOMPUTE),
            "block": scheduler.plan(block_profile(profile), budget, rt.settings.host_budget,
                                    keep_last=rt.settings.keep_last),
            "op level": rt.policy.plans[sig]}, profile.op_dispatch_s,
            max((s.op_count for s in profile.segments if s.recomputable), default=0)))
        att.close()
    return keep_peak, out


def lines(preset_name: str, keep_peak: int, comparisons: Sequence[Comparison]) -> list[str]:
    """The comparison as text: per budget, each plan's simulated step, +% and peak."""
    out = [f"{preset_name}: keep's measured peak {keep_peak / 2**20:.1f} MiB; simulated step ms, +% over "
           f"keep-all, peak MiB, plan (K keep, O offload, R recompute, S selective)"]
    for c in comparisons:
        keep_s = c.plans["keep-all"].predicted_step_s
        out.append(f"budget {c.fraction:.0%} of keep ({c.planned_bytes / 2**20:.1f} MiB planned, "
                   f"the rest kept for backward; a selective block's dispatch modes cost "
                   f"{c.op_dispatch_s * 1e6:.1f} us x {c.block_ops} ops in forward and in replay)")
        for name, p in c.plans.items():
            out.append(f"  {name:<10} {p.predicted_step_s * 1e3:9.1f} {p.predicted_step_s / keep_s - 1:+8.1%} "
                       f"{p.predicted_peak_bytes / 2**20:9.1f}  {letters(p)}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print the comparison; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m bench.oplevel", description=__doc__.split("\n\n")[1])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="workload (default: cpu)")
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budgets", type=_fractions, default=DEFAULT_BUDGETS,
                   help="device budgets as fractions of keep's measured peak (default 0.7,0.5,0.3)")
    p.add_argument("--host-budget", metavar="SIZE", help="pinned host bytes (default: the preset's)")
    args = p.parse_args(argv)
    keep_peak, comparisons = compare(args.preset, args.device, args.budgets, args.host_budget)
    print("\n".join(lines(args.preset, keep_peak, comparisons)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
