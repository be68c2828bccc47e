"""Random and adversarial small problems for `scheduler.check` and the tests.

A `Case` is a profile of at most 10 segments with a device and a host budget. `random_profile`
draws profiles shaped like a model step; the adversarial families each stress one thing the
planner must get right:

- huge: one tensor several times a segment's bytes, on a slow link (keep it, offload small
  ones and recompute instead; the known 41.6x failure of issue 12 was such a case);
- slow: a 0.2-3 GB/s link, so almost every copy is exposed;
- asymmetric: H2D 0.1-0.4x or 3-8x D2H;
- host: a host budget of 3-30% of the saved bytes, so the host budget binds;
- mixed: forward times over 3 orders of magnitude, tensors from 0.5 MB to 1 GB, empty
  segments, tensors saved again by later segments, measured backward working sets.

Units: bytes, seconds, bytes per second.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from .plan import Action
from .planner import plan_uniform
from .profile import Profile, SegmentRecord, TensorRecord

#: Device budgets, as fractions of the way from a floor to the keep-all peak.
BUDGET_LEVELS = (0.9, 0.7, 0.5, 0.35, 0.2, 0.1)
MB = 10**6
GB = 10**9


@dataclass(frozen=True)
class Case:
    """One problem: a profile and its two budgets (bytes; host None = no limit)."""

    profile: Profile
    device_budget: int
    host_budget: int | None
    family: str = "random"


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


def _with_link(p: Profile, bw_d2h: float, bw_h2d: float) -> Profile:
    return Profile(p.segments, p.tensors, bw_d2h=bw_d2h, bw_h2d=bw_h2d,
                   transfer_latency_s=p.transfer_latency_s)


def huge_profile(rng: random.Random, max_segments: int = 8) -> Profile:
    """A random profile with one tensor of 2-6x its segment's bytes (at least 300 MB) in a
    segment outside the last two, over a 0.3-3 GB/s link."""
    p = random_profile(rng, max_segments)
    n = len(p.segments)
    s = rng.randrange(max(1, n - 2))
    size = max(300 * MB, int(p.saved_bytes(s) * rng.uniform(2, 6)))
    tensors = sorted(p.tensors + (TensorRecord(-1, s, size, True),),
                     key=lambda t: (t.segment, t.id if t.id >= 0 else 10**9))
    tensors = tuple(TensorRecord(i, t.segment, t.nbytes, t.offloadable, t.last_segment)
                    for i, t in enumerate(tensors))
    bw = rng.uniform(0.3, 3) * GB
    p = Profile(p.segments, tensors, bw_d2h=bw, bw_h2d=bw * rng.uniform(0.8, 2),
                transfer_latency_s=p.transfer_latency_s)
    return p


def slow_profile(rng: random.Random, max_segments: int = 8) -> Profile:
    """A random profile over a 0.2-3 GB/s link."""
    bw = rng.uniform(0.2, 3) * GB
    return _with_link(random_profile(rng, max_segments), bw, bw * rng.uniform(0.8, 2))


def asymmetric_profile(rng: random.Random, max_segments: int = 8) -> Profile:
    """A random profile whose H2D is 0.1-0.4x or 3-8x its D2H."""
    p = random_profile(rng, max_segments)
    ratio = rng.uniform(0.1, 0.4) if rng.random() < 0.5 else rng.uniform(3, 8)
    return _with_link(p, p.bw_d2h, p.bw_d2h * ratio)


def mixed_profile(rng: random.Random, max_segments: int = 8) -> Profile:
    """Heterogeneous segments: forward 0.05-30 ms (log-uniform), backward 0.5-4x forward, 0-5
    tensors of 0.5 MB-1 GB (log-uniform), 20% saved again later, working sets 0-150% of a
    segment's bytes, a 1-60 GB/s link."""
    n = rng.randint(3, max_segments)
    segments, tensors = [], []
    for s in range(n):
        fwd = 10 ** rng.uniform(-4.3, -1.5)
        recomputable = rng.random() < 0.75
        total = 0
        for _ in range(rng.randint(0 if s else 1, 5)):
            size = int(10 ** rng.uniform(5.7, 9))
            last = s
            if rng.random() < 0.2 and s < n - 1:
                last = rng.randint(s + 1, n - 1)
            tensors.append(TensorRecord(len(tensors), s, size, rng.random() < 0.9,
                                        last if last > s else -1))
            total += size
        inputs = int(max(total, MB) * rng.uniform(0.02, 0.5)) if recomputable else 0
        working = int(total * rng.uniform(0, 1.5)) if rng.random() < 0.7 else 0
        segments.append(SegmentRecord(s, f"seg{s}", fwd, fwd * rng.uniform(0.5, 4),
                                      recomputable, inputs, working))
    bw = 10 ** rng.uniform(9, 10.8)
    return Profile(tuple(segments), tuple(tensors), bw_d2h=bw, bw_h2d=bw * rng.uniform(0.5, 2),
                   transfer_latency_s=10e-6)


#: Profile generators by family name (`random` plus the adversarial ones).
FAMILIES: dict[str, Callable[[random.Random], Profile]] = {
    "random": random_profile, "huge": huge_profile, "slow": slow_profile,
    "asymmetric": asymmetric_profile, "host": random_profile, "mixed": mixed_profile,
}
ADVERSARIAL = ("huge", "slow", "asymmetric", "host", "mixed")


def budget_floor(profile: Profile) -> int:
    """A device floor no plan goes under: a segment's saved bytes and working set, all on the
    device during its backward (bytes)."""
    return max(profile.saved_bytes(s.index) + s.backward_working_set_bytes
               for s in profile.segments)


def make_case(rng: random.Random, family: str, level: float) -> Case:
    """A profile of `family` with a device budget `level` of the way from `budget_floor` up to
    the keep-all peak. Host budget: 3-30% of the saved bytes for "host", else none in 70% of
    cases and 20-80% of the saved bytes in 30%."""
    profile = FAMILIES[family](rng)
    keep = plan_uniform(profile, Action.KEEP).predicted_peak_bytes
    floor = budget_floor(profile)
    host = None
    if family == "host":
        host = int(profile.total_saved_bytes * rng.uniform(0.03, 0.3))
    elif rng.random() < 0.3:
        host = int(profile.total_saved_bytes * rng.uniform(0.2, 0.8))
    return Case(profile, int(floor + level * (max(keep, floor) - floor)), host, family)


def random_case(rng: random.Random, level: float, max_segments: int = 10) -> Case:
    """A `random_profile` case (kept for callers of the first check)."""
    profile = random_profile(rng, max_segments)
    keep = plan_uniform(profile, Action.KEEP).predicted_peak_bytes
    floor = budget_floor(profile)
    host = None
    if rng.random() < 0.3:
        host = int(profile.total_saved_bytes * rng.uniform(0.2, 0.8))
    return Case(profile, int(floor + level * (keep - floor)), host)


def cases(count: int, seed: int, families: tuple[str, ...] = ("random",)) -> list[Case]:
    """`count` cases cycling through BUDGET_LEVELS and `families`, reproducible from `seed`."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        family = families[i % len(families)]
        level = BUDGET_LEVELS[(i // len(families)) % len(BUDGET_LEVELS)]
        out.append(random_case(rng, level) if family == "random" else
                   make_case(rng, family, level))
    return out
