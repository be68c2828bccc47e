"""Pipeline parallelism: the schedule, the activations each stage holds at once, and a plan.

A model cut into N stages (one per device) runs M micro-batches per step. Each stage runs its
forward (F) and backward (B) of every micro-batch in the schedule's order, as PyTorch's
`torch.distributed.pipelining` does:

- GPipe: F0 .. F(M-1), then B0 .. B(M-1). Every stage holds all M micro-batches' activations.
- 1F1B: stage i (0-based) runs w_i = min(N - i, M) forwards (warm-up), then alternates one
  backward and one forward (B0 Fw B1 F(w+1) ...), then runs the backwards left (cool-down). It
  holds at most w_i micro-batches at once: stage 0 the most, the last stage one.

A micro-batch's activations live from its forward to its backward, and on the first stages
that is the longest (the backward comes back through every later stage first): there an
offload has the most time to hide (PipeOffload, ICML'25: offloading the longest-lived first
hides most bytes). So each micro-batch of each stage gets its own action (`MicroBatchCost`, a
`scheduler.Plan` of the stage's profile for one micro-batch), and `plan_pipeline` chooses them
under a device budget that covers every live micro-batch at once.

The simulation (`simulate_pipeline`), all stages together; units: seconds and bytes:

1. Compute, per stage, in schedule order: F(i, j) starts when stage i is free and F(i - 1, j)
   has ended; B(i, j) when stage i is free, B(i + 1, j) has ended (the last stage: its own
   F(i, j)) and its reload has arrived. F lasts the stage's forward seconds (sum of
   `SegmentRecord.forward_s`), B its backward seconds plus the forward seconds of the
   segments the micro-batch recomputes. Point-to-point sends take no time.
2. Copies, one D2H and one H2D stream per stage: the bytes a micro-batch moves are copied to
   the host once its forward has ended (in forward order), and back in the order the schedule
   runs backward, each reload issued as late as still arrives when its backward could start
   (the schedule is static, so a stage knows when that is), never before its D2H has ended
   (DESIGN.md §4, rule 2) nor while the previous reload holds the stream. A copy of x bytes in
   n tensors takes n * transfer_latency_s + x / bw (the alpha-beta model of `costmodel`, with
   the profile's measured link).
3. Device bytes of a stage: a micro-batch holds all it saves from the start of its forward until
   its D2H ends, then only what stays (`resident`), then all again from its reload's issue to
   the end of its backward; a backward that recomputes holds the largest replayed segment's
   bytes on top while it runs. Frees at a moment count before allocations at that moment.
4. Host bytes of a stage: what a micro-batch moves, from its D2H's start to its backward's end.

The plan (`plan_pipeline`): start from keeping everything; while a stage is over budget, take
the change of one micro-batch's action on it that removes the most byte-seconds over budget
per second it adds to the step (a change that adds nothing scores infinitely; byte-seconds,
unlike the peak, fall with each micro-batch that holds less where the peak recurs), ties to
fewer replayed seconds (a copy the link hides before a replay hidden in a stage's idle time),
then to the longest-lived micro-batch. So hidden offloads come first, the oldest first, and
recompute where the link cannot hide the bytes. Then single actions change while the key
(overrun, step, replayed seconds, bytes moved) improves. If that stalls over budget, the
least-memory assignment (every micro-batch on its stage's option that keeps the fewest bytes)
is relaxed the same way instead: the plan is never over budget when that assignment fits. Nor
is it slower than full recompute, offload-all or recompute with the inputs offloaded when one
of them fits: it is then relaxed from there.

Pure Python; stages are cut from a `Profile` (`split_stages`), and the per-micro-batch options
include `scheduler.plan`'s plan for one micro-batch under the stage's budget share.
"""
from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass
from typing import Sequence

from . import oplevel
from .plan import Action, Plan, SegmentPlan
from .planner import plan as plan_one
from .profile import Profile, SegmentRecord, TensorRecord

_EPS = 1e-12  # seconds below which a step-time change counts as none


class Schedule(enum.Enum):
    """The order in which each stage runs its micro-batches' forwards and backwards."""

    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"


@dataclass(frozen=True)
class Op:
    """One forward or backward of one micro-batch on one stage."""

    forward: bool
    microbatch: int

    def __str__(self) -> str:
        return f"{'F' if self.forward else 'B'}{self.microbatch}"


