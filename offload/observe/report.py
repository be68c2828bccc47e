"""`Report`: what one step kept, moved and dropped, and how well the moves overlapped.

Printed, it is a table; `to_dict()` / `to_json()` give the same figures for tools;
`save_trace(path)` writes a Chrome trace (Perfetto, chrome://tracing) with the compute, D2H and
H2D streams as tracks and NVML samples as counters; `plot(path)` draws the step (matplotlib).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.runtime import Runtime
    from .monitor import Monitor
    from .stats import StepStats
    from .timeline import ResolvedTimeline


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _ms(s: float | None) -> str:
    return "n/a" if s is None else f"{s * 1e3:.2f} ms"


@dataclass
class Report:
    """The runtime's account of one step (all bytes are distinct storages, times in seconds)."""

    step: int
    policy: str
    backend: str
    forwards: int
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
    prefetch_hits: int
    prefetch_misses: int
    # memory
    host_budget: int
    host_reserved: int
    host_in_use: int
    host_high_water: int
    param_bytes: int | None
    grad_bytes: int | None
    segments: list[dict] = field(default_factory=list)
    # the plan, when policy="auto"
    predicted: dict | None = None
    # verify mode: tensors compared, mismatches, max abs diff, per segment and the first mismatch
    verify: dict | None = None
    # NVML/psutil, when a Monitor is attached
    monitor: dict | None = None
    _timeline: "ResolvedTimeline | None" = field(default=None, repr=False, compare=False)
    _samples: list = field(default_factory=list, repr=False, compare=False)

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
        return cls(
            step=s.step, policy=str(rt.settings.policy_name), backend=backend.name, forwards=s.forwards,
            kept_bytes=s.kept_bytes, offloaded_bytes=s.offloaded_bytes, recomputed_bytes=s.recomputed_bytes,
            fallback_count=s.fallback_count, fallback_bytes=s.fallback_bytes,
            step_s=step_s, forward_s=sum(sp.end - sp.start for sp in fwd),
            backward_s=sum(e - b for b, e in tl.backward),
            recompute_s=sum(sp.end - sp.start for sp in tl.of("compute", "recompute")), replays=s.replays,
            d2h_bytes=s.d2h_bytes, h2d_bytes=s.h2d_bytes, d2h_busy_s=d2h_busy, h2d_busy_s=h2d_busy,
            d2h_gbps=tl.bytes("d2h") / d2h_busy / 1e9 if d2h_busy > 0 else None,
            h2d_gbps=tl.bytes("h2d") / h2d_busy / 1e9 if h2d_busy > 0 else None,
            overlap_fraction=tl.overlap_fraction(), stall_s=tl.stall_s(),
            prefetch_hits=s.prefetch_hits, prefetch_misses=s.prefetch_misses,
            host_budget=rt.settings.host_budget, host_reserved=rt.pool.reserved, host_in_use=s.host_in_use,
            host_high_water=s.host_high_water, param_bytes=params, grad_bytes=grads, segments=segs,
            predicted=rt.policy.prediction(), monitor=monitor, _timeline=tl, _samples=samples,
            verify=s.verify.to_dict() if s.verify is not None else None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_timeline")
        d.pop("_samples")
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def save_trace(self, path: str) -> None:
        """A Chrome trace of the step: compute / D2H / H2D tracks, NVML and RSS as counters."""
        self._timeline.save_trace(path, counters=_counters(self._samples))

    def plot(self, path: str) -> None:
        """A PNG of stream activity and device/host memory over the step (needs matplotlib)."""
        from .plot import plot_step
        plot_step(self._timeline, self._samples, path, title=f"step {self.step}, policy={self.policy}")

    def __str__(self) -> str:
        moved = self.offloaded_bytes > 0
        overlap = "n/a (nothing moved)" if self.overlap_fraction is None else f"{self.overlap_fraction:.0%}"
        rows = [
            ("step", f"{self.step} ({self.forwards} forward(s)), policy={self.policy}, backend={self.backend}"),
            ("step time", f"{_ms(self.step_s)} (forward {_ms(self.forward_s)}, backward {_ms(self.backward_s)}, "
                          f"recompute {_ms(self.recompute_s)} in {self.replays} replays)"),
            ("activations kept on device", fmt_bytes(self.kept_bytes)),
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
                ("reloads prefetched / on demand", f"{self.prefetch_hits} / {self.prefetch_misses}"),
            ]
        rows.append(("host pool high-water / budget",
                     f"{fmt_bytes(self.host_high_water)} / {fmt_bytes(self.host_budget)} "
                     f"(reserved {fmt_bytes(self.host_reserved)}, in use {fmt_bytes(self.host_in_use)})"))
        if self.param_bytes is not None:
            rows.append(("parameters / gradients", f"{fmt_bytes(self.param_bytes)} / {fmt_bytes(self.grad_bytes)}"))
        if self.predicted:
            p = self.predicted
            rows.append(("plan: predicted step / measured", f"{_ms(p.get('step_s'))} / {_ms(self.step_s)}"))
            rows.append(("plan: predicted peak activations", fmt_bytes(p.get("peak_bytes"))))
            rows.append(("plan: offload / recompute predicted", f"{fmt_bytes(p.get('offloaded_bytes'))} / "
                                                                f"{fmt_bytes(p.get('recomputed_bytes'))}"))
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
        shown = [sg for sg in self.segments if sg["kept"] or sg["offloaded"] or sg["recomputed"]]
        if shown:
            lines += ["", f"{'segment':<24} {'kept':>10} {'offloaded':>10} {'recomputed':>10} "
                          f"{'fwd ms':>8} {'bwd ms':>8}"]
            for sg in shown:
                lines.append(f"{sg['name'][:24]:<24} {fmt_bytes(sg['kept']):>10} {fmt_bytes(sg['offloaded']):>10} "
                             f"{fmt_bytes(sg['recomputed']):>10} {_num_ms(sg['forward_s']):>8} "
                             f"{_num_ms(sg['backward_s']):>8}")
        return "\n".join(lines)


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


def _counters(samples) -> list[tuple[float, str, dict[str, Any]]]:
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
