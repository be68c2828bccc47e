"""A discrete-event timeline of one step under a plan: compute, D2H and H2D streams, memory.

The model the runtime implements, in the order the simulator applies it (units: seconds, bytes):

- Rule 1 (forward). Segments run back to back on the compute stream; segment s runs from t_s
  to e_s = t_s + F_s. Its tensors are saved in id order at their save times (t_s plus
  `TensorRecord.save_offset_s`, or, unmeasured, the k-th of m at t_s + F_s * k / m) and each
  allocates its device bytes then. A RECOMPUTE segment allocates its inputs (`input_bytes`) at
  t_s, and of its own tensors only those a later segment saves again (`last > segment`, which a
  replay would bring back too late, so they are kept); the others are dropped. Its
  `held_bytes` (selective recompute's stored outputs) are allocated at t_s too and stay.
- Rule 2 (D2H). An offloaded tensor (id in `Plan.offload_ids`, in an OFFLOAD segment) is queued
  on the one D2H stream at its save time, the inputs of a RECOMPUTE segment with
  `offload_inputs` at t_s; FIFO, a copy of x bytes takes `costmodel.d2h_seconds(x)`. The host
  block is taken at the save. The device bytes are freed when the copy ends, but not before
  e_s: the forward may use the tensor until its segment ends. The forward never waits.
- Rule 3 (H2D). Each reload is issued when backward reaches segment min(n - 1, need + d), d the
  lookahead and `need` its own latest user: `TensorRecord.last` for a tensor, s for the inputs
  of s. At one issue point reloads go latest need first, then reverse pack order, on the one
  H2D stream (so the stream's order does not depend on d). A reload takes
  `costmodel.h2d_seconds(x)`, cannot start before its D2H copy ended, and allocates its device
  bytes when issued.
- Rule 4 (stalls). A segment's backward (or its replay) waits for the reloads it needs; the
  wait is exposed time.
- Rule 5 (recompute). A RECOMPUTE segment replays its forward (`forward_s`, or `replay_s` when
  set: selective recompute replays only part of it) right before its backward, allocating the
  bytes it re-materialises (all it dropped, or `replay_bytes`) when the replay starts.
- Rule 6 (working set). A segment's backward allocates `backward_working_set_bytes` when it
  starts (after any replay) and frees them when it ends.
- Rule 7 (frees). When a segment's backward ends, every tensor first saved in it (kept,
  reloaded, or re-materialised), its inputs if recomputed and its working set are freed, and
  its host blocks go back.
- Rule 8 (ties). At equal times frees are applied before allocations.

Parameters are not counted; the device bytes are saved activations and backward working sets.
Every host block is taken in forward and given back in backward, so the host peak is the sum of
the offloaded bytes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from . import costmodel, oplevel
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
    peak_time_s: float = 0.0  # when the device peak is first reached, seconds into the step

    def stream(self, name: str) -> tuple[Interval, ...]:
        """The intervals of one stream, in time order."""
        return tuple(i for i in self.intervals if i.stream == name)

    def fits(self, device_budget: int, host_budget: int | None = None) -> bool:
        """True when the peaks stay within the budgets (bytes; None means no host limit)."""
        return self.peak_device_bytes <= device_budget and (
            host_budget is None or self.peak_host_bytes <= host_budget)


class _Tensor(NamedTuple):
    """A compiled `TensorRecord`: its absolute save time and copy seconds."""

    id: int
    segment: int
    nbytes: int
    offloadable: bool
    last: int
    save_t: float  # absolute save time in the step, seconds
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
            if seg.backward_working_set_bytes < 0:
                raise ValueError(f"SegmentRecord {i}: backward_working_set_bytes must be >= 0 "
                                 f"bytes, got {seg.backward_working_set_bytes}")
        self.forward_s = tuple(s.forward_s for s in segs)
        self.replay_s = tuple(s.forward_s if s.replay_s is None else s.replay_s for s in segs)
        self.backward_s = tuple(s.backward_s for s in segs)
        self.recomputable = tuple(s.recomputable for s in segs)
        self.input_bytes = tuple(s.input_bytes for s in segs)
        self.held = tuple(s.held_bytes for s in segs)
        self.working = tuple(s.backward_working_set_bytes for s in segs)
        self.input_d2h_s = tuple(costmodel.d2h_seconds(s.input_bytes, hw) for s in segs)
        self.input_h2d_s = tuple(costmodel.h2d_seconds(s.input_bytes, hw) for s in segs)
        starts, t = [], 0.0
        for f in self.forward_s:
            starts.append(t)
            t += f
        self.start = tuple(starts)
        self.end = tuple(s + f for s, f in zip(starts, self.forward_s))
        self.forward_end = t
        per_seg: list[list] = [[] for _ in range(n)]
        for t_ in profile.tensors:
            if not 0 <= t_.segment < n or t_.last < t_.segment or t_.last >= n:
                raise ValueError(f"TensorRecord {t_.id}: segment {t_.segment}, last {t_.last} "
                                 f"out of range for {n} segments")
            per_seg[t_.segment].append(t_)
        tensors = []
        for s, recs in enumerate(per_seg):
            recs.sort(key=lambda r: r.id)
            m = len(recs)
            out = []
            for k, r in enumerate(recs, 1):
                off = self.forward_s[s] * k / m if r.save_offset_s is None else r.save_offset_s
                out.append(_Tensor(r.id, s, r.nbytes, r.offloadable, r.last,
                                   self.start[s] + min(max(0.0, off), self.forward_s[s]),
                                   costmodel.d2h_seconds(r.nbytes, hw),
                                   costmodel.h2d_seconds(r.nbytes, hw), f"t{r.id}"))
            out.sort(key=lambda x: (x.save_t, x.id))
            tensors.append(tuple(out))
        self.tensors = tuple(tensors)
        self.by_id = {x.id: x for ts in self.tensors for x in ts}
        if len(self.by_id) != len(profile.tensors):
            raise ValueError("Profile.tensors: tensor ids must be unique (one record per storage)")
        self.segment_of = {i: x.segment for i, x in self.by_id.items()}
        self.offloadable_ids = frozenset(i for i, x in self.by_id.items() if x.offloadable)
        self.saved = tuple(sum(x.nbytes for x in ts) for ts in self.tensors)
        # Bytes a later segment saves again: kept even when the segment is recomputed (rule 1).
        self.cross = tuple(sum(x.nbytes for x in ts if x.last > i)
                           for i, ts in enumerate(self.tensors))
        # Bytes a replay re-materialises (rule 5): all it dropped unless the profile says less.
        self.replayed = tuple(self.saved[i] - self.cross[i] if seg.replay_bytes is None
                              else seg.replay_bytes for i, seg in enumerate(segs))
        self._rows = tuple(tuple((x.save_t, x.nbytes, x.id, x.d2h_s, x.h2d_s, x.last, x.label)
                                 for x in ts) for ts in self.tensors)
        self._keep_events = tuple(tuple((x.save_t, x.nbytes) for x in ts) for ts in self.tensors)
        self._cross_events = tuple(tuple((x.save_t, x.nbytes) for x in ts if x.last > i)
                                   for i, ts in enumerate(self.tensors))
        # Pack position of a segment's inputs: after every earlier tensor, before its own.
        keys, nxt = [0.0] * n, float(max(self.by_id, default=0) + 1)
        for s in range(n - 1, -1, -1):
            if self.tensors[s]:
                nxt = min(x.id for x in self.tensors[s])
            keys[s] = nxt - 0.5
        self._input_key = tuple(keys)

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

    def reloads(self, codes: Sequence[int], offload_ids: frozenset[int] | set[int]
                ) -> dict[int, float]:
        """Reloads by the segment that needs them first in backward: need -> H2D seconds."""
        out: dict[int, float] = {}
        for s, c in enumerate(codes):
            if c == RECOMPUTE_OFFLOAD_INPUTS and self.input_bytes[s]:
                out[s] = out.get(s, 0.0) + self.input_h2d_s[s]
            elif c == OFFLOAD:
                for x in self.tensors[s]:
                    if x.id in offload_ids:
                        out[x.last] = out.get(x.last, 0.0) + x.h2d_s
        return out

    def timeline(self, plan: Plan) -> Timeline:
        """The simulated step of `plan`."""
        return self.run(self.codes(plan), plan.offload_ids, plan.lookahead, record=True)

    # -- the simulation ------------------------------------------------------------------

    def run(self, codes: Sequence[int], offload_ids: frozenset[int] | set[int],
            lookahead: int, *, record: bool = False) -> Timeline:
        """Simulate one step (rules 1-8 of the module docstring); inputs are trusted.

        The planner calls this thousands of times, so the curve and the stream intervals are
        only built with `record=True`; without it `Timeline.memory` and `.intervals` are empty.
        """
        return self.backward(self.forward(codes, offload_ids, record), codes, lookahead)

    def forward(self, codes: Sequence[int], offload_ids: frozenset[int] | set[int],
                record: bool = False) -> Forward:
        """The forward of a step (rules 1 and 2, the memory curve up to its end): what does
        not depend on the lookahead, so that `backward` can try several on it."""
        starts, ends, inputs = self.start, self.end, self.input_bytes
        rows, keep_rows, cross_rows = self._rows, self._keep_events, self._cross_events
        intervals: list[Interval] = []
        curve: list[tuple[float, int]] = []
        frees: list[tuple[float, int]] = []  # D2H frees, in time order
        copies: list[tuple] = []  # (need, pack key, bytes, D2H end, H2D seconds, label)
        host = mem = peak = fk = 0
        peak_t = d2h_free = d2h_busy = 0.0
        for s, c in enumerate(codes):  # rules 1 and 2; memory merged as it goes (rule 8)
            if record:
                intervals.append(Interval(COMPUTE, f"fwd {s}", starts[s], ends[s]))
            if c == OFFLOAD:
                es = ends[s]
                for t, nbytes, tid, d2h_s, h2d_s, last, label in rows[s]:
                    while fk < len(frees) and frees[fk][0] <= t:
                        mem += frees[fk][1]
                        if record:
                            curve.append((frees[fk][0], mem))
                        fk += 1
                    mem += nbytes
                    if mem > peak:
                        peak, peak_t = mem, t
                    if record:
                        curve.append((t, mem))
                    if tid in offload_ids:
                        st = d2h_free if d2h_free > t else t
                        d2h_free = st + d2h_s
                        d2h_busy += d2h_s
                        if record:
                            intervals.append(Interval(D2H, label, st, d2h_free))
                        frees.append((d2h_free if d2h_free > es else es, -nbytes))
                        host += nbytes
                        copies.append((last, tid, nbytes, d2h_free, h2d_s, label))
                continue
            events = keep_rows[s]
            if c >= RECOMPUTE:
                events = cross_rows[s]
                ib = inputs[s]
                if ib or self.held[s]:
                    ts = starts[s]
                    events = ((ts, ib + self.held[s]),) + events
                    if c == RECOMPUTE_OFFLOAD_INPUTS and ib:
                        es = ends[s]
                        st = d2h_free if d2h_free > ts else ts
                        d2h_free = st + self.input_d2h_s[s]
                        d2h_busy += self.input_d2h_s[s]
                        if record:
                            intervals.append(Interval(D2H, f"in {s}", st, d2h_free))
                        frees.append((d2h_free if d2h_free > es else es, -ib))
                        host += ib
                        copies.append((s, self._input_key[s], ib, d2h_free,
                                       self.input_h2d_s[s], f"in {s}"))
            for t, nbytes in events:
                while fk < len(frees) and frees[fk][0] <= t:
                    mem += frees[fk][1]
                    if record:
                        curve.append((frees[fk][0], mem))
                    fk += 1
                mem += nbytes
                if mem > peak:
                    peak, peak_t = mem, t
                if record:
                    curve.append((t, mem))
        copies.sort(key=_STREAM_ORDER, reverse=True)  # rule 3: latest need, reverse pack
        return Forward(copies, frees, fk, mem, peak, peak_t, host, d2h_busy, intervals, curve,
                       record)

    def backward(self, fw: Forward, codes: Sequence[int], lookahead: int) -> Timeline:
        """The step of `fw`'s forward followed by its backward at `lookahead` (rules 3-8)."""
        n = self.n
        fwd, bwd, saved, cross, inputs = (self.replay_s, self.backward_s, self.saved,
                                          self.cross, self.input_bytes)
        working = self.working
        record = fw.record
        intervals = list(fw.intervals) if record else fw.intervals
        curve = list(fw.curve) if record else fw.curve
        copies, frees = fw.copies, fw.frees
        fk, nf, mem, peak, peak_t = fw.fk, len(fw.frees), fw.mem, fw.peak, fw.peak_t
        t = forward_end = self.forward_end
        ready = [0.0] * n
        h2d_free = h2d_busy = exposed = recompute_s = 0.0
        k, ncopies, last = 0, len(copies), n - 1
        for j in range(last, -1, -1):
            # a positive event at time t: apply the D2H frees up to t first (rule 8)
            while fk < nf and frees[fk][0] <= t:
                mem += frees[fk][1]
                if record:
                    curve.append((frees[fk][0], mem))
                fk += 1
            while k < ncopies and copies[k][0] + lookahead >= j:  # rule 3
                need, _, nbytes, d2h_end, h2d_s, label = copies[k]
                k += 1
                mem += nbytes
                if mem > peak:
                    peak, peak_t = mem, t
                if record:
                    curve.append((t, mem))
                st = h2d_free if h2d_free > t else t
                if d2h_end > st:
                    st = d2h_end
                h2d_free = st + h2d_s
                h2d_busy += h2d_s
                if record:
                    intervals.append(Interval(H2D, label, st, h2d_free))
                if h2d_free > ready[need]:
                    ready[need] = h2d_free
            if ready[j] > t:  # rule 4
                if record:
                    intervals.append(Interval(COMPUTE, f"stall {j}", t, ready[j]))
                exposed += ready[j] - t
                t = ready[j]
            c = codes[j]
            held = saved[j] + working[j]
            grow = working[j]
            if c >= RECOMPUTE:  # rule 5
                if record:
                    intervals.append(Interval(COMPUTE, f"recompute {j}", t, t + fwd[j]))
                grow_at = t
                t += fwd[j]
                recompute_s += fwd[j]
                replayed = self.replayed[j]
                held += inputs[j] + self.held[j] + replayed - (saved[j] - cross[j])
                while fk < nf and frees[fk][0] <= grow_at:
                    mem += frees[fk][1]
                    if record:
                        curve.append((frees[fk][0], mem))
                    fk += 1
                mem += replayed
                if mem > peak:
                    peak, peak_t = mem, grow_at
                if record:
                    curve.append((grow_at, mem))
            if grow:  # rule 6
                while fk < nf and frees[fk][0] <= t:
                    mem += frees[fk][1]
                    if record:
                        curve.append((frees[fk][0], mem))
                    fk += 1
                mem += grow
                if mem > peak:
                    peak, peak_t = mem, t
                if record:
                    curve.append((t, mem))
            if record:
                intervals.append(Interval(COMPUTE, f"bwd {j}", t, t + bwd[j]))
            t += bwd[j]
            while fk < nf and frees[fk][0] <= t:
                mem += frees[fk][1]
                if record:
                    curve.append((frees[fk][0], mem))
                fk += 1
            mem -= held  # rule 7
            if record:
                curve.append((t, mem))
        if record:
            for time, delta in frees[fk:]:
                mem += delta
                curve.append((time, mem))
            intervals.sort(key=lambda i: (i.start, i.end))
        return Timeline(
            step_s=t, forward_s=forward_end, backward_s=t - forward_end, exposed_s=exposed,
            recompute_s=recompute_s, d2h_busy_s=fw.d2h_busy, h2d_busy_s=h2d_busy,
            peak_device_bytes=peak, peak_host_bytes=fw.host, offloaded_bytes=fw.host,
            memory=tuple(curve), intervals=tuple(intervals), peak_time_s=peak_t)