def stage_order(schedule: Schedule, stages: int, microbatches: int, stage: int) -> tuple[Op, ...]:
    """The ops stage `stage` runs, in order (module docstring)."""
    _check_shape("stage_order", stages, microbatches)
    if not 0 <= stage < stages:
        raise ValueError(f"stage_order: stage must be in [0, {stages}), got {stage!r}")
    m = microbatches
    if schedule is Schedule.GPIPE:
        return tuple(Op(True, j) for j in range(m)) + tuple(Op(False, j) for j in range(m))
    warmup = min(stages - stage, m)
    ops = [Op(True, j) for j in range(warmup)]
    for k in range(m - warmup):
        ops += [Op(False, k), Op(True, warmup + k)]
    return tuple(ops) + tuple(Op(False, j) for j in range(m - warmup, m))


@functools.lru_cache(maxsize=64)
def orders(schedule: Schedule, stages: int, microbatches: int) -> tuple[tuple[Op, ...], ...]:
    """`stage_order` of every stage."""
    return tuple(stage_order(schedule, stages, microbatches, i) for i in range(stages))


def live_microbatches(order: Sequence[Op]) -> int:
    """The most micro-batches whose forward has run and backward has not, over `order`."""
    live = peak = 0
    for op in order:
        live += 1 if op.forward else -1
        peak = max(peak, live)
    return peak


def split_stages(profile: Profile, stages: int) -> tuple[Profile, ...]:
    """`profile` (one micro-batch of the whole model) cut into `stages` contiguous stages.

    The recomputable segments (the layers) are dealt out evenly, the first stages taking one
    more when they do not divide; the segments before the first layer go with stage 0, those
    after a layer with that layer's stage. Segment indices restart at 0 in each stage; tensor
    ids are kept; a tensor saved again in a later stage is cut at its stage's end (a stage
    never reads another's saved tensors)."""
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"split_stages: stages must be a positive int, got {stages!r}")
    layers = [s.index for s in profile.segments if s.recomputable]
    if len(layers) < stages:
        raise ValueError(f"split_stages: {len(layers)} recomputable segments cannot fill {stages} "
                         "stages; use fewer stages")
    per, extra = divmod(len(layers), stages)
    first_layer_of = []
    k = 0
    for i in range(stages):
        first_layer_of.append(layers[k])
        k += per + (1 if i < extra else 0)
    stage_of = [max([i for i, first in enumerate(first_layer_of) if first <= seg.index], default=0)
                for seg in profile.segments]
    out = []
    for i in range(stages):
        segs = [s for s in profile.segments if stage_of[s.index] == i]
        base = segs[0].index
        local = {s.index: s.index - base for s in segs}
        last_local = len(segs) - 1

        def last(t: TensorRecord) -> int:
            if t.last_segment < 0:
                return -1
            return local[t.last] if stage_of[t.last] == i else last_local

        tensors = tuple(TensorRecord(t.id, local[t.segment], t.nbytes, t.offloadable, last(t))
                        for t in profile.tensors if stage_of[t.segment] == i)
        out.append(Profile(
            segments=tuple(SegmentRecord(local[s.index], s.name, s.forward_s, s.backward_s, s.recomputable,
                                         s.input_bytes) for s in segs),
            tensors=tensors, bw_d2h=profile.bw_d2h, bw_h2d=profile.bw_h2d,
            transfer_latency_s=profile.transfer_latency_s,
            signature=f"{profile.signature}:stage{i}of{stages}", meta=dict(profile.meta, stage=i)))
    return tuple(out)


# -- what one micro-batch costs a stage ------------------------------------------------------------

@dataclass(frozen=True)
class MicroBatchCost:
    """One micro-batch of one stage under one `Plan` of the stage's profile (bytes, seconds)."""

    label: str  # K keep, O offload, P the single-micro-batch planner's plan, R recompute, Ri recompute + offload
    plan: Plan
    resident: int  # device bytes kept from its forward to its backward
    moved: int  # bytes copied to the host after its forward and back before its backward
    copies: int  # copies each way (each pays transfer_latency_s)
    replay_s: float  # forward seconds replayed before its backward (recomputed segments)
    transient: int  # extra device bytes while its backward runs (the largest replayed segment)


