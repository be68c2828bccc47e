"""`Report`: what one step kept, moved and dropped, and how well the moves overlapped."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .checkpointer import HybridCheckpointer
    from .stats import StepStats


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@dataclass
class Report:
    """The runtime's account of one step. Print it for a table; `to_dict()` for JSON."""

    step: int
    policy: str
    backend: str
    forwards: int
    kept_bytes: int
    offloaded_bytes: int
    recomputed_bytes: int
    fallback_count: int
    fallback_bytes: int
    d2h_bytes: int
    h2d_bytes: int
    prefetch_hits: int
    prefetch_misses: int
    stall_s: float
    replays: int
    replay_s: float
    host_budget: int
    host_reserved: int
    host_in_use: int
    host_high_water: int
    segments: list[dict] = field(default_factory=list)

    @classmethod
    def build(cls, hc: "HybridCheckpointer", s: "StepStats") -> "Report":
        segs = [dict(index=i, name=b.name, kept=b.kept, offloaded=b.offloaded, recomputed=b.recomputed)
                for i, b in sorted(s.segments.items())]
        return cls(step=s.step, policy=str(hc.policy_name), backend=hc.backend.name, forwards=s.forwards,
                   kept_bytes=s.kept_bytes, offloaded_bytes=s.offloaded_bytes,
                   recomputed_bytes=s.recomputed_bytes, fallback_count=s.fallback_count,
                   fallback_bytes=s.fallback_bytes, d2h_bytes=s.d2h_bytes, h2d_bytes=s.h2d_bytes,
                   prefetch_hits=s.prefetch_hits, prefetch_misses=s.prefetch_misses, stall_s=s.stall_s,
                   replays=s.replays, replay_s=s.replay_s, host_budget=hc.host_budget,
                   host_reserved=hc.host_pool.reserved, host_in_use=s.host_in_use,
                   host_high_water=s.host_high_water, segments=segs)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def __str__(self) -> str:
        rows = [
            ("step", f"{self.step} ({self.forwards} forward(s)), policy={self.policy}, backend={self.backend}"),
            ("kept on device", fmt_bytes(self.kept_bytes)),
            ("offloaded to host", fmt_bytes(self.offloaded_bytes)),
            ("dropped for recompute", f"{fmt_bytes(self.recomputed_bytes)} ({self.replays} replays, "
                                      f"{self.replay_s * 1e3:.1f} ms)"),
            ("fallbacks (pool full)", f"{self.fallback_count} ({fmt_bytes(self.fallback_bytes)})"),
            ("copied D2H / H2D", f"{fmt_bytes(self.d2h_bytes)} / {fmt_bytes(self.h2d_bytes)}"),
            ("reloads prefetched / on demand", f"{self.prefetch_hits} / {self.prefetch_misses}"),
            ("compute blocked on reloads", f"{self.stall_s * 1e3:.2f} ms"),
            ("host pool high-water / budget", f"{fmt_bytes(self.host_high_water)} / {fmt_bytes(self.host_budget)} "
                                              f"(reserved {fmt_bytes(self.host_reserved)}, in use {fmt_bytes(self.host_in_use)})"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.segments:
            lines.append("")
            lines.append(f"{'segment':<28} {'kept':>11} {'offloaded':>11} {'recomputed':>11}")
            for seg in self.segments:
                if seg["kept"] or seg["offloaded"] or seg["recomputed"]:
                    lines.append(f"{seg['name'][:28]:<28} {fmt_bytes(seg['kept']):>11} "
                                 f"{fmt_bytes(seg['offloaded']):>11} {fmt_bytes(seg['recomputed']):>11}")
        return "\n".join(lines)
