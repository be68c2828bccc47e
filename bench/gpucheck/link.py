"""The link part: the runtime's own bandwidth probe (offload/bandwidth.py: copies through our
pinned pool on the side streams) against plain torch copies of the same size between one pinned
host tensor and the device, each direction, best of a few runs.

The probe's figures feed the planner; if they fall far below what torch gets from the same link,
the pool is not pinned or its copy path costs too much.
"""
from __future__ import annotations

from typing import Callable

import torch

from offload import HostPool

from ..tables import format_table
from .config import CheckConfig
from .outcome import Finding
from .seams import PROBE_BYTES, UNMEASURED, CudaBackend, measure_link

TITLE = "our pinned-pool probe vs plain torch copies (GB/s)"
SIZES = (PROBE_BYTES, 256 << 20)  # the runtime's own probe size, and one where fixed costs vanish
REPEATS = 5
MIN_RATIO = 0.5  # ours / torch below this at the same size: our path is broken, not just slower


def plan(cfg: CheckConfig) -> dict:
    return dict(sizes_bytes=list(SIZES), repeats=REPEATS, min_ratio=MIN_RATIO,
                ours="offload.transfer.linkprobe.measure_link through a HostPool of 4x the size (CudaBackend side streams)",
                torch="copy_ between a pinned host tensor and a device tensor, CUDA events, best of the repeats")


def _best_seconds(copy: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        copy()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def torch_link(device: torch.device, nbytes: int, repeats: int = REPEATS) -> tuple[float, float]:
    """(D2H, H2D) bytes/s of plain `copy_` between a pinned host tensor and a device tensor."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    with torch.cuda.device(device):
        d2h = _best_seconds(lambda: host.copy_(dev, non_blocking=True), repeats)
        h2d = _best_seconds(lambda: dev.copy_(host, non_blocking=True), repeats)
    return nbytes / d2h, nbytes / h2d


def our_link(device: torch.device, nbytes: int, repeats: int = REPEATS):
    """The runtime's probe (an `offload.transfer.linkprobe.Link`) on a fresh backend and pool."""
    backend = CudaBackend(device)
    return measure_link(backend, HostPool(backend, budget=4 * nbytes), nbytes=nbytes, repeats=repeats)


def run(cfg: CheckConfig, cap_s: float) -> Finding:
    if not cfg.on_cuda:
        return Finding("skipped: needs a CUDA device", skipped=f"needs a CUDA device (--device {cfg.device})")
    device = torch.device(cfg.device)
    rows, problems = [], []
    for nbytes in SIZES:
        link = our_link(device, nbytes)
        if link is UNMEASURED:
            problems.append(f"{nbytes} bytes: the probe could not allocate its pool blocks")
            continue
        t_d2h, t_h2d = torch_link(device, nbytes)
        for direction, ours, theirs in (("d2h", link.d2h_bytes_per_s, t_d2h), ("h2d", link.h2d_bytes_per_s, t_h2d)):
            ratio = ours / theirs
            rows.append(dict(bytes=nbytes, direction=direction, ours_gbps=ours / 1e9, torch_gbps=theirs / 1e9,
                             ratio=ratio, latency_us=link.latency_s * 1e6,
                             min_offload_bytes=link.min_offload_bytes()))
            if ratio < MIN_RATIO:
                problems.append(f"{direction} at {nbytes >> 20} MiB: our probe {ours / 1e9:.1f} GB/s is "
                                f"{ratio:.2f}x torch's {theirs / 1e9:.1f} GB/s")
    big = [r for r in rows if r["bytes"] == max(SIZES)]
    summary = ", ".join(f"{r['direction']} {r['ours_gbps']:.1f} GB/s ours vs {r['torch_gbps']:.1f} torch"
                        for r in big) + f" at {max(SIZES) >> 20} MiB"
    return Finding(summary if big else "not measured", dict(rows=rows), problems)


def markdown(figures: dict) -> str:
    rows = [[f"{r['bytes'] / 2**20:.0f} MiB", r["direction"], f"{r['ours_gbps']:.2f}", f"{r['torch_gbps']:.2f}",
             f"{r['ratio']:.2f}", f"{r['latency_us']:.1f}"] for r in figures.get("rows", [])]
    table = format_table(["size", "direction", "ours GB/s", "torch GB/s", "ours/torch", "our copy latency us"], rows)
    return f"```\n{table}\n```"
