"""The planner against the exact reference on small random and adversarial profiles.

    python -m scheduler.check [--cases 200] [--seed 0] [--set random|adversarial|all]

Each case is a profile of at most 10 segments (`cases`) with a device budget at one of several
fractions of its keep-all peak and, in some cases, a host budget. `plan` and `plan_exact` (the
optimum over the full plan format: every subset of each segment's tensors, recompute with or
without offloaded inputs, every lookahead) both run with the same rule 1 (`keep_last`). The
report says, per family and in all: how often the planner's simulated step is within 2% of the
optimum, its worst ratio, how often it does not fit where a fitting plan exists, and the time
`plan` takes; cases the exact search gave up on (`--max-branches`) are counted apart. The targets of issue 12: >= 99% within 2%, none over budget where a plan fits,
worst ratio <= 1.10.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Sequence, TextIO

from .cases import ADVERSARIAL, Case, cases
from .exact import plan_exact
from .plan import Plan
from .planner import plan
from .simulate import simulate

SETS = {"random": ("random",), "adversarial": ADVERSARIAL, "all": ("random",) + ADVERSARIAL}
WITHIN = 1.02  # "within 2% of the optimum"
TARGET_SHARE, TARGET_WORST = 0.99, 1.10
MAX_BRANCHES = 1_000_000  # the exact search's per-case limit (about 15 s): cases it gives up
# on (a few in a thousand) are reported and left out of the share and the worst ratio


@dataclass(frozen=True)
class Outcome:
    """The planner's and the exact plan of one case, with their simulated feasibility."""

    case: Case
    greedy: Plan
    exact: Plan
    greedy_fits: bool
    exact_fits: bool
    greedy_s: float  # seconds `plan` took
    exact_s: float  # seconds `plan_exact` took

    @property
    def proven(self) -> bool:
        """Whether the exact search finished (else its plan is only the best it found)."""
        return not any("gave up" in n for n in self.exact.notes)

    @property
    def ratio(self) -> float:
        """Planner step over optimal step (both feasible), else nan."""
        if not (self.greedy_fits and self.exact_fits):
            return float("nan")
        return self.greedy.predicted_step_s / self.exact.predicted_step_s


def compare(case: Case, keep_last: int = 1, max_branches: int | None = None) -> Outcome:
    """Plan one case both ways (the planner's plan seeds the exact search, which stops after
    `max_branches`) and check both plans on the simulator."""
    start = time.perf_counter()
    greedy = plan(case.profile, case.device_budget, case.host_budget, keep_last=keep_last)
    mid = time.perf_counter()
    exact = plan_exact(case.profile, case.device_budget, case.host_budget, keep_last=keep_last,
                       incumbent=greedy, max_branches=max_branches)
    end = time.perf_counter()
    fits = [simulate(case.profile, p).fits(case.device_budget, case.host_budget)
            for p in (greedy, exact)]
    return Outcome(case, greedy, exact, fits[0], fits[1], mid - start, end - mid)


@dataclass(frozen=True)
class Summary:
    """The figures of a set of outcomes."""

    cases: int
    unproven: int  # cases the exact search gave up on (left out of the figures below)
    feasible: int  # cases where a fitting plan exists
    within: int  # feasible cases with the planner within 2% of the optimum
    missed: int  # feasible cases where the planner's plan does not fit
    worst: float  # worst planner / optimum ratio over feasible cases
    mean_ms: float
    max_ms: float

    @property
    def share(self) -> float:
        return self.within / self.feasible if self.feasible else 1.0

    @property
    def meets_targets(self) -> bool:
        return (self.share >= TARGET_SHARE and self.missed == 0
                and not self.worst > TARGET_WORST)


def summarize(outcomes: Sequence[Outcome]) -> Summary:
    """The figures of `outcomes`; where the exact search gave up, a planner plan over budget
    while the search found one that fits still counts as missed."""
    proven = [o for o in outcomes if o.proven]
    missed = sum(1 for o in outcomes if o.exact_fits and not o.greedy_fits)
    outcomes_all, outcomes = outcomes, proven
    feasible = [o for o in outcomes if o.exact_fits]
    ratios = [o.ratio for o in feasible if o.greedy_fits]
    times = [o.greedy_s for o in outcomes_all] or [0.0]
    return Summary(
        cases=len(outcomes_all), unproven=len(outcomes_all) - len(proven),
        feasible=len(feasible), within=sum(1 for r in ratios if r <= WITHIN), missed=missed,
        worst=max(ratios, default=float("nan")),
        mean_ms=1e3 * sum(times) / len(times), max_ms=1e3 * max(times))


def report(outcomes: Sequence[Outcome], out: TextIO) -> Summary:
    """Print one line per family and one for all; return the overall summary."""
    families = sorted({o.case.family for o in outcomes})
    rows = [("set", "cases", "unproven", "feasible", "within 2%", "share", "worst",
             "over budget", "plan ms mean", "max")]
    for name, group in [(f, [o for o in outcomes if o.case.family == f]) for f in families] + [
            ("all", list(outcomes))]:
        s = summarize(group)
        rows.append((name, str(s.cases), str(s.unproven), str(s.feasible), str(s.within),
                     f"{s.share:.1%}",
                     "-" if math.isnan(s.worst) else f"{s.worst:.4f}", str(s.missed),
                     f"{s.mean_ms:.1f}", f"{s.max_ms:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                        enumerate(zip(r, widths))), file=out)
    return summarize(outcomes)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the check and print its summary; returns 0 when the planner meets the targets."""
    out = sys.stdout if out is None else out
    parser = argparse.ArgumentParser(prog="python -m scheduler.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=200, help="number of cases")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--set", choices=sorted(SETS), default="random",
                        help="which generators: random (today's), adversarial, or all")
    parser.add_argument("--keep-last", type=int, default=1, help="rule 1 for both planners")
    parser.add_argument("--max-branches", type=int, default=MAX_BRANCHES,
                        help="branches the exact search bounds per case before it gives up "
                             "(0: never)")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error(f"--cases must be >= 1, got {args.cases}")
    if args.keep_last < 0:
        parser.error(f"--keep-last must be >= 0, got {args.keep_last}")
    start = time.perf_counter()
    limit = args.max_branches or None
    outcomes = [compare(c, args.keep_last, limit)
                for c in cases(args.cases, args.seed, SETS[args.set])]
    wrong = [o for o in outcomes if o.proven and o.greedy_fits and not o.exact_fits]
    print(f"{len(outcomes)} cases, set {args.set}, seed {args.seed}, keep_last "
          f"{args.keep_last}; exact search {sum(o.exact_s for o in outcomes):.1f} s, "
          f"all {time.perf_counter() - start:.1f} s", file=out)
    summary = report(outcomes, out)
    print(f"targets (>= {TARGET_SHARE:.0%} within 2%, 0 over budget, worst <= {TARGET_WORST}): "
          f"{'met' if summary.meets_targets else 'NOT met'}", file=out)
    if wrong:  # the exact search is exact: a planner plan it missed is a bug
        print(f"BUG: the exact search found no plan in {len(wrong)} cases the planner solved",
              file=out)
    return 0 if summary.meets_targets and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
