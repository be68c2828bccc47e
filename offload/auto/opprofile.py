"""The op profile: each op of a region call, its output bytes and its forward time.

policy="auto" runs its warm-up forward (the first profiling forward of an input shape, not
timed for the plan) with an `OpProbe` around every region call: a dispatch mode that times each
op whose outputs selective recompute could store (selective.py's `_stored_ok`: not a view, not
random) with the backend's marks (host clock on the CPU, CUDA events on a GPU) and notes the
distinct storage bytes of its outputs. When the region's forward returns, the outputs whose
storages are still alive are the ones autograd saved (the recompute frame holds every tensor
the region saved until its forward ends; every other intermediate has died): their bytes are
`OpRecord.saved_bytes`, which storing them costs nothing extra in the replay.

The warm-up step's times carry first-call costs (allocator, kernel selection), so `op_records`
keeps only their shares: per op position the median over the region calls with the same op
sequence, scaled so each segment's ops add up to its forward time measured on the timed step.

A selective segment pays more than its ops: its forward runs under selective.py's `SaveOps`, its
replay under `ReplayOps`, Python dispatch modes that see every op the region dispatches (views
too), a few Python calls each. `OpProbe` counts those ops (`SegmentRecord.dispatched_ops`) and
`dispatch_overhead_s` measures the seconds per op once per profile, on tiny ops so the op's own
work is negligible (`Profile.op_dispatch_s`); the planner charges n x that to a selective
segment's forward and to its replay (scheduler/oplevel.py). Measured on this 2-core CPU: about
10 us per op on tiny tensors, 20-40 us per op inside a 256-wide GPT block (65 ops a block; about
10% of its 20 ms forward on one thread), so the figure is a lower bound there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Any, Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from scheduler.profile import OpRecord, Profile

from ..core.dtensor import storage
from ..core.selective import _NOT_ASKED, OpPolicy, OpStore, ReplayOps, SaveOps, _stored_ok as storable

CALIBRATION_OPS = 64  # tiny ops timed per run by `dispatch_overhead_s`
CALIBRATION_RUNS = 5  # runs per mode; the fastest counts (the least disturbed by other work)


class OpProbe(TorchDispatchMode):
    """One region call's ops, in the order selective recompute numbers them."""

    def __init__(self, mark: Callable[[], object]):
        super().__init__()
        self.mark = mark
        # per op: name, output bytes, start mark, end mark, (weak ref, bytes) of its output storages
        self.ops: list[tuple[str, int, object, object, list[tuple[StorageWeakRef, int]]]] = []
        self.saved: list[int] = []  # per op: bytes of its outputs autograd saved (set on exit)
        self.dispatched = 0  # every op seen, views and random ops too (what SaveOps sees)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.dispatched += 1
        if func in _NOT_ASKED or not storable(func):  # numbered as StoreOps numbers them
            return func(*args, **kwargs)
        start = self.mark()
        out = func(*args, **kwargs)
        end = self.mark()
        refs: dict[int, tuple[StorageWeakRef, int]] = {}
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor):
                try:
                    s = storage(x)
                except (NotImplementedError, RuntimeError):  # storage-less: nothing to hold
                    continue
                refs.setdefault(s._cdata, (StorageWeakRef(s), s.nbytes()))
        self.ops.append((str(func), sum(n for _, n in refs.values()), start, end,
                         [(r, n) for r, n in refs.values()]))
        return out

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.saved = [sum(n for ref, n in refs if not ref.expired()) for *_, refs in self.ops]
        self.ops = [op[:4] + ([],) for op in self.ops]  # the weak refs are no longer needed

    def timed(self, seconds: Callable[[object], float | None]) -> list[tuple[str, int, int, float]]:
        """(name, output bytes, saved bytes, seconds) per op; marks not resolved count 0 s."""
        out = []
        for (name, nbytes, start, end, _), saved in zip(self.ops, self.saved or [0] * len(self.ops)):
            a, b = seconds(start), seconds(end)
            out.append((name, nbytes, saved, max(0.0, b - a) if a is not None and b is not None else 0.0))
        return out


def _never_store(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.PREFER_RECOMPUTE


def dispatch_overhead_s(device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds selective recompute's dispatch modes add per op, host clock: `CALIBRATION_OPS`
    one-element adds on `device`, run plain, under `SaveOps` (a policy that stores nothing) and
    under `ReplayOps` (an empty store), fastest of `CALIBRATION_RUNS` each; the mean of the two
    modes' excess over plain, per op, at least 0. Under no_grad: nothing is saved. On a GPU the
    adds only launch, so this is the host's cost per op (hidden there behind large kernels)."""
    store = OpStore(OpPolicy(_never_store, on_replay=False))
    modes = (lambda: contextlib.nullcontext(),
             lambda: SaveOps(store, lambda x: None, lambda x: None, lambda: False),
             lambda: ReplayOps(store, lambda: True))
    x = torch.zeros(1, device=device)
    best = [float("inf")] * len(modes)
    with torch.no_grad():
        for _ in range(CALIBRATION_RUNS):
            for m, mode in enumerate(modes):
                y = x
                start = clock()
                with mode():
                    for _ in range(CALIBRATION_OPS):
                        y = y + 1
                best[m] = min(best[m], clock() - start)
    plain, save, replay = best
    return max(0.0, (save + replay) / 2 - plain) / CALIBRATION_OPS


def op_records(probes: dict[int, OpProbe], seconds: Callable[[object], float | None],
               forward_s: dict[int, float]) -> dict[int, tuple[OpRecord, ...]]:
    """Per segment, its `OpRecord`s: op times as shares (the median per position over the
    segments with the same op sequence), scaled to the segment's `forward_s` (seconds)."""
    timed = {seg: probe.timed(seconds) for seg, probe in probes.items()}
    groups: dict[tuple, list[int]] = {}
    for seg, ops in timed.items():
        groups.setdefault(tuple((name, nbytes) for name, nbytes, _, _ in ops), []).append(seg)
    out = {}
    for members in groups.values():
        rows = [timed[seg] for seg in members]
        median = [statistics.median(row[k][3] for row in rows) for k in range(len(rows[0]))]
        total = sum(median)
        for seg in members:
            scale = forward_s.get(seg, 0.0) / total if total > 0 else 0.0
            out[seg] = tuple(OpRecord(k, name, nbytes, median[k] * scale, saved)
                             for k, (name, nbytes, saved, _) in enumerate(timed[seg]))
    return out


def attach_ops(profile: Profile, probes: dict[int, OpProbe],
               seconds: Callable[[object], float | None], op_dispatch_s: float = 0.0) -> Profile:
    """`profile` with each probed region segment's ops (`SegmentRecord.ops`, and how many ops
    it dispatches) and `op_dispatch_s`, the seconds per op a selective segment's dispatch modes
    add (`dispatch_overhead_s`)."""
    if not probes:
        return profile
    forward_s = {s.index: s.forward_s for s in profile.segments}
    probed = {i: p for i, p in probes.items() if i < len(profile.segments) and profile.segments[i].recomputable}
    records = op_records(probed, seconds, forward_s)
    return dataclasses.replace(profile, op_dispatch_s=op_dispatch_s, segments=tuple(
        dataclasses.replace(s, ops=records[s.index], dispatched_ops=probed[s.index].dispatched)
        if s.index in records else s for s in profile.segments))
