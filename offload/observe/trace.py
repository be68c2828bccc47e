"""Chrome traces of the runtime's steps, on torch.profiler's clock; one step or several.

The clock. Our timeline is in `time.perf_counter()` seconds (CLOCK_MONOTONIC). torch.profiler
(kineto) stamps its events with CLOCK_REALTIME nanoseconds and writes them to its Chrome trace as
`ts = (ns - baseTimeNanoseconds) / 1000` microseconds, with `baseTimeNanoseconds` in the file.
`TraceClock` measures the offset between the two clocks (the closest of a few paired readings)
and writes our events the same way, so that:
- a trace of ours alone carries its own `baseTimeNanoseconds`: `ts * 1000 + base` is wall-clock ns;
- with `profiler=` (a finished `torch.profiler.profile`, or the path of its exported trace) one
  file holds the profiler's events and ours on its base: Perfetto shows them on one timeline.
A step of the wall clock (NTP) between a step and its save shifts our events by that step.

Tracks: "steps" (one span per step), the compute stream (forward / backward / recompute / stall
spans per segment), the D2H and H2D streams (every copy with its bytes); counters: saved
activations on the device (the runtime's measured count) and, with a Monitor, NVML and RSS.
"""
from __future__ import annotations

import collections
import gzip
import json
import os
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from ..core.errors import OffloadError
from .timeline import ResolvedTimeline

if TYPE_CHECKING:
    from .stats import StepStats

PROCESS = "offload runtime"
TRACKS = {"step": (0, "steps"), "compute": (1, "compute stream"), "d2h": (2, "D2H stream"),
          "h2d": (3, "H2D stream")}


@dataclass(frozen=True)
class TraceClock:
    """`time.perf_counter()` seconds to Chrome-trace microseconds on a kineto-style base."""

    offset_ns: int  # CLOCK_REALTIME minus perf_counter, nanoseconds
    base_ns: int  # the trace's baseTimeNanoseconds

    @classmethod
    def measure(cls, base_ns: int | None = None, first_s: float | None = None) -> "TraceClock":
        """The clocks' offset now; `base_ns` None: the whole second of wall time before `first_s`."""
        best = None
        for _ in range(8):
            a = time.perf_counter_ns()
            wall = time.time_ns()
            b = time.perf_counter_ns()
            if best is None or b - a < best[0]:
                best = (b - a, wall - (a + b) // 2)
        offset = best[1]
        if base_ns is None:
            first_ns = round(first_s * 1e9) + offset if first_s is not None else time.time_ns()
            base_ns = first_ns // 10**9 * 10**9
        return cls(offset, base_ns)

    def us(self, t_s: float) -> float:
        return (round(t_s * 1e9) + self.offset_ns - self.base_ns) / 1e3


@dataclass
class StepTrace:
    """One step to write: its number, its resolved timeline, its saved-bytes curve."""

    step: int
    timeline: ResolvedTimeline
    saved_series: Sequence[tuple[float, int]] = ()


def write_trace(path: str | os.PathLike, steps: Sequence[StepTrace], samples: Sequence = (),
                profiler: Any = None) -> None:
    """Write `steps` (and the monitor's `samples` as counters) as one Chrome trace at `path`,
    merged into `profiler`'s trace when given (see the module docstring)."""
    trace = _profiler_trace(profiler) if profiler is not None else None
    starts = [sp.start for st in steps for sp in st.timeline.spans] + [t for st in steps for t, _ in st.saved_series]
    clock = TraceClock.measure(None if trace is None else trace.get("baseTimeNanoseconds", 0),
                               min(starts, default=None))
    if trace is None:
        trace, pid = {"traceEvents": [], "displayTimeUnit": "ms", "baseTimeNanoseconds": clock.base_ns}, 1
    else:
        pids = [e["pid"] for e in trace.get("traceEvents", []) if isinstance(e.get("pid"), int)]
        pid = max(pids, default=0) + 1
        trace.setdefault("traceEvents", [])
    trace["traceEvents"].extend(chrome_events(steps, samples, clock, pid))
    with open(path, "w") as f:
        json.dump(trace, f)


def chrome_events(steps: Sequence[StepTrace], samples: Sequence, clock: TraceClock, pid: int) -> list[dict]:
    """Our process, its tracks and, per step, its spans and counters as Chrome trace events."""
    events: list[dict] = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": PROCESS}}]
    for tid, name in TRACKS.values():
        events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}})
        events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
    for st in steps:
        bounds = st.timeline.bounds
        if bounds is not None:
            events.append(_span(pid, "step", "step", f"step {st.step}", bounds[0], bounds[1], clock, st.step))
        for s in st.timeline.spans:
            events.append(_span(pid, s.track, s.kind, f"{s.kind} {s.label}".strip(), s.start, s.end, clock,
                                st.step, s.nbytes))
        for t, nbytes in st.saved_series:
            events.append({"ph": "C", "pid": pid, "name": "saved activations (MiB)", "ts": clock.us(t),
                           "args": {"saved": nbytes / 2**20}})
    for t, name, values in monitor_counters(samples):
        events.append({"ph": "C", "pid": pid, "name": name, "ts": clock.us(t), "args": values})
    return events