def cost_of(profile: Profile, plan: Plan, label: str) -> MicroBatchCost:
    """The figures of `plan` for one micro-batch of `profile`. A selective segment (one that
    stores op outputs) holds them from its forward to its backward and replays only the rest."""
    profile = oplevel.apply(profile, oplevel.stores_of(plan))
    resident = moved = copies = transient = 0
    replay = 0.0
    saved = [0] * len(profile.segments)
    for t in profile.tensors:
        saved[t.segment] += t.nbytes
    for t in profile.tensors:
        sp = plan.segments[t.segment]
        if sp.action is Action.RECOMPUTE:
            if t.last > t.segment:  # saved again by a later segment: kept, as `simulate` does
                resident += t.nbytes
            continue
        if sp.action is Action.OFFLOAD and t.id in plan.offload_ids:
            moved += t.nbytes
            copies += 1
        else:
            resident += t.nbytes
    for seg, sp in zip(profile.segments, plan.segments):
        if sp.action is not Action.RECOMPUTE:
            continue
        replay += seg.forward_s if seg.replay_s is None else seg.replay_s
        resident += seg.held_bytes
        transient = max(transient, saved[seg.index] if seg.replay_bytes is None else seg.replay_bytes)
        if sp.offload_inputs and seg.input_bytes:
            moved += seg.input_bytes
            copies += 1
        else:
            resident += seg.input_bytes
    return MicroBatchCost(label, plan, resident, moved, copies, replay, transient)


def uniform_costs(profile: Profile) -> dict[str, MicroBatchCost]:
    """The whole-stage options for one micro-batch: K (keep all), O (offload every offloadable
    tensor), R (recompute every recomputable segment, keep the rest), Ri (recompute with the
    inputs offloaded, offload the rest). Options that move or drop nothing are left out."""
    segs = profile.segments
    offloadable = frozenset(t.id for t in profile.tensors if t.offloadable)
    has = {s.index for s in segs if any(t.offloadable and t.segment == s.index for t in profile.tensors)}

    def make(codes, ids):
        return Plan(segments=tuple(codes), offload_ids=frozenset(ids), signature=profile.signature)

    keep = make([SegmentPlan(Action.KEEP)] * len(segs), ())
    options = {"K": cost_of(profile, keep, "K")}
    if offloadable:
        p = make([SegmentPlan(Action.OFFLOAD if s.index in has else Action.KEEP) for s in segs], offloadable)
        options["O"] = cost_of(profile, p, "O")
    if any(s.recomputable for s in segs):
        p = make([SegmentPlan(Action.RECOMPUTE if s.recomputable else Action.KEEP) for s in segs], ())
        options["R"] = cost_of(profile, p, "R")
        ids = frozenset(t.id for t in profile.tensors if t.offloadable and not segs[t.segment].recomputable)
        p = make([SegmentPlan(Action.RECOMPUTE, offload_inputs=True) if s.recomputable else
                  SegmentPlan(Action.OFFLOAD if s.index in has else Action.KEEP) for s in segs], ids)
        options["Ri"] = cost_of(profile, p, "Ri")
    return options


# -- the simulation --------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageTimeline:
    """One stage's step (seconds, bytes)."""

    live: int  # the most micro-batches whose activations it holds at once
    peak_device_bytes: int
    peak_host_bytes: int
    busy_s: float  # compute: forwards, backwards and replays
    replay_s: float
    stall_s: float  # backwards waiting for their reloads
    end_s: float  # when its last backward ends
    lifetimes: tuple[float, ...]  # per micro-batch: its backward's end less its forward's start
    memory: tuple[tuple[float, int], ...]  # (time, device bytes from then on), in time order

    def excess(self, budget: int) -> float:
        """Byte-seconds the device bytes spend above `budget` (0 exactly when the peak fits)."""
        return sum(max(0, level - budget) * (t1 - t0)
                   for (t0, level), (t1, _) in zip(self.memory, self.memory[1:]))


@dataclass(frozen=True)
class PipelineTimeline:
    """The simulated step of a pipeline: its length and each stage's figures."""

    step_s: float
    stages: tuple[StageTimeline, ...]
    moved_bytes: int  # summed over stages and micro-batches


