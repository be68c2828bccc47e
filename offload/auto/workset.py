"""Backward's working set, measured per segment.

While a segment's backward runs, the device holds, next to the saved activations the plan
accounts for, the gradients of that segment's activations and the temporaries of its backward
ops (the LM head's fp32 logits gradient alone is twice its saved bytes at long context). The
planner needs these bytes to keep the measured peak, not only the planned one, under the budget.

`WorkingSetProbe` records the allocator's events over one step with the torch profiler
(`profile_memory=True`, the same events `PeakMemory` reads on the CPU) and cuts them at each
segment's backward start, marked with a zero-length `record_function` range on the profiler's own
clock. For each window:

    working set = peak allocated in the window - allocated at its start - bytes recomputed in it

(a recomputed segment's replay re-creates its saved tensors inside its window; the simulator
counts those as saved activations already). It runs on a profiling step only: the profiler's
overhead never touches a timed step. If another profiler is active the probe stands down and the
planner falls back to its estimate.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch

from ..observe.peakmem import quiet_kineto

log = logging.getLogger(__name__)

MARK = "offload::backward "
END = MARK + "(end)"


def window_peaks(events: Iterable[tuple[int, int]], marks: Iterable[tuple[int, str]]) -> dict[str, int]:
    """Peak bytes above each window's starting level.

    `events`: (time ns, +bytes allocated / -bytes freed); `marks`: (time ns, label) where each
    labelled window starts; a window ends at the next mark. The label `END` only closes the last
    window. A label seen in several windows keeps its largest peak."""
    events = sorted(events)
    marks = sorted(marks)
    out: dict[str, int] = {}
    level, i = 0, 0
    for (start, label), (end, _) in zip(marks, marks[1:]):
        while i < len(events) and events[i][0] < start:
            level += events[i][1]
            i += 1
        base = peak = level
        while i < len(events) and events[i][0] < end:
            level += events[i][1]
            peak = max(peak, level)
            i += 1
        if label != END:
            out[label] = max(out.get(label, 0), peak - base)
    return out


class WorkingSetProbe:
    """Profiles the allocator over one step; `stop()` returns each segment's backward peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self._prof = None

    @property
    def active(self) -> bool:
        return self._prof is not None

    def start(self) -> bool:
        """Start recording; False (and nothing recorded) when a profiler is already running."""
        if torch._C._autograd._profiler_enabled():  # the user's own profiler: leave it alone
            log.info("auto: backward working set not measured (a profiler is running); the planner estimates it")
            return False
        quiet_kineto()
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        try:
            prof.__enter__()
        except RuntimeError as e:  # the user's own profiler is running
            log.info("auto: backward working set not measured (%s); the planner estimates it", e)
            return False
        self._prof = prof
        return True

    def mark(self, label: str | None) -> None:
        """A segment's backward starts now (None: the backward ended)."""
        if self._prof is not None:
            with torch.profiler.record_function(END if label is None else MARK + label):
                pass

    def stop(self) -> dict[str, int]:
        """Stop recording: segment label -> peak bytes above its backward's starting level."""
        prof, self._prof = self._prof, None
        if prof is None:
            return {}
        prof.__exit__(None, None, None)
        events, marks = [], []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.name.startswith(MARK):
                marks.append((node.start_time_ns, node.name[len(MARK):] if node.name != END else END))
                continue
            size = getattr(node.extra_fields, "alloc_size", None)
            if size is not None and _on(node.extra_fields, self.device):
                events.append((node.start_time_ns, size))
        return window_peaks(events, marks)


def _on(fields, device: torch.device) -> bool:
    dev = getattr(fields, "device", None)
    if dev is None:
        return device.type == "cpu"
    return dev.type == device.type and (device.index is None or dev.index in (None, device.index))
