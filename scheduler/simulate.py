"""A discrete-event timeline of one step under a plan: compute, D2H and H2D streams, memory.

The model the runtime implements, in the order the simulator applies it (units: seconds, bytes):

- Rule 1 (forward). Segments run back to back on the compute stream. All the device bytes a
  segment saves are allocated when its forward starts: KEEP and OFFLOAD segments allocate
  everything they save; a RECOMPUTE segment allocates only its inputs (`input_bytes`) and the
  tensors a later segment saves again (`last > segment`, which a replay would bring back too late,
  so they are kept).
- Rule 2 (D2H). After a segment's forward, its offloaded tensors (ids in `Plan.offload_ids`, in
  pack order) and, for RECOMPUTE with `offload_inputs`, its inputs are queued on the one D2H
  stream; a copy of x bytes takes `costmodel.d2h_seconds(x)`. Device bytes are freed when the
  copy ends (in flight they still count); the host block is taken when the copy is queued.
  The forward never waits for a copy.
- Rule 3 (H2D). A segment's reloads are issued when backward reaches segment
  `min(n - 1, need + lookahead)`, `need` being the latest segment that uses them; reloads issued
  together go in reverse pack order on the one H2D stream. A reload takes
  `costmodel.h2d_seconds(x)`, cannot start before its D2H copy ended, and allocates its device
  bytes when issued.
- Rule 4 (stalls). A segment's backward waits for the reloads it needs; the wait is exposed time.
- Rule 5 (recompute). A RECOMPUTE segment replays its forward (`forward_s`) right before its
  backward, allocating the bytes it re-materialises when the replay starts.
- Rule 6 (frees). When a segment's backward ends, everything it held on the device (kept,
  reloaded, re-materialised, inputs) and its host blocks are freed.
- Rule 7 (ties). At equal times frees are applied before allocations.

Parameters are not counted; the device bytes are saved activations only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

from . import costmodel
from .hardware import Hardware
from .plan import Action, Plan
from .profile import Profile

# Per-segment action codes used inside the scheduler (a Plan is the public form).
KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD_INPUTS = 0, 1, 2, 3

COMPUTE, D2H, H2D = "compute", "d2h", "h2d"


class Interval(NamedTuple):
    """One busy stretch of a stream: `stream` is "compute", "d2h" or "h2d"; seconds."""

    stream: str
    label: str
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """The simulated step. Seconds and bytes; `memory` is (time, device bytes) after each event."""

    step_s: float
    forward_s: float
    backward_s: float  # wall time from the end of forward to the end of the step
    exposed_s: float  # compute stalls waiting on reloads
    recompute_s: float  # forward replays inside backward
    d2h_busy_s: float
    h2d_busy_s: float
    peak_device_bytes: int  # saved-activation bytes on the device at the worst moment
    peak_host_bytes: int  # pinned host bytes held at the worst moment
    offloaded_bytes: int  # bytes copied to the host (and back) in the step
    memory: tuple[tuple[float, int], ...]
    intervals: tuple[Interval, ...]

    def stream(self, name: str) -> tuple[Interval, ...]:
        """The intervals of one stream, in time order."""
        return tuple(i for i in self.intervals if i.stream == name)

    def fits(self, device_budget: int, host_budget: int | None = None) -> bool:
        """True when the peaks stay within the budgets (bytes; None means no host limit)."""
        return self.peak_device_bytes <= device_budget and (
            host_budget is None or self.peak_host_bytes <= host_budget)


@dataclass(frozen=True)
class _Tensor:
    id: int
    nbytes: int
    offloadable: bool
    last: int
    d2h_s: float
    h2d_s: float
    label: str


class Simulator:
    """A profile compiled once under one hardware, for simulating many plans of it.

    `run` takes the scheduler's internal form (one action code per segment, the offloaded ids,
    the lookahead); `simulate` and `timeline` take a `Plan`.
    """

    def __init__(self, profile: Profile, hardware: Hardware | None = None) -> None:
        hw = costmodel.link(profile, hardware)
        self.profile = profile
        self.hardware = hw
        segs = profile.segments
        self.n = n = len(segs)
        for i, seg in enumerate(segs):
            if seg.index != i:
                raise ValueError(f"Profile.segments[{i}].index is {seg.index}; expected {i}")
        self.forward_s = tuple(s.forward_s for s in segs)
        self.backward_s = tuple(s.backward_s for s in segs)
        self.recomputable = tuple(s.recomputable for s in segs)
        self.input_bytes = tuple(s.input_bytes for s in segs)
        self.input_d2h_s = tuple(costmodel.d2h_seconds(s.input_bytes, hw) for s in segs)
        self.input_h2d_s = tuple(costmodel.h2d_seconds(s.input_bytes, hw) for s in segs)
        per_seg: list[list[_Tensor]] = [[] for _ in range(n)]
        for t in profile.tensors:
            if not 0 <= t.segment < n or t.last < t.segment or t.last >= n:
                raise ValueError(f"TensorRecord {t.id}: segment {t.segment}, last {t.last} "
                                 f"out of range for {n} segments")
            per_seg[t.segment].append(_Tensor(t.id, t.nbytes, t.offloadable, t.last,
                                              costmodel.d2h_seconds(t.nbytes, hw),
                                              costmodel.h2d_seconds(t.nbytes, hw), f"t{t.id}"))
        self.tensors = tuple(tuple(sorted(ts, key=lambda t: t.id)) for ts in per_seg)
        self.segment_of = {t.id: t.segment for t in profile.tensors}
        if len(self.segment_of) != len(profile.tensors):
            raise ValueError("Profile.tensors: tensor ids must be unique (one record per storage)")
        self.offloadable_ids = frozenset(t.id for t in profile.tensors if t.offloadable)
        self.saved = tuple(sum(t.nbytes for t in ts) for ts in self.tensors)
        # Bytes a later segment saves again: kept even when the segment is recomputed (rule 1).
        self.cross = tuple(sum(t.nbytes for t in ts if t.last > i)
                           for i, ts in enumerate(self.tensors))

    # -- conversions ---------------------------------------------------------------------

    def codes(self, plan: Plan) -> tuple[int, ...]:
        """The action code of every segment of `plan`; `ValueError` if the plan does not fit."""
        if len(plan.segments) != self.n:
            raise ValueError(f"Plan has {len(plan.segments)} segments; the profile has {self.n}")
        out = []
        for i, sp in enumerate(plan.segments):
            if sp.action is Action.RECOMPUTE:
                if not self.recomputable[i]:
                    raise ValueError(f"Plan: segment {i} is not recomputable but its action is "
                                     "RECOMPUTE; keep or offload it instead")
                out.append(RECOMPUTE_OFFLOAD_INPUTS if sp.offload_inputs else RECOMPUTE)
            else:
                out.append(OFFLOAD if sp.action is Action.OFFLOAD else KEEP)
        for tid in plan.offload_ids:
            seg = self.segment_of.get(tid)
            if seg is None:
                raise ValueError(f"Plan.offload_ids: no tensor with id {tid} in the profile")
            if tid not in self.offloadable_ids:
                raise ValueError(f"Plan.offload_ids: tensor {tid} is not offloadable")
            if out[seg] != OFFLOAD:
                raise ValueError(f"Plan.offload_ids: tensor {tid} belongs to segment {seg}, "
                                 f"whose action is {plan.segments[seg].action.name}, not OFFLOAD")
        if plan.lookahead < 1:
            raise ValueError(f"Plan.lookahead must be >= 1, got {plan.lookahead}")
        return tuple(out)

    def reloads(self, codes: Sequence[int],
                offload_ids: frozenset[int] | set[int]) -> dict[int, tuple[int, float]]:
        """Segments that reload bytes in backward: segment -> (need, seconds of its H2D copies).

        `need` is the latest segment whose backward uses them (rule 3).
        """
        out: dict[int, tuple[int, float]] = {}
        for s, c in enumerate(codes):
            if c == RECOMPUTE_OFFLOAD_INPUTS and self.input_bytes[s]:
                out[s] = (s, self.input_h2d_s[s])
            elif c == OFFLOAD:
                moved = [x for x in self.tensors[s] if x.id in offload_ids]
                if moved:
                    out[s] = (max(x.last for x in moved), sum(x.h2d_s for x in moved))
        return out

    def footprint(self, s: int, c: int) -> tuple[int, int, int]:
        """Device bytes segment s holds under action code c, OFFLOAD moving all it may:
        (from its forward to its backward once its copies are done, while the backward of
        segment s + 1 runs with its reloads issued, during its own backward)."""
        saved, inputs, cross = self.saved[s], self.input_bytes[s], self.cross[s]
        if c == KEEP:
            return saved, saved, saved
        if c == OFFLOAD:
            return saved - sum(x.nbytes for x in self.tensors[s] if x.offloadable), saved, saved
        if c == RECOMPUTE:
            return inputs + cross, inputs + cross, saved + inputs
        return cross, inputs + cross, saved + inputs

    def timeline(self, plan: Plan) -> Timeline:
        """The simulated step of `plan`."""
        return self.run(self.codes(plan), plan.offload_ids, plan.lookahead, record=True)

    # -- the simulation ------------------------------------------------------------------

    def run(self, codes: Sequence[int], offload_ids: frozenset[int] | set[int],
            lookahead: int, *, record: bool = False) -> Timeline:
        """Simulate one step (rules 1-7 of the module docstring); inputs are trusted.

        The planner calls this thousands of times, so the curve and the stream intervals are
        only built with `record=True`; without it `Timeline.memory` and `.intervals` are empty.
        """
        n = self.n
        fwd, bwd, saved = self.forward_s, self.backward_s, self.saved
        intervals: list[Interval] = []
        comp: list[tuple[float, int]] = []  # compute-driven memory events, in time order
        d2h_frees: list[tuple[float, int]] = []  # D2H completions, in time order (FIFO)
        groups: list[list[tuple[str, int, int, float, float]]] = [[] for _ in range(n)]
        needs: dict[int, int] = {}
        host = 0
        t = d2h_free = d2h_busy = 0.0

        for s in range(n):  # forward
            c = codes[s]
            comp.append((t, self.input_bytes[s] + self.cross[s] if c >= RECOMPUTE else saved[s]))
            end = t + fwd[s]
            if record:
                intervals.append(Interval(COMPUTE, f"fwd {s}", t, end))
            t = end
            if c == RECOMPUTE_OFFLOAD_INPUTS and self.input_bytes[s]:
                copies = [(f"in {s}", self.input_bytes[s], s,
                           self.input_d2h_s[s], self.input_h2d_s[s])]
            elif c == OFFLOAD:
                copies = [x for x in self.tensors[s] if x.id in offload_ids]
                copies = [(x.label, x.nbytes, x.last, x.d2h_s, x.h2d_s) for x in copies]
            else:
                continue
            group = groups[s]
            for label, nbytes, need, d2h_s, h2d_s in copies:  # rule 2
                start = d2h_free if d2h_free > end else end
                d2h_free = start + d2h_s
                d2h_busy += d2h_s
                if record:
                    intervals.append(Interval(D2H, label, start, d2h_free))
                d2h_frees.append((d2h_free, -nbytes))
                host += nbytes
                group.append((label, nbytes, need, d2h_free, h2d_s))
                if need > needs.get(s, -1):
                    needs[s] = need
        forward_end = t

        triggers = issue_schedule(needs, n, lookahead)
        ready = [0.0] * n
        h2d_free = h2d_busy = exposed = recompute_s = 0.0
        for j in range(n - 1, -1, -1):  # backward
            for s in triggers[j]:  # rule 3
                for label, nbytes, need, d2h_end, h2d_s in reversed(groups[s]):
                    comp.append((t, nbytes))
                    start = h2d_free if h2d_free > t else t
                    if d2h_end > start:
                        start = d2h_end
                    h2d_free = start + h2d_s
                    h2d_busy += h2d_s
                    if record:
                        intervals.append(Interval(H2D, label, start, h2d_free))
                    if h2d_free > ready[need]:
                        ready[need] = h2d_free
            if ready[j] > t:  # rule 4
                if record:
                    intervals.append(Interval(COMPUTE, f"stall {j}", t, ready[j]))
                exposed += ready[j] - t
                t = ready[j]
            c = codes[j]
            if c >= RECOMPUTE:  # rule 5
                comp.append((t, saved[j] - self.cross[j]))
                if record:
                    intervals.append(Interval(COMPUTE, f"recompute {j}", t, t + fwd[j]))
                t += fwd[j]
                recompute_s += fwd[j]
            if record:
                intervals.append(Interval(COMPUTE, f"bwd {j}", t, t + bwd[j]))
            t += bwd[j]
            comp.append((t, -(saved[j] + (self.input_bytes[j] if c >= RECOMPUTE else 0))))  # rule 6

        memory, peak = _merge(comp, d2h_frees, record)
        if record:
            intervals.sort(key=lambda i: (i.start, i.end))
        return Timeline(
            step_s=t, forward_s=forward_end, backward_s=t - forward_end, exposed_s=exposed,
            recompute_s=recompute_s, d2h_busy_s=d2h_busy, h2d_busy_s=h2d_busy,
            # every host block is taken in forward and freed in backward: the peak is the sum
            peak_device_bytes=peak, peak_host_bytes=host, offloaded_bytes=host,
            memory=memory, intervals=tuple(intervals))


def issue_schedule(needs: dict[int, int], n: int, lookahead: int) -> tuple[tuple[int, ...], ...]:
    """Rule 3: for each segment j, the segments whose reloads are issued when backward reaches j.

    `needs` maps a segment with reloads to the latest segment that uses them; its reloads are
    issued at segment min(n - 1, need + lookahead). Segments issued at one point come in reverse
    pack order (highest segment first).
    """
    points: list[list[int]] = [[] for _ in range(n)]
    for s in sorted(needs, reverse=True):
        points[min(n - 1, needs[s] + lookahead)].append(s)
    return tuple(tuple(p) for p in points)


def _merge(comp: list[tuple[float, int]], frees: list[tuple[float, int]],
           record: bool) -> tuple[tuple[tuple[float, int], ...], int]:
    """The device-memory curve (if `record`) and its peak from two time-ordered lists (rule 7)."""
    out: list[tuple[float, int]] = []
    mem = peak = 0
    k = 0
    nf = len(frees)
    for time, delta in comp:
        while k < nf and frees[k][0] <= time:
            mem += frees[k][1]
            if record:
                out.append((frees[k][0], mem))
            k += 1
        mem += delta
        if mem > peak:
            peak = mem
        if record:
            out.append((time, mem))
    if record:
        for time, delta in frees[k:]:
            mem += delta
            out.append((time, mem))
    return tuple(out), peak


def simulate(profile: Profile, plan: Plan, hardware: Hardware | None = None) -> Timeline:
    """Simulate one step of `profile` under `plan`.

    `hardware=None` costs copies with the bandwidths measured in the profile; a `Hardware`
    replaces the link (compute times always come from the profile).
    """
    return Simulator(profile, hardware).timeline(plan)