def simulate_pipeline(stages: Sequence[Profile], costs: Sequence[Sequence[MicroBatchCost]],
                      schedule: Schedule) -> PipelineTimeline:
    """One step of the pipeline: stage i runs micro-batch j under `costs[i][j]` (module docstring)."""
    n = len(stages)
    m = len(costs[0]) if costs else 0
    if len(costs) != n or any(len(c) != m for c in costs):
        raise ValueError(f"simulate_pipeline: costs must be {n} stages x the same number of micro-batches")
    _check_shape("simulate_pipeline", n, m)
    ords = orders(schedule, n, m)
    fwd_s = [sum(s.forward_s for s in p.segments) for p in stages]
    bwd_s = [sum(s.backward_s for s in p.segments) for p in stages]
    f_start = [[math.nan] * m for _ in range(n)]
    f_end = [[math.nan] * m for _ in range(n)]
    b_end = [[math.nan] * m for _ in range(n)]
    events: list[list[tuple[float, int]]] = [[] for _ in range(n)]  # device (time, delta)
    host: list[list[tuple[float, int]]] = [[] for _ in range(n)]
    d2h_end = [[0.0] * m for _ in range(n)]
    free = [0.0] * n
    d2h_free = [0.0] * n
    h2d_free = [0.0] * n
    busy = [0.0] * n
    replay = [0.0] * n
    stall = [0.0] * n
    pos = [0] * n
    remaining = n * 2 * m
    while remaining:
        progressed = False
        for i in range(n):
            while pos[i] < len(ords[i]):
                op = ords[i][pos[i]]
                j, c = op.microbatch, costs[i][op.microbatch]
                lat = stages[i].transfer_latency_s
                if op.forward:
                    dep = f_end[i - 1][j] if i > 0 else 0.0
                    if math.isnan(dep):
                        break
                    start = max(free[i], dep)
                    end = start + fwd_s[i]
                    f_start[i][j], f_end[i][j] = start, end
                    events[i].append((start, c.resident + c.moved))
                    if c.moved:
                        d2h_start = max(end, d2h_free[i])
                        d2h_free[i] = d2h_end[i][j] = d2h_start + c.copies * lat + c.moved / stages[i].bw_d2h
                        events[i].append((d2h_end[i][j], -c.moved))
                        host[i].append((d2h_start, c.moved))
                else:
                    dep = b_end[i + 1][j] if i < n - 1 else f_end[i][j]
                    if math.isnan(dep):
                        break
                    ready = max(free[i], dep)
                    start = ready
                    if c.moved:  # as late as arrives in time, never before the D2H ended
                        h2d = c.copies * lat + c.moved / stages[i].bw_h2d
                        issue = max(ready - h2d, d2h_end[i][j], h2d_free[i])
                        h2d_free[i] = issue + h2d
                        events[i].append((issue, c.moved))
                        start = max(ready, h2d_free[i])
                    stall[i] += start - ready
                    end = start + c.replay_s + bwd_s[i]
                    b_end[i][j] = end
                    replay[i] += c.replay_s
                    if c.transient:
                        events[i] += [(start, c.transient), (end, -c.transient)]
                    events[i].append((end, -(c.resident + c.moved)))
                    if c.moved:
                        host[i].append((end, -c.moved))
                busy[i] += end - start
                free[i] = end
                pos[i] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("simulate_pipeline: the schedule deadlocked; this is a bug in scheduler")
    curves = [_curve(e) for e in events]
    out = tuple(StageTimeline(live_microbatches(ords[i]), max(v for _, v in curves[i]),
                              max(v for _, v in _curve(host[i])), busy[i], replay[i], stall[i], free[i],
                              tuple(b_end[i][j] - f_start[i][j] for j in range(m)), curves[i])
                for i in range(n))
    moved = sum(c.moved for row in costs for c in row)
    return PipelineTimeline(max(s.end_s for s in out), out, moved)


def _curve(events: list[tuple[float, int]]) -> tuple[tuple[float, int], ...]:
    """The running sum of (time, delta) events, one point per distinct time (frees before
    allocations at one time, so a free and an allocation at one moment never add up)."""
    out: list[tuple[float, int]] = [(0.0, 0)]
    level = 0
    for t, delta in sorted(events):
        level += delta
        if out[-1][0] == t:
            out[-1] = (t, level)
        else:
            out.append((t, level))
    return tuple(out)