class Forward(NamedTuple):
    """What `Simulator.forward` leaves for `Simulator.backward`: the reloads in H2D stream
    order, the D2H frees (time order) and how many of them the forward applied, the device
    bytes and peak at its end, and the host bytes, D2H busy seconds and records."""

    copies: list
    frees: list
    fk: int
    mem: int
    peak: int
    peak_t: float
    host: int
    d2h_busy: float
    intervals: list
    curve: list
    record: bool


_STREAM_ORDER = operator.itemgetter(0, 1)


def issue_schedule(needs: dict[int, int], n: int, lookahead: int) -> tuple[tuple[int, ...], ...]:
    """Rule 3 at segment level: for each segment j, the segments with a reload issued when
    backward reaches j. `needs` maps a segment to the needs of its reloads (an int, or a set of
    them when its tensors are saved again later); a reload with need m is issued at segment
    min(n - 1, m + lookahead). At one point segments come highest first.
    """
    points: list[set[int]] = [set() for _ in range(n)]
    for s, need in needs.items():
        for m in (need if isinstance(need, (set, frozenset, tuple)) else (need,)):
            points[min(n - 1, m + lookahead)].add(s)
    return tuple(tuple(sorted(p, reverse=True)) for p in points)


def simulate(profile: Profile, plan: Plan, hardware: Hardware | None = None) -> Timeline:
    """Simulate one step of `profile` under `plan`.

    `hardware=None` costs copies with the bandwidths measured in the profile; a `Hardware`
    replaces the link (compute times always come from the profile). Selective segments
    (`SegmentPlan.store_ops`) are costed by `oplevel.apply`.
    """
    stores = {i: sp.store_ops for i, sp in enumerate(plan.segments) if sp.store_ops}
    for i in stores:
        if plan.segments[i].action is not Action.RECOMPUTE:
            raise ValueError(f"Plan: segment {i} has store_ops but its action is "
                             f"{plan.segments[i].action.name}; only RECOMPUTE stores op outputs")
    return Simulator(oplevel.apply(profile, stores), hardware).timeline(plan)
