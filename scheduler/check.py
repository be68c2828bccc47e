"""The greedy planner against the exhaustive search on random small profiles.

    python -m scheduler.check [--cases 200] [--seed 0]

Each case is a random profile of at most 10 segments (`random_case`) with a device budget at one
of several fractions of its keep-all peak and, in some cases, a host budget. The report says how
often the greedy's simulated step is within 2% of the optimum, its worst ratio, how often it
is infeasible where the optimum is feasible, and the mean time `plan` takes.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from .exact import plan_exact
from .planner import plan, plan_uniform
from .plan import Action, Plan
from .profile import Profile, SegmentRecord, TensorRecord
from .simulate import simulate

#: Device budgets of the check, as fractions of the way from a floor to the keep-all peak.
BUDGET_LEVELS = (0.9, 0.7, 0.5, 0.35, 0.2, 0.1)
MB = 10**6
GB = 10**9


@dataclass(frozen=True)
class Case:
    """One random problem: a profile and its two budgets (bytes; host None = no limit)."""

    profile: Profile
    device_budget: int
    host_budget: int | None


def random_profile(rng: random.Random, max_segments: int = 10) -> Profile:
    """A random profile shaped like a model step: embedding, repeated blocks, head.

    Forward 1-10 ms per segment, backward 1.5-2.5x forward, 1-5 tensors of 1-400 MB per
    segment (a few too small to offload), inputs 5-40% of a block's bytes, a link of 5-60 GB/s
    D2H and 0.8-2.5x that H2D, so that copies range from hidden to several times the compute.
    """
    n = rng.randint(2, max_segments)
    shaped = rng.random() < 0.7
    segments, tensors = [], []
    for s in range(n):
        recomputable = (0 < s < n - 1) if shaped and n > 2 else rng.random() < 0.8
        fwd = rng.uniform(1e-3, 10e-3)
        nbytes = []
        for _ in range(rng.randint(1, 5)):
            size = int(rng.choice((rng.uniform(1, 40), rng.uniform(40, 400))) * MB)
            offloadable = rng.random() < 0.85
            if not offloadable:
                size = max(1, size // 20)
            last = s
            if rng.random() < 0.05 and s < n - 1:
                last = min(n - 1, s + rng.randint(1, 2))
            tensors.append(TensorRecord(len(tensors), s, size, offloadable,
                                        last if last > s else -1))
            nbytes.append(size)
        inputs = int(sum(nbytes) * rng.uniform(0.05, 0.4)) if recomputable else 0
        segments.append(SegmentRecord(s, f"seg{s}", fwd, fwd * rng.uniform(1.5, 2.5),
                                      recomputable, inputs))
    bw_d2h = rng.uniform(5, 60) * GB
    return Profile(tuple(segments), tuple(tensors), bw_d2h=bw_d2h,
                   bw_h2d=bw_d2h * rng.uniform(0.8, 2.5), transfer_latency_s=10e-6)


def random_case(rng: random.Random, level: float, max_segments: int = 10) -> Case:
    """A random profile with a device budget `level` of the way from a floor no plan can go
    under (the largest segment's saved bytes, all on the device during its backward) up to the
    keep-all peak; in 30% of cases also a host budget of 20-80% of its saved bytes."""
    profile = random_profile(rng, max_segments)
    keep = plan_uniform(profile, Action.KEEP).predicted_peak_bytes
    floor = max(profile.saved_bytes(s.index) for s in profile.segments)
    host = None
    if rng.random() < 0.3:
        host = int(profile.total_saved_bytes * rng.uniform(0.2, 0.8))
    return Case(profile, int(floor + level * (keep - floor)), host)


@dataclass(frozen=True)
class Outcome:
    """The greedy and the exact plan of one case, with their simulated feasibility."""

    greedy: Plan
    exact: Plan
    greedy_fits: bool
    exact_fits: bool
    greedy_s: float  # seconds `plan` took

    @property
    def ratio(self) -> float:
        """Greedy step over optimal step (both feasible), else nan."""
        if not (self.greedy_fits and self.exact_fits):
            return float("nan")
        return self.greedy.predicted_step_s / self.exact.predicted_step_s


def compare(case: Case) -> Outcome:
    """Plan one case both ways and check both plans on the simulator."""
    start = time.perf_counter()
    greedy = plan(case.profile, case.device_budget, case.host_budget)
    elapsed = time.perf_counter() - start
    exact = plan_exact(case.profile, case.device_budget, case.host_budget)
    fits = [simulate(case.profile, p).fits(case.device_budget, case.host_budget)
            for p in (greedy, exact)]
    return Outcome(greedy, exact, fits[0], fits[1], elapsed)


def cases(count: int, seed: int) -> list[Case]:
    """`count` cases cycling through BUDGET_LEVELS, reproducible from `seed`."""
    rng = random.Random(seed)
    return [random_case(rng, BUDGET_LEVELS[i % len(BUDGET_LEVELS)]) for i in range(count)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and print its summary; returns 0 when the greedy meets the bar."""
    parser = argparse.ArgumentParser(prog="python -m scheduler.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=200, help="number of random cases")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error(f"--cases must be >= 1, got {args.cases}")
    results = [compare(c) for c in cases(args.cases, args.seed)]
    both = [r for r in results if r.exact_fits and r.greedy_fits]
    within = sum(1 for r in both if r.ratio <= 1.02)
    missed = sum(1 for r in results if r.exact_fits and not r.greedy_fits)
    wrong_fit = sum(1 for r in results if r.greedy_fits and not r.exact_fits)
    infeasible = sum(1 for r in results if not r.exact_fits)
    worst = max((r.ratio for r in both), default=float("nan"))
    mean_ms = 1e3 * sum(r.greedy_s for r in results) / len(results)
    feasible = len(results) - infeasible
    share = within / feasible if feasible else 1.0
    print(f"cases: {len(results)} (seed {args.seed}); optimum infeasible in {infeasible}")
    print(f"within 2% of optimum: {within}/{feasible} = {share:.1%}")
    print(f"worst ratio (greedy / optimum): {worst:.4f}")
    print(f"greedy infeasible where the optimum is feasible: {missed}")
    print(f"greedy feasible where the exact search found nothing: {wrong_fit}")
    print(f"mean planner time: {mean_ms:.1f} ms")
    return 0 if share >= 0.95 and missed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