# -- the plan --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PipelinePlan:
    """Per stage, per micro-batch, the chosen action; its simulated step; notes."""

    costs: tuple[tuple[MicroBatchCost, ...], ...]
    timeline: PipelineTimeline
    fits: bool  # every stage within the budgets it was planned for (a uniform plan has none: True)
    notes: tuple[str, ...] = ()

    def mix(self) -> str:
        """Each stage's actions in micro-batch order (K keep, O offload, P planned, R recompute,
        r recompute with inputs offloaded), stages separated by '/'."""
        return "/".join("".join("r" if c.label == "Ri" else c.label for c in row) for row in self.costs)


def uniform_pipeline(stages: Sequence[Profile], schedule: Schedule, microbatches: int,
                     label: str) -> PipelinePlan:
    """Every micro-batch of every stage under one whole-stage option ("K", "O", "R" or "Ri";
    a stage without it keeps)."""
    costs = []
    for p in stages:
        options = uniform_costs(p)
        costs.append((options.get(label, options["K"]),) * microbatches)
    costs = tuple(costs)
    return PipelinePlan(costs, simulate_pipeline(stages, costs, schedule), fits=True)


def plan_pipeline(stages: Sequence[Profile], schedule: Schedule, microbatches: int,
                  device_budget: int, host_budget: int | None = None) -> PipelinePlan:
    """Each micro-batch's action on each stage, every stage under `device_budget` and
    `host_budget` (bytes, per stage; None: no host limit). Method in the module docstring.
    Never raises for a budget that cannot be met: the plan then says so (`fits`, `notes`)."""
    for name, value in (("device_budget", device_budget), ("host_budget", host_budget)):
        if value is None and name == "host_budget":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"plan_pipeline: {name} must be a non-negative int of bytes, got {value!r}")
    search = _Search(stages, schedule, microbatches, device_budget,
                     math.inf if host_budget is None else host_budget)
    return search.solve()


