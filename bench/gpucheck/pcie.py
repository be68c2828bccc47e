"""The pcie part: the PCIe bytes NVML counted (offload.Monitor) against the bytes the runtime says
it moved (its report's D2H and H2D bytes), over a few offload steps, as a ratio per direction.

NVML counts everything on the link (our copies, the loss read back, kernel launches), so the
ratio sits a little above 1; an idle window of the same sampler gives the background rate. NVML
may be missing or may not expose the counters: the part then says why and is skipped, not failed.
"""
from __future__ import annotations

import time

import torch

from offload import Monitor

from ..contenders import Hybrid
from ..gpt import GPT, GPTConfig
from ..measure import step
from ..presets import Preset
from ..suite import runtime_settings
from ..tables import format_table
from .config import CheckConfig
from .outcome import Finding
from .seams import nvml_status

TITLE = "NVML's PCIe bytes vs the runtime's byte counts"
MODEL = Preset("pcie", "GPT 8 x 1024-wide, 16 x 512 tokens, float32",
               GPTConfig(vocab_size=1024, block_size=512, n_layer=8, n_head=8, n_embd=1024, dropout=0.0),
               GPT, "transformer.h", batch=16, seq=512, min_offload_bytes=1 << 20, host_budget="8GiB")
STEPS = 3
INTERVAL_S = 0.01  # a 32-bit counter wraps after 68 ms at Gen5 x16's 63 GB/s: sample well inside that
IDLE_S = 0.5


def plan(cfg: CheckConfig) -> dict:
    return dict(model=MODEL.description, policy="offload", steps=STEPS, interval_s=INTERVAL_S, idle_s=IDLE_S,
                ours="sum over the steps of hc.report() d2h_bytes / h2d_bytes",
                nvml="offload.Monitor summary pcie_tx_bytes / pcie_rx_bytes over the same window")


def _idle_rate(device: torch.device) -> float | None:
    """Bytes/s NVML counts in both directions while this process does nothing."""
    with Monitor(device, interval_s=INTERVAL_S) as mon:
        time.sleep(IDLE_S)
    s = mon.summary()
    if s["pcie_tx_bytes"] is None or s["pcie_rx_bytes"] is None or not s["duration_s"]:
        return None
    return (s["pcie_tx_bytes"] + s["pcie_rx_bytes"]) / s["duration_s"]


def run(cfg: CheckConfig, cap_s: float) -> Finding:
    if not cfg.on_cuda:
        return Finding("skipped: needs a CUDA device", skipped=f"needs a CUDA device (--device {cfg.device})")
    ok, reason = nvml_status()
    if not ok:
        return Finding(f"skipped: {reason}", dict(nvml_reason=reason), skipped=reason)
    device = torch.device(cfg.device)
    att = Hybrid("offload", runtime_settings(MODEL)).attach(MODEL.build(device), MODEL.blocks)
    batch = MODEL.batch_for(device)
    step(att, batch)  # warm-up, outside the window
    torch.cuda.synchronize(device)
    idle = _idle_rate(device)
    ours = {"d2h": 0, "h2d": 0}
    with Monitor(device, interval_s=INTERVAL_S) as mon:
        for _ in range(STEPS):
            step(att, batch)
            rep = att.report()
            ours["d2h"] += rep["d2h_bytes"]
            ours["h2d"] += rep["h2d_bytes"]
        torch.cuda.synchronize(device)
    att.close()
    s = mon.summary()
    if not s["nvml_available"]:
        return Finding(f"skipped: {s['nvml_reason']}", dict(nvml_reason=s["nvml_reason"]), skipped=s["nvml_reason"])
    rows, problems = [], []
    for direction, key in (("d2h", "pcie_tx"), ("h2d", "pcie_rx")):
        nvml = s[f"{key}_bytes"]
        ratio = nvml / ours[direction] if nvml is not None and ours[direction] else None
        rows.append(dict(direction=direction, ours_bytes=ours[direction], nvml_bytes=nvml, ratio=ratio,
                         source=s[f"{key}_source"], nvml_peak_gbps=s[f"{key}_peak_gbps"]))
        if not ours[direction]:
            problems.append(f"{direction}: the offload policy moved no bytes")
    figures = dict(rows=rows, window_s=s["duration_s"], samples=s["samples"], idle_bytes_per_s=idle,
                   link_gen=s["pcie_link_gen"], link_width=s["pcie_link_width"])
    if all(r["nvml_bytes"] is None for r in rows):
        why = "NVML gave neither PCIe byte counters nor throughput on this device"
        return Finding(f"skipped: {why}", figures, skipped=why)
    summary = ", ".join(f"{r['direction']} NVML/ours = {r['ratio']:.3f} ({r['source']})" if r["ratio"] is not None
                        else f"{r['direction']} not counted" for r in rows)
    return Finding(summary, figures, problems)


def markdown(figures: dict) -> str:
    rows = [[r["direction"], f"{r['ours_bytes'] / 2**30:.2f}",
             "-" if r["nvml_bytes"] is None else f"{r['nvml_bytes'] / 2**30:.2f}",
             "-" if r["ratio"] is None else f"{r['ratio']:.3f}", str(r["source"])] for r in figures.get("rows", [])]
    table = format_table(["direction", "ours GiB", "NVML GiB", "NVML / ours", "NVML source"], rows)
    idle = figures.get("idle_bytes_per_s")
    return (f"```\n{table}\n```\nwindow {figures.get('window_s', 0):.2f} s, {figures.get('samples')} samples; "
            f"link Gen{figures.get('link_gen')} x{figures.get('link_width')}; idle NVML traffic "
            f"{'-' if idle is None else f'{idle / 1e6:.1f} MB/s'}")