def _span(pid: int, track: str, kind: str, name: str, start: float, end: float, clock: TraceClock,
          step: int, nbytes: int = 0) -> dict:
    args = {"step": step}
    if nbytes:
        args["bytes"] = nbytes
    ts = clock.us(start)
    return {"ph": "X", "pid": pid, "tid": TRACKS[track][0], "cat": kind, "name": name, "ts": ts,
            "dur": max(0.0, clock.us(end) - ts), "args": args}


def _profiler_trace(profiler: Any) -> dict:
    """The Chrome trace of a finished torch.profiler.profile, or of the file it was exported to."""
    if isinstance(profiler, (str, os.PathLike)):
        opener = gzip.open if str(profiler).endswith(".gz") else open
        with opener(profiler, "rt") as f:
            return json.load(f)
    if hasattr(profiler, "export_chrome_trace"):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "profiler.json")
            try:
                profiler.export_chrome_trace(path)
            except RuntimeError as exc:  # torch exports a profile's trace once
                raise OffloadError(f"save_trace(profiler=...): torch.profiler could not export this profile's "
                                   f"trace ({exc}); torch exports a trace only once, so pass the path it was "
                                   f"exported to: save_trace(path, profiler='trace.json')") from exc
            with open(path) as f:
                return json.load(f)
    raise TypeError(f"save_trace(profiler={profiler!r}): expected a finished torch.profiler.profile or the "
                    f"path of the Chrome trace it exported")


def monitor_counters(samples: Sequence) -> list[tuple[float, str, dict[str, Any]]]:
    """A Monitor's samples as (time, counter name, {series: value}): RSS, NVML memory and PCIe."""
    out = []
    prev = None
    for x in samples:
        if x.rss_bytes is not None:
            out.append((x.time_s, "host RSS (MiB)", {"rss": x.rss_bytes / 2**20}))
        r = x.nvml
        if r is not None:
            if r.memory_used_bytes is not None:
                series = {"used": r.memory_used_bytes / 2**20}
                if r.memory_reserved_bytes is not None:
                    series["reserved"] = r.memory_reserved_bytes / 2**20
                out.append((x.time_s, "device memory (MiB)", series))
            if prev is not None and prev.nvml is not None:
                from .nvml import pcie_delta
                tx, rx = pcie_delta(prev.nvml, r)
                dt = x.time_s - prev.time_s
                if tx is not None and rx is not None and dt > 0:
                    out.append((x.time_s, "PCIe (GB/s)", {"tx": tx / dt / 1e9, "rx": rx / dt / 1e9}))
            elif r.pcie_tx_kbps is not None and r.pcie_rx_kbps is not None:
                out.append((x.time_s, "PCIe (GB/s)", {"tx": r.pcie_tx_kbps * 1024 / 1e9,
                                                      "rx": r.pcie_rx_kbps * 1024 / 1e9}))
        prev = x
    return out


class TraceRecorder:
    """The last `steps` steps of a checkpointer, written as one trace.

        rec = offload.TraceRecorder(hc, steps=4)
        for batch in loader:
            ...                              # forward under `with hc:`, backward
        rec.save("steps.json")               # or rec.save(path, profiler=prof) to merge

    It holds at most `steps` finished steps (their marks and copy events and saved-bytes curves;
    no tensors) besides the runtime's current one, and lets older ones go. `close()` stops
    recording and keeps what was recorded; a recorder that is dropped stops by itself.
    """

    def __init__(self, checkpointer, steps: int = 8):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"TraceRecorder(steps={steps!r}): expected an int >= 1 (steps kept for the trace)")
        runtime = getattr(checkpointer, "_runtime", None)
        if runtime is None or not hasattr(runtime, "step_listeners"):
            raise TypeError(f"TraceRecorder(checkpointer=...): expected an offload.HybridCheckpointer, "
                            f"got {type(checkpointer).__name__}")
        self.steps = steps
        self._checkpointer = checkpointer
        self._runtime = runtime
        self._done: collections.deque = collections.deque(maxlen=steps)
        self._listener: weakref.WeakMethod | None = weakref.WeakMethod(self._add)
        runtime.step_listeners.append(self._listener)

    def _add(self, stats: "StepStats") -> None:
        self._done.append(stats)

    def recorded(self) -> list["StepStats"]:
        """The steps a save would write, oldest first (the current one too, once it ran forward)."""
        held = list(self._done)
        if self._listener is not None:
            current = self._runtime.finish_step()
            if current.forwards and (not held or held[-1] is not current):
                held.append(current)
        return held[-self.steps:]

    def save(self, path: str | os.PathLike, profiler: Any = None) -> None:
        """Write the recorded steps as one Chrome trace (merged into `profiler`'s when given)."""
        rt = self._runtime
        rt.backend.settle()
        steps = [StepTrace(s.step, s.timeline.resolve(rt.backend), list(s.saved_series)) for s in self.recorded()]
        samples = []
        monitor = getattr(self._checkpointer, "monitor", None)
        spans = [sp for st in steps for sp in st.timeline.spans]
        if monitor is not None and spans:
            lo, hi = min(sp.start for sp in spans), max(sp.end for sp in spans)
            samples = [x for x in monitor.samples if lo <= x.time_s <= hi]
        write_trace(path, steps, samples, profiler)

    def close(self) -> None:
        """Stop recording; the steps recorded so far (the current one included) stay savable."""
        if self._listener is None:
            return
        held = self.recorded()
        self._done = collections.deque(held, maxlen=self.steps)
        try:
            self._runtime.step_listeners.remove(self._listener)
        except ValueError:
            pass
        self._listener = None
