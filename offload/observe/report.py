"""`Report`: what one step kept, moved and dropped, and how well the moves overlapped.

Printed, it is a table; `to_dict()` / `to_json()` give the same figures for tools;
`save_trace(path)` writes a Chrome trace (Perfetto, chrome://tracing) with the compute, D2H and
H2D streams as tracks and NVML samples as counters, on torch.profiler's clock; `plot(path)` draws
the step (matplotlib).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .units import fmt_bytes, fmt_error, fmt_ms as _ms

if TYPE_CHECKING:
    from ..core.runtime import Runtime
    from .monitor import Monitor
    from .stats import StepStats
    from .timeline import ResolvedTimeline

@dataclass
class Report:
    """The runtime's account of one step (all bytes are distinct storages, times in seconds)."""

    step: int
    policy: str
    backend: str
    forwards: int
    in_flight: int  # the most of the step's forwards in flight at once (pipeline micro-batches)
    # what happened to the saved activations
    kept_bytes: int
    offloaded_bytes: int
    recomputed_bytes: int
    fallback_count: int
    fallback_bytes: int
    # the step's timeline
    step_s: float | None
    forward_s: float
    backward_s: float
    recompute_s: float
    replays: int
    d2h_bytes: int
    h2d_bytes: int
    d2h_busy_s: float
    h2d_busy_s: float
    d2h_gbps: float | None  # achieved: bytes / time the stream was busy
    h2d_gbps: float | None
    overlap_fraction: float | None  # transfer time hidden under compute; None if nothing moved
    stall_s: float  # compute waiting on reloads
    budget_waits: int  # lagging copies waited for (forward, prefetch) to hold the device budget (Rule 10)
    budget_wait_s: float
    prefetch_hits: int
    prefetch_misses: int
    # memory
    host_budget: int
    host_reserved: int
    host_in_use: int
    host_high_water: int
    param_bytes: int | None
    grad_bytes: int | None
    # the device budget against saved activations on the device, measured over the step
    device_budget: int  # bytes in force (the user's, or free device memory less headroom now)
    device_budget_default: bool  # True: no device_budget was given
    saved_peak_bytes: int  # kept + in flight + reloaded + recomputed, at the worst moment
    saved_peak_parts: dict  # those four at that moment
    over_budget: bool
    min_offload_bytes: int
    small_count: int  # storages kept because they are below min_offload_bytes
    small_bytes: int
    segments: list[dict] = field(default_factory=list)
    # the plan, when policy="auto": `planview.describe`'s figures, per-segment rows and notes,
    # plus step_error / peak_error: measured / predicted - 1
    predicted: dict | None = None
    # policy="auto": profiling steps so far (profiling_steps), shapes profiled, plans made from
    # the shape fit with no profiling step (fitted_plans), where this step's plan came from
    # (plan_source: "fit" or "profile", None while profiling) and, for a plan from the fit, its
    # saved bytes measured / predicted - 1 (fit_error)
    shapes: dict | None = None
    # verify mode: tensors compared, mismatches, max abs diff, per segment and the first mismatch
    verify: dict | None = None
    # NVML/psutil, when a Monitor is attached
    monitor: dict | None = None
    _timeline: "ResolvedTimeline | None" = field(default=None, repr=False, compare=False)
    _samples: list = field(default_factory=list, repr=False, compare=False)
    _saved_series: list = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def build(cls, rt: "Runtime", s: "StepStats", monitor_: "Monitor | None" = None) -> "Report":
        """The report of step `s` of runtime `rt` (with `monitor_`'s samples over the step, if any)."""
        backend = rt.backend
        backend.settle()
        tl = s.timeline.resolve(backend)
        fwd = [sp for sp in tl.of("compute", "forward")]
        bwd_end = max((e for _, e in tl.backward), default=None)
        start = min((sp.start for sp in fwd), default=None)
        end = bwd_end if bwd_end is not None else max((sp.end for sp in fwd), default=None)
        step_s = end - start if start is not None and end is not None else None
        bwd_by_seg: dict[str, float] = {}
        for sp in tl.of("compute", "backward"):
            bwd_by_seg[sp.label] = bwd_by_seg.get(sp.label, 0.0) + sp.end - sp.start
        fwd_by_seg: dict[str, float] = {}
        for sp in fwd:
            fwd_by_seg[sp.label] = fwd_by_seg.get(sp.label, 0.0) + sp.end - sp.start
        segs = [dict(index=i, name=b.name, kept=b.kept, offloaded=b.offloaded, recomputed=b.recomputed,
                     forward_s=fwd_by_seg.get(b.name), backward_s=bwd_by_seg.get(b.name))
                for i, b in sorted(s.segments.items())]
        d2h_busy, h2d_busy = tl.busy_s("d2h"), tl.busy_s("h2d")
        params, grads = _param_and_grad_bytes(rt.settings.model)
        samples, monitor = [], None
        if monitor_ is not None:
            from .monitor import summarize
            lo, hi = tl.bounds if tl.bounds else (float("-inf"), float("inf"))
            samples = [x for x in monitor_.samples if lo <= x.time_s <= hi]
            monitor = summarize(samples) if samples else {"samples": 0}
            monitor["nvml_available"] = monitor_.nvml_available
            monitor["nvml_reason"] = monitor_.nvml_reason
        budget = rt.device_budget()
        predicted = rt.policy.prediction()
        if predicted is not None:
            # The plan predicts one forward's step and bytes (and, with forwards in flight, the
            # stage's peak): a step of several forwards (micro-batches) is compared per forward.
            per = max(1, s.forwards)
            predicted["step_error"] = (step_s / per / predicted["step_s"] - 1
                                       if step_s and predicted["step_s"] else None)
            predicted["peak_error"] = (s.saved_peak_bytes / predicted["peak_bytes"] - 1
                                       if predicted["peak_bytes"] else None)
        return cls(
            step=s.step, policy=str(rt.settings.policy_name), backend=backend.name, forwards=s.forwards,
            in_flight=s.in_flight,
            kept_bytes=s.kept_bytes, offloaded_bytes=s.offloaded_bytes, recomputed_bytes=s.recomputed_bytes,
            fallback_count=s.fallback_count, fallback_bytes=s.fallback_bytes,
            step_s=step_s, forward_s=sum(sp.end - sp.start for sp in fwd),
            backward_s=sum(e - b for b, e in tl.backward),
            recompute_s=sum(sp.end - sp.start for sp in tl.of("compute", "recompute")), replays=s.replays,
            d2h_bytes=s.d2h_bytes, h2d_bytes=s.h2d_bytes, d2h_busy_s=d2h_busy, h2d_busy_s=h2d_busy,
            d2h_gbps=tl.bytes("d2h") / d2h_busy / 1e9 if d2h_busy > 0 else None,
            h2d_gbps=tl.bytes("h2d") / h2d_busy / 1e9 if h2d_busy > 0 else None,
            overlap_fraction=tl.overlap_fraction(), stall_s=tl.stall_s(),
            budget_waits=s.budget_waits, budget_wait_s=s.budget_wait_s,
            prefetch_hits=s.prefetch_hits, prefetch_misses=s.prefetch_misses,
            host_budget=rt.settings.host_budget, host_reserved=rt.pool.reserved, host_in_use=s.host_in_use,
            host_high_water=s.host_high_water, param_bytes=params, grad_bytes=grads,
            device_budget=budget, device_budget_default=rt.settings.device_budget is None,
            saved_peak_bytes=s.saved_peak_bytes, saved_peak_parts=dict(s.saved_peak_parts),
            over_budget=s.saved_peak_bytes > budget, min_offload_bytes=rt.settings.min_offload_bytes,
            small_count=s.small_count, small_bytes=s.small_bytes, segments=segs,
            predicted=predicted, shapes=rt.policy.shapes(), monitor=monitor, _timeline=tl, _samples=samples,
            _saved_series=list(s.saved_series),
            verify=s.verify.to_dict() if s.verify is not None else None)

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("_timeline", "_samples", "_saved_series"):
            d.pop(name)
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def save_trace(self, path: str, profiler: Any = None) -> None:
        """A Chrome trace of the step: compute / D2H / H2D tracks, saved activations, NVML and RSS
        as counters, on torch.profiler's clock. `profiler`: a finished `torch.profiler.profile`,
        or the path of its exported trace; the file then holds its events and ours, aligned."""
        from .trace import StepTrace, write_trace
        write_trace(path, [StepTrace(self.step, self._timeline, self._saved_series)], self._samples, profiler)

    def plot(self, path: str) -> None:
        """A PNG of the streams and of saved activations on the device against the device budget
        over the step (and NVML / RSS samples when a Monitor is attached); needs matplotlib."""
        from .plot import plot_step
        plot_step(self._timeline, self._samples, path, **self._plot_args())

    def figure(self):
        """The figure `plot` saves, as a matplotlib Figure to adjust or show (close it when done)."""
        from .plot import step_figure
        return step_figure(self._timeline, self._samples, **self._plot_args())

    def _plot_args(self) -> dict:
        return dict(title=f"step {self.step}, policy={self.policy}", saved_series=self._saved_series,
                    device_budget=self.device_budget)

    def __str__(self) -> str:
        moved = self.offloaded_bytes > 0
        overlap = "n/a (nothing moved)" if self.overlap_fraction is None else f"{self.overlap_fraction:.0%}"
        rows = [
            ("step", f"{self.step} ({self.forwards} forward(s){_in_flight(self.in_flight)}), "
                     f"policy={self.policy}, backend={self.backend}"),
            ("step time", f"{_ms(self.step_s)} (forward {_ms(self.forward_s)}, backward {_ms(self.backward_s)}, "
                          f"recompute {_ms(self.recompute_s)} in {self.replays} replays)"),
            ("device budget", fmt_bytes(self.device_budget)
             + (" (none given: free device memory less 10%, now)" if self.device_budget_default else "")),
            ("saved activations, peak", self._peak_line()),
            ("activations kept on device", fmt_bytes(self.kept_bytes)),
        ]
        if self.small_count:
            rows.append((f"below min_offload_bytes ({fmt_bytes(self.min_offload_bytes)})",
                         f"{self.small_count} tensors, {fmt_bytes(self.small_bytes)} kept (too small to be "
                         f"worth a copy)"))
        rows += [
            ("offloaded to host", fmt_bytes(self.offloaded_bytes)),
            ("dropped for recompute", fmt_bytes(self.recomputed_bytes)),
            ("fallbacks (host pool full)", f"{self.fallback_count} ({fmt_bytes(self.fallback_bytes)})"),
        ]
        if moved:
            rows += [
                ("D2H copied / busy / rate", f"{fmt_bytes(self.d2h_bytes)} / {_ms(self.d2h_busy_s)} / "
                                             f"{_gbps(self.d2h_gbps)}"),
                ("H2D copied / busy / rate", f"{fmt_bytes(self.h2d_bytes)} / {_ms(self.h2d_busy_s)} / "
                                             f"{_gbps(self.h2d_gbps)}"),
                ("overlap (copies hidden)", overlap),
                ("compute stalled on reloads", _ms(self.stall_s)),
                ("waited on lagging copies", f"{self.budget_waits} copies, {_ms(self.budget_wait_s)} "
                                             f"(to hold the device budget)"),
                ("reloads prefetched / on demand", f"{self.prefetch_hits} / {self.prefetch_misses}"),
            ]
        rows.append(("host pool high-water / budget",
                     f"{fmt_bytes(self.host_high_water)} / {fmt_bytes(self.host_budget)} "
                     f"(reserved {fmt_bytes(self.host_reserved)}, in use {fmt_bytes(self.host_in_use)})"))
        if self.param_bytes is not None:
            rows.append(("parameters / gradients", f"{fmt_bytes(self.param_bytes)} / {fmt_bytes(self.grad_bytes)}"))
        if self.predicted:
            p, per = self.predicted, max(1, self.forwards)
            each = f" per forward of {per}" if per > 1 else ""
            step = None if self.step_s is None else self.step_s / per
            rows.append(("plan: step predicted / measured", f"{_ms(p['step_s'])} / {_ms(step)}{each} "
                                                            f"({fmt_error(step, p['step_s'])})"))
            rows.append(("plan: peak predicted / measured", f"{fmt_bytes(p['peak_bytes'])} / "
                                                            f"{fmt_bytes(self.saved_peak_bytes)} "
                                                            f"({fmt_error(self.saved_peak_bytes, p['peak_bytes'])})"))
            rows.append(("plan: offloaded predicted / measured", f"{fmt_bytes(p['offloaded_bytes'])} / "
                                                                 f"{fmt_bytes(self.offloaded_bytes // per)}{each}"))
            rows.append(("plan: recomputed predicted / measured", f"{fmt_bytes(p['recomputed_bytes'])} / "
                                                                  f"{fmt_bytes(self.recomputed_bytes // per)}{each}"))
        if self.shapes is not None:
            rows += _shape_rows(self.shapes)
        if self.monitor is not None:
            m = self.monitor
            if m.get("nvml_available"):
                rows.append(("NVML: PCIe TX / RX", f"{fmt_bytes(m.get('pcie_tx_bytes'))} / {fmt_bytes(m.get('pcie_rx_bytes'))}"))
                rows.append(("NVML: peak device used", fmt_bytes(m.get("peak_device_used_bytes"))))
            else:
                rows.append(("NVML", m.get("nvml_reason") or "unavailable"))
            rows.append(("host RSS peak", fmt_bytes(m.get("peak_rss_bytes"))))
        if self.verify is not None:
            v = self.verify
            rows.append(("verify: compared / mismatches", f"{v['compared']} / {v['mismatches']} "
                                                          f"(max abs diff {v['max_abs_diff']:.3g})"))
            first = v["first_mismatch"]
            if first:
                rows.append(("verify: first mismatch", f"{first['action']} #{first['index']} of {first['segment']}, "
                                                       f"{first['op']}, max abs diff {first['max_abs_diff']:.3g}"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.predicted:
            from .planview import format_plan
            lines += ["", format_plan(self.predicted)]
        shown = [sg for sg in self.segments if sg["kept"] or sg["offloaded"] or sg["recomputed"]]
        if shown:
            lines += ["", f"{'segment':<24} {'kept':>10} {'offloaded':>10} {'recomputed':>10} "
                          f"{'fwd ms':>8} {'bwd ms':>8}"]
            for sg in shown:
                lines.append(f"{sg['name'][:24]:<24} {fmt_bytes(sg['kept']):>10} {fmt_bytes(sg['offloaded']):>10} "
                             f"{fmt_bytes(sg['recomputed']):>10} {_num_ms(sg['forward_s']):>8} "
                             f"{_num_ms(sg['backward_s']):>8}")
        return "\n".join(lines)


    def _peak_line(self) -> str:
        parts = ", ".join(f"{kind.replace('_', ' ')} {fmt_bytes(n)}" for kind, n in self.saved_peak_parts.items())
        if self.over_budget:
            verdict = f"over the device budget by {fmt_bytes(self.saved_peak_bytes - self.device_budget)}"
        else:
            share = self.saved_peak_bytes / self.device_budget if self.device_budget else 0.0
            verdict = f"within the device budget ({share:.0%} of it)"
        return f"{fmt_bytes(self.saved_peak_bytes)} measured, {verdict}; at the peak: {parts or 'nothing'}"


def _shape_rows(sh: dict) -> list[tuple[str, str]]:
    """policy="auto": profiling steps, and whether this step's plan came from the shape fit."""
    rows = [("auto: profiling steps", f"{sh['profiling_steps']} ({sh['profiled_shapes']} shape(s) profiled); "
                                      f"{sh['fitted_plans']} plan(s) from the shape fit, with no profiling step")]
    source = sh["plan_source"]
    if source == "fit":
        error = "" if sh["fit_error"] is None else f" (saved bytes measured vs predicted {sh['fit_error']:+.2%})"
        rows.append(("auto: this plan", "from the shape fit" + error))
    elif source == "profile":
        rows.append(("auto: this plan", "from a profiling step of this shape"))
    else:
        rows.append(("auto: this plan", "none yet: this step profiled"))
    return rows


def _gbps(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} GB/s"


def _num_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.2f}"


def _param_and_grad_bytes(model) -> tuple[int | None, int | None]:
    """Bytes of this rank's parameters and gradients (local shards under FSDP), each storage once."""
    if model is None:
        return None, None
    from torch.multiprocessing.reductions import StorageWeakRef

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t  # DTensor: this rank's shard

    params, grads = {}, {}
    for p in model.parameters():
        t = local(p)
        params[StorageWeakRef(t.untyped_storage())] = t.untyped_storage().nbytes()
        if p.grad is not None:
            g = local(p.grad)
            grads[StorageWeakRef(g.untyped_storage())] = g.untyped_storage().nbytes()
    return sum(params.values()), sum(grads.values())


def _in_flight(n: int) -> str:
    """", at most N in flight" when forwards overlapped (pipeline micro-batches)."""
    return f", at most {n} in flight" if n > 1 else ""