class _Search:
    """All state of one `plan_pipeline` call: the options, the budgets, an evaluation cache.

    A state is, per stage, per micro-batch, an index into that stage's options, which are sorted
    from the most bytes held between forward and backward (K, index 0) to the least."""

    def __init__(self, stages: Sequence[Profile], schedule: Schedule, m: int, device_budget: int,
                 host_budget: float):
        _check_shape("plan_pipeline", len(stages), m)
        self.stages, self.schedule, self.m = tuple(stages), schedule, m
        self.device_budget, self.host_budget = device_budget, host_budget
        live = [live_microbatches(o) for o in orders(schedule, len(stages), m)]
        self.options: list[list[MicroBatchCost]] = []
        for p, k in zip(self.stages, live):
            opts = uniform_costs(p)
            # the single-micro-batch planner, under an equal share of the budgets
            host_share = None if math.isinf(host_budget) else int(host_budget // k)
            planned = cost_of(p, plan_one(p, device_budget // k, host_share), "P")
            if all((planned.plan.segments, planned.plan.offload_ids) != (o.plan.segments, o.plan.offload_ids)
                   for o in opts.values()):
                opts["P"] = planned
            self.options.append(sorted(opts.values(), key=lambda c: (-c.resident, -c.moved)))
        self._cache: dict[tuple, tuple[PipelineTimeline, float]] = {}
        keep = self.state_of("K")
        # micro-batches of each stage, longest-lived first (ties: earlier first): "oldest first"
        self.ages = [sorted(range(m), key=lambda j, _s=s: -_s.lifetimes[j]) for s in self.eval(keep)[0].stages]

    def state_of(self, label: str) -> tuple[tuple[int, ...], ...]:
        """Every micro-batch under the option `label` (index 0, keep, where a stage lacks it)."""
        return tuple((next((k for k, c in enumerate(opts) if c.label == label), 0),) * self.m
                     for opts in self.options)

    def costs(self, state) -> tuple[tuple[MicroBatchCost, ...], ...]:
        return tuple(tuple(self.options[i][k] for k in row) for i, row in enumerate(state))

    def eval(self, state) -> tuple[PipelineTimeline, float]:
        """The simulated step of `state` and its bytes over the budgets."""
        hit = self._cache.get(state)
        if hit is None:
            tl = simulate_pipeline(self.stages, self.costs(state), self.schedule)
            hit = self._cache[state] = (tl, sum(self.over(s) for s in tl.stages))
        return hit

    def over(self, stage: StageTimeline) -> float:
        """A stage's bytes over the budgets (host bytes count as device bytes)."""
        return (max(0, stage.peak_device_bytes - self.device_budget)
                + max(0.0, stage.peak_host_bytes - self.host_budget))

    def key(self, state) -> tuple[float, float, float, int]:
        """What the search lowers, in order: budget overrun, step seconds, seconds replayed (a
        replay in a stage's idle time is free for the step but not for the device: a hidden
        copy is preferred), bytes moved."""
        tl, over = self.eval(state)
        return over, tl.step_s, sum(s.replay_s for s in tl.stages), tl.moved_bytes

    @staticmethod
    def better(a: tuple, b: tuple) -> bool:
        """Whether key `a` improves on key `b` (seconds within a relative 1e-9 tie)."""
        for x, y in zip(a, b):
            if isinstance(x, float) and abs(x - y) <= 1e-9 * max(abs(x), abs(y)):
                continue
            if x != y:
                return x < y
        return False

    @staticmethod
    def change(state, i: int, j: int, k: int):
        return state[:i] + (state[i][:j] + (k,) + state[i][j + 1:],) + state[i + 1:]

    def excess(self, tl: PipelineTimeline) -> float:
        """Byte-seconds over the device budget, summed over stages: unlike the peak, it falls
        with every micro-batch that holds less while the peak is reached at several moments."""
        return sum(s.excess(self.device_budget) for s in tl.stages)

    def shed(self, state):
        """While over budget, apply the change on a stage over budget that removes the most
        byte-seconds over budget (without raising the overrun) per second it adds to the step
        (an addition of none scores infinity), ties to fewer replayed seconds per byte-second (a
        hidden copy before a replay in idle time), then to more byte-seconds, then to the
        oldest micro-batch, then to the option holding more."""
        while True:
            tl, over = self.eval(state)
            if over <= 0:
                return state
            area = self.excess(tl)
            best, best_score = None, None
            for i, row in enumerate(state):
                if not self.over(tl.stages[i]):
                    continue
                for rank, j in enumerate(self.ages[i]):
                    for k in range(row[j] + 1, len(self.options[i])):  # options that keep fewer bytes
                        cand = self.change(state, i, j, k)
                        ctl, cover = self.eval(cand)
                        gain = area - self.excess(ctl)
                        if cover > over or (gain <= 0 and cover == over):
                            continue
                        gain = max(gain, _EPS)
                        added = ctl.step_s - tl.step_s
                        replayed = sum(x.replay_s for x in ctl.stages) - sum(x.replay_s for x in tl.stages)
                        score = (math.inf if added <= _EPS else gain / added, -max(0.0, replayed) / gain,
                                 gain, -rank, -k)
                        if best_score is None or score > best_score:
                            best, best_score = cand, score
            if best is None:
                return state
            state = best

    def relax(self, state):
        """Change single actions while the key improves (never past the budget once within it)."""
        improved = True
        while improved:
            improved = False
            for i in range(len(self.stages)):
                for j in self.ages[i]:
                    for k in range(len(self.options[i])):
                        cand = self.change(state, i, j, k)
                        if cand != state and self.better(self.key(cand), self.key(state)):
                            state, improved = cand, True
        return state

    def solve(self) -> PipelinePlan:
        keep = self.state_of("K")
        notes = []
        if self.eval(keep)[1] <= 0:
            best = keep
            notes.append("keep-all fits every stage's device budget: nothing moves")
        else:
            best = self.relax(self.shed(keep))
            least = tuple((len(opts) - 1,) * self.m for opts in self.options)
            if self.eval(best)[1] > 0 and self.eval(least)[1] < self.eval(best)[1]:
                best = self.relax(least)
            for label in ("R", "O", "Ri"):  # never worse than a uniform plan that fits
                uniform = self.state_of(label)
                if self.eval(uniform)[1] <= 0 and self.better(self.key(uniform), self.key(best)):
                    best = self.relax(uniform)
            if self.eval(best)[1] > 0:
                notes.append("infeasible: even the least-memory actions exceed a stage's budget; "
                             "returning the least-overrun plan found")
        tl, over = self.eval(best)
        return PipelinePlan(self.costs(best), tl, over <= 0, tuple(notes))


def _check_shape(api: str, stages: int, microbatches: int) -> None:
    for name, value in (("stages", stages), ("microbatches", microbatches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{api}: {name} must be a positive int, got {value!r}")
